"""What the token-selection strategies share (`gemfilter`, `specprefill`, `kvp+specprefill`):
how many tokens to keep, scores -> kept indices, the base's prefill of the kept tokens at their
original or at fresh positions, and decoding after it.

The algorithms are written once, over an `ops` class of array operations (MlxOps here, the
torch mirror's TorchOps in edgeprefill.mirror.prefill.selection). Selection itself runs on the
host (numpy) on one score per prompt token.
"""

import time

import mlx.core as mx
import numpy as np

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.base import PrefillStats, PromptCache
from edgeprefill.prefill.full import as_token_array

POSITIONS = ("original", "fresh")
POOL = 13  # tokens in the average pool that smooths attention scores before ranking
FIRST, LAST = 4, 32  # always kept: the first tokens (attention sink, the chat template's
# start) and the last ones (the question, the answer's start); docs/selection.md


class MlxOps:
    """The array operations the selection strategies need, for MLX."""

    tokens = staticmethod(lambda ids, model: as_token_array(ids))
    ints = staticmethod(lambda xs, model: mx.array(np.asarray(xs, dtype=np.int32)))
    bools = staticmethod(lambda xs, model: mx.array(np.asarray(xs, dtype=bool)))
    eval = staticmethod(mx.eval)
    sync = staticmethod(lambda model: None)
    argmax = staticmethod(lambda x: mx.argmax(x, axis=-1))
    maximum = staticmethod(mx.maximum)
    stack = staticmethod(mx.stack)
    float32 = staticmethod(lambda x: x.astype(mx.float32))
    numpy = staticmethod(lambda x: np.array(x.astype(mx.float32)))
    cat = staticmethod(lambda xs, axis: mx.concatenate(xs, axis=axis))
    zeros = staticmethod(lambda shape, like: mx.zeros(shape, dtype=like.dtype))
    cumsum = staticmethod(lambda x, axis: mx.cumsum(x, axis=axis))
    max = staticmethod(lambda x, axis: x.max(axis=axis))

    @staticmethod
    def assign(buf, idx, values):
        """buf[:, :, idx] = values (scatter along the position axis), in place."""
        buf[:, :, idx] = values


def pooled(ops, probs, n, window=POOL):
    """(B, H, m, S) attention probabilities -> (m, n): each head's row over the first n keys
    smoothed by a centred average pool of `window` tokens, then the max over heads."""
    x = probs[0, :, :, :n]
    r = window // 2
    pad = ops.zeros((*x.shape[:-1], r), x)
    c = ops.cumsum(ops.cat([ops.zeros((*x.shape[:-1], r + 1), x), x, pad], -1), -1)
    smooth = (c[..., window:] - c[..., :-window]) / window
    return ops.max(smooth, 0)


def check_keep(keep):
    """Refuse a keep that is neither a fraction in (0, 1] nor a whole count >= 1."""
    ok = isinstance(keep, (int, float)) and not isinstance(keep, bool) and keep > 0 and (
        keep <= 1 or float(keep).is_integer())
    if not ok:
        raise EdgeprefillError(f"--keep must be a fraction in (0, 1] or a whole number of "
                               f"tokens >= 1 (got {keep!r}): for example --keep 0.2 or --keep 1024")


def keep_count(keep, n):
    """Tokens kept of n: `keep` a fraction (<= 1) or a count (> 1); between 1 and n."""
    k = round(keep * n) if keep <= 1 else int(keep)
    return max(1, min(n, k))


