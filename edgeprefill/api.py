"""The public Python API, in mlx-lm's shape: load, generate, stream_generate, prefill.

Strategy names and options are the CLI's and come from edgeprefill.prefill.registry:
`strategy="kvp"` (with `kvp=FOLDER`, `kvp_tail=T`), `"lazy"`, `"lazy-0.8:0.6:0.5"`,
`"runahead"` (with `workers=N`), ...; other keywords go to the strategy (e.g. `chunk_size`).
A strategy object from `edgeprefill.prefill.build(...)` may be passed instead of a name and is
then reused across calls (worker processes stay up until its `close()`).
"""

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from edgeprefill.errors import EdgeprefillError
from edgeprefill.generate import build_prompt, check_context, check_sampling, check_stop
from edgeprefill.generate import stream_generate as stream_tokens
from edgeprefill.loading import LoadedModel
from edgeprefill.loading import load as load_model
from edgeprefill.prefill import registry
from edgeprefill.prefill.base import PrefillStats
from edgeprefill.prefill.lazy import LazyCache
from edgeprefill.cache import PrefixCache
from edgeprefill.prefill.selection import SelectedCache


def load(path_or_hf_repo="default", dtype="auto"):
    """Load a model: 'default' (SmolLM2-135M-Instruct), an HF folder, a .gguf file or a hub id.

    Args:
        path_or_hf_repo: what to load (see edgeprefill.loading.resolve_model_path).
        dtype: 'auto' (float32 on a CPU, as stored on a GPU), 'float32', 'float16',
            'bfloat16'.
    Returns:
        LoadedModel: `.tokenizer` (mlx-lm's TokenizerWrapper), `.mlx_model` (the mlx-lm model,
        for mlx_lm.generate), `.model` (edgeprefill's per-layer view), `.config`.
    """
    return load_model(path_or_hf_repo, dtype=dtype)


@dataclass
class GenerationResponse:
    """One streamed step, with mlx-lm's field names plus the prefill's.

    text: the new text (may be empty while a character is incomplete).
    token: the token id (None on the last response when it only flushes text).
    prompt_tokens, prompt_tps: prompt length and prefill speed (tokens/s).
    ttft_s: seconds from the call to the first token's logits (the prefill).
    generation_tokens, generation_tps: tokens so far and decode speed after the first.
    peak_memory: peak MLX memory in GB.
    strategy: the prefill strategy's name.
    finish_reason: None until the last response: 'stop' (an end token), 'length'
        (max_tokens) or 'context' (the model's window is full).
    stats: on the last response, every prefill and decode figure as a dict.
    cache: on the last response, the caches (prompt and answer) the prefill and decoding made.
    """

    text: str
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    ttft_s: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    strategy: str
    finish_reason: Optional[str] = None
    stats: dict = field(default_factory=dict)
    cache: object = field(default=None, repr=False)


@dataclass
class PrefillResult:
    """What `prefill` returns.

    cache: per-layer caches holding the prompt, usable as mlx-lm's `prompt_cache`.
    logits: (V,) float32 logits of the first output token.
    stats: PrefillStats (ttft_s, prompt_tokens, ...).
    """

    cache: list
    logits: mx.array
    stats: PrefillStats


def _loaded(model):
    if not isinstance(model, LoadedModel):
        raise EdgeprefillError(f"expected a model from edgeprefill.load(), got "
                               f"{type(model).__name__}: load it with edgeprefill.load(...)")
    return model


def _token_ids(model, prompt, system=None, chat_template=True):
    """Token ids of a prompt: a str goes through the chat template (as the CLI does); a list
    (or array) of ints is used as given."""
    if isinstance(prompt, str):
        return build_prompt(model.tokenizer, prompt, system=system,
                                 chat_template=chat_template)
    try:
        ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    except (TypeError, ValueError):
        raise EdgeprefillError("prompt must be a str or a list of token ids") from None
    if not ids:
        raise EdgeprefillError("the prompt has no tokens: pass text or a non-empty id list")
    bad = next((t for t in ids if not 0 <= t < model.model.vocab_size), None)
    if bad is not None:
        raise EdgeprefillError(f"token id {bad} is outside the model's vocabulary "
                               f"(0..{model.model.vocab_size - 1}): tokenize with model.tokenizer")
    return ids


def _strategy(model, strategy, kvp, kvp_tail, options):
    """A built strategy: as given, or from the registry by name (with its options)."""
    if hasattr(strategy, "prefill"):  # an already built strategy object
        return strategy
    return registry.build(strategy, model, kvp=kvp, kvp_tail=kvp_tail, **options)


def _closing(strat, given):
    """Close worker processes a name started here (not a strategy object the caller owns)."""
    if strat is not given and hasattr(strat, "close"):
        strat.close()


