"""What several commands share: their common flags, the progress bars they put around library
calls, and how they read prompts and write records."""

import json
import sys

from edgeprefill.apps.argtypes import positive
from edgeprefill.errors import EdgeprefillError


def add_model_args(p):
    """--model / --dtype, shared by every command that loads a model."""
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), an HF folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="activation/weight dtype (auto: float32 on CPU, as stored on GPU)")


def add_kvp_tail_arg(p):
    """--kvp-tail, shared by the commands that run kvp."""
    p.add_argument("--kvp-tail", type=positive, default=None, metavar="T",
                   help="kvp / runahead-kvp: the base runs the prompt's last T tokens itself, "
                   "over the predicted cache of the rest (default: the pair's card; 1 is the "
                   "paper; more costs more FLOPs and tracks the base closer)")


def kvp_tail(args):
    """--kvp-tail if given (checked), else None: the card decides."""
    from edgeprefill.prefill import check_kvp_tail

    tail = getattr(args, "kvp_tail", None)
    check_kvp_tail(tail)
    return tail


def read_prompt(value):
    """The --prompt value, or stdin for '-' (either must be UTF-8)."""
    from edgeprefill.fsio import check_utf8, decode_utf8

    if value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeprefillError("--prompt - reads stdin, but nothing is piped: pipe the prompt in")
        return decode_utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    return check_utf8(value, "--prompt")


def validate_sampling(args):
    from edgeprefill.generate import check_sampling

    check_sampling(args.max_tokens, args.temp, args.top_p)


def strategy_options(args, lm, name=None):
    """make_strategy options from --kvp and --kvp-tail (kvp, aux-only, runahead-kvp)."""
    from rich.console import Console

    from edgeprefill.prefill import pair_options

    err = Console(stderr=True)
    return pair_options(lm, name or args.strategy, args.kvp, kvp_tail(args),
                        say=lambda msg: err.print(f"[dim]{msg}[/dim]", highlight=False))


def stats_line(stats):
    """One human line: TTFT, prefill and decode speed."""
    return (f"strategy {stats['strategy']} | prompt {stats['prompt_tokens']} tok | "
            f"TTFT {stats['ttft_s'] * 1000:.0f} ms | prefill {stats['prefill_tok_s']:.1f} tok/s | "
            f"decode {stats['generated_tokens']} tok, {stats['decode_tok_s']:.1f} tok/s")


def parse_list(text, cast, what):
    try:
        items = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EdgeprefillError(f"bad {what} list '{text}': give comma-separated values") from None
    if not items:
        raise EdgeprefillError(f"empty {what} list: give at least one value")
    return items


def write_json(path, payload):
    """Write JSON atomically (temp file, then rename)."""
    from edgeprefill.fsio import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


def add_rank_arg(p):
    p.add_argument("--predictor-rank", type=positive, default=None, metavar="R",
                   help="a low-rank predictor: one shared (input -> R) map, then R -> K/V per "
                   "layer; the best rank-R approximation of the fit on the fitting text's "
                   "inputs (hidden-state inputs; fewer FLOPs, see README)")


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
