"""`edgeprefill eval`: a strategy's quality against the base's exact prefill on held-out pairs."""

import json
import sys

from edgeprefill.apps.argtypes import non_negative, positive
from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    from edgeprefill.apps.shared import add_model_args, add_strategy_args

    p = sub.add_parser("eval", help="quality of prefill strategies vs the exact prefill")
    add_model_args(p)
    add_strategy_args(p, default="kvp")  # a comma list of strategies here
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='{"prompt", "continuation"} lines (default: 40 built-in held-out pairs '
                   "of code and prose, ~384-token prompts)")
    p.add_argument("--pairs", type=positive, default=40, help="most pairs to evaluate")
    p.add_argument("--greedy-tokens", type=positive, default=16,
                   help="length of the base's greedy continuation to match")
    p.add_argument("--task", default=None,
                   help="a long-prompt task instead of the pairs: niah-single, niah-multikey, "
                   "niah-multivalue, vartrack (or vartrack-K, K names in the chain), code-line "
                   "(greedy answers, exact match)")
    p.add_argument("--prompt-tokens", default="1024,2048", help="--task: prompt lengths")
    p.add_argument("--rows", type=positive, default=50, help="--task: rows per length")
    p.add_argument("--haystack", default="prose", choices=["filler", "prose", "code"],
                   help="--task: the text the needles hide in")
    p.add_argument("--seed", type=non_negative, default=0, help="--task: which rows")
    p.add_argument("--followup", action="store_true",
                   help="--task niah-multikey: score a second question about another key, asked "
                   "in a next turn over each strategy's first-turn cache, unhealed and healed "
                   "(recomputed exactly), against full")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="--task: the strategies decode over a 4- or 8-bit cache (full, the "
                   "reference, over the exact one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import (build_strategy, builtin_refs, command_line,
                                         evaluate_refs, parse_list)
    from edgeprefill.machine import machine_info, now
    from edgeprefill.data import BUILTIN_PAIRS
    from edgeprefill.flops import prefill_flops
    from edgeprefill.loading import load
    from edgeprefill.prefill.registry import flops, parse
    from edgeprefill.quality import NEAR_TIE

    names = parse_list(args.strategy, str, "--strategy")
    if args.task or (args.data and _has_answers(args.data)):
        return run_task(args, names)
    if args.pairs < 1 or args.greedy_tokens < 1:
        raise EdgeprefillError("--pairs and --greedy-tokens must be >= 1")
    for n in names:
        parse(n)
    lm = load(args.model, dtype=args.dtype)
    console = Console(stderr=True)
    strategies = [build_strategy(args, lm, n, console) for n in names]
    refs = builtin_refs(lm, args.pairs, console, args.data, args.greedy_tokens)
    n_prompt = round(sum(len(r.prompt) for r in refs) / len(refs))
    results = []
    for name, strategy in zip(names, strategies):
        q = evaluate_refs(lm, strategy, refs, console, f"evaluating {name}")
        fl = flops(name, strategy, lm.config, n_prompt)
        full = prefill_flops(lm.config, n_prompt)
        aux = getattr(strategy, "aux", None)
        results.append({"strategy": name, "aux": aux.kind if aux else None,
                        **({"tail": strategy.tail} if hasattr(strategy, "tail") else {}),
                        "ttft_flops": fl, "flops_ratio": fl / full if fl else None, **q})
    payload = {"command": command_line(), "date": now(), "machine": machine_info(),
               "model": lm.model_id, "data": args.data or BUILTIN_PAIRS,
               "prompt_tokens_mean": n_prompt, "results": results}
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(title=f"quality vs exact prefill, {lm.model_id}, {len(refs)} pairs, "
                        f"~{n_prompt}-token prompts",
                  caption=f"agree 95%: the agreement's 95% (Wilson) interval over these pairs; "
                          f"clear: agreement on the N pairs whose base top-two first-token "
                          f"probabilities are >= {NEAR_TIE} apart (the rest are near-ties)")
    for col in ("strategy", "aux", "FLOPs x", "TTFT ms", "exact ms", "agree", "agree 95%",
                "clear", "KL", "NLL", "NLL exact", "NLL x",
                f"greedy /{args.greedy_tokens}"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["strategy"], r["aux"] or "-",
                      f"{r['flops_ratio']:.2f}" if r["flops_ratio"] else "-",
                      f"{r['ttft_s'] * 1e3:.0f}", f"{r['ttft_exact_s'] * 1e3:.0f}",
                      f"{r['first_token_agreement']:.2f}",
                      "{:.2f}-{:.2f}".format(*r["agreement_ci95"]),
                      "-" if r["agreement_clear"] is None else
                      f"{r['agreement_clear']:.2f}/{r['pairs'] - r['near_ties']}",
                      f"{r['first_token_kl']:.3f}",
                      f"{r['nll']:.3f}", f"{r['nll_exact']:.3f}", f"{r['nll_ratio']:.3f}",
                      f"{r['greedy_match']:.1f}")
    out = Console()
    # piped or redirected output: a width that fits every column (rich assumes 80)
    (out if out.is_terminal else Console(width=160)).print(table)
    sys.stdout.flush()
    return 0


