"""Prompt building, the shared decode loop, sampling, streaming and stop rules.

Every prefill strategy hands its (cache, first-token logits) to the same decode loop, so the
tokens after the first are produced the same way whatever produced the cache.
"""

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from edgeprefill.errors import EdgeprefillError
from edgeprefill.fsio import check_utf8
from edgeprefill.prefill.base import PromptCache


def build_prompt(tokenizer, prompt, system=None, history=None, chat_template=True):
    """Token ids for a user prompt, through the model's chat template when it has one.

    Args:
        tokenizer: mlx-lm TokenizerWrapper.
        prompt: the user's text.
        system: optional system message.
        history: optional earlier messages [{"role", "content"}, ...].
        chat_template: False to encode the raw text.
    Returns:
        list[int] token ids.
    """
    if not prompt or not prompt.strip():
        raise EdgeprefillError("the prompt is empty: pass text with --prompt, or '-' and pipe it")
    check_utf8(prompt, "the prompt")
    if system:
        check_utf8(system, "the system message")
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + list(
            history or []) + [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(prompt))


def check_context(n_tokens, max_context, already=0):
    """Refuse a prompt that does not fit the model's context window."""
    if already + n_tokens >= max_context:
        raise EdgeprefillError(
            f"the prompt has {n_tokens} tokens (+{already} in context) but the model's context is "
            f"{max_context}: shorten the prompt")