def stream_generate(model, prompt, strategy="full", max_tokens=256, temp=0.0, top_p=1.0,
                    seed=None, system=None, chat_template=True, kvp=None, kvp_tail=None,
                    prompt_cache=None, kv_bits=None, stop=None, **strategy_options):
    """Prefill `prompt` with `strategy`, then stream the answer.

    Args:
        model: from `load`.
        prompt: text (through the chat template unless chat_template=False) or token ids.
        strategy: a strategy name (the CLI's) or a built strategy object.
        max_tokens, temp, top_p, seed: decoding, as mlx-lm's (temp 0: greedy).
        system: optional system message for a text prompt.
        kvp, kvp_tail: the KV Prediction pair folder and exact tail (kvp strategies).
        prompt_cache: an edgeprefill.PrefixCache (in memory: the longest cached prefix is
            reused and this prompt's cache is kept there afterwards) or a prompt-cache file
            (`edgeprefill cache-prompt`). The uncached rest is prefilled with `strategy` where
            it continues a cache it did not make (full, mlx-lm), else with full. From memory,
            an exact strategy reuses only exact caches, and another strategy reuses a prefix
            only where full on the rest costs fewer FLOPs than the strategy on the whole.
        kv_bits: 4 or 8: decode over a quantized cache (as mlx-lm's kv_bits).
        stop: a string or up to 4 strings that end the answer (finish_reason 'stop'); the text
            ends before the first of them.
    Yields:
        GenerationResponse per token; the last has finish_reason and stats set (with
        cached_tokens when a prompt cache was used).
    """
    model = _loaded(model)
    ids = _token_ids(model, prompt, system, chat_template)
    check_sampling(max_tokens, temp, top_p)
    check_stop(stop)
    strat = _strategy(model, strategy, kvp, kvp_tail, strategy_options)
    try:
        cache, ids, cached, run = _from_prompt_cache(model, prompt_cache, ids, strat)
        for r in _stream(model, ids, run, max_tokens, temp, top_p, seed, cache, cached, kv_bits,
                         stop):
            if (r.finish_reason is not None and isinstance(prompt_cache, PrefixCache)
                    and getattr(run, "base_cache", True)):
                name = getattr(run, "name", str(strategy))
                prompt_cache.store(r.cache, name, registry.is_exact(name))
            yield r
    finally:
        _closing(strat, strategy)


def _from_prompt_cache(model, prompt_cache, ids, strat):
    """(cache or None, tokens to prefill, {"cached_tokens", ...}, the strategy that runs)."""
    from edgeprefill.cache import continuing, load_cache, reuse

    if prompt_cache is None:
        return None, ids, {}, strat
    if not getattr(strat, "base_cache", True):  # aux-only: its cache is another model's
        if isinstance(prompt_cache, PrefixCache):
            return None, ids, {"cached_tokens": 0}, strat
        raise EdgeprefillError(f"{strat.name} prefills and decodes with its own model, so a "
                               "prompt-cache file of the base does not apply: drop it")
    if isinstance(prompt_cache, PrefixCache):
        # an exact strategy reuses only exact caches: its answer must not depend on what came
        # before it
        exact = registry.is_exact(getattr(strat, "name", ""))
        cache, info = prompt_cache.lookup(ids, exact_only=exact)
        if cache is None or not _worth_reusing(model, strat, len(cache.tokens), len(ids)):
            return None, ids, {"cached_tokens": 0}, strat
        n = len(cache.tokens)
        ids = ids[n:]
    else:
        cache, info = load_cache(prompt_cache, model)
        cache, ids, n = reuse(cache, info, ids)
    return cache, ids, {"cached_tokens": n, "cache_exact": info["exact"]}, continuing(strat,
                                                                                       model)


def _worth_reusing(model, strat, cached, total):
    """Whether a cached prefix beats running `strat` on the whole prompt. Full and mlx-lm
    continue any cache; the others cannot, so after a hit the uncached rest is prefilled with
    full, which is worth it only when that costs fewer FLOPs than the strategy on the whole
    (a long shared document, not a shared chat-template header)."""
    from edgeprefill.cache import can_continue
    from edgeprefill.flops import prefill_flops

    if can_continue(strat):
        return True
    try:
        own = registry.flops(strat.name, strat, model.config, total)
    except (AttributeError, EdgeprefillError, KeyError, TypeError):
        return True
    return prefill_flops(model.config, total - cached, cached) <= own


