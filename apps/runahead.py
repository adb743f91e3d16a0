"""KV-Runahead on local processes: the worker every rank runs (under `mlx.launch`), the launcher
that starts them with a timeout, and `edgeprefill runahead tune` (the partition table)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeprefill.apps.argtypes import non_negative, non_negative_float, positive, positive_float
from edgeprefill.errors import EdgeprefillError

from edgeprefill.prefill import PARALLEL_STRATEGIES  # noqa: F401  (re-exported)

TABLE_NAME = "runahead-partitions.json"
# Workers run the installed package in isolated mode (-I): a folder of the user's that holds
# its own apps/ or edgeprefill/ cannot stand in for it.
WORKER = (sys.executable, "-I", "-m", "edgeprefill.apps.cli", "runahead", "worker")
PARENT_ENV = "EDGEPREFILL_PARENT_PID"  # set for local workers: the process that started them
POOL_PREFIX = "edgeprefill-runahead-"  # the chat pool's job folder: <prefix><pid>.<random>
RANDOM_PAIR = "random:T-0.50"  # runahead-kvp's artifact for random-weight shapes (speed only)


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args

    p = sub.add_parser("runahead", help="KV-Runahead: partition tuning, worker entry point")
    rsub = p.add_subparsers(dest="runahead_command", metavar="ACTION", required=True)
    t = rsub.add_parser("tune", help="search partitions per prompt length and worker count")
    add_model_args(t)
    t.add_argument("--workers", default="2", help="comma list of worker counts")
    t.add_argument("--prompt-tokens", default="256,512,1024")
    t.add_argument("--alphas", default="0,0.5,1,1.5",
                   help="partitions searched: 0 = even, 1 = FLOP-balanced, between/beyond mixes")
    t.add_argument("--out", default=None, help="table file (default: the cache)")
    t.add_argument("--shape", default=None,
                   help="random-weight model of a real shape instead of --model (e.g. llama-8b)")
    t.add_argument("--trials", type=positive, default=3, help="timed prefills per point (min kept)")
    t.add_argument("--with-tsp", action="store_true",
                   help="also time tsp at each length and the link between two workers")
    t.add_argument("--json", default=None, help="write every timing here")
    t.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="mx.distributed backend (auto: nccl on CUDA GPUs, else ring)")
    t.add_argument("--timeout", type=positive_float, default=1800, help="seconds for one launch")
    t.set_defaults(run=run_tune)
    j = rsub.add_parser("project", help="projected TTFT of runahead / tsp / full on 2..8 "
                        "machines from layer times measured here and a link model")
    add_model_args(j)
    j.add_argument("--shape", default=None,
                   help="random-weight model of a real shape instead of --model (e.g. llama-8b)")
    j.add_argument("--workers", default="2,3,4,5,6,7,8", help="comma list of machine counts")
    j.add_argument("--prompt-tokens", default="4096,8192,16384")
    j.add_argument("--links", default="10,40", help="comma list of link speeds in Gb/s")
    j.add_argument("--latency-us", type=non_negative_float, default=50.0,
                   help="one-way link latency")
    j.add_argument("--measured", default=None, metavar="TUNE_JSON",
                   help="`runahead tune --with-tsp --json` records (comma list): predict "
                   "those runs with their measured link and print predicted beside measured")
    j.add_argument("--chunk-size", type=positive, default=None, help="full prefill's chunk")
    j.add_argument("--json", default=None, help="write the projection here")
    j.add_argument("--plot", default=None, help="write a PNG: projected TTFT vs machines")
    j.set_defaults(run=run_project)
    w = rsub.add_parser("worker", help="(internal) one rank of a runahead/tsp prefill")
    add_model_args(w)
    w.add_argument("--jobs", required=True, help="JSON file: the prefills to run (see run_jobs)")
    w.add_argument("--serve", default=None, metavar="FOLDER",
                   help="stay up and run job files appearing in FOLDER (see RunaheadPool)")
    w.add_argument("--out", required=True, help="results file prefix: each reporting rank writes OUT.rank<r>")
    w.add_argument("--backend", default="auto", choices=BACKENDS)
    w.add_argument("--die-rank", type=non_negative, default=None, help=argparse.SUPPRESS)
    w.set_defaults(run=run_worker)


def mixed_partition(n, p, config, alpha):
    """Chunk lengths between even (alpha 0) and FLOP-balanced (alpha 1), extrapolated beyond."""
    from edgeprefill.prefill.runahead import balanced_partition, even_partition
    from edgeprefill.projection import mix_sizes

    return mix_sizes(even_partition(n, p), balanced_partition(n, p, config), alpha, n)


def table_path():
    from edgeprefill.loading import cache_dir

    return cache_dir() / TABLE_NAME


def partition_from_table(model_id, n, p, config, path=None, warn=True):
    """Chunk lengths for (n, p): alpha interpolated linearly in n from the tuned table; an even
    split with a warning when the table has no entry for this model and worker count."""
    from edgeprefill.prefill.runahead import even_partition

    path = Path(path) if path else table_path()
    rows = {}
    if path.is_file():
        rows = json.loads(path.read_text()).get(model_id, {}).get(str(p), {})
    if not rows:
        if warn:
            print(f"edgeprefill: warning: no tuned runahead partition for {model_id} with {p} "
                  "workers: using an even split (run `edgeprefill runahead tune`)",
                  file=sys.stderr)
        return even_partition(n, p)
    pts = sorted((int(k), v) for k, v in rows.items())
    if n <= pts[0][0]:
        alpha = pts[0][1]
    elif n >= pts[-1][0]:
        alpha = pts[-1][1]
    else:
        for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
            if n0 <= n <= n1:
                alpha = a0 + (a1 - a0) * (n - n0) / (n1 - n0)
                break
    return mixed_partition(n, p, config, alpha)


BACKENDS = ("auto", "ring", "nccl")


def resolve_backend(backend):
    """'auto': NCCL where MLX sees a CUDA GPU (one GPU per rank), else the ring (TCP)."""
    if backend != "auto":
        return backend
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_worker_limit(lm):
    """How many local workers this machine holds: each is a process with its own copy of the
    weights (plus about 0.5 GiB of runtime), within the memory available now and 8 per core."""
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(lm.model.model.parameters()))
    per_worker = weights + 2**29
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(8 * (os.cpu_count() or 1), avail // per_worker))


def check_local_workers(n, lm):
    """Refuse a local worker count below 1 or above local_worker_limit, naming the limit."""
    limit = local_worker_limit(lm)
    if not 1 <= n <= limit:
        raise EdgeprefillError(f"--workers {n}: this machine holds 1 to {limit} local workers of "
                               f"this model (memory available, 8 per core); pass fewer, or "
                               "--hostfile to spread them over machines")


def launch(n_workers, worker_args, timeout=120, hostfile=None, backend="auto"):
    """Run `edgeprefill runahead worker` on n_workers ranks: over machines through mlx.launch
    (`hostfile`), else as local processes started here with the environment mlx.launch gives
    them (ring: MLX_HOSTFILE + MLX_RANK; NCCL: rendezvous address, MLX_RANK, one GPU a rank).
    Local ranks skip mlx.launch because its output relay polls a CPU core busy (measured 87%
    of a core on this 2-core machine), which would slow the ranks it times. Every rank is
    killed and a one-line error raised if they do not all finish within `timeout`."""
    if n_workers < 1:
        raise EdgeprefillError("--workers must be >= 1")
    backend = resolve_backend(backend)
    worker = [*WORKER, "--backend", backend, *worker_args]
    if hostfile:
        launcher = Path(sys.executable).with_name("mlx.launch")
        cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", backend,
               "--hostfile", str(hostfile)]
        if backend == "nccl":  # NVLink multicast stays off (shared hosts)
            cmd += ["--nccl-port", str(free_port()), "--env", "NCCL_NVLS_ENABLE=0"]
        return _wait([subprocess.Popen(cmd + ["--", *worker], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)], timeout)
    with tempfile.TemporaryDirectory() as tmp:
        return _wait(start_local(n_workers, worker, backend, tmp), timeout)


def start_local(n_workers, worker, backend, tmp, output=subprocess.PIPE):
    """Start the local ranks of `worker` (a command) with mx.distributed's environment."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", MLX_WORLD_SIZE=str(n_workers),
               **{PARENT_ENV: str(os.getpid())})
    if backend == "ring":
        ring = Path(tmp) / "ring.json"
        ring.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n_workers)])
                        if n_workers > 1 else "")
        env["MLX_HOSTFILE"] = str(ring)
    else:
        env.update(NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(free_port()))
    procs = []
    gpus = gpu_count()
    for rank in range(n_workers):
        renv = dict(env, MLX_RANK=str(rank))
        if gpus:  # one GPU a rank (round robin), whatever the backend
            renv["CUDA_VISIBLE_DEVICES"] = str(rank % gpus)
        procs.append(subprocess.Popen(worker, env=renv, stdout=output, stderr=output,
                                      text=True, start_new_session=True))
    return procs


