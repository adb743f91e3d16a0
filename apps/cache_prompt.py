"""`edgeprefill cache-prompt`: prefill a prompt once and save its KV cache (mlx-lm's format),
for `generate --prompt-cache` / `chat --prompt-cache` (and mlx-lm's own --prompt-cache-file)."""

import sys

from edgeprefill.apps.argtypes import positive_float
from edgeprefill.apps.shared import (add_model_args, add_strategy_args, build_strategy,
                                     load_prompt_ids, read_prompt)
from edgeprefill.errors import EdgeprefillError


def add_parser(sub):
    p = sub.add_parser("cache-prompt", help="prefill a prompt once and save its KV cache")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text, or '-' to read stdin")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    src.add_argument("--heal", metavar="FILE",
                     help="recompute an approximate cache file (kvp) exactly, in place (or to "
                     "--out)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-chat-template", action="store_true", help="encode the raw prompt")
    p.add_argument("--out", default=None, help="the cache file to write (.safetensors)")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="store the cache quantized to 4 or 8 bits (mlx-lm's QuantizedKVCache)")
    p.add_argument("--max-cache-mb", type=positive_float, default=None,
                   help="refuse a cache larger than this (MiB), before writing it")
    add_strategy_args(p)
    p.set_defaults(run=run)


def read_prompt_file(path):
    from edgeprefill.fsio import decode_utf8

    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise EdgeprefillError(f"cannot read --prompt-file {path}: {e.strerror}") from None
    return decode_utf8(data, path)


def run(args):
    from rich.console import Console

    from edgeprefill.cache import save_cache
    from edgeprefill.prefill.registry import parse

    spec, _ = parse(args.strategy)
    if args.heal:
        return heal_file(args)
    if args.out is None:
        raise EdgeprefillError("--out FILE.safetensors is needed: where to write the cache")
    if not args.out.endswith(".safetensors"):
        raise EdgeprefillError(f"--out must end in .safetensors (got {args.out}): rename it")
    prompt = read_prompt(args.prompt) if args.prompt is not None else read_prompt_file(
        args.prompt_file)
    if not prompt.strip():
        raise EdgeprefillError("the prompt is empty: pass text with --prompt or --prompt-file")
    err = Console(stderr=True, soft_wrap=True)
    lm, ids = load_prompt_ids(args, prompt)
    strategy = build_strategy(args, lm, console=err)
    try:
        cache, _, stats = strategy.prefill(ids)
    finally:
        if hasattr(strategy, "close"):
            strategy.close()
    budget = None if args.max_cache_mb is None else int(args.max_cache_mb * 2**20)
    if args.kv_bits:
        from edgeprefill.cache import quantize

        quantize(cache, args.kv_bits)
    nbytes = save_cache(args.out, lm, cache, ids, spec.name, spec.exact and not args.kv_bits,
                        budget)
    exact = "exact" if spec.exact and not args.kv_bits else "approximate"
    print(f"cached {len(ids)} tokens ({nbytes / 2**20:.1f} MiB, {exact}, {spec.name} prefill "
          f"{stats.ttft_s * 1000:.0f} ms) in {args.out}", file=sys.stderr)
    return 0


def heal_file(args):
    """cache-prompt --heal FILE: the exact cache of the file's tokens, written atomically."""
    import time

    from edgeprefill.cache import heal, load_cache, save_cache
    from edgeprefill.loading import load

    lm = load(args.model, dtype=args.dtype)
    cache, info = load_cache(args.heal, lm)
    out = args.out or args.heal
    if info["exact"]:
        print(f"{args.heal} is exact already: nothing to heal", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    healed = heal(lm, cache)
    budget = None if args.max_cache_mb is None else int(args.max_cache_mb * 2**20)
    save_cache(out, lm, healed, healed.tokens, "full", True, budget)
    print(f"healed {len(healed.tokens)} tokens ({info['strategy']} -> exact) in "
          f"{time.perf_counter() - t0:.1f} s: {out}", file=sys.stderr)
    return 0
