"""`edgeprefill runahead tune | project`: the partition table and the multi-machine projection
(edgeprefill.distributed.tune does the work; this parses and prints)."""


from edgeprefill.apps.argtypes import non_negative_float, positive, positive_float
from edgeprefill.distributed.launch import BACKENDS


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args

    p = sub.add_parser("runahead", help="KV-Runahead: partition tuning and projection")
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


def load_for(args):
    """--model, or with --shape a random-weight model of that real shape."""
    from edgeprefill.bench import load_bench_model

    return load_bench_model(args.model, getattr(args, "shape", None), args.dtype)


def run_tune(args):
    from rich.console import Console

    from edgeprefill.apps.shared import parse_list, write_json
    from edgeprefill.distributed.tune import tune

    workers = parse_list(args.workers, int, "--workers")
    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    alphas = parse_list(args.alphas, float, "--alphas")
    console = Console(stderr=True)
    record = tune(load_for(args), workers, lengths, alphas, args.trials, args.with_tsp,
                  args.out, args.dtype, args.backend, args.timeout,
                  say=lambda msg: console.print(msg, highlight=False))
    console.print(f"wrote {record['table']}")
    if args.json:
        write_json(args.json, record)
        console.print(f"wrote {args.json}")
    return 0


def run_project(args):
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import parse_list, write_json
    from edgeprefill.distributed.tune import project, read_tune_records

    workers = parse_list(args.workers, int, "--workers")
    lengths = parse_list(args.prompt_tokens, int, "--prompt-tokens")
    links = parse_list(args.links, float, "--links")
    measured = read_tune_records(args.measured.split(",") if args.measured else [])
    console = Console(stderr=True)
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    rec = project(load_for(args), workers, lengths, links, args.latency_us, measured,
                  args.chunk_size, say)
    table = Table(title=f"Projected TTFT (s), {rec['model']}: layer times measured on "
                        f"{rec['machine'].get('mlx_device', '?')}, links at "
                        f"{args.latency_us:g} us latency")
    for col in ("Gb/s", "tokens", "full (1)", *[f"p={p} runahead / tsp" for p in workers]):
        table.add_column(col, justify="right")
    rows = {}
    for r in rec["projection"]:
        rows.setdefault((r["gbit_s"], r["n"]), [r["full_s"]]).append(
            f"{r['runahead_s']:.2f} / {r['tsp_s']:.2f}")
    for (gb, n), (full, *cells) in rows.items():
        table.add_row(f"{gb:g}", str(n), f"{full:.2f}", *cells)
    Console(width=max(Console().width, 140)).print(table)
    for r in rec["full"]:
        say(f"full {r['n']}: measured {r['measured_s'] * 1e3:.1f} ms, model "
            f"{r['predicted_s'] * 1e3:.1f} ms")
    for r in rec["validation"]:
        say(f"p={r['workers']} {r['backend']} n={r['n']} {r['strategy']} {r['sizes']}: "
            f"measured {r['measured_s'] * 1e3:.1f} ms, model {r['predicted_s'] * 1e3:.1f} ms")
    if args.json:
        write_json(args.json, rec)
        console.print(f"wrote {args.json}")
    if args.plot:
        from edgeprefill.apps.plots import projection_plot

        projection_plot(rec, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
