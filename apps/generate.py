"""`edgeprefill generate`: one prompt in, a streamed answer and its TTFT out."""

import json
import sys

from edgeprefill.apps.argtypes import fraction, non_negative, non_negative_float, positive
from edgeprefill.apps.shared import (add_model_args, add_strategy_args, build_strategy,
                                     load_prompt_ids, read_prompt, stats_line,
                                     validate_sampling)
from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    p = sub.add_parser("generate", help="generate an answer to one prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text, or '-' to read stdin")
    p.add_argument("--system", default=None, help="system message")
    add_strategy_args(p)
    p.add_argument("--max-tokens", type=positive, default=256)
    p.add_argument("--temp", type=non_negative_float, default=0.0,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=fraction, default=1.0)
    p.add_argument("--seed", type=non_negative, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a prompt cache (edgeprefill cache-prompt, or mlx-lm's): its longest "
                   "common prefix with this prompt is reused, only the rest is prefilled")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="decode over a 4- or 8-bit quantized cache (as mlx-lm's --kv-bits)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and stats)")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console

    from edgeprefill.generate import stream_generate
    from edgeprefill.prefill.registry import parse

    validate_sampling(args)
    parse(args.strategy)  # an unknown name fails before the model loads
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise EdgeprefillError("the prompt is empty: pass text with --prompt, or '-' and pipe it")
    err = Console(stderr=True, soft_wrap=True)
    lm, ids = load_prompt_ids(args, prompt)
    strategy = build_strategy(args, lm, console=err)
    cache, cached = None, {}
    if args.prompt_cache:
        from edgeprefill.cache import continuing, load_cache, reuse

        cache, info = load_cache(args.prompt_cache, lm)
        cache, ids, reused = reuse(cache, info, ids)
        cached = {"cached_tokens": reused, "cache_exact": info["exact"],
                  "cache_strategy": info["strategy"]}
        rest = continuing(strategy, lm)
        if rest is not strategy:
            err.print(f"[dim]{args.strategy} continues only caches it made: the {len(ids)} "
                      "uncached tokens are prefilled with full[/dim]", highlight=False)
            strategy = rest
    result = None
    try:
        for event in stream_generate(lm.model, lm.tokenizer, ids, strategy, cache=cache,
                                     max_tokens=args.max_tokens, temp=args.temp,
                                     top_p=args.top_p, seed=args.seed, kv_bits=args.kv_bits):
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            result = event.result or result
    finally:
        if hasattr(strategy, "close"):  # worker processes
            strategy.close()
    stats = {**result.stats(), **cached}
    if args.json:
        print(json.dumps({"model": lm.model_id, "text": result.text, "stats": stats}))
    else:
        sys.stdout.write("\n")
        reused = (f" | {cached['cached_tokens']} cached tokens reused" if cached else "")
        err.print(f"[dim]{stats_line(stats)}{reused}[/dim]", highlight=False)
    return 0
