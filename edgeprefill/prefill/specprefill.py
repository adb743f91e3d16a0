"""`specprefill`: Speculative Prefill (Liu, Chen, Zhang, ICML 2025, arXiv 2502.02789), and
`kvp+specprefill`, its fusion with KV Prediction. Both training-free in their selection.

SpecPrefill, for a prompt of n tokens:
1. a small draft model of the same tokenizer prefills the prompt and greedily decodes
   `lookahead` tokens;
2. each prompt token's importance is the attention that the draft's last prompt token and its
   look-ahead tokens pay to it: per layer and head the row is smoothed by an average pool,
   then the max over layers and heads, then the mean over those queries;
3. whole chunks of `select_chunk` tokens are kept by mean importance (the last chunk always),
   and the base prefills the kept tokens at their ORIGINAL positions (`positions="original"`,
   the paper; "fresh" renumbers them as GemFilter does).
The draft is a separate model (`--draft MODEL`), or, for a model with a KV Prediction pair,
the pair's aux (`--draft aux`, the default there).

kvp+specprefill (ours): the kvp pair's aux already runs over the whole prompt to predict the
base's KV. The same pass scores the tokens: the aux also runs over the exact tail, and the
tail's queries rank the earlier tokens as above (no look-ahead). The base then computes the
kept tokens EXACTLY, at their positions, over the predicted cache of the rest (each kept
token attends by position to the predicted K/V of the others and the exact K/V of the kept
ones), and their exact K/V replace the predicted ones. A needle the question asks for is
computed by the base itself instead of predicted. keep -> 0 is kvp; keep = 1 is full.
"""

import time

import numpy as np

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.base import PrefillStats
from edgeprefill.prefill.kv_prediction import KVPrediction
from edgeprefill.prefill.selection import (FIRST, MlxOps, Selective, check_keep, keep_count,
                                           pooled, select)

DEFAULT_KEEP = 0.25
FUSED_KEEP = 0.05
# kvp+specprefill's default keeps at least this many tokens: the chunks its ranking puts first
# are the chat template's opening and the text just before the tail (attended to by habit,
# not for content), and a needle sentence can straddle two chunks (docs/selection.md)
FUSED_MIN_KEEP = 160
SELECT_CHUNK = 32
LOOKAHEAD = 8


class AuxDraft:
    """A kvp pair's aux seen as a draft model (embed, block, head over its own layers)."""

    def __init__(self, aux):
        self.aux = aux
        self.n_layers = aux.n_layers
        self.config = aux.model.config
        self.embed = aux.model.embed
        self.head = aux.logits

    def make_cache(self):
        return self.aux.make_cache()

    def block(self, a, h, **kw):
        return self.aux.model.block(self.aux.layers[a], h, **kw)


def load_draft(lm, draft=None, kvp=None, say=None):
    """The speculator for `lm`: "aux" or None (the model's kvp pair's aux, or that of --kvp),
    "random:<shape>" (random weights, for speed runs of a random-weight model), or a model
    (an HF folder, a .gguf file or a hub id) with the base's tokenizer."""
    from edgeprefill.kvp.pairs import load_pair

    if draft in (None, "aux"):
        try:
            aux, _, _ = load_pair(lm, kvp, say)
        except EdgeprefillError:
            if draft == "aux" or kvp:
                raise
            raise EdgeprefillError(
                f"specprefill needs a draft for {lm.model_id}: pass --draft MODEL, a smaller "
                "model with the same tokenizer (for example Llama-3.2-1B for Llama-3.1-8B)"
            ) from None
        return AuxDraft(aux)
    if draft.startswith("random:"):
        from edgeprefill.models.random import load_random

        if not lm.model_id.startswith("random:"):
            raise EdgeprefillError(f"a random draft is for random-weight shapes (--shape) only, "
                                   f"not {lm.model_id}: pass --draft MODEL")
        return load_random(draft.partition(":")[2], dtype=str(lm.model.dtype).split(".")[-1],
                           seed=1).model
    from edgeprefill.loading import load

    small = load(draft, dtype=str(lm.model.dtype).split(".")[-1])
    probe = "SpecPrefill: def f(x):\n    return x ** 2  # ünïcode 東京 123"
    if (small.model.vocab_size != lm.model.vocab_size
            or list(small.tokenizer.encode(probe)) != list(lm.tokenizer.encode(probe))):
        raise EdgeprefillError(f"draft {draft} does not share {lm.model_id}'s tokenizer: pick "
                               "a smaller model of the same family")
    return small.model


