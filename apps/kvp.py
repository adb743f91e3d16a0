"""`edgeprefill kvp fit|sweep|diagnose`: KV Prediction artifacts for a model, the Pareto
sweep, and where a pair loses a long-prompt task's answer."""

import sys
from pathlib import Path

from edgeprefill.apps.argtypes import non_negative, positive, positive_float
from edgeprefill.apps.shared import add_rank_arg, builtin_refs, evaluate_refs
from edgeprefill.errors import EdgeprefillError

from edgeprefill.kvp.pairs import (DEFAULT_AUX, build_predictor, check_rank,  # noqa: F401
                                   default_artifact_path, resolve_source)


def add_fit_args(p):
    p.add_argument("--tokens", type=positive, default=30000, help="fitting tokens (default 30000)")
    p.add_argument("--chunk", type=positive, default=256, help="tokens per fitting window")
    p.add_argument("--lam", type=positive_float, default=1e-3, help="relative ridge strength")
    p.add_argument("--input", default="auto", choices=["auto", "kv", "hidden", "hidden-in",
                                                      "hidden2"],
                   help="predictor input: aux K/V (paper) or the aux's hidden state "
                   "(auto: hidden for T, kv for LP)")


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args

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
    f.add_argument("--eval-pairs", type=non_negative, default=16,
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
    s.add_argument("--pairs", type=positive, default=24, help="most pairs to evaluate")
    add_fit_args(s)
    s.add_argument("--json", dest="json_out", default="kvp-sweep.json", metavar="FILE")
    s.add_argument("--plot", default="kvp-sweep.png", metavar="FILE.png")
    s.add_argument("--dir", default=None, help="where fitted artifacts go (default: cache)")
    s.set_defaults(run=run_sweep)

    d = ksub.add_parser("diagnose", help="where kvp loses a long-prompt task's answer: "
                        "accuracy with parts of the predicted KV made exact")
    add_model_args(d)
    d.add_argument("--kvp", default=None, help="the pair folder (default: the model's)")
    d.add_argument("--kvp-tail", type=positive, default=None,
                   help="tokens the base runs itself (default: the pair's card)")
    d.add_argument("--task", default="niah-single",
                   help="a needle task: niah-single, niah-multikey, niah-multivalue, "
                   "vartrack[-K]")
    d.add_argument("--prompt-tokens", type=positive, default=2048, help="prompt length")
    d.add_argument("--rows", type=positive, default=50, help="rows")
    d.add_argument("--haystack", default="prose", choices=["filler", "prose", "code"])
    d.add_argument("--seed", type=non_negative, default=0, help="which rows")
    d.add_argument("--groups", type=positive, default=3,
                   help="the predicted layers are made exact in this many depth groups")
    d.add_argument("--parts", default="layers,needles",
                   help="which parts to make exact beside the controls: layers (the aux-copied "
                   "layers and the predicted ones in --groups), needles (the needle's tokens, "
                   "and every token but them)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(run=run_diagnose)

    from edgeprefill.apps.kvp_train import add_train_parser

    add_train_parser(ksub)


def fit_artifact(lm, aux_spec, out, eval_refs=None, console=None, **options):
    """`edgeprefill.kvp.pairs.fit_artifact` with a progress bar, measured on `eval_refs`
    (evaluate.Reference list) if given. Returns (path, quality dict)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeprefill.kvp import pairs

    console = console or Console(stderr=True)
    measure = None
    if eval_refs:
        measure = lambda s: evaluate_refs(lm, s, eval_refs, console, "evaluating")  # noqa: E731
    with Progress(TextColumn("fitting {task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} tokens"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(str(aux_spec), total=None)

        def progress(done, total, label):
            bar.update(task, completed=done, total=total, description=label)

        return pairs.fit_artifact(lm, aux_spec, out, measure=measure, progress=progress,
                                  **options)


def run_fit(args):
    from rich.console import Console

    from edgeprefill.kvp.aux import parse_aux_kind
    from edgeprefill.loading import load

    source = resolve_source(args.aux, args.input)
    kind, _ = parse_aux_kind(args.aux)
    if (kind == "C") != bool(args.aux_model):
        raise EdgeprefillError("--aux C and --aux-model go together: pass both or neither")
    check_rank(args.predictor_rank, source)
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
    path, q = fit_artifact(lm, args.aux, out, refs, console, source=source, tokens=args.tokens,
                           chunk=args.chunk, lam=args.lam, aux_lm=aux_lm,
                           rank=args.predictor_rank)
    card_q = (f"; held-out agreement {q['first_token_agreement']:.2f}, KL "
              f"{q['first_token_kl']:.3f}, NLL ratio {q['nll_ratio']:.2f}" if q else "")
    rank = f" of rank {args.predictor_rank}" if args.predictor_rank else ""
    console.print(f"wrote {path} ({args.aux}, {source} predictor{rank}{card_q})")
    return 0


def run_sweep(args):
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import parse_list, write_json
    from edgeprefill.data import BUILTIN_PAIRS
    from edgeprefill.flops import prefill_flops
    from edgeprefill.prefill.registry import flops
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
    full_flops = prefill_flops(lm.config, n_prompt)
    records = [{"aux": "-", "strategy": "full", "predictor_input": "-", "ttft_flops": full_flops,
                "flops_ratio": 1.0, "ttft_s": sum(r.ttft_s for r in refs) / len(refs),
                "first_token_agreement": 1.0, "first_token_kl": 0.0, "nll_ratio": 1.0,
                "greedy_match": float(len(refs[0].greedy))}]
    for kind in kinds:
        source = resolve_source(kind, args.input)
        out = (Path(args.dir) / f"{kind}-{source}" if args.dir
               else default_artifact_path(lm.model_id, kind, source))
        if not out.exists():
            fit_artifact(lm, kind, out, console=console, source=source, tokens=args.tokens,
                         chunk=args.chunk, lam=args.lam)
        aux, pred, _ = load_artifact(out, lm.model)
        for strategy in (KVPrediction(lm.model, aux, pred), AuxOnly(lm.model, aux)):
            q = evaluate_refs(lm, strategy, refs, console, f"{strategy.name} {aux.kind}")
            fl = flops(strategy.name, strategy, lm.config, n_prompt)
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
        from edgeprefill.apps.plots import pareto_plot

        pareto_plot(records, args.plot, f"{lm.model_id}: quality vs TTFT FLOPs")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_diagnose(args):
    import json

    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import command_line, with_bar
    from edgeprefill.kvp.diagnose import diagnose_rows
    from edgeprefill.loading import load
    from edgeprefill.machine import machine_info, now
    from edgeprefill.prefill.registry import build
    from edgeprefill.tasks import check_task, make_rows, run_rows, summarize_rows

    from edgeprefill.apps.shared import parse_list
    from edgeprefill.kvp.diagnose import PARTS

    check_task(args.task)
    parts = parse_list(args.parts, str, "--parts")
    if not parts or set(parts) - set(PARTS):
        raise EdgeprefillError(f"--parts takes {', '.join(PARTS)}, comma-separated "
                               f"(got '{args.parts}')")
    if args.task == "code-line":
        raise EdgeprefillError("kvp diagnose needs a needle task (niah-*, vartrack*): "
                               "code-line has no needle to repair")
    lm = load(args.model, dtype=args.dtype)
    if args.prompt_tokens + 64 >= lm.model.max_context:
        raise EdgeprefillError(f"--prompt-tokens {args.prompt_tokens} does not fit the "
                               f"model's context ({lm.model.max_context}): use shorter prompts")
    console = Console(stderr=True)
    rows = make_rows(lm.tokenizer, args.task, args.prompt_tokens, args.rows, args.haystack,
                     args.seed)
    kvp = build("kvp", lm, kvp=args.kvp, kvp_tail=args.kvp_tail,
                say=lambda m: console.print(m))
    full = with_bar(console, "full", lambda p: run_rows(lm, build("full", lm), rows,
                                                        progress=p))
    out = with_bar(console, "diagnosing", lambda p: diagnose_rows(lm, kvp, rows, args.groups,
                                                                  parts, progress=p))
    records = [{"variant": "full", "summary": summarize_rows(full, full), "rows": full}]
    records += [{"variant": k, "summary": summarize_rows(v, full), "rows": v}
                for k, v in out["variants"].items()]
    payload = {"command": command_line(), "date": now(), "machine": machine_info(),
               "model": lm.model_id, "task": args.task, "haystack": args.haystack,
               "prompt_tokens": args.prompt_tokens, "seed": args.seed, "tail": kvp.tail,
               "aux": kvp.aux.kind, "needle_tokens": out["needle_tokens"], "records": records}
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(title=f"kvp diagnosis: {args.task} ({args.haystack}), {args.prompt_tokens} "
                        f"tokens, {len(rows)} rows, {lm.model_id}",
                  caption="each row: kvp with that part of the cache exact (the base's own "
                          "K/V), the rest predicted")
    for col in ("exact part", "accuracy", "95% CI", "x full"):
        table.add_column(col, justify="right")
    for r in records:
        s = r["summary"]
        rel = s.get("relative_accuracy")
        table.add_row(r["variant"], f"{s['accuracy']:.2f}",
                      "{:.2f}-{:.2f}".format(*s["accuracy_ci95"]),
                      "-" if rel is None else f"{rel:.2f}")
    out_console = Console()
    (out_console if out_console.is_terminal else Console(width=160)).print(table)
    return 0