def _has_answers(path):
    """Whether a --data file holds task rows ({"prompt", "answer"}) rather than pairs."""
    from pathlib import Path

    try:
        first = next(x for x in Path(path).read_text(errors="replace").splitlines() if x.strip())
        return '"answer"' in first
    except (OSError, StopIteration):
        return False


def run_task(args, names):
    """--task / --data with answers: greedy answers per strategy, accuracy against full's."""
    from rich.console import Console
    from rich.table import Table

    from edgeprefill.apps.shared import build_strategy, command_line, parse_list, with_bar
    from edgeprefill.loading import load
    from edgeprefill.machine import machine_info, now
    from edgeprefill.prefill.registry import parse
    from edgeprefill.tasks import (check_task, evaluate_followup, evaluate_task, make_rows,
                                   read_task_rows)

    for n in names:
        parse(n)
    if args.task:
        check_task(args.task)
    if args.followup and args.task != "niah-multikey":
        raise EdgeprefillError("--followup needs --task niah-multikey (its rows carry a second "
                               "question)")
    if args.followup and args.kv_bits:
        raise EdgeprefillError("--followup and --kv-bits measure different things: pass one")
    rows_from_file = read_task_rows(args.data) if args.data else None
    lengths = [] if rows_from_file else parse_list(args.prompt_tokens, int, "--prompt-tokens")
    lm = load(args.model, dtype=args.dtype)
    console = Console(stderr=True)
    for n in lengths:
        if n + 64 >= lm.model.max_context:
            raise EdgeprefillError(f"--prompt-tokens {n} does not fit the model's context "
                                   f"({lm.model.max_context}): use shorter prompts")
    sets = ({args.data: rows_from_file} if rows_from_file else
            {n: make_rows(lm.tokenizer, args.task, n, args.rows, args.haystack, args.seed)
             for n in lengths})
    built = {n: build_strategy(args, lm, n, console) for n in names}
    try:
        if args.followup:
            records = with_bar(console, "answering", lambda progress: evaluate_followup(
                lm, built, sets, progress))
        else:
            records = with_bar(console, "answering", lambda progress: evaluate_task(
                lm, built, sets, progress, kv_bits=args.kv_bits))
    finally:
        for s in built.values():
            if hasattr(s, "close"):
                s.close()
    payload = {"command": command_line(), "date": now(), "machine": machine_info(),
               "model": lm.model_id, "task": args.task or "data", "haystack": args.haystack,
               "seed": args.seed, "kv_bits": args.kv_bits, "followup": args.followup,
               "records": records}
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    table = Table(title=f"{payload['task']} ({args.haystack}), {lm.model_id}: greedy answers, "
                        "exact match" + (" (the follow-up question, a next turn)"
                                         if args.followup else ""))
    similar = any("similarity" in r["summary"] for r in records)
    for col in ("strategy", "prompt", "rows", "accuracy", "95% CI", "x full",
                *(("similarity", "x full") if similar else ()), "TTFT ms"):
        table.add_column(col, justify="right")
    for r in records:
        s = r["summary"]
        rel, rel_sim = s.get("relative_accuracy"), s.get("relative_similarity")
        name = r["strategy"] + (", healed" if r.get("healed") else "")
        table.add_row(name, str(r["set"]), str(s["rows"]), f"{s['accuracy']:.2f}",
                      "{:.2f}-{:.2f}".format(*s["accuracy_ci95"]),
                      "-" if rel is None else f"{rel:.2f}",
                      *((f"{s['similarity']:.3f}", "-" if rel_sim is None else f"{rel_sim:.2f}")
                        if similar else ()), f"{s['ttft_s'] * 1e3:.0f}")
    out = Console()
    (out if out.is_terminal else Console(width=160)).print(table)
    return 0