def select(scores, k, chunk=1, last=1, first=0):
    """The kept token indices (ascending) of (n,) host scores.

    The first `first` and the final `last` tokens are always kept (the question sits at the
    end of most prompts); then whole chunks of `chunk` tokens in order of their mean score,
    the last chunk taken only in part (its best tokens) so that exactly k tokens are kept.
    """
    n = len(scores)
    if k >= n:
        return np.arange(n)
    last = min(last, k)
    first = min(first, k - last, n - last)
    kept = np.zeros(n, dtype=bool)
    kept[n - last:] = True
    kept[:first] = True
    head = n - last
    budget = k - last - first
    if budget <= 0 or head <= first:
        return np.flatnonzero(kept)
    starts = np.arange(first, head, chunk)
    ends = np.minimum(starts + chunk, head)
    upto = np.minimum(starts + chunk, n)  # a chunk's mean reads past the head into the tail
    total = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
    means = (total[upto] - total[starts]) / (upto - starts)
    order = np.argsort(-means, kind="stable")
    taken = np.cumsum(ends[order] - starts[order])
    whole = int(np.searchsorted(taken, budget, side="right"))  # chunks that fit entirely
    chosen = np.zeros(len(starts), dtype=bool)
    chosen[order[:whole]] = True
    kept[first:head] = chosen[np.arange(head - first) // chunk]
    left = budget - (int(taken[whole - 1]) if whole else 0)
    if left > 0 and whole < len(order):  # the next chunk in part: its best tokens
        c = order[whole]
        span = np.arange(starts[c], ends[c])
        kept[span[np.argsort(-scores[span], kind="stable")[:left]]] = True
    return np.flatnonzero(kept)


def check_positions(positions):
    if positions not in POSITIONS:
        raise EdgeprefillError(f"--positions must be one of {', '.join(POSITIONS)} (got "
                               f"{positions!r}): original keeps each kept token's position, "
                               "fresh numbers the kept tokens 0, 1, 2, ...")


class SelectedCache(PromptCache):
    """The base's per-layer caches after a selective prefill: they hold the kept tokens only.

    next_pos: the position of the next token (the prompt's length with original positions,
    the kept count with fresh ones); decoding rotates new tokens from there.
    """

    def __init__(self, layers):
        super().__init__(layers)
        self.next_pos = 0

    trimmable = False


def run_base(model, ids, cache, positions=None, chunk_size=512, ops=MlxOps):
    """The base over (L,) ids after `cache` (extended in place), `chunk_size` tokens per call;
    positions: (L,) ascending absolute positions (None: contiguous after next_pos). Returns
    the last token's (V,) float32 logits."""
    start = cache.next_pos
    for s in range(0, ids.shape[0], chunk_size):
        h = model.embed(ids[s:s + chunk_size][None])
        pos = None if positions is None else positions[s:s + chunk_size]
        for i in range(model.n_layers):
            h = model.block(i, h, cache=cache[i], offset=None if pos is not None else start + s,
                            positions=pos).h
        ops.eval(h, [c.keys_and_values() for c in cache])
    logits = ops.float32(model.head(h[:, -1:])[0, -1])
    ops.eval(logits)
    return logits


class Selective:
    """The part every selection strategy shares: choose, then prefill the kept tokens.

    A subclass sets `name` and implements scores(ids) -> (n,) host scores (or None: keep
    all). The first turn selects; later chat turns run their new tokens in full.
    """

    ops = MlxOps
    select_chunk = 1
    keep_first, keep_last = FIRST, LAST

    def __init__(self, model, keep, positions, chunk_size):
        from edgeprefill.prefill.base import default_chunk_size

        check_keep(keep)
        check_positions(positions)
        self.model = model
        self.keep = keep
        self.positions = positions
        self.chunk_size = chunk_size or default_chunk_size()

    def make_cache(self, max_len=None):
        m = self.model
        return SelectedCache(m.make_cache() if max_len is None else m.make_cache(max_len))

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill."""
        ops, m = self.ops, self.model
        ops.sync(m)
        start = time.perf_counter()
        ids = ops.tokens(prompt_ids, m)
        n = ids.shape[0]
        if cache is not None and cache.next_pos:  # a later turn: its tokens in full
            logits = run_base(m, ids, cache, chunk_size=self.chunk_size, ops=ops)
            cache.next_pos += n
            cache.tokens.extend(ids.tolist())
            ops.sync(m)
            return cache, logits, PrefillStats(self.name, n, cache.next_pos,
                                               time.perf_counter() - start, {"kept": n})
        cache = cache if cache is not None else self.make_cache()
        k = keep_count(self.keep, n)
        extra = {}
        if k < n:
            scores = self.scores(ids, extra)
            t_rank = time.perf_counter()
            kept = self.choose(scores, k)
            extra["rank_s"] = time.perf_counter() - t_rank  # on the host
        else:
            kept = np.arange(n)
        ops.sync(m)
        t_select = time.perf_counter() - start
        if progress:
            progress(n - k, n)
        pos = None if self.positions == "fresh" else ops.ints(kept, m)
        logits = run_base(m, ids[ops.ints(kept, m)], cache, pos, self.chunk_size, ops)
        cache.next_pos = n if self.positions == "original" else len(kept)
        cache.tokens.extend(ids.tolist())
        ops.sync(m)
        if progress:
            progress(n, n)
        extra.update(select_s=t_select, kept=len(kept), keep_fraction=len(kept) / n,
                     positions=self.positions)
        return cache, logits, PrefillStats(self.name, n, cache.next_pos,
                                           time.perf_counter() - start, extra)

    def choose(self, scores, k):
        """The k kept indices of (n,) host scores: the first and last tokens always, then
        whole chunks by mean score."""
        return select(scores, k, self.select_chunk, last=max(self.keep_last, self.select_chunk),
                      first=self.keep_first)

    def forward(self, ids, cache):
        """Decode (1, L) ids after a selective prefill: (1, L, V) logits, rotated from
        cache.next_pos on."""
        m = self.model
        h = m.embed(ids)
        for i in range(m.n_layers):
            h = m.block(i, h, cache=cache[i], offset=cache.next_pos).h
        cache.next_pos += ids.shape[1]
        return m.head(h)