def _check_count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EdgeprefillError(f"--{name} must be a whole number >= {low} (got {value!r})")


class SpecPrefill(Selective):
    """Args:
        model: edgeprefill.models.Transformer (the base).
        draft: the speculator (a Transformer of the same tokenizer, or an AuxDraft).
        keep: tokens kept: a fraction in (0, 1] or a count.
        lookahead: tokens the draft decodes to score with (0: the last prompt token only).
        select_chunk: tokens per selection chunk.
        positions: "original" (the paper) or "fresh".
        chunk_size: prompt tokens per forward call.
    """

    name = "specprefill"

    def __init__(self, model, draft, keep=DEFAULT_KEEP, lookahead=LOOKAHEAD,
                 select_chunk=SELECT_CHUNK, positions="original", chunk_size=None):
        super().__init__(model, keep, positions, chunk_size)
        _check_count("lookahead", lookahead, 0)
        _check_count("select-chunk", select_chunk, 1)
        self.draft = draft
        self.lookahead = lookahead
        self.select_chunk = select_chunk

    def scores(self, ids, extra):
        """The draft's prefill and look-ahead: (n,) host importance of each prompt token."""
        ops, d = self.ops, self.draft
        t0 = time.perf_counter()
        n = ids.shape[0]
        cache = d.make_cache()
        for s in range(0, n, self.chunk_size):
            last = s + self.chunk_size >= n
            h = d.embed(ids[s:s + self.chunk_size][None])
            step = None
            for a in range(d.n_layers):
                out = d.block(a, h, cache=cache[a], attn_probs=1 if last else 0)
                h = out.h
                if last:
                    row = pooled(ops, out.attn, n)
                    step = row if step is None else ops.maximum(step, row)
            ops.eval(h, step, [c.keys_and_values() for c in cache])
        ops.sync(self.model)
        extra["draft_prefill_s"] = time.perf_counter() - t0
        steps = [step]
        token = ops.argmax(d.head(h[:, -1:])[0])
        for _ in range(self.lookahead):
            h, step = d.embed(token[None]), None
            for a in range(d.n_layers):
                out = d.block(a, h, cache=cache[a], attn_probs=1)
                h = out.h
                row = pooled(ops, out.attn, n)
                step = row if step is None else ops.maximum(step, row)
            token = ops.argmax(d.head(h)[0])
            steps.append(step)
            ops.eval(token, step)
        ops.sync(self.model)
        extra["lookahead_s"] = time.perf_counter() - t0 - extra["draft_prefill_s"]
        extra["lookahead"] = self.lookahead
        return ops.numpy(ops.cat(steps, 0)).mean(axis=0)


