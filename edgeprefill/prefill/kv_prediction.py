"""`kvp`: KV Prediction (Horton et al., arXiv 2410.08391).

For a prompt of N new tokens:
1. the aux model runs causally over prompt[:-1] (after any tokens of earlier turns it has not
   seen yet, so its own cache covers the whole conversation);
2. for each base layer i the predictor maps aux layer j_i's output (its pre-RoPE K/V, or its
   hidden state) to base K/V (a truncated aux's own layers are copied exactly), which the
   base's own k_norm and RoPE place at absolute positions offset .. offset+N-2;
3. the base runs ONE step on the last prompt token at position offset+N-1 over that cache;
   its logits give the first output token. Decoding then continues with the base alone.

`tail` > 1 (an extension beyond the paper, recorded in the artifact card when used) lets the
base compute the last `tail` prompt tokens itself, exactly, over the predicted cache of the
earlier ones: the aux runs over prompt[:-tail]. tail = 1 is the paper.
"""

import time

import mlx.core as mx

from edgeprefill.kvp.predictor import StackedPredictor
from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size
from edgeprefill.prefill.full import as_token_array


def check_tail(tail):
    """Refuse an exact tail that is not an integer >= 1 (None: the pair's card decides)."""
    from edgeprefill.errors import EdgeprefillError

    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
        raise EdgeprefillError(f"--kvp-tail must be >= 1 (got {tail!r}): pass a whole number "
                               "of tokens")


