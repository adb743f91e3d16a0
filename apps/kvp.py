"""`edgeprefill kvp fit|sweep`: KV Prediction artifacts for a model, and the Pareto sweep."""

import json
import sys
from pathlib import Path

from edgeprefill.errors import EdgeprefillError

DEFAULT_AUX = "T-0.50"  # the default pair: truncated aux, hidden-state predictor


def add_fit_args(p):
    p.add_argument("--tokens", type=int, default=30000, help="fitting tokens (default 30000)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per fitting window")
    p.add_argument("--lam", type=float, default=1e-3, help="relative ridge strength")
    p.add_argument("--input", default="auto", choices=["auto", "kv", "hidden", "hidden-in",
                                                      "hidden2"],
                   help="predictor input: aux K/V (paper) or the aux's hidden state "
                   "(auto: hidden for T, kv for LP)")


def add_rank_arg(p):
    p.add_argument("--predictor-rank", type=int, default=None, metavar="R",
                   help="a low-rank predictor: one shared (input -> R) map, then R -> K/V per "
                   "layer; the best rank-R approximation of the fit on the fitting text's "
                   "inputs (hidden-state inputs; fewer FLOPs, see README)")


def check_rank_arg(rank, source):
    """Raise EdgeprefillError unless --predictor-rank suits the predictor input."""
    from edgeprefill.kvp.predictor import check_rank

    try:
        check_rank(rank, source)
    except ValueError as e:
        raise EdgeprefillError(f"--predictor-rank {rank}: {e}; pass a positive rank with "
                               "--input hidden, hidden-in or hidden2, or drop the option") from None


def add_parser(sub):
    from apps.generate import add_model_args

    p = sub.add_parser("kvp", help="KV Prediction artifacts (fit, train, sweep)")
    ksub = p.add_subparsers(dest="kvp_command", metavar="ACTION", required=True)
    f = ksub.add_parser("fit", help="fit a predictor by closed-form ridge regression")
    add_model_args(f)
    f.add_argument("--aux", default=DEFAULT_AUX,
                   help=f"aux kind: LP-0.75, LP-0.50, LP-0.25, T-<fraction>, or C with "
                   f"--aux-model (default {DEFAULT_AUX})")
    f.add_argument("--aux-model", default=None,
                   help="KVP-C: the smaller model (same tokenizer) used as the aux")
    add_fit_args(f)
    add_rank_arg(f)
    f.add_argument("--eval-pairs", type=int, default=16,
                   help="held-out pairs to measure quality on for the card (0: skip)")
    f.add_argument("--out", default=None, help="artifact folder (default: the model's "
                   "artifact path in the cache, which --strategy kvp uses)")
    f.set_defaults(run=run_fit)

    s = ksub.add_parser("sweep", help="fit and evaluate a grid of aux kinds: Pareto table")
    add_model_args(s)
    s.add_argument("--kinds", default="T-0.25,T-0.50,T-0.75,LP-0.25,LP-0.50,LP-0.75",
                   help="comma list of aux kinds")
    s.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="held-out pairs (default: the built-in held-out set)")
    s.add_argument("--pairs", type=int, default=24, help="most pairs to evaluate")
    add_fit_args(s)
    s.add_argument("--json", dest="json_out", default="kvp-sweep.json", metavar="FILE")
    s.add_argument("--plot", default="kvp-sweep.png", metavar="FILE.png")
    s.add_argument("--dir", default=None, help="where fitted artifacts go (default: cache)")
    s.set_defaults(run=run_sweep)

    from apps.kvp_train import add_train_parser

    add_train_parser(ksub)


def default_artifact_path(model_id, aux=DEFAULT_AUX, source=None, rank=None):
    """Where `kvp fit` puts, and `--strategy kvp` looks for, a model's artifact (a low-rank
    one gets its own folder, `-r<rank>`)."""
    from edgeprefill.kvp.aux import parse_aux_kind
    from edgeprefill.loading import cache_dir

    kind, fraction = parse_aux_kind(aux)
    if kind == "C":
        raise EdgeprefillError("a KVP-C artifact has no default path: pass --out")
    source = source or ("hidden" if kind == "T" else "kv")
    safe = model_id.replace("/", "--")
    suffix = "" if source == ("hidden" if kind == "T" else "kv") else f"-{source}"
    suffix += f"-r{rank}" if rank else ""
    return cache_dir() / "kvp" / f"{safe}-{kind}-{fraction:.2f}{suffix}"