def gpu_count():
    """CUDA GPUs MLX sees here (0 without CUDA)."""
    import mlx.core as mx

    if not mx.cuda.is_available():
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([x for x in visible.split(",") if x.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return max(1, out.stdout.count("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 1


def last_lines(text, n=3, width=300):
    """The last `n` non-empty lines of a worker's output on one line (for an error message)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()][-n:]
    return " | ".join(lines)[-width:]


def kill_groups(procs):
    """SIGKILL each worker's process group (each was started in a session of its own)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait(procs, timeout):
    """Wait for every process; on a failure, the timeout or an interrupt kill them all."""
    try:
        return _wait_all(procs, timeout)
    except BaseException:
        kill_groups(procs)
        raise


def _wait_all(procs, timeout):
    import threading
    import time

    outs = [[] for _ in procs]
    threads = [threading.Thread(target=lambda p=p, o=o: o.extend(p.communicate()), daemon=True)
               for p, o in zip(procs, outs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout

    def kill_all():
        kill_groups(procs)
        for t in threads:
            t.join(5)

    failed = []
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            kill_all()
            if not failed:
                raise EdgeprefillError(
                    f"runahead workers did not finish within {timeout:.0f} s (a worker died or "
                    "a peer never connected): check the hosts and ports, or use fewer --workers")
            break
        time.sleep(0.05)
    for t in threads:
        t.join()
    out = "".join(o[0] for o in outs if o)
    err = "".join(o[1] for o in outs if len(o) > 1)
    died = [x for x in (out + err).splitlines() if "exited with code" in x]
    bad = failed or [r for r, p in enumerate(procs) if p.returncode != 0]
    if bad or died:
        rank, code = (bad[0], procs[bad[0]].returncode) if bad else ("?", "?")
        where = f"rank {rank}, " if len(procs) > 1 else ""
        raise EdgeprefillError(f"a runahead worker failed ({where}exit code {code}; its last "
                               f"output: {last_lines(err) or 'none'}): run with fewer --workers "
                               "or another strategy")
    return out, err


def run_jobs(lm, jobs, n_workers, timeout=300, hostfile=None, dtype="auto", backend="auto",
             link=False):
    """Launch the workers once and run every job on them (no process start or model load
    between jobs). A job: {"strategy": one of PARALLEL_STRATEGIES, "ids": [...], optional
    "sizes", "alpha", "trials", "check", "max_tokens", "logits", "continuation", and for
    runahead-kvp "artifact"}. With `link`, the last two ranks time
    point-to-point messages (the projection model's link figures).

    Returns:
        the last rank's results: {"results": [one dict per job], "link": [...]}.
    """
    if not hostfile:
        check_local_workers(n_workers, lm)
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file, out_file = Path(tmp) / "jobs.json", Path(tmp) / "out.json"
        jobs_file.write_text(json.dumps({"jobs": jobs, "link": link}))
        args = ["--model", lm.spec, "--dtype", dtype or "auto", "--jobs", str(jobs_file),
                "--out", str(out_file)]
        launch(n_workers, args, timeout, hostfile, backend)
        parts = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("out.json.rank*"))]
        results = {r["job"]: r for part in parts for r in part["results"]}
        if len(results) != len(jobs):
            raise EdgeprefillError("a runahead worker wrote no result: see the worker output")
        report = {k: v for part in parts for k, v in part.items() if k != "results" and v}
        report["results"] = [results[i] for i in range(len(jobs))]
        return report


def run_prefill(lm, ids, strategy, n_workers, timeout=300, sizes=None, check=False,
                max_tokens=0, trials=1, hostfile=None, alpha=None, dtype="auto", backend="auto",
                artifact=None, continuation=None, tail=None):
    """Launch the workers on `ids`; the last rank's JSON result (runahead-kvp: `artifact`
    is the KV Prediction folder every worker loads, `tail` its exact tail if not the card's)."""
    if strategy == "runahead-kvp" and not artifact:
        raise EdgeprefillError("runahead-kvp needs a KV Prediction artifact: pass --kvp FOLDER")
    if artifact and artifact != RANDOM_PAIR:
        artifact = str(Path(artifact).resolve())
        kvp_for(lm, artifact, tail)  # refuse a bad artifact before launching
    job = {"strategy": strategy, "ids": list(ids), "sizes": sizes, "alpha": alpha,
           "trials": trials, "check": check, "max_tokens": max_tokens, "artifact": artifact,
           "tail": tail,
           "continuation": list(continuation) if continuation else None}
    return run_jobs(lm, [job], n_workers, timeout, hostfile, dtype, backend)["results"][0]


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


_KVP = {}  # (artifact path, tail) -> KVPrediction, loaded once per worker process


def job_strategy(lm, group, job, handoff):
    """The strategy object of one job on this rank (runahead-kvp loads its artifact once)."""
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
        return RunaheadKVPrediction(kvp_for(lm, job["artifact"], job.get("tail")), group, sizes,
                                    handoff=handoff)
    cls = RunaheadPrefill if job["strategy"] == "runahead" else TspPrefill
    return cls(lm.model, group, sizes, handoff=handoff)


def kvp_for(lm, artifact, tail=None):
    """The KVPrediction of an artifact folder (or RANDOM_PAIR), loaded once per process;
    `tail`: its exact tail (default: the card's)."""
    from edgeprefill.prefill import make_strategy

    key = (artifact, tail)
    if key not in _KVP:
        opts = {} if tail is None else {"tail": tail}
        _KVP[key] = (random_kvp(lm, **opts) if artifact == RANDOM_PAIR
                     else make_strategy("kvp", lm.model, artifact=artifact, **opts))
    return _KVP[key]


def random_kvp(lm, tail=1):
    """kvp with the random T-0.50 pair of a random-weight model, the same on every rank."""
    import mlx.core as mx

    from edgeprefill.bench import random_kvp_pair
    from edgeprefill.prefill import KVPrediction

    if not lm.model_id.startswith("random:"):
        raise EdgeprefillError(f"{RANDOM_PAIR} is for random-weight shapes (--shape) only")
    mx.random.seed(0)
    return KVPrediction(lm.model, *random_kvp_pair(lm, None, lm.model.dtype), tail=tail)


def run_job(lm, group, job, index, handoff):
    """Run one prefill job on this rank: (result dict or None, cache, logits); the result,
    cache and logits come back on the rank that ends with the cache. A job's optional
    "continuation" (token ids) adds the teacher-forced mean NLL over the cache it made."""
    import mlx.core as mx

    from edgeprefill.prefill import FullPrefill
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
              "logits": [float(x) for x in logits.tolist()] if job.get("logits", True)
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
        from edgeprefill.evaluate import continuation_logits, mean_nll

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


def run_worker(args):
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
        result, cache, _ = run_job(lm, group, job, index, handoff)
        if result is not None:
            report["results"].append(result)
        del cache
    if report["results"] or "link" in report and report["link"]:
        # the rank that ended with a job's cache reports it (the last useful rank: with more
        # workers than tokens that is not the last rank); the launcher merges the files
        atomic_write_text(f"{args.out}.rank{group.rank()}", json.dumps(report))
    return 0


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
            arrays = {"logits": logits}
            for i, c in enumerate(cache):
                arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.keys_and_values()
            tmp = folder / f".result-{k}.safetensors"
            mx.save_safetensors(str(tmp), arrays, metadata={"result": json.dumps(result)})
            os.replace(tmp, folder / f"result-{k}.safetensors")
        del cache
        k += 1


class RunaheadPool:
    """Local runahead workers kept alive between prompts (the chat's `runahead` strategy):
    started once, each prompt is one job; the cache comes back through a file in /dev/shm
    (or the temp folder) and decoding runs in this process.

    Args:
        lm: the LoadedModel (its spec is what the workers load).
        workers: ranks to start.
        backend: mx.distributed backend (auto: nccl on CUDA GPUs, else ring).
    """

    def __init__(self, lm, workers=2, backend="auto", dtype="auto", start_timeout=300):
        import shutil

        if workers < 1:
            raise EdgeprefillError("--workers must be >= 1")
        check_local_workers(workers, lm)
        self.lm, self.workers, self.k = lm, workers, 0
        from edgeprefill.fsio import clean_stale

        shm = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        clean_stale(shm, POOL_PREFIX)  # folders of pools whose chat was killed
        self.dir = Path(tempfile.mkdtemp(prefix=f"{POOL_PREFIX}{os.getpid()}.", dir=shm))
        self._cleanup = lambda: shutil.rmtree(self.dir, ignore_errors=True)
        backend = resolve_backend(backend)
        worker = [*WORKER, "--backend", backend, "--model", lm.spec, "--dtype", dtype or "auto",
                  "--jobs", "-", "--out", "-", "--serve", str(self.dir)]
        self.log = open(self.dir / "workers.log", "w")
        self.procs = start_local(workers, worker, backend, self.dir, output=self.log)
        self._wait_for(lambda: all((self.dir / f"ready-{r}").exists() for r in range(workers)),
                       start_timeout, "did not start")

    def _wait_for(self, done, timeout, what, error_file=None):
        """Poll until done(); on a dead rank, an error file or the timeout: stop, raise."""
        import time

        deadline = time.monotonic() + timeout
        while not done():
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if (error_file and error_file.is_file()) or dead or time.monotonic() > deadline:
                why = error_file.read_text() if error_file and error_file.is_file() else (
                    f"rank {dead[0]} exited" if dead else f"{what} within {timeout:.0f} s")
                self.log.flush()
                log = (self.dir / "workers.log").read_text(errors="replace")
                why += f"; last worker output: {last_lines(log) or 'none'}"
                self.close()
                raise EdgeprefillError(f"runahead workers failed ({why}): switch strategy "
                                       "(/strategy full) or restart with fewer --workers")
            time.sleep(0.002)

    def run(self, ids, timeout=None):
        """(cache arrays, result dict) of one runahead prefill of `ids`."""
        import mlx.core as mx

        from edgeprefill.fsio import atomic_write_text

        k = self.k
        self.k += 1
        atomic_write_text(self.dir / f"job-{k}.json",
                          json.dumps({"strategy": "runahead", "ids": list(ids), "logits": False}))
        out = self.dir / f"result-{k}.safetensors"
        self._wait_for(out.is_file, timeout or 600, "no result",
                       error_file=self.dir / f"error-{k}.txt")
        arrays, meta = mx.load(str(out), return_metadata=True)
        out.unlink()
        return arrays, json.loads(meta["result"])

    def close(self):
        if not self.procs:
            return
        (self.dir / "stop").touch()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                kill_groups([p])
        self.procs = []
        self.log.close()
        self._cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class PooledRunahead:
    """The prefill contract over a RunaheadPool: a fresh conversation is prefilled by the
    workers (KV-Runahead); a later turn extends the returned cache here with `full` (runahead
    parallelises a prompt from position 0; a follow-up only adds its new tokens)."""

    name = "runahead"

    def __init__(self, lm, workers=2, backend="auto", say=None):
        from edgeprefill.prefill import FullPrefill

        self.lm, self.workers, self.backend = lm, workers, backend
        self.say = say or (lambda msg: print(f"edgeprefill: {msg}", file=sys.stderr))
        self.pool = RunaheadPool(lm, workers, backend)
        self.local = FullPrefill(lm.model)

    def _pool_or_none(self):
        """The pool, restarted (once, said in one line) if a worker has died since the last
        prompt; None if it cannot be restarted."""
        if self.pool.procs and all(p.poll() is None for p in self.pool.procs):
            return self.pool
        self.pool.close()
        try:
            self.pool = RunaheadPool(self.lm, self.workers, self.backend)
        except EdgeprefillError as e:
            self.say(f"runahead workers could not be restarted ({e})")
            return None
        self.say("a runahead worker had died: restarted the workers")
        return self.pool

    def _fallback(self, prompt_ids, cache, progress, why):
        self.say(f"{why}: this turn is prefilled with full")
        cache, logits, stats = self.local.prefill(prompt_ids, cache, progress)
        stats.extra["runahead"] = f"fell back to full ({why})"
        return cache, logits, stats

    def prefill(self, prompt_ids, cache=None, progress=None):
        import time

        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        from edgeprefill.prefill.base import PrefillStats, PromptCache

        if cache is not None and len(cache.tokens):
            cache, logits, stats = self.local.prefill(prompt_ids, cache, progress)
            stats.extra["runahead"] = "later turn: new tokens prefilled locally"
            return cache, logits, stats
        start = time.perf_counter()
        ids = [int(x) for x in prompt_ids]
        if self._pool_or_none() is None:
            return self._fallback(prompt_ids, cache, progress, "no runahead workers")
        try:
            arrays, result = self.pool.run(ids)
        except EdgeprefillError as e:  # a worker died mid-prompt: the pool is closed
            return self._fallback(prompt_ids, cache, progress, str(e).split(":")[0])
        layers = []
        for i in range(self.lm.model.n_layers):
            c = KVCache()
            c.update_and_fetch(arrays[f"{i}.keys"], arrays[f"{i}.values"])
            layers.append(c)
        cache = PromptCache(layers)
        cache.tokens = ids
        logits = arrays["logits"]
        mx.eval(logits, [c.keys_and_values() for c in layers])
        stats = PrefillStats(self.name, len(ids), len(ids), time.perf_counter() - start,
                             {"workers": self.pool.workers, "sizes": result["sizes"],
                              "workers_ttft_s": result["ttft_s"]})
        return cache, logits, stats

    def close(self):
        self.pool.close()


def run_tune(args):
    """Search partitions (alpha grid) per worker count and prompt length, one launch per worker
    count; write the table, and with --json every timing (tsp too, and the link figures)."""
    from rich.console import Console

    from edgeprefill.apps.shared import parse_list

    from edgeprefill.bench import bench_prompt_sets
    from edgeprefill.apps.info import machine_info
    from edgeprefill.fsio import atomic_write_text

    workers = parse_list(args.workers, int, "--workers")
    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    alphas = parse_list(args.alphas, float, "--alphas")
    lm = load_for(args)
    console = Console(stderr=True)
    out = Path(args.out) if args.out else table_path()
    table = json.loads(out.read_text()) if out.is_file() else {}
    entry = table.setdefault(lm.model_id, {})
    record = {"model": lm.model_id, "machine": machine_info(), "date": now(), "runs": []}
    random_tokens = lm.spec.startswith("random:")
    for p in workers:
        prompts = {n: bench_prompt_sets(lm, n, 1, 0, random_tokens)[0][0] for n in lengths}
        jobs = [{"strategy": "runahead", "ids": prompts[n], "alpha": a, "trials": args.trials,
                 "logits": False} for n in lengths for a in alphas]
        if args.with_tsp:
            jobs += [{"strategy": "tsp", "ids": prompts[n], "trials": args.trials,
                      "logits": False} for n in lengths]
        console.print(f"p={p}: {len(jobs)} prefills on {p} workers ...", highlight=False)
        rep = run_jobs(lm, jobs, p, timeout=args.timeout, dtype=args.dtype,
                       backend=args.backend, link=args.with_tsp)
        record["runs"].append({"workers": p, "backend": rep["backend"], "device": rep["device"],
                               "link": rep.get("link"), "results": rep["results"]})
        for n in lengths:
            rows = [r for r in rep["results"] if r["n"] == n and r["strategy"] == "runahead"]
            for r in rows:
                console.print(f"p={p} n={n} alpha={r['alpha']:g} sizes={r['sizes']} "
                              f"TTFT {r['ttft_s'] * 1e3:.1f} ms", highlight=False)
            best = min(rows, key=lambda r: r["ttft_s"])
            entry.setdefault(str(p), {})[str(n)] = best["alpha"]
            tsp = [r for r in rep["results"] if r["n"] == n and r["strategy"] == "tsp"]
            extra = (f"; tsp {tsp[0]['ttft_s'] * 1e3:.1f} ms "
                     f"({tsp[0]['ttft_s'] / best['ttft_s']:.2f}x runahead)" if tsp else "")
            console.print(f"[bold]p={p} n={n}: alpha {best['alpha']:g}, "
                          f"{best['ttft_s'] * 1e3:.1f} ms{extra}[/bold]", highlight=False)
    atomic_write_text(out, json.dumps(table, indent=2))
    console.print(f"wrote {out}")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2))
        console.print(f"wrote {args.json}")
    return 0


def now():
    import datetime

    return datetime.datetime.now().isoformat(timespec="seconds")


def load_for(args):
    """--model, or with --shape a random-weight model of that real shape."""
    from edgeprefill.loading import load

    spec = f"random:llama-{args.shape}" if getattr(args, "shape", None) else args.model
    return load(spec, dtype=args.dtype)



def measure_layer_cost(lm, max_tokens, trials=2, progress=None):
    """Time the real blocks (all layers, evaluated layer by layer as runahead does) over chunks
    after cached prefixes; returns (LayerCost, samples, head seconds)."""
    import time

    import mlx.core as mx

    from edgeprefill.projection import fit_layer_cost

    m = lm.model
    N = max_tokens
    grid = sorted({(max(1, c), s) for c in (N // 16, N // 4, N // 2, N) for s in (0, N // 2)
                   if c + s <= N} | {(max(1, N // 16), N - max(1, N // 16))})
    rng = mx.random.key(0)
    samples = []
    for c, s in grid:
        best = None
        for k in range(trials + 1):
            cache = m.make_cache()
            if s:
                kv = mx.random.normal((2, 1, m.n_kv_heads, s, m.head_dim), key=rng).astype(
                    m.dtype)
                for layer in cache:
                    layer.update_and_fetch(kv[0], kv[1])
            h = m.embed(mx.arange(3, 3 + c)[None] % m.vocab_size)
            mx.eval(h, [x.keys_and_values() for x in cache] if s else [])
            t0 = time.perf_counter()
            for i in range(m.n_layers):
                h = m.block(i, h, cache=cache[i]).h
                mx.eval(h)
            dt = (time.perf_counter() - t0) / m.n_layers
            if k:  # the first run warms up kernels
                best = dt if best is None else min(best, dt)
            del cache
        samples.append((c, s, best))
        if progress:
            progress(c, s, best)
    h = m.embed(mx.array([[3]]))
    mx.eval(h)
    t0 = time.perf_counter()
    for _ in range(3):
        mx.eval(m.head(h))
    head = (time.perf_counter() - t0) / 3
    return fit_layer_cost(samples), samples, head


def run_project(args):
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import parse_list

    from edgeprefill.bench import bench_prompt_sets
    from edgeprefill.apps.info import machine_info
    from edgeprefill.fsio import atomic_write_text
    from edgeprefill.prefill import FullPrefill
    from edgeprefill.prefill.base import default_chunk_size
    from edgeprefill.prefill.runahead import kv_bytes_per_token
    from edgeprefill.projection import Link, best_runahead, full_time, runahead_time, tsp_time

    workers = parse_list(args.workers, int, "--workers")
    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    links = parse_list(args.links, float, "--links")
    measured = []
    for f in (args.measured.split(",") if args.measured else []):
        try:
            rec = json.loads(Path(f).read_text())
            measured += [dict(run, source=f) for run in rec["runs"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise EdgeprefillError(f"cannot read a tune record from {f}: pass the --json file "
                                   "of `edgeprefill runahead tune --with-tsp`") from None
    lengths = sorted(set(lengths) | {r["n"] for run in measured for r in run["results"]})
    lm = load_for(args)
    m = lm.model
    console = Console(stderr=True)
    chunk = args.chunk_size or default_chunk_size()
    kvb = kv_bytes_per_token(m)
    cost, samples, head = measure_layer_cost(
        lm, max(lengths), progress=lambda c, s, t: console.print(
            f"layer time: chunk {c} after {s}: {t * 1e3:.3f} ms", highlight=False))
    console.print(f"fit: t0 {cost.t0 * 1e6:.1f} us, {cost.a * 1e9:.2f} ns/token, "
                  f"{cost.b * 1e12:.3f} ps/token/key; rms error {cost.rms_rel:.1%}",
                  highlight=False)
    L = m.n_layers
    record = {"model": lm.model_id, "machine": machine_info(), "date": now(),
              "layer_cost": {"t0_s": cost.t0, "a_s_per_token": cost.a,
                             "b_s_per_token_key": cost.b, "rms_rel": cost.rms_rel},
              "samples": [{"chunk": c, "prefix": s, "layer_s": t} for c, s, t in samples],
              "head_s": head, "kv_bytes_per_token_layer": kvb, "chunk_size": chunk,
              "latency_us": args.latency_us, "full": [], "projection": [], "validation": []}
    # the cost model against a real single-process prefill on this machine
    for n in lengths:
        ids = bench_prompt_sets(lm, n, 1, 0, lm.spec.startswith("random:"))[0][0]
        strat = FullPrefill(m, chunk)
        times = [strat.prefill(ids)[2].ttft_s for _ in range(2)]
        record["full"].append({"n": n, "measured_s": min(times[1:] or times),
                               "predicted_s": full_time(cost, n, L, chunk, head)})
    table = Table(title=f"Projected TTFT (s), {lm.model_id}: layer times measured on "
                        f"{record['machine'].get('mlx_device', '?')}, links at "
                        f"{args.latency_us:g} us latency")
    for col in ("Gb/s", "tokens", "full (1)", *[f"p={p} runahead / tsp" for p in workers]):
        table.add_column(col, justify="right")
    for gb in links:
        link = Link.gbit(gb, args.latency_us)
        for n in lengths:
            f = full_time(cost, n, L, chunk, head)
            cells = []
            for p in workers:
                sizes, ra = best_runahead(cost, link, n, p, L, kvb, head)
                ts = tsp_time(cost, link, n, p, L, kvb, head)
                record["projection"].append({"gbit_s": gb, "n": n, "workers": p,
                                             "runahead_s": ra, "sizes": sizes, "tsp_s": ts,
                                             "full_s": f})
                cells.append(f"{ra:.2f} / {ts:.2f}")
            table.add_row(f"{gb:g}", str(n), f"{f:.2f}", *cells)
    Console(width=max(Console().width, 140)).print(table)
    for r in record["full"]:
        console.print(f"full {r['n']}: measured {r['measured_s'] * 1e3:.1f} ms, model "
                      f"{r['predicted_s'] * 1e3:.1f} ms", highlight=False)
    if measured:
        for run in measured:
            if not run.get("link"):
                continue
            link = Link.fit(run["link"])
            console.print(f"p={run['workers']} {run.get('backend')} measured link: "
                          f"{link.latency_s * 1e6:.1f} us, "
                          f"{link.bytes_per_s / 1e9:.2f} GB/s", highlight=False)
            for r in run["results"]:
                if r["strategy"] == "runahead":
                    pred = runahead_time(cost, link, r["sizes"], L, kvb, head)
                else:
                    pred = tsp_time(cost, link, r["n"], run["workers"], L, kvb, head)
                record["validation"].append({
                    "workers": run["workers"], "n": r["n"], "strategy": r["strategy"],
                    "backend": run.get("backend"),
                    "sizes": r["sizes"], "measured_s": r["ttft_s"], "predicted_s": pred,
                    "link_latency_s": link.latency_s, "link_bytes_per_s": link.bytes_per_s})
                console.print(f"p={run['workers']} {run.get('backend')} n={r['n']} "
                              f"{r['strategy']} {r['sizes']}: "
                              f"measured {r['ttft_s'] * 1e3:.1f} ms, model {pred * 1e3:.1f} ms",
                              highlight=False)
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2))
        console.print(f"wrote {args.json}")
    if args.plot:
        from edgeprefill.apps.plots import projection_plot

        projection_plot(record, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