def _stream(model, ids, strat, max_tokens, temp, top_p, seed, cache=None, cached=None,
            kv_bits=None, stop=None):
    n, t_first = 0, None
    for event in stream_tokens(model.model, model.tokenizer, ids, strat, cache=cache,
                               max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                               kv_bits=kv_bits, stop=stop):
        p = event.prefill
        if event.token is not None:
            n += 1
            t_first = t_first or time.perf_counter()
        elapsed = time.perf_counter() - t_first if t_first else 0.0
        done = event.result is not None
        yield GenerationResponse(
            text=event.text, token=event.token, prompt_tokens=p.prompt_tokens,
            prompt_tps=p.prefill_tok_s, ttft_s=p.ttft_s, generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, strategy=p.strategy,
            finish_reason=({"eos": "stop"}.get(event.result.finish_reason,
                                               event.result.finish_reason) if done else None),
            stats={**event.result.stats(), **(cached or {})} if done else {},
            cache=event.result.cache if done else None)


def generate(model, prompt, strategy="full", verbose=False, **kwargs):
    """Generate a complete answer: `stream_generate`'s arguments; returns the text.

    verbose: print the text as it comes, then the TTFT and speeds.
    """
    text, last = "", None
    for r in stream_generate(model, prompt, strategy=strategy, **kwargs):
        text += r.text
        last = r
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
        print(f"strategy {last.strategy} | prompt {last.prompt_tokens} tok | TTFT "
              f"{last.ttft_s * 1000:.0f} ms | prefill {last.prompt_tps:.1f} tok/s | generation "
              f"{last.generation_tokens} tok, {last.generation_tps:.1f} tok/s | peak memory "
              f"{last.peak_memory:.2f} GB")
    return text


class PositionedKVCache:
    """An mlx-lm cache for a layer whose stored keys skip positions (LazyLLM's pruned layers).

    mlx-lm's attention rotates a new token by `cache.offset`; here that is the token's true
    position, while the keys and values stay the inner cache's (fewer than the position).

    Args:
        inner: the layer's mlx-lm KVCache (rotated keys at their own positions).
        next_pos: position of the next token.
    """

    def __init__(self, inner, next_pos):
        self.inner = inner
        self.offset = next_pos

    def update_and_fetch(self, keys, values):
        """Append (B, Hkv, L, hd) keys/values; return every stored key and value."""
        self.offset += keys.shape[2]
        return self.inner.update_and_fetch(keys, values)

    def make_mask(self, n, return_array=False, window_size=None):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(n, offset=self.inner.offset, return_array=return_array,
                                     window_size=window_size)

    def is_trimmable(self):
        return False

    def empty(self):
        return self.inner.empty()

    @property
    def nbytes(self):
        return self.inner.nbytes

    @property
    def state(self):
        return self.inner.state


def mlx_lm_cache(cache):
    """The per-layer caches of a strategy's prefill as mlx-lm's prompt_cache.

    full, kvp and runahead-streams caches are mlx-lm KVCaches already; a lazy cache's pruned
    layers, and the layers of a selective prefill (gemfilter, specprefill), are wrapped so new
    tokens get their true positions (mlx-lm then decodes over the pruned layers as they are: it
    does not revive pruned tokens as edgeprefill's lazy decoding does).
    """
    if isinstance(cache, (LazyCache, SelectedCache)):
        return [PositionedKVCache(c, cache.next_pos) for c in cache]
    return list(cache)


def prefill(model, tokens, strategy="full", kvp=None, kvp_tail=None, **strategy_options):
    """Prefill token ids with `strategy`; the cache continues in mlx-lm.

    Args:
        model: from `load`.
        tokens: token ids (a list or array; text is tokenized as is, without a chat template).
        strategy, kvp, kvp_tail: as in `stream_generate`.
    Returns:
        PrefillResult. With mlx-lm, prefill all but the last token and let mlx-lm run that one:

            r = edgeprefill.prefill(model, ids[:-1], strategy="kvp")
            text = mlx_lm.generate(model.mlx_model, model.tokenizer, ids[-1:],
                                   prompt_cache=r.cache)
    """
    model = _loaded(model)
    ids = _token_ids(model, tokens, chat_template=False)
    strat = _strategy(model, strategy, kvp, kvp_tail, strategy_options)
    if getattr(strat, "name", None) == "aux-only":
        raise EdgeprefillError("aux-only decodes with its aux model, so its cache does not fit "
                               "the base: use edgeprefill.generate(..., strategy='aux-only')")
    check_context(len(ids), model.model.max_context)
    try:
        cache, logits, stats = strat.prefill(ids)
    finally:
        _closing(strat, strategy)
    return PrefillResult(mlx_lm_cache(cache), logits, stats)


__all__ = ["load", "generate", "stream_generate", "prefill", "GenerationResponse",
           "PrefillResult", "PrefixCache", "EdgeprefillError"]
