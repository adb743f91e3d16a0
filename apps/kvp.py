"""`edgeprefill kvp fit`: fit a KV Prediction artifact (closed-form ridge) for a model."""

from pathlib import Path

from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    from apps.generate import add_model_args

    p = sub.add_parser("kvp", help="KV Prediction artifacts (fit)")
    ksub = p.add_subparsers(dest="kvp_command", metavar="ACTION", required=True)
    f = ksub.add_parser("fit", help="fit a predictor by closed-form ridge regression")
    add_model_args(f)
    f.add_argument("--aux", default="LP-0.50", help="aux kind: LP-0.75, LP-0.50 or LP-0.25")
    f.add_argument("--tokens", type=int, default=30000, help="fitting tokens (default 30000)")
    f.add_argument("--chunk", type=int, default=256, help="tokens per fitting window")
    f.add_argument("--lam", type=float, default=1e-3, help="relative ridge strength")
    f.add_argument("--out", default=None, help="artifact folder (default: the model's "
                   "default artifact path in the cache)")
    f.set_defaults(run=run_fit)


def parse_aux(spec):
    """'LP-0.50' -> 0.5."""
    from edgeprefill.kvp.layer_map import LP_FRACTIONS

    kind, _, frac = spec.partition("-")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = None
    if kind != "LP" or fraction not in LP_FRACTIONS:
        raise EdgeprefillError(f"unknown --aux '{spec}': use LP-0.75, LP-0.50 or LP-0.25")
    return fraction


def default_artifact_path(model_id, aux="LP-0.50"):
    """Where `kvp fit` puts, and `--strategy kvp` looks for, a model's artifact."""
    from edgeprefill.loading import cache_dir

    safe = model_id.replace("/", "--")
    return cache_dir() / "kvp" / f"{safe}-{aux}"


def run_fit(args):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.data import FIT_MODULES, fit_chunks
    from edgeprefill.kvp.artifact import save_artifact
    from edgeprefill.kvp.aux import layer_pruned_aux
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.layer_map import lp_layer_map
    from edgeprefill.loading import load

    fraction = parse_aux(args.aux)
    if args.tokens < args.chunk or args.chunk < 8:
        raise EdgeprefillError("--tokens must be >= --chunk and --chunk >= 8")
    lm = load(args.model, dtype=args.dtype)
    base = lm.model
    aux = layer_pruned_aux(base, fraction)
    layer_map = lp_layer_map(base.n_layers, aux.layers)
    chunks = fit_chunks(lm.tokenizer, args.tokens, args.chunk)
    total = sum(len(c) for c in chunks)
    console = Console(stderr=True)
    with Progress(TextColumn("fitting {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} tokens"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(aux.kind, total=total)
        pred, tokens = fit_ridge(base, aux, layer_map, chunks, lam=args.lam,
                                 progress=lambda done: bar.update(task, completed=done))
    out = Path(args.out) if args.out else default_artifact_path(lm.model_id, args.aux)
    fit_info = {"method": "ridge", "lam": args.lam, "tokens": tokens, "chunk": args.chunk,
                "steps": 0, "data": "python-stdlib:" + ",".join(FIT_MODULES)}
    save_artifact(out, pred, aux, base, lm.model_id, fit_info)
    console.print(f"wrote {out} ({aux.kind}, {len(aux.layers)}/{base.n_layers} layers, "
                  f"{tokens} tokens)")
    return 0
