"""`edgeprefill bench`: time-to-first-token per strategy and prompt length, beside its quality
against the exact prefill (edgeprefill.bench runs it; this prints, writes JSON and plots)."""

import sys

from edgeprefill.apps.argtypes import non_negative, positive
from edgeprefill.apps.shared import (SELECT_FLAGS, add_model_args, add_strategy_options,
                                     kvp_tail, parse_list, say_dim, write_json)


def add_parser(sub):
    from edgeprefill.prefill.registry import names

    p = sub.add_parser("bench", help="measure TTFT per strategy and prompt length")
    add_model_args(p)
    p.add_argument("--strategies", default="full,mlx-lm",
                   help=f"comma list of {', '.join(names())} (lazy-<schedule> too); the mirror "
                   "backend runs full, kvp and lazy")
    p.add_argument("--prompt-tokens", default="128,512,1024", help="comma list of lengths")
    p.add_argument("--trials", type=positive, default=3)
    p.add_argument("--warmup", type=non_negative, default=1)
    p.add_argument("--prompts", type=positive, default=1, help="distinct prompts per length")
    p.add_argument("--chunk-size", type=positive, default=None, help="prefill chunk")
    add_strategy_options(p)  # with --shape, the kvp pair is a random one
    p.add_argument("--backend", default="mlx", choices=["mlx", "mirror"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="mirror backend device")
    p.add_argument("--continuation", type=non_negative, default=32,
                   help="tokens after each prompt scored for the NLL ratio (0: skip)")
    p.add_argument("--random-tokens", action="store_true",
                   help="random token prompts (speed only: quality columns omitted)")
    p.add_argument("--shape", default=None,
                   help="random-weight model of a real shape instead of --model (llama-1b, "
                   "llama-3b, llama-8b, smollm2-135m; speed only)")
    p.add_argument("--aux-shape", default=None,
                   help="with --shape: a random KVP-C aux of this shape for the kvp strategies "
                   "(default: T-0.50 of the base, random predictor)")
    p.add_argument("--task", default=None,
                   help="add task accuracy: niah-single, niah-multikey, niah-multivalue, "
                   "vartrack[-K], code-line (greedy answers beside full's on the same rows)")
    p.add_argument("--task-rows", type=positive, default=8, help="--task: rows per length")
    p.add_argument("--haystack", default="prose", choices=["filler", "prose", "code"],
                   help="--task: the text the needles hide in")
    p.add_argument("--prefix-tokens", type=positive, default=None, metavar="P",
                   help="prompt-cache mode: TTFT of prompts whose first P tokens were prefilled "
                   "before (cold, warm from a cache file, warm in memory), the rest with full")
    p.add_argument("--json", metavar="FILE", default=None, help="write the records as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="PNG: TTFT vs prompt length, and quality vs TTFT")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console
    from rich.progress import Progress

    from edgeprefill.bench import load_bench_model, run_bench
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.prefill.registry import parse

    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    strategies = parse_list(args.strategies, str, "--strategies")
    for s in strategies:
        parse(s)  # an unknown name fails before the model loads
    if args.task:
        from edgeprefill.tasks import check_task

        check_task(args.task)
    if args.aux_shape and not args.shape:
        raise EdgeprefillError("--aux-shape goes with --shape (random-weight models)")
    lm = load_bench_model(args.model, args.shape, args.dtype)
    if args.prefix_tokens:
        return run_prefix(args, lm, lengths)
    kvp = f"random:{args.aux_shape}" if args.aux_shape else args.kvp
    console = Console(stderr=True)
    total = len(lengths) * len(strategies) * args.prompts * (args.trials + args.warmup)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=total)
        result = run_bench(lm, strategies, lengths, args.backend, args.device, args.trials,
                           args.warmup, args.prompts, args.continuation, args.random_tokens,
                           progress=lambda: bar.advance(task), chunk_size=args.chunk_size,
                           task=(args.task, args.task_rows, args.haystack) if args.task else None,
                           kvp=kvp, kvp_tail=kvp_tail(args), workers=args.workers,
                           hostfile=args.hostfile, say=say_dim(console),
                           **{k: getattr(args, k) for k in SELECT_FLAGS})
    title = print_table(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from edgeprefill.apps.plots import bench_plot

        bench_plot(result["records"], args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_prefix(args, lm, lengths):
    """bench --prefix-tokens: the prompt-cache modes' table and JSON."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from edgeprefill.bench import prefix_records
    from edgeprefill.blas import matmul_gflops
    from edgeprefill.machine import machine_info, now

    header = {**machine_info(), "date": now(), "model": lm.model_id,
              "dtype": str(lm.model.dtype).split(".")[-1], "trials": args.trials,
              "matmul_gflops_fp32": round(matmul_gflops(), 1), "prefix_tokens": args.prefix_tokens}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(lengths) * (args.trials + args.warmup))
        records = prefix_records(lm, lengths, args.prefix_tokens, args.trials, args.warmup,
                                 random_tokens=args.random_tokens or lm.model_id.startswith(
                                     "random:"), progress=lambda: bar.advance(task))
    table = Table(title=f"TTFT with a cached prefix of {args.prefix_tokens} tokens, {lm.model_id}")
    for col in ("mode", "prompt", "new", "TTFT ms (min-max)", "x cold", "load ms", "file MB",
                "same token"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r["mode"], str(r["prompt_tokens"]), str(r["new_tokens"]),
                      f"{r['ttft_s'] * 1e3:.0f} ({r['ttft_min_s'] * 1e3:.0f}-"
                      f"{r['ttft_max_s'] * 1e3:.0f})", f"{r['x_cold']:.3f}",
                      f"{r['load_s'] * 1e3:.0f}" if "load_s" in r else "-",
                      f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-",
                      "yes" if r["same_first_token"] else "NO")
    Console(width=max(Console().width, 110)).print(table)
    if args.json:
        write_json(args.json, {"header": header, "records": records})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def print_table(result):
    """The records as one table on stdout; returns its title."""
    from rich.console import Console
    from rich.table import Table

    h, records = result["header"], result["records"]
    title = (f"TTFT, {h['model']}, {h['backend']} on {h['device']} ({h['blas']} BLAS, "
             f"{h['matmul_gflops_fp32']} GFLOPS)")
    table = Table(title=title)
    task = h.get("task")
    for col in ("strategy", "prompt", "TTFT ms (min-max)", "x full", "tok/s", "GFLOP",
                "peak MB", "agree", "KL", "NLL x", *([f"{task['name']} acc (x full)"]
                                                     if task else [])):
        table.add_column(col, justify="right")
    full = {r["prompt_tokens"]: r["ttft_s"] for r in records if r["strategy"] == "full"}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in records:
        ratio = r["ttft_s"] / full[r["prompt_tokens"]] if r["prompt_tokens"] in full else None
        table.add_row(r["strategy"], str(r["prompt_tokens"]),
                      f"{r['ttft_s'] * 1e3:.0f} ({r['ttft_min_s'] * 1e3:.0f}-"
                      f"{r['ttft_max_s'] * 1e3:.0f})", fmt(ratio, ".2f"),
                      f"{r['prefill_tok_s']:.1f}",
                      f"{r['ttft_flops'] / 1e9:.1f}" if r["ttft_flops"] else "-",
                      f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] else "-",
                      fmt(r["first_token_agreement"], ".2f"), fmt(r["first_token_kl"], ".4f"),
                      fmt(r["nll_ratio"], ".3f"), *([f"{r['task_accuracy']:.2f} ("
                                                     f"{fmt(r['task_relative_accuracy'], '.2f')})"]
                                                    if task else []))
    Console(width=max(Console().width, 110)).print(table)
    return title
