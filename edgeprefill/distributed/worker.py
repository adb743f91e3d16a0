"""One runahead rank: `python -m edgeprefill.distributed.worker` (started by launch.py). It
runs a file of prefill jobs once, or, with --serve FOLDER, stays up and runs job files as they
appear there (pool.RunaheadPool); the rank that ends with a job's cache writes the result."""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from edgeprefill.distributed.launch import BACKENDS, PARENT_ENV
from edgeprefill.distributed.partition import mixed_partition, partition_from_table
from edgeprefill.errors import EdgeprefillError

LINK_BYTES = (1 << 10, 1 << 16, 1 << 20, 1 << 23, 1 << 26)


def time_link(group, sizes_bytes=LINK_BYTES, repeats=5, handoff="sendrecv"):
    """The last two ranks bounce messages of each size; the last rank returns the best round
    trip per size (the other ranks return None). With the all-sum hand-off (two ranks), twice
    the best all-sum time."""
    import time

    import mlx.core as mx

    r, a, b = group.rank(), group.size() - 2, group.size() - 1
    if handoff != "allsum" and r not in (a, b):
        return None

    def exchange(x):
        """One round trip (all-sum: one exchange, counted twice)."""
        if handoff == "allsum":
            mx.eval(mx.distributed.all_sum(x, group=group))
        elif r == a:
            mx.eval(mx.distributed.send(x, b, group=group))
            mx.eval(mx.distributed.recv_like(x, b, group=group))
        else:
            mx.eval(mx.distributed.send(mx.distributed.recv_like(x, a, group=group), a,
                                        group=group))

    out = []
    for nbytes in sizes_bytes:
        x = mx.zeros((nbytes // 2,), dtype=mx.float16)
        mx.eval(x)
        times = []
        for _ in range(repeats + 1):  # the first exchange warms the connection
            t0 = time.perf_counter()
            exchange(x)
            times.append(time.perf_counter() - t0)
        out.append({"bytes": nbytes, "round_trip_s": min(times[1:]) * (
            2 if handoff == "allsum" else 1)})
    return out if r == b else None


def handoff_for(backend):
    """allsum on NCCL when MLX's GPU backend lacks Send/Recv (CUDA), else sendrecv."""
    import mlx.core as mx

    return "allsum" if backend == "nccl" and mx.cuda.is_available() else "sendrecv"


_KVP = {}  # (pair, tail) -> KVPrediction, loaded once per worker process


def job_strategy(lm, group, job, handoff):
    """The strategy object of one job on this rank (runahead-kvp loads its pair once)."""
    from edgeprefill.prefill.runahead import RunaheadKVPrediction, RunaheadPrefill, TspPrefill

    if job.get("sizes"):
        sizes = job["sizes"]
    elif job.get("alpha") is not None:
        alpha = job["alpha"]
        sizes = lambda n, p: mixed_partition(n, p, lm.config, alpha)  # noqa: E731
    elif job["strategy"] != "tsp":  # the tuned table (the aux's tokens for runahead-kvp)
        sizes = lambda n, p: partition_from_table(lm.model_id, n, p, lm.config,  # noqa: E731
                                                  warn=group.rank() == 0)
    else:
        sizes = None
    if job["strategy"] == "runahead-kvp":
        key = (job["artifact"], job.get("tail"))
        if key not in _KVP:
            from edgeprefill.prefill.registry import build

            _KVP[key] = build("kvp", lm, kvp=key[0], kvp_tail=key[1])
        return RunaheadKVPrediction(_KVP[key], group, sizes, handoff=handoff)
    cls = RunaheadPrefill if job["strategy"] == "runahead" else TspPrefill
    return cls(lm.model, group, sizes, handoff=handoff)


def write_result(path, result, cache, logits):
    """The rank that ends with a job's cache saves it: logits, each layer's keys and values
    (and the aux cache's, for runahead-kvp), the result dict in the metadata; atomically."""
    import mlx.core as mx

    arrays = {"logits": logits}
    for prefix, layers in (("", cache), ("aux.", getattr(cache, "aux", None) or [])):
        for i, c in enumerate(layers):
            arrays[f"{prefix}{i}.keys"], arrays[f"{prefix}{i}.values"] = c.keys_and_values()
    path = Path(path)
    tmp = path.with_name(f".{path.name}")
    mx.save_safetensors(str(tmp), arrays, metadata={"result": json.dumps(result)})
    os.replace(tmp, path)


def run_job(lm, group, job, index, handoff):
    """Run one prefill job on this rank: (result dict or None, cache, logits); the result,
    cache and logits come back on the rank that ends with the cache. A job's optional
    "continuation" (token ids) adds the teacher-forced mean NLL over the cache it made."""
    import mlx.core as mx

    from edgeprefill.prefill.full import FullPrefill
    from edgeprefill.prefill.runahead import kvp_runahead_bytes, runahead_bytes

    ids = job["ids"]
    strategy = job_strategy(lm, group, job, handoff)
    times = []
    for _ in range(max(1, job.get("trials") or 1)):
        cache, logits, stats = strategy.prefill(ids)
        times.append(stats.ttft_s)
    if logits is None:
        return None, None, None  # not the rank that ends with the cache
    sizes = stats.extra["sizes"]
    name = job["strategy"]
    bytes_moved = (runahead_bytes(lm.model, sizes) if name == "runahead" else
                   kvp_runahead_bytes(strategy.kvp, sizes) if name == "runahead-kvp" else
                   stats.extra["bytes_received"] * group.size())
    result = {"job": index, "strategy": name, "workers": group.size(), "n": len(ids),
              "ttft_s": min(times), "ttft_all_s": times, "sizes": sizes,
              "alpha": job.get("alpha"), "bytes": bytes_moved,
              "first_token": int(mx.argmax(logits).item()),
              "logits": [float(x) for x in logits.tolist()] if job.get("logits")
              else None}
    if job.get("check"):  # against the same strategy in one process
        ref = (strategy.kvp if name == "runahead-kvp" else FullPrefill(lm.model))
        fcache, flogits, _ = ref.prefill(ids)
        diff = float(mx.abs(flogits - logits).max().item())
        pairs = list(zip(cache, fcache)) + list(zip(getattr(cache, "aux", None) or [],
                                                    getattr(fcache, "aux", None) or []))
        kdiff = max([float(mx.abs(a.keys_and_values()[t] - b.keys_and_values()[t]).max()
                          .item()) for a, b in pairs if a.offset and a.offset == b.offset
                      for t in (0, 1)] + [0.0])
        kdiff = max(kdiff, max(abs(a.offset - b.offset) for a, b in pairs))
        result.update(max_logit_diff=diff, max_cache_diff=kdiff, cache_offset=cache[0].offset)
    if job.get("continuation"):
        from edgeprefill.quality import continuation_logits, mean_nll

        cont = job["continuation"]
        result["nll"] = mean_nll(continuation_logits(lm.model, cache, logits, cont), cont)
    if job.get("max_tokens"):
        from mlx_lm.sample_utils import make_sampler

        from edgeprefill.generate import decode_tokens

        toks = list(decode_tokens(lm.model, cache, logits, make_sampler(temp=0.0),
                                  job["max_tokens"], lm.model.max_context))
        result["tokens"] = toks
        result["text"] = lm.tokenizer.decode(toks)
    return result, cache, logits


def exit_with_parent():
    """End this worker when the process that started it is gone (Ctrl-C, an error, SIGTERM or
    SIGKILL there): on Linux the kernel sends SIGKILL at its death (PR_SET_PDEATHSIG); everywhere
    a daemon thread checks twice a second that the worker was not re-parented."""
    import threading
    import time

    parent = int(os.environ.get(PARENT_ENV) or 0)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()



def run(args):
    import mlx.core as mx

    from edgeprefill.fsio import atomic_write_text
    from edgeprefill.loading import load

    exit_with_parent()
    if os.environ.get("EDGEPREFILL_TEST_HANG_RANK") == os.environ.get("MLX_RANK", "-"):
        import time

        time.sleep(600)  # test hook: a rank that never answers (its parent must end it)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    group = mx.distributed.init(backend=args.backend, strict=True)
    if args.die_rank is not None and group.rank() == args.die_rank:
        os._exit(3)  # test hook: a worker that dies before doing its part
    lm = load(args.model, dtype=args.dtype)
    handoff = handoff_for(args.backend)
    if args.serve:
        return serve(args.serve, lm, group, handoff)
    spec = json.loads(Path(args.jobs).read_text())
    report = {"results": [], "workers": group.size(), "backend": args.backend,
              "device": str(mx.default_device())}
    if spec.get("link") and group.size() > 1:
        report["link"] = time_link(group, handoff=handoff)
    for index, job in enumerate(spec["jobs"]):
        result, cache, logits = run_job(lm, group, job, index, handoff)
        if result is not None:
            report["results"].append(result)
            if job.get("arrays"):  # the cache itself comes back (WorkerPrefill over machines)
                write_result(f"{args.out}.job{index}.safetensors", result, cache, logits)
        del cache
    if report["results"] or "link" in report and report["link"]:
        # the rank that ended with a job's cache reports it (the last useful rank: with more
        # workers than tokens that is not the last rank); the launcher merges the files
        atomic_write_text(f"{args.out}.rank{group.rank()}", json.dumps(report))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edgeprefill.distributed.worker",
                                description="one rank of a runahead / tsp / runahead-kvp prefill")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--jobs", default=None, help="JSON file: the prefills to run (see run_job)")
    p.add_argument("--serve", default=None, metavar="FOLDER",
                   help="stay up and run job files appearing in FOLDER (pool.RunaheadPool)")
    p.add_argument("--out", default=None, help="results: each reporting rank writes OUT.rank<r>")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--die-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.serve and not (args.jobs and args.out):
        p.error("pass --jobs and --out, or --serve")
    try:
        return run(args)
    except EdgeprefillError as e:
        print(f"edgeprefill: error: {e}", file=sys.stderr)
        return 1


def serve(folder, lm, group, handoff):
    """Persistent workers (chat): run job-<k>.json files as they appear in `folder`; the rank
    ending with the cache writes result-<k>.safetensors (cache arrays + logits, result JSON in
    the metadata). Stops on a 'stop' file or when the parent process is gone."""
    import time

    import mlx.core as mx

    folder, parent, k = Path(folder), os.getppid(), 0
    (folder / f"ready-{group.rank()}").touch()  # model loaded: the pool may send jobs
    while True:
        job_file = folder / f"job-{k}.json"
        while not job_file.is_file():
            if (folder / "stop").exists() or os.getppid() != parent:
                return 0
            time.sleep(0.002)
        job = json.loads(job_file.read_text())
        try:
            result, cache, logits = run_job(lm, group, job, k, handoff)
        except Exception as e:  # noqa: BLE001  (reported to the parent, then this rank stops)
            (folder / f"error-{k}.txt").write_text(f"rank {group.rank()}: {type(e).__name__}: "
                                                   f"{str(e).splitlines()[0][:200]}")
            return 1
        if result is not None:
            write_result(folder / f"result-{k}.safetensors", result, cache, logits)
        del cache
        k += 1




if __name__ == "__main__":
    sys.exit(main())