def resolve_source(aux_spec, source):
    from edgeprefill.kvp.aux import parse_aux_kind

    if source in (None, "auto"):
        return "hidden" if parse_aux_kind(aux_spec)[0] == "T" else "kv"
    return source


def build_predictor(base, aux_spec, source, aux_lm=None, tokenizer=None, rank=None):
    """(aux, empty KVPredictor) for an aux kind and predictor input (C: aux_lm, a LoadedModel
    checked against the base's tokenizer); `rank`: a low-rank predictor."""
    from edgeprefill.kvp.aux import make_aux
    from edgeprefill.kvp.predictor import KVPredictor, input_dim

    aux, layer_map, exact = make_aux(base, aux_spec, aux_lm, tokenizer)
    in_dim = input_dim(aux, source)
    return aux, KVPredictor(layer_map, in_dim, base.n_kv_heads, base.head_dim, source, exact,
                            rank)


def fit_artifact(lm, aux_spec, out, source="auto", tokens=30000, chunk=256, lam=1e-3,
                 eval_refs=None, console=None, aux_lm=None, rank=None):
    """Fit an artifact by ridge with a progress bar (`rank`: then reduce it to a low-rank
    predictor), measure it on `eval_refs` (evaluate.Reference list) if given, write it
    atomically. Returns (path, quality dict)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.data import BUILTIN_PAIRS, FIT_DATA, fit_chunks
    from edgeprefill.kvp.artifact import save_artifact
    from edgeprefill.kvp.fit import fit_ridge

    if tokens < chunk or chunk < 8:
        raise EdgeprefillError("--tokens must be >= --chunk and --chunk >= 8")
    source = resolve_source(aux_spec, source)
    check_rank_arg(rank, source)
    base = lm.model
    aux, pred = build_predictor(base, aux_spec, source, aux_lm, lm.tokenizer)
    chunks = fit_chunks(lm.tokenizer, tokens, chunk)
    total = sum(len(c) for c in chunks)
    console = console or Console(stderr=True)
    with Progress(TextColumn("fitting {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} tokens"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"{aux.kind} ({source}{f', rank {rank}' if rank else ''})",
                            total=total)
        pred, used = fit_ridge(base, aux, pred, chunks, lam=lam, rank=rank,
                               progress=lambda done: bar.update(task, completed=done))
    quality = {}
    if eval_refs:
        quality = evaluate_refs(lm, make_kvp_strategy(base, aux, pred), eval_refs, console,
                                f"evaluating {aux.kind}")
        quality["data"] = BUILTIN_PAIRS
    fit_info = {"method": "ridge", "lam": lam, "tokens": used, "chunk": chunk, "steps": 0,
                "data": FIT_DATA}
    save_artifact(out, pred, aux, base, lm.model_id, fit_info, quality)
    return Path(out), quality


def make_kvp_strategy(base, aux, pred):
    from edgeprefill.prefill.kv_prediction import KVPrediction

    return KVPrediction(base, aux, pred)


def evaluate_refs(lm, strategy, refs, console, label):
    """Summary metrics of `strategy` over references, with a progress bar."""
    from rich.progress import Progress

    from edgeprefill.evaluate import score, summarize

    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=len(refs))
        for ref in refs:
            rows.append(score(lm.model, strategy, ref))
            bar.advance(task)
    greedy = len(refs[0].greedy) if refs else 0
    return summarize(rows, greedy)


def builtin_refs(lm, n_pairs, console, data=None, greedy_tokens=16):
    """Exact-prefill references for held-out pairs (a JSONL file or the built-in set)."""
    from rich.progress import Progress

    from edgeprefill.data import heldout_pairs, read_pairs
    from edgeprefill.evaluate import reference, tokenize_pairs

    rows = read_pairs(data) if data else heldout_pairs(lm.tokenizer, n_pairs)
    pairs = tokenize_pairs(lm.tokenizer, rows)[:n_pairs]
    for p, c in pairs:
        if len(p) + len(c) + greedy_tokens >= lm.model.max_context:
            raise EdgeprefillError(f"an evaluation pair has {len(p) + len(c)} tokens, beyond "
                                   f"the model's context {lm.model.max_context}: shorten it")
    refs = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("exact prefill references", total=len(pairs))
        for p, c in pairs:
            refs.append(reference(lm.model, p, c, greedy_tokens))
            bar.advance(task)
    return refs


def bundled_dir():
    """edgeprefill/assets: trained pairs shipped with the package."""
    import edgeprefill

    return Path(edgeprefill.__file__).resolve().parent / "assets"


def stale_bundled_copy(path, shipped):
    """True when `path` holds an earlier release's bundled pair (trained, not a ridge fit
    made here) whose weights (predictor, trained aux blocks) or card (e.g. its exact tail)
    differ from the ones shipped now: it is then replaced."""
    import filecmp

    try:
        card = json.loads((Path(path) / "card.json").read_text())
    except (OSError, ValueError):
        return False
    if card.get("fit", {}).get("method") == "ridge" or not (shipped / "card.json").is_file():
        return False
    names = {f.name for f in shipped.glob("*.safetensors")}
    return names != {f.name for f in Path(path).glob("*.safetensors")} or not all(
        filecmp.cmp(Path(path) / n, shipped / n, shallow=False) for n in names | {"card.json"})


def ensure_default_artifact(lm, path):
    """The default pair on first use (the bundled model only): the trained pair shipped with
    edgeprefill when it matches the model, else a ridge fit; other models are left alone."""
    import shutil

    from rich.console import Console

    from edgeprefill.fsio import atomic_folder
    from edgeprefill.kvp.artifact import load_artifact

    shipped = bundled_dir() / Path(path).name
    if lm.spec != "default" or Path(path).exists() and not stale_bundled_copy(path, shipped):
        return path
    console = Console(stderr=True)
    if shipped.is_dir():
        try:
            _, _, card = load_artifact(shipped, lm.model)
        except EdgeprefillError:
            card = None  # a different build of the model: fit one instead
        if card is not None:
            with atomic_folder(Path(path)) as tmp:
                for f in shipped.iterdir():
                    shutil.copy2(f, tmp / f.name)
            q = card.get("quality") or {}
            console.print(f"[dim]kvp: installed the bundled default pair ({DEFAULT_AUX}, "
                          f"trained; held-out NLL ratio {q.get('nll_ratio', float('nan')):.2f}, "
                          f"first-token agreement {q.get('first_token_agreement', float('nan')):.2f}"
                          f" on {q.get('data', 'held-out pairs')}) in {path}[/dim]")
            return path
    console.print(f"[dim]first use of kvp: fitting the default pair ({DEFAULT_AUX}, hidden-state "
                  f"predictor) into {path}, about two minutes, once[/dim]")
    fit_artifact(lm, DEFAULT_AUX, path, console=console)
    return path


def run_fit(args):
    from rich.console import Console

    from edgeprefill.loading import load

    from edgeprefill.kvp.aux import parse_aux_kind

    source = resolve_source(args.aux, args.input)
    kind, _ = parse_aux_kind(args.aux)
    if (kind == "C") != bool(args.aux_model):
        raise EdgeprefillError("--aux C and --aux-model go together: pass both or neither")
    check_rank_arg(args.predictor_rank, source)
    lm = load(args.model, dtype=args.dtype)
    aux_lm = load(args.aux_model, dtype=args.dtype) if args.aux_model else None
    console = Console(stderr=True)
    refs = builtin_refs(lm, args.eval_pairs, console) if args.eval_pairs > 0 else None
    if args.out:
        out = Path(args.out)
    elif aux_lm:
        out = default_artifact_path(lm.model_id, "LP-0.50").with_name(
            f"{lm.model_id}-C-{aux_lm.model_id}".replace("/", "--"))
    else:
        out = default_artifact_path(lm.model_id, args.aux, source, args.predictor_rank)
    path, q = fit_artifact(lm, args.aux, out, source, args.tokens, args.chunk, args.lam, refs,
                           console, aux_lm, args.predictor_rank)
    card_q = (f"; held-out agreement {q['first_token_agreement']:.2f}, KL "
              f"{q['first_token_kl']:.3f}, NLL ratio {q['nll_ratio']:.2f}" if q else "")
    rank = f" of rank {args.predictor_rank}" if args.predictor_rank else ""
    console.print(f"wrote {path} ({args.aux}, {source} predictor{rank}{card_q})")
    return 0


def run_sweep(args):
    from rich.console import Console
    from rich.table import Table

    from apps.bench import parse_list, write_json
    from edgeprefill.data import BUILTIN_PAIRS
    from edgeprefill.flops import flops_options, strategy_flops
    from edgeprefill.kvp.artifact import load_artifact
    from edgeprefill.loading import load
    from edgeprefill.prefill.aux_only import AuxOnly
    from edgeprefill.prefill.kv_prediction import KVPrediction

    kinds = parse_list(args.kinds, str, "--kinds")
    for k in kinds:
        resolve_source(k, args.input)  # validates the kind before any work
    lm = load(args.model, dtype=args.dtype)
    console = Console(stderr=True)
    refs = builtin_refs(lm, args.pairs, console, args.data)
    n_prompt = round(sum(len(r.prompt) for r in refs) / len(refs))
    full_flops = strategy_flops("full", lm.config, n_prompt)
    records = [{"aux": "-", "strategy": "full", "predictor_input": "-", "ttft_flops": full_flops,
                "flops_ratio": 1.0, "ttft_s": sum(r.ttft_s for r in refs) / len(refs),
                "first_token_agreement": 1.0, "first_token_kl": 0.0, "nll_ratio": 1.0,
                "greedy_match": float(len(refs[0].greedy))}]
    for kind in kinds:
        source = resolve_source(kind, args.input)
        out = (Path(args.dir) / f"{kind}-{source}" if args.dir
               else default_artifact_path(lm.model_id, kind, source))
        if not out.exists():
            fit_artifact(lm, kind, out, source, args.tokens, args.chunk, args.lam,
                         console=console)
        aux, pred, _ = load_artifact(out, lm.model)
        for strategy in (KVPrediction(lm.model, aux, pred), AuxOnly(lm.model, aux)):
            q = evaluate_refs(lm, strategy, refs, console, f"{strategy.name} {aux.kind}")
            fl = strategy_flops(strategy.name, lm.config, n_prompt, **flops_options(strategy))
            records.append({"aux": aux.kind, "strategy": strategy.name,
                            "predictor_input": source if strategy.name == "kvp" else "-",
                            "ttft_flops": fl, "flops_ratio": fl / full_flops,
                            "artifact": str(out), **q})
    table = Table(title=f"KV Prediction sweep, {lm.model_id}, {len(refs)} held-out pairs, "
                        f"~{n_prompt}-token prompts")
    for col in ("strategy", "aux", "input", "FLOPs x", "TTFT ms", "agree", "KL", "NLL x",
                "greedy"):
        table.add_column(col, justify="right")
    for r in records:
        table.add_row(r["strategy"], r["aux"], r["predictor_input"], f"{r['flops_ratio']:.2f}",
                      f"{r['ttft_s'] * 1e3:.0f}", f"{r['first_token_agreement']:.2f}",
                      f"{r['first_token_kl']:.3f}", f"{r['nll_ratio']:.2f}",
                      f"{r['greedy_match']:.1f}")
    Console(width=max(Console().width, 110)).print(table)
    header = {"model": lm.model_id, "pairs": len(refs), "prompt_tokens_mean": n_prompt,
              "data": args.data or BUILTIN_PAIRS}
    write_json(args.json_out, {"header": header, "records": records})
    print(f"wrote {args.json_out}", file=sys.stderr)
    if args.plot:
        from apps.plots import pareto_plot

        pareto_plot(records, args.plot, f"{lm.model_id}: quality vs TTFT FLOPs")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
