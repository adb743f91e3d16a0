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

from edgeprefill.errors import EdgeprefillError

TABLE_NAME = "runahead-partitions.json"


def add_parser(sub):
    from apps.generate import add_model_args

    p = sub.add_parser("runahead", help="KV-Runahead: partition tuning, worker entry point")
    rsub = p.add_subparsers(dest="runahead_command", metavar="ACTION", required=True)
    t = rsub.add_parser("tune", help="search partitions per prompt length and worker count")
    add_model_args(t)
    t.add_argument("--workers", default="2", help="comma list of worker counts")
    t.add_argument("--prompt-tokens", default="256,512,1024")
    t.add_argument("--alphas", default="0,0.5,1,1.5",
                   help="partitions searched: 0 = even, 1 = FLOP-balanced, between/beyond mixes")
    t.add_argument("--out", default=None, help="table file (default: the cache)")
    t.set_defaults(run=run_tune)
    w = rsub.add_parser("worker", help="(internal) one rank of a runahead/tsp prefill")
    add_model_args(w)
    w.add_argument("--strategy", default="runahead", choices=["runahead", "tsp"])
    w.add_argument("--ids", required=True, help="JSON file of prompt token ids")
    w.add_argument("--sizes", default=None, help="comma list of chunk lengths")
    w.add_argument("--alpha", type=float, default=None)
    w.add_argument("--trials", type=int, default=1)
    w.add_argument("--check", action="store_true", help="last rank compares with full prefill")
    w.add_argument("--max-tokens", type=int, default=0, help="last rank decodes this many")
    w.add_argument("--out", required=True, help="JSON result written by the last rank")
    w.add_argument("--die-rank", type=int, default=None, help=argparse.SUPPRESS)
    w.set_defaults(run=run_worker)


def mixed_partition(n, p, config, alpha):
    """Chunk lengths between even (alpha 0) and FLOP-balanced (alpha 1), extrapolated beyond."""
    from edgeprefill.prefill.runahead import balanced_partition, even_partition

    ev, bal = even_partition(n, p), balanced_partition(n, p, config)
    if len(ev) != len(bal):
        return ev
    raw = [max(1.0, e + alpha * (b - e)) for e, b in zip(ev, bal)]
    sizes = [max(1, int(round(x * n / sum(raw)))) for x in raw]
    sizes[-1] = n - sum(sizes[:-1])
    return sizes if sizes[-1] >= 1 else ev


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