def with_room(k, v, room, step):
    """(K, V), (..., L, hd), followed by zeros up to the next multiple of `step` positions
    that leaves at least `room` free: one buffer a KV cache can append into without growing."""
    n = k.shape[2]
    free = -(-(n + room) // step) * step - n
    pad = mx.zeros((*k.shape[:2], free, k.shape[3]), dtype=k.dtype)
    return mx.concatenate([k, pad], axis=2), mx.concatenate([v, pad], axis=2)


def write_fresh(c, k, v, room):
    """Fill an empty mlx-lm KVCache with (1, Hkv, L, hd) keys/values, `room` slots to spare."""
    c.keys, c.values = with_room(k, v, room, c.step)
    c.offset = k.shape[2]


class KVPrediction:
    """Args:
        model: the base edgeprefill.models.Transformer.
        aux: an edgeprefill.kvp.aux.AuxModel.
        predictor: an edgeprefill.kvp.predictor.KVPredictor (its layer_map is j_i).
        chunk_size: aux tokens per forward call.
    """

    name = "kvp"

    def __init__(self, model, aux, predictor, chunk_size=None, tail=1, overlap="auto"):
        self.model = model
        self.aux = aux
        self.predictor = predictor
        self.layer_map = predictor.layer_map
        self.chunk_size = chunk_size or default_chunk_size()
        if tail < 1:
            raise ValueError(f"tail must be >= 1 (got {tail})")
        self.tail = tail
        self._stacked = None  # the predictor's Linears stacked, built at the first prefill
        self.overlap = overlap
        self._step_streams = {}  # thread id -> the stream of the overlapped base step

    def make_cache(self):
        cache = PromptCache(self.model.make_cache())
        cache.aux = self.aux.make_cache()
        return cache

    def predicted_stacked(self, aux_out, offset, skip=0):
        """The predicted base layers' K/V from one aux forward's output (its first `skip`
        positions dropped): (keys, values), each (P, Hkv, L, hd) in the base's dtype, row s
        being base layer predictor.predicted[s], keys through the base's own k_norm and RoPE
        at absolute positions offset.. (ready for the base cache)."""
        if self._stacked is None:
            self._stacked = StackedPredictor(self.predictor)
        base = self.model
        k, v = self._stacked(aux_out, skip)
        k = base.rotate_keys_stacked(self.predictor.predicted, k.astype(base.dtype), offset)
        return k, v.astype(base.dtype)

    def _run_aux(self, ids, cache, predict_from, room):
        """Aux over `ids`; predicted base K/V written for ids[predict_from:]; `room`: tokens
        the base will add right after (its step), reserved in fresh cache buffers."""
        hidden_from = self.predictor.hidden_layers()
        for s in range(0, ids.shape[0], self.chunk_size):
            chunk = ids[s:s + self.chunk_size]
            out = self.aux.forward(chunk[None], cache.aux, hidden_from)
            skip = max(0, predict_from - s)
            if skip >= chunk.shape[0]:
                mx.eval([c.keys_and_values() for c in cache.aux])
                continue
            left = ids.shape[0] - s - chunk.shape[0]
            self._write_predicted(out, cache, skip, room + left)
            mx.eval([c.keys_and_values() for c in cache.aux + list(cache)])

    def _write_predicted(self, out, cache, skip, room):
        """Append one aux forward's base K/V to the base cache: exact layers one by one, the
        predicted ones stacked (one batched matmul, one RoPE call; into a fresh cache as
        views of one buffer with `room` free slots, so no per-layer allocate-and-copy)."""
        base, plan = self.model, self.predictor
        offset = cache[0].offset
        for i, k, v in plan.base_kv(out, skip, layers=plan.exact):
            k = base.rotate_keys(i, k.astype(base.dtype), offset=offset)
            cache[i].update_and_fetch(k, v.astype(base.dtype))
        if not plan.predicted:
            return
        k, v = self.predicted_stacked(out, offset, skip)
        n = k.shape[2]
        if offset == 0 and all(cache[i].keys is None for i in plan.predicted):
            k, v = with_room(k, v, room, cache[plan.predicted[0]].step)
            for s, i in enumerate(plan.predicted):
                c = cache[i]
                c.keys, c.values, c.offset = k[s:s + 1], v[s:s + 1], n
        else:
            for s, i in enumerate(plan.predicted):
                cache[i].update_and_fetch(k[s:s + 1], v[s:s + 1])

    def _overlapped(self, aux_ids, tail_ids, cache):
        """The aux prefill and the base step as one graph (a fresh prompt, one aux chunk): as
        soon as aux layer j has run, the base layers it feeds get their K/V written and their
        part of the base step queued on a second stream, so the base's memory-bound one-token
        step (it reads every weight once) runs beside the aux's compute-bound prefill instead
        of after it. Same operations and results as the sequential path."""
        import threading

        base, plan = self.model, self.predictor
        feeds = {}
        for i, j in enumerate(plan.layer_map):
            feeds.setdefault(j, []).append(i)
        key = threading.get_ident()  # MLX streams belong to the thread that made them
        if key not in self._step_streams:
            self._step_streams[key] = mx.new_stream(mx.default_device())
        stream = self._step_streams[key]
        state = {}
        room = tail_ids.shape[0]

        def after_aux_layer(j, out):
            for i, k, v in plan.base_kv(out, layers=feeds.get(j, ())):
                k = base.rotate_keys(i, k.astype(base.dtype))
                write_fresh(cache[i], k, v.astype(base.dtype), room)
                with mx.stream(stream):
                    h = state.get("h")
                    h = base.embed(tail_ids[None]) if h is None else h
                    state["h"] = base.block(i, h, cache=cache[i]).h

        self.aux.forward(aux_ids[None], cache.aux, plan.hidden_layers(),
                         after_layer=after_aux_layer)
        with mx.stream(stream):
            logits = base.head(state["h"][:, -1:])[0, -1].astype(mx.float32)
        mx.eval(logits, [c.keys_and_values() for c in cache.aux + list(cache)])
        return logits

    def predicted_cache(self, ids, room=0):
        """A fresh base cache holding the pair's predicted K/V for `ids` (an mx int32 array),
        with `room` free slots for the tokens the base will add: the prefill's first part,
        without the base step (edgeprefill.kvp.diagnose compares it with the exact cache)."""
        cache = self.make_cache()
        self._run_aux(ids, cache, predict_from=0, room=room)
        return cache

    def base_step(self, ids, cache):
        """The base over `ids` (the prompt's last `tail` tokens) after the predicted cache:
        the first output token's (V,) float32 logits; the base cache is extended in place."""
        base = self.model
        h = base.embed(ids[None])
        for i in range(base.n_layers):
            h = base.block(i, h, cache=cache[i]).h
        logits = base.head(h[:, -1:])[0, -1].astype(mx.float32)
        mx.eval(logits, [c.keys_and_values() for c in cache])
        return logits

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill."""
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = total = ids.shape[0]
        if cache is None:
            cache = self.make_cache()
        elif not isinstance(cache, PromptCache) or cache.aux is None:
            raise ValueError("kvp continues only a conversation it started (its aux cache)")
        tail = min(self.tail, n)
        gap = cache.tokens[cache.aux[0].offset:]  # tokens the base holds that the aux has not seen
        head = ids[:n - tail]
        aux_ids = mx.concatenate([mx.array(gap, dtype=mx.int32), head]) if gap else head
        overlap = self.overlap if self.overlap != "auto" else mx.default_device() == mx.gpu
        if overlap and aux_ids.shape[0] and not gap and cache[0].offset == 0 and (
                aux_ids.shape[0] <= self.chunk_size):
            logits = self._overlapped(aux_ids, ids[n - tail:], cache)
            t_aux = None  # not separable: the aux and the base step ran together
        else:
            overlap = False
            if aux_ids.shape[0]:
                self._run_aux(aux_ids, cache, predict_from=len(gap), room=tail)
            t_aux = time.perf_counter() - start
            if progress:
                progress(total - tail, total)
            logits = self.base_step(ids[n - tail:], cache)
        cache.tokens.extend(ids.tolist())
        if progress:
            progress(total, total)
        stats = PrefillStats(self.name, total, cache[0].offset, time.perf_counter() - start,
                             {"aux_s": t_aux, "aux_tokens": int(aux_ids.shape[0]),
                              "aux": self.aux.kind, "tail": tail, "overlap": overlap})
        return cache, logits, stats
