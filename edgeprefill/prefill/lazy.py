"""`lazy`: LazyLLM dynamic token pruning (Fu et al., arXiv 2407.14057), training-free.

Prefill runs layer by layer over a shrinking token set. At each pruning depth d_k of the
schedule, the last token's attention row at layer d_k - 1 (softmax of its query against that
layer's keys, averaged over query heads, computed beside the fused attention) scores the tokens
still present; the lowest-scoring ones are dropped for layers d_k and deeper. The last token is
never dropped and every token keeps its original position id. The layers between two depths
form a segment with one token set; the sets are nested.

Aux Cache: the hidden state entering d_k of each token dropped there is kept. While decoding,
each new token re-makes the selection at every depth from its own attention row; a selected
token missing from the segment is revived from its cached hidden state: it runs that segment's
layers (attending, by position, to the keys present there) and its K/V join that segment's
caches. Every token is computed at most once per layer, so lazy never does more work than full.
A later chat turn's new tokens are computed in full over the existing token sets.
"""

import time
from collections.abc import MutableMapping
from dataclasses import dataclass

import mlx.core as mx

from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size
from edgeprefill.prefill.full import as_token_array


class MlxOps:
    """The array operations the algorithm needs, for MLX (the torch mirror has its own)."""

    ints = staticmethod(lambda xs, like=None: mx.array(list(xs), dtype=mx.int32))
    tokens = staticmethod(lambda ids, model: as_token_array(ids))
    cat = staticmethod(lambda xs, axis: mx.concatenate(xs, axis=axis))
    stack = staticmethod(mx.stack)
    float32 = staticmethod(lambda x: x.astype(mx.float32))
    order = staticmethod(lambda scores: mx.argsort(-scores.astype(mx.float32)).tolist())
    eval = staticmethod(mx.eval)
    sync = staticmethod(lambda model: None)


@dataclass(frozen=True)
class Schedule:
    """Pruning depths (fractions of the layers) and, at each, the fraction of the tokens still
    present that is kept."""

    name: str
    depths: tuple
    keep: tuple

    def layers(self, n_layers):
        """Pruning layer indices d_k (distinct, increasing, inside 1..n_layers-1)."""
        out = []
        for f in self.depths:
            d = min(n_layers - 1, max(1, round(f * n_layers)))
            if not out or d > out[-1]:
                out.append(d)
        return out[:len(self.keep)]


PAPER_DEPTHS = (0.3, 0.6, 0.9)  # pruning at about 30%, 60% and 90% of the layers
SCHEDULES = {
    "gentle": Schedule("gentle", PAPER_DEPTHS, (0.9, 0.8, 0.7)),
    "default": Schedule("default", PAPER_DEPTHS, (0.7, 0.6, 0.5)),
    "aggressive": Schedule("aggressive", PAPER_DEPTHS, (0.5, 0.5, 0.5)),
    "early": Schedule("early", (0.1, 0.3, 0.6), (0.6, 0.6, 0.6)),
    "none": Schedule("none", PAPER_DEPTHS, (1.0, 1.0, 1.0)),
}


def resolve_schedule(spec):
    """A Schedule from a name in SCHEDULES or from 'K1:K2:K3': the fraction of the tokens still
    present kept at each of the paper's depths (30%, 60% and 90% of the layers), so a schedule
    can be set to a given TTFT FLOPs budget (`lazy-0.8:0.6:0.5`)."""
    if isinstance(spec, Schedule):
        return spec
    if spec in SCHEDULES:
        return SCHEDULES[spec]
    try:
        keep = tuple(float(k) for k in spec.split(":"))
    except ValueError:
        keep = ()
    if len(keep) != len(PAPER_DEPTHS) or not all(0 < k <= 1 for k in keep):
        from edgeprefill.errors import EdgeprefillError

        raise EdgeprefillError(
            f"unknown lazy schedule '{spec}': choose one of {', '.join(SCHEDULES)}, or K1:K2:K3, "
            "the fraction of tokens kept at 30%, 60% and 90% of the layers (each in (0, 1])")
    return Schedule(spec, PAPER_DEPTHS, keep)