def check_sampling(max_tokens, temp, top_p):
    """Refuse decoding options out of range (one line naming the option)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EdgeprefillError(f"--max-tokens must be at least 1 (got {max_tokens!r})")
    if temp < 0:
        raise EdgeprefillError(f"--temp must be >= 0 (got {temp})")
    if not 0 < top_p <= 1:
        raise EdgeprefillError(f"--top-p must be in (0, 1] (got {top_p})")


@dataclass
class GenerationResult:
    """A finished generation.

    finish_reason: 'eos' (a stop token), 'stop' (a stop sequence), 'length' (max tokens) or
        'context' (window full).
    """

    text: str
    tokens: list
    prefill: object  # PrefillStats
    decode_s: float
    finish_reason: str
    cache: object = None  # the caches after decoding, for a next turn

    @property
    def ttft_s(self):
        return self.prefill.ttft_s

    @property
    def decode_tok_s(self):
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def stats(self):
        d = self.prefill.as_dict()
        d.update(generated_tokens=len(self.tokens), decode_s=self.decode_s,
                 decode_tok_s=self.decode_tok_s, finish_reason=self.finish_reason)
        return d


@dataclass
class StreamEvent:
    """One streamed step: new text (may be empty mid-character), the token, the prefill's
    stats, and at the end the GenerationResult."""

    text: str
    token: Optional[int] = None
    result: Optional[GenerationResult] = None
    extra: dict = field(default_factory=dict)
    prefill: object = None  # PrefillStats


def decode_tokens(model, cache, logits, sampler, max_tokens, max_context):
    """The decode loop: sample from `logits`, feed the token back, repeat.

    Args:
        model: callable (1, 1) ids, cache -> (1, 1, V) logits (a Transformer).
        cache: per-layer caches holding the prompt.
        logits: (V,) first-token logits from a prefill.
        sampler: callable (1, V) logprobs -> (1,) token.
        max_tokens: most tokens to yield.
        max_context: the model's window; decoding stops before it overflows.
    Yields:
        int token ids (the caller decides when to stop on EOS).
    """

    def sample(lg):
        lg = lg.astype(mx.float32)
        return sampler((lg - mx.logsumexp(lg, axis=-1, keepdims=True))[None])[0]

    y = sample(logits)
    mx.async_eval(y)
    for n in range(max_tokens):
        token = y.item()
        if n + 1 < max_tokens and cache[0].offset + 1 < max_context:
            y = sample(model(y.reshape(1, 1), cache)[0, -1])
            if isinstance(cache, PromptCache):
                cache.tokens.append(token)
            mx.async_eval(y)
        yield token
        if cache[0].offset + 1 >= max_context:
            return


class StopScanner:
    """Stop sequences over streamed text: `feed` returns the text safe to show (a tail that
    could begin a stop sequence is held back until it can't) and whether a stop sequence
    appeared; the text before it is kept, the stop sequence and what follows are dropped.

    Args:
        stops: the stop strings (empty ones are ignored).
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.text = ""

    def feed(self, segment):
        buf = self.held + segment
        found = [(buf.find(s), s) for s in self.stops if s in buf]
        if found:
            out, self.held = buf[:min(found)[0]], ""
            self.text += out
            return out, True
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        out, self.held = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out, False

    def flush(self, segment=""):
        """The last text: `segment` scanned, then whatever was held back (no stop came)."""
        out, hit = self.feed(segment)
        if not hit:
            out, self.text, self.held = out + self.held, self.text + self.held, ""
        return out, hit


def check_stop(stop):
    """A stop argument as a list of strings: None, a str, or a list of up to 4 non-empty str."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise EdgeprefillError("stop must be a string or a list of strings")
    if len(stops) > 4 or not all(stops):
        raise EdgeprefillError("stop takes 1 to 4 non-empty strings")
    return list(stops)


def stream_generate(model, tokenizer, prompt_ids, strategy, cache=None, max_tokens=256,
                    temp=0.0, top_p=1.0, seed=None, progress=None, kv_bits=None, stop=None):
    """Prefill with `strategy`, then stream decoded text.

    Args:
        model: edgeprefill.models.Transformer.
        tokenizer: mlx-lm TokenizerWrapper (for EOS ids and streaming detokenization).
        prompt_ids: token ids to prefill (the new tokens only when `cache` holds earlier turns).
        strategy: a prefill strategy (edgeprefill.prefill).
        cache: optional caches of earlier turns, extended in place.
        temp, top_p: sampling; temp 0 is greedy.
        seed: optional random seed for sampling.
        progress: optional prefill progress callback (done, total).
        kv_bits: quantize the cache to 4 or 8 bits after the prefill (edgeprefill.cache.quantize).
        stop: strings that end the answer (finish_reason 'stop'); the text stops before them.
    Yields:
        StreamEvent per token; the last one carries the GenerationResult.
    """
    already = cache[0].offset if cache else 0
    check_context(len(prompt_ids), model.max_context, already)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    cache, logits, pstats = strategy.prefill(prompt_ids, cache=cache, progress=progress)
    if kv_bits:
        from edgeprefill.cache import quantize

        quantize(cache, kv_bits)
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    detok.reset()
    tokens, finish = [], "length"
    scan = StopScanner(check_stop(stop)) if stop else None
    t0 = time.perf_counter()
    forward = getattr(strategy, "forward", model)  # aux-only decodes with its own model
    for token in decode_tokens(forward, cache, logits, sampler, max_tokens, model.max_context):
        if not tokens:
            t0 = time.perf_counter()  # decode time starts after the first token
        tokens.append(token)
        if token in eos:
            finish = "eos"
            break
        detok.add_token(token)
        segment, hit = scan.feed(detok.last_segment) if scan else (detok.last_segment, False)
        yield StreamEvent(segment, token, prefill=pstats)
        if hit:
            finish = "stop"
            break
    else:
        if cache[0].offset + 1 >= model.max_context and len(tokens) < max_tokens:
            finish = "context"
    detok.finalize()
    tail, text = detok.last_segment, detok.text
    if scan:
        tail = scan.flush(tail)[0] if finish != "stop" else ""
        text = scan.text
    result = GenerationResult(text, tokens, pstats, time.perf_counter() - t0, finish, cache)
    yield StreamEvent(tail, None, result, prefill=pstats)


def generate(model, tokenizer, prompt_ids, strategy, **kwargs):
    """Non-streaming `stream_generate`: returns the GenerationResult."""
    for event in stream_generate(model, tokenizer, prompt_ids, strategy, **kwargs):
        if event.result is not None:
            return event.result