def launch(n_workers, worker_args, timeout=120, hostfile=None):
    """Run `edgeprefill runahead worker` on n_workers ranks through mlx.launch (ring backend);
    kill every rank and raise a one-line error if they do not finish within `timeout`."""
    if n_workers < 1:
        raise EdgeprefillError("--workers must be >= 1")
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher) if launcher.exists() else "mlx.launch", "--backend", "ring"]
    cmd += ["--hostfile", str(hostfile)] if hostfile else ["-n", str(n_workers)]
    cmd += ["--", sys.executable, "-m", "apps.cli", "runahead", "worker", *worker_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise EdgeprefillError(
            f"runahead workers did not finish within {timeout:.0f} s (a worker died or a peer "
            "never connected): check the hosts and ports, or use fewer --workers") from None
    died = [x for x in (out + err).splitlines() if "exited with code" in x]
    if proc.returncode != 0 or died:
        last = died[:1] or [x for x in err.strip().splitlines() if x.strip()][-1:] or [
            "no output"]
        raise EdgeprefillError(f"a runahead worker failed ({last[0][:200]}): see the worker "
                               "output above or run with fewer --workers")
    return out, err


def run_prefill(lm, ids, strategy, n_workers, timeout=300, sizes=None, check=False,
                max_tokens=0, trials=1, hostfile=None, alpha=None, dtype="auto"):
    """Launch the workers on `ids`; the last rank's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.json", Path(tmp) / "out.json"
        ids_file.write_text(json.dumps(list(ids)))
        args = ["--model", lm.spec, "--dtype", dtype, "--strategy", strategy, "--ids",
                str(ids_file), "--out", str(out_file), "--trials", str(trials)]
        if sizes:
            args += ["--sizes", ",".join(map(str, sizes))]
        if alpha is not None:
            args += ["--alpha", str(alpha)]
        if check:
            args.append("--check")
        if max_tokens:
            args += ["--max-tokens", str(max_tokens)]
        launch(n_workers, args, timeout, hostfile)
        if not out_file.is_file():
            raise EdgeprefillError("the last runahead worker wrote no result: see its output")
        return json.loads(out_file.read_text())


def run_worker(args):
    import mlx.core as mx

    from edgeprefill.fsio import atomic_write_text
    from edgeprefill.loading import load
    from edgeprefill.prefill import FullPrefill
    from edgeprefill.prefill.runahead import RunaheadPrefill, TspPrefill, runahead_bytes

    group = mx.distributed.init(backend="ring", strict=True)
    if args.die_rank is not None and group.rank() == args.die_rank:
        os._exit(3)  # test hook: a worker that dies before doing its part
    lm = load(args.model, dtype=args.dtype)
    ids = json.loads(Path(args.ids).read_text())
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    elif args.alpha is not None:
        sizes = mixed_partition(len(ids), group.size(), lm.config, args.alpha)
    elif args.strategy == "runahead":
        sizes = partition_from_table(lm.model_id, len(ids), group.size(), lm.config,
                                     warn=group.rank() == 0)
    else:
        sizes = None
    cls = RunaheadPrefill if args.strategy == "runahead" else TspPrefill
    strategy = cls(lm.model, group, sizes)
    times = []
    for _ in range(max(1, args.trials)):
        cache, logits, stats = strategy.prefill(ids)
        times.append(stats.ttft_s)
    if logits is None:
        return 0
    result = {"strategy": args.strategy, "workers": group.size(), "ttft_s": min(times),
              "ttft_all_s": times, "sizes": stats.extra["sizes"],
              "bytes": (runahead_bytes(lm.model, stats.extra["sizes"]) if args.strategy ==
                        "runahead" else stats.extra["bytes_received"] * group.size()),
              "first_token": int(mx.argmax(logits).item()),
              "logits": [float(x) for x in logits.tolist()]}
    if args.check:
        fcache, flogits, _ = FullPrefill(lm.model).prefill(ids)
        diff = float(mx.abs(flogits - logits).max().item())
        kdiff = max(float(mx.abs(a.keys_and_values()[t] - b.keys_and_values()[t]).max().item())
                    for a, b in zip(cache, fcache) for t in (0, 1))
        result.update(max_logit_diff=diff, max_cache_diff=kdiff,
                      cache_offset=cache[0].offset)
    if args.max_tokens:
        from mlx_lm.sample_utils import make_sampler

        from edgeprefill.generate import decode_tokens

        toks = list(decode_tokens(lm.model, cache, logits, make_sampler(temp=0.0),
                                  args.max_tokens, lm.model.max_context))
        result["tokens"] = toks
        result["text"] = lm.tokenizer.decode(toks)
    atomic_write_text(args.out, json.dumps(result))
    return 0


def run_tune(args):
    from rich.console import Console

    from apps.bench import parse_list
    from edgeprefill.data import bench_prompts
    from edgeprefill.fsio import atomic_write_text
    from edgeprefill.loading import load

    workers = parse_list(args.workers, int, "--workers")
    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    alphas = parse_list(args.alphas, float, "--alphas")
    lm = load(args.model, dtype=args.dtype)
    console = Console(stderr=True)
    out = Path(args.out) if args.out else table_path()
    table = json.loads(out.read_text()) if out.is_file() else {}
    entry = table.setdefault(lm.model_id, {})
    for p in workers:
        for n in lengths:
            ids = bench_prompts(lm.tokenizer, n, 1)[0]
            best = None
            for a in alphas:
                r = run_prefill(lm, ids, "runahead", p, alpha=a, trials=3)
                console.print(f"p={p} n={n} alpha={a:g} sizes={r['sizes']} "
                              f"TTFT {r['ttft_s'] * 1e3:.0f} ms", highlight=False)
                if best is None or r["ttft_s"] < best[1]:
                    best = (a, r["ttft_s"])
            entry.setdefault(str(p), {})[str(n)] = best[0]
            console.print(f"[bold]p={p} n={n}: alpha {best[0]:g}[/bold]")
    atomic_write_text(out, json.dumps(table, indent=2))
    console.print(f"wrote {out}")
    return 0