class HiddenStash(MutableMapping):
    """{position: (D,) hidden state} of the tokens absent from a segment. A prune stores the
    (k, D) rows it gathered as one block and indexes into it on lookup, instead of slicing
    one array per dropped token (tens of thousands of array ops at 32k tokens)."""

    def __init__(self):
        self._at = {}  # position -> (block, row index; None: the block is the row)

    def put_rows(self, positions, block):
        """Row r of (k, D) `block` is the hidden state of positions[r]."""
        self._at.update(zip(positions, ((block, r) for r in range(len(positions)))))

    def __setitem__(self, position, row):
        self._at[position] = (row, None)

    def __getitem__(self, position):
        block, r = self._at[position]
        return block if r is None else block[r]

    def __delitem__(self, position):
        del self._at[position]

    def __iter__(self):
        return iter(self._at)

    def __len__(self):
        return len(self._at)


class LazyCache(PromptCache):
    """Per-layer KV caches holding different token sets.

    seg_pos[k]: positions present in segment k's layers, in cache order.
    aux_hidden[k]: {position: (D,) hidden state entering segment k} for tokens absent there.
    next_pos: the position of the next token.
    """

    def __init__(self, layers, n_segments):
        super().__init__(layers)
        self.seg_pos = [[] for _ in range(n_segments)]
        self.aux_hidden = [HiddenStash() for _ in range(n_segments)]
        self.next_pos = 0

    trimmable = False  # revived tokens sit mid-cache: a trim cannot undo a decode step


def _keep_top(ops, scores, keep_frac, last_index):
    """Indices (ascending) of the kept entries of (S,) scores; last_index always kept."""
    n = scores.shape[0]
    k = max(1, int(round(keep_frac * n)))
    if k >= n:
        return list(range(n))
    order = ops.order(scores)
    kept = set(order[:k])
    if last_index not in kept:
        kept.discard(order[k - 1])
        kept.add(last_index)
    return sorted(kept)