class KVPSpecPrefill(KVPrediction):
    """kvp whose aux pass also chooses prompt tokens the base computes exactly.

    Args: as KVPrediction, plus keep (a fraction of the tokens before the exact tail, or a
    count; None: FUSED_KEEP of them, at least FUSED_MIN_KEEP) and select_chunk (tokens per
    selection chunk).
    """

    name = "kvp+specprefill"
    ops = MlxOps
    keep_first = FIRST

    def __init__(self, model, aux, predictor, keep=None, select_chunk=SELECT_CHUNK,
                 chunk_size=None, tail=1):
        super().__init__(model, aux, predictor, chunk_size=chunk_size, tail=tail, overlap=False)
        if keep is not None:
            check_keep(keep)
        _check_count("select-chunk", select_chunk, 1)
        self.keep = keep
        self.select_chunk = select_chunk

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill; the first turn selects, later turns run as kvp."""
        ops, base = self.ops, self.model
        if cache is not None and cache[0].offset:
            return super().prefill(prompt_ids, cache, progress)
        ops.sync(base)
        start = time.perf_counter()
        ids = ops.tokens(prompt_ids, base)
        n = ids.shape[0]
        tail = min(self.tail, n)
        m0 = n - tail
        cache = cache if cache is not None else self.make_cache()
        if m0:
            self._run_aux(ids[:m0], cache, predict_from=0, room=tail)
        t_aux = time.perf_counter() - start
        kept = np.zeros(0, dtype=np.int64)
        k = self.kept_count(m0)
        if k:
            scores = self._tail_scores(ids[m0:], m0, cache.aux)
            kept = select(scores, k, self.select_chunk, last=0, first=self.keep_first)
        logits = self._exact(ids, kept, m0, cache)
        cache.tokens.extend(ids.tolist())
        ops.sync(base)
        if progress:
            progress(n, n)
        return cache, logits, PrefillStats(
            self.name, n, cache[0].offset, time.perf_counter() - start,
            {"aux_s": t_aux, "aux_tokens": n, "aux": self.aux.kind, "tail": tail,
             "kept": len(kept), "keep_fraction": len(kept) / max(1, m0)})

    def kept_count(self, m0):
        """The tokens kept exactly among the m0 before the tail."""
        if not m0:
            return 0
        if self.keep is None:
            return min(m0, max(FUSED_MIN_KEEP, keep_count(FUSED_KEEP, m0)))
        return keep_count(self.keep, m0)

    def _tail_scores(self, tail_ids, m0, cache):
        """The aux over the tail (its cache then covers the whole prompt): (m0,) host
        importance of the earlier tokens from the tail queries' attention."""
        ops, d = self.ops, AuxDraft(self.aux)
        h, score = d.embed(tail_ids[None]), None
        m = tail_ids.shape[0]
        for a in range(d.n_layers):
            out = d.block(a, h, cache=cache[a], attn_probs=m)
            h = out.h
            row = pooled(ops, out.attn, m0)
            score = row if score is None else ops.maximum(score, row)
        ops.eval(score, [c.keys_and_values() for c in cache])
        return ops.numpy(score).mean(axis=0)

    def _exact(self, ids, kept, m0, cache):
        """The base over the kept tokens and the tail, at their positions. Per layer, their
        exact K/V are first written at their positions (replacing the kept tokens' predicted
        ones; the tail's after the head), then each query attends causally by position over
        the cache: predicted K/V where nothing was kept, exact ones where something was.
        Returns the last token's (V,) float32 logits."""
        ops, base = self.ops, self.model
        n = ids.shape[0]
        q_idx = np.concatenate([kept, np.arange(m0, n)])
        qpos = ops.ints(q_idx, base)
        runs, mask = position_runs(q_idx), None
        if len(runs) > MAX_RUNS:  # many short spans: one masked call costs less than them
            runs, mask = None, ops.bools(np.arange(n)[None, :] <= q_idx[:, None], base)
        h = base.embed(ids[qpos][None])
        for i in range(base.n_layers):
            c = cache[i]
            at = AtPositions(c, qpos, n, ops) if m0 else c  # no head: the tail appends
            h = base.block(i, h, cache=at, positions=qpos, runs=runs, mask=mask).h
            c.offset = n
            ops.eval(h, c.keys_and_values())
        logits = ops.float32(base.head(h[:, -1:])[0, -1])
        ops.eval(logits)
        return logits


MAX_RUNS = 256  # spans of kept positions above which one masked attention call is used


def position_runs(positions):
    """[(lo, hi, end)] of ascending positions: each span of consecutive ones, as indices
    lo..hi-1 into `positions`, and end = its last position + 1 (the keys it attends to)."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(positions)]])
    return [(int(lo), int(hi), int(positions[hi - 1]) + 1)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


class AtPositions:
    """A layer's KV cache as one call over tokens at scattered positions sees it: the call's
    K/V are written at their positions (not appended), and attention reads positions 0..n-1.

    Args:
        cache: the layer's KV cache (mlx-lm's or the mirror's), holding the positions before
            the call's first unwritten one; its buffer grows to n positions if shorter.
        at: (L,) positions of the call's tokens.
        n: the positions attention reads.
        ops: MlxOps or TorchOps.
    """

    def __init__(self, cache, at, n, ops):
        self.cache, self.at, self.n, self.ops = cache, at, n, ops
        self.offset = cache.offset
        k = cache.keys
        if k.shape[2] < n:
            pad = ops.zeros((*k.shape[:2], n - k.shape[2], k.shape[3]), k)
            cache.keys = ops.cat([k, pad], 2)
            cache.values = ops.cat([cache.values, pad], 2)

    def update_and_fetch(self, keys, values):
        c = self.cache
        self.ops.assign(c.keys, self.at, keys)
        self.ops.assign(c.values, self.at, values)
        return c.keys[:, :, :self.n], c.values[:, :, :self.n]
