"""What several commands share: their common flags, the progress bars they put around library
calls, and how they read prompts and write records."""

import json
import sys

from edgeprefill.apps.argtypes import non_negative, positive, positive_float
from edgeprefill.errors import EdgeprefillError


SELECT_FLAGS = ("keep", "filter_layer", "draft", "lookahead", "select_chunk", "positions")


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
    from edgeprefill.prefill.kv_prediction import check_tail

    tail = getattr(args, "kvp_tail", None)
    check_tail(tail)
    return tail


def add_strategy_args(p, default="full"):
    """--strategy (help read from the registry) and the options strategies take."""
    from edgeprefill.prefill.registry import help_text

    text = help_text().replace("full)", f"{default})").replace("%", "%%")  # argparse formats help
    p.add_argument("--strategy", default=default, help=text)
    add_strategy_options(p)


def add_strategy_options(p):
    """The options strategies take: --kvp, --kvp-tail, --workers, --hostfile."""
    p.add_argument("--kvp", default=None, metavar="FOLDER",
                   help="KV Prediction pair for kvp / aux-only / runahead-kvp (default: the "
                   "model's; the default model's installs on first use)")
    add_kvp_tail_arg(p)
    p.add_argument("--workers", type=positive, default=2,
                   help="runahead / tsp / runahead-kvp: worker processes")
    p.add_argument("--hostfile", default=None,
                   help="runahead / tsp / runahead-kvp: mlx.launch hostfile spreading the "
                   "workers over machines")
    p.add_argument("--keep", type=positive_float, default=None, metavar="K",
                   help="gemfilter / specprefill / kvp+specprefill: the prompt tokens the base "
                   "computes, a fraction in (0, 1] or a count (defaults 0.25 / 0.25 / 0.05 of the "
                   "tokens before the exact tail, at least 160)")
    p.add_argument("--filter-layer", type=non_negative, default=None, metavar="R",
                   help="gemfilter: the layer whose last-token attention selects (default: 0.4 "
                   "of the depth)")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="specprefill: the draft model (same tokenizer), or 'aux' (the kvp "
                   "pair's aux; the default where the model has a pair)")
    p.add_argument("--lookahead", type=non_negative, default=None, metavar="T",
                   help="specprefill: tokens the draft decodes to score with (default 8)")
    p.add_argument("--select-chunk", type=positive, default=None, metavar="C",
                   help="specprefill / kvp+specprefill: tokens per selection chunk (default 32)")
    p.add_argument("--positions", choices=["original", "fresh"], default=None,
                   help="gemfilter / specprefill: kept tokens keep their positions (original; "
                   "specprefill's default) or are renumbered (fresh; gemfilter's default)")


def say_dim(console):
    """A `say` callable printing a notice dimmed on `console`."""
    return lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False)


def build_strategy(args, lm, name=None, console=None):
    """The strategy `name` (default --strategy) with the options from the flags it takes."""
    from rich.console import Console

    from edgeprefill.prefill.registry import build, parse

    name = name or args.strategy
    spec, _ = parse(name)
    opts = {k: v for k, v in strategy_flags(args).items() if k in spec.options}
    return build(name, lm, say=say_dim(console or Console(stderr=True)), **opts)


def strategy_flags(args):
    """The strategy options the command line set ({option: value}; None where unset)."""
    flags = {"kvp": getattr(args, "kvp", None), "kvp_tail": kvp_tail(args),
             "workers": getattr(args, "workers", None), "hostfile": getattr(args, "hostfile", None),
             "chunk_size": getattr(args, "chunk_size", None)}
    flags.update({k: getattr(args, k, None) for k in SELECT_FLAGS})
    return flags


def read_prompt(value):
    """The --prompt value, or stdin for '-' (either must be UTF-8)."""
    from edgeprefill.fsio import check_utf8, decode_utf8

    if value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeprefillError("--prompt - reads stdin, but nothing is piped: pipe the prompt in")
        return decode_utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    return check_utf8(value, "--prompt")


def load_prompt_ids(args, prompt):
    """(the loaded --model, the prompt's token ids: --system, the chat template unless
    --no-chat-template), the length checked against the model's window."""
    from edgeprefill.generate import build_prompt, check_context
    from edgeprefill.loading import load

    lm = load(args.model, dtype=args.dtype)
    ids = build_prompt(lm.tokenizer, prompt, system=args.system,
                       chat_template=not args.no_chat_template)
    check_context(len(ids), lm.model.max_context)
    return lm, ids


def validate_sampling(args):
    from edgeprefill.generate import check_sampling

    check_sampling(args.max_tokens, args.temp, args.top_p)


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


def command_line():
    """The command that made a record, as the user typed it (kept in every JSON it writes)."""
    import shlex

    return " ".join(["edgeprefill", *map(shlex.quote, sys.argv[1:])])


def write_json(path, payload):
    """Write a record atomically (temp file, then rename), with the command that made it."""
    from edgeprefill.fsio import atomic_write_text

    if isinstance(payload, dict):
        payload = {"command": command_line(), **payload}
    atomic_write_text(path, json.dumps(payload, indent=2))


def add_rank_arg(p):
    p.add_argument("--predictor-rank", type=positive, default=None, metavar="R",
                   help="a low-rank predictor: one shared (input -> R) map, then R -> K/V per "
                   "layer; the best rank-R approximation of the fit on the fitting text's "
                   "inputs (hidden-state inputs; fewer FLOPs, see README)")


def with_bar(console, label, fn):
    """fn(progress) under a transient progress bar: progress(done, total)."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        return fn(lambda done, total: bar.update(task, completed=done, total=total))


def evaluate_refs(lm, strategy, refs, console, label):
    """edgeprefill.quality.evaluate with a progress bar."""
    from edgeprefill.quality import evaluate

    return with_bar(console, label, lambda progress: evaluate(lm, strategy, refs, progress))


def builtin_refs(lm, n_pairs, console, data=None, greedy_tokens=16):
    """edgeprefill.quality.references with a progress bar."""
    from edgeprefill.quality import references

    return with_bar(console, "exact prefill references",
                    lambda progress: references(lm, n_pairs, data, greedy_tokens, progress))