class LazyPrefill:
    """Args:
        model: edgeprefill.models.Transformer.
        schedule: a Schedule, the name of one in SCHEDULES, or 'K1:K2:K3' (resolve_schedule).
        chunk_size: query tokens per attention call inside a layer.
    """

    name = "lazy"
    ops = MlxOps

    def __init__(self, model, schedule="default", chunk_size=None):
        schedule = resolve_schedule(schedule)
        self.model = model
        self.schedule = schedule
        self.chunk_size = chunk_size or default_chunk_size()
        self.bounds = schedule.layers(model.n_layers)
        self.keep = dict(zip(self.bounds, schedule.keep))
        self.starts = [0] + self.bounds  # first layer of each segment

    def segment(self, layer):
        return sum(1 for d in self.bounds if d <= layer)

    def make_cache(self, max_len=None):
        layers = self.model.make_cache() if max_len is None else self.model.make_cache(max_len)
        return LazyCache(layers, len(self.starts))

    def _layer(self, i, h, pos, cache, want_row=False, contiguous=False):
        """Run layer i over (1, L, D) h at positions pos (ascending, after the cache's), chunked;
        returns (h out, last token's attention row or None). `contiguous`: the cache holds
        every earlier position, so RoPE takes the fast contiguous-offset path."""
        outs, row = [], None
        for s in range(0, h.shape[1], self.chunk_size):
            last = s + self.chunk_size >= h.shape[1]
            out = self.model.block(i, h[:, s:s + self.chunk_size], cache=cache[i],
                                   positions=None if contiguous else pos[s:s + self.chunk_size],
                                   return_attn_row=want_row and last)
            outs.append(out.h)
            row = out.attn_row if last else row
        h = self.ops.cat(outs, 1) if len(outs) > 1 else outs[0]
        self.ops.eval(h, cache[i].keys_and_values())  # one sync per layer, not per chunk
        return h, row

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill; the first turn prunes, later turns run their new tokens in
        full over the existing token sets."""
        ops, m = self.ops, self.model
        ops.sync(m)
        start = time.perf_counter()
        ids = ops.tokens(prompt_ids, m)
        n = ids.shape[0]
        cache = cache if cache is not None else self.make_cache()
        p0 = cache.next_pos
        first = p0 == 0
        qpos = ops.ints(range(p0, p0 + n), m)  # the present tokens' positions
        h = m.embed(ids[None])
        present = list(range(n))  # indices into this prompt
        kept_per_layer, row, prune_s = [], None, 0.0
        for i in range(m.n_layers):
            if first and i in self.keep:  # prune with the previous layer's row
                ops.eval(row)
                t_prune = time.perf_counter()
                idx = _keep_top(ops, row[0], self.keep[i], len(present) - 1)
                kept = set(idx)
                dropped = [j for j in range(len(present)) if j not in kept]
                if dropped:  # one gather; the stash indexes into it
                    cache.aux_hidden[self.segment(i)].put_rows(
                        [p0 + present[j] for j in dropped], h[0, ops.ints(dropped, m)])
                h, present = h[:, ops.ints(idx, m)], [present[j] for j in idx]
                qpos = ops.ints([p0 + j for j in present], m)
                prune_s += time.perf_counter() - t_prune
            if i in self.starts:
                cache.seg_pos[self.segment(i)].extend(p0 + j for j in present)
            want = first and (i + 1) in self.keep
            h, row = self._layer(i, h, qpos, cache, want, contiguous=self.segment(i) == 0)
            kept_per_layer.append(len(present))
            if progress:
                progress(int(n * (i + 1) / m.n_layers), n)
        logits = ops.float32(m.head(h[:, -1:])[0, -1])
        ops.eval(logits)
        ops.sync(m)
        cache.next_pos = p0 + n
        cache.tokens.extend(ids.tolist())
        stats = PrefillStats(self.name, n, cache.next_pos, time.perf_counter() - start,
                             {"schedule": self.schedule.name, "prune_layers": self.bounds,
                              "prune_s": prune_s,  # ranking and bookkeeping, on the host
                              "tokens_per_layer": kept_per_layer,
                              "token_layers_fraction": sum(kept_per_layer) / (n * m.n_layers)})
        return cache, logits, stats

    def _revive(self, seg, positions, cache):
        """Run segment `seg`'s layers for tokens absent there, from their cached hidden states."""
        ops, m = self.ops, self.model
        h = ops.stack([cache.aux_hidden[seg].pop(p) for p in positions])[None]
        qpos = ops.ints(positions, m)
        end = self.starts[seg + 1] if seg + 1 < len(self.starts) else m.n_layers
        kpos = ops.ints(cache.seg_pos[seg] + positions, m)
        mask = kpos[None, :] <= qpos[:, None]  # by position: the cache is not in order
        for i in range(self.starts[seg], end):
            h = m.block(i, h, cache=cache[i], positions=qpos, mask=mask).h
        cache.seg_pos[seg].extend(positions)
        if seg + 1 < len(self.starts):
            cache.aux_hidden[seg + 1].put_rows(positions, h[0])
        ops.eval(h, [cache[i].keys_and_values() for i in range(self.starts[seg], end)])

    def forward(self, ids, cache):
        """Decode (1, L) ids token by token with re-selection and revival; (1, L, V) logits."""
        if not isinstance(cache, LazyCache):
            raise ValueError("lazy decodes only a cache its own prefill made")
        ops, m = self.ops, self.model
        rows = []
        for t in range(ids.shape[1]):
            p = cache.next_pos
            qpos = ops.ints([p], m)
            h = m.embed(ids[:, t:t + 1])
            row = None
            for i in range(m.n_layers):
                if i in self.keep and cache.aux_hidden[self.segment(i)]:
                    prev = cache.seg_pos[self.segment(i) - 1]
                    idx = _keep_top(ops, row[0, :len(prev)], self.keep[i], len(prev) - 1)
                    have = set(cache.seg_pos[self.segment(i)])
                    need = [prev[j] for j in idx if prev[j] not in have and prev[j] != p]
                    if need:
                        self._revive(self.segment(i), need, cache)
                if i in self.starts:
                    cache.seg_pos[self.segment(i)].append(p)
                out = m.block(i, h, cache=cache[i], positions=qpos,
                              return_attn_row=(i + 1) in self.keep)
                h, row = out.h, out.attn_row
            rows.append(m.head(h))
            cache.next_pos = p + 1
        return ops.cat(rows, 1) if len(rows) > 1 else rows[0]
