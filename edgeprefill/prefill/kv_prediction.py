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

from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size
from edgeprefill.prefill.full import as_token_array


class KVPrediction:
    """Args:
        model: the base edgeprefill.models.Transformer.
        aux: an edgeprefill.kvp.aux.AuxModel.
        predictor: an edgeprefill.kvp.predictor.KVPredictor (its layer_map is j_i).
        chunk_size: aux tokens per forward call.
    """

    name = "kvp"

    def __init__(self, model, aux, predictor, chunk_size=None, tail=1):
        self.model = model
        self.aux = aux
        self.predictor = predictor
        self.layer_map = predictor.layer_map
        self.chunk_size = chunk_size or default_chunk_size()
        if tail < 1:
            raise ValueError(f"tail must be >= 1 (got {tail})")
        self.tail = tail

    def make_cache(self):
        cache = PromptCache(self.model.make_cache())
        cache.aux = self.aux.make_cache()
        return cache

    def _run_aux(self, ids, cache, predict_from):
        """Aux over `ids`; predicted base K/V written for ids[predict_from:]."""
        base = self.model
        hidden_from = self.predictor.hidden_layers()
        for s in range(0, ids.shape[0], self.chunk_size):
            chunk = ids[s:s + self.chunk_size]
            out = self.aux.forward(chunk[None], cache.aux, hidden_from)
            skip = max(0, predict_from - s)
            if skip >= chunk.shape[0]:
                mx.eval([c.keys_and_values() for c in cache.aux])
                continue
            for i, k, v in self.predictor.base_kv(out, skip):
                k = base.rotate_keys(i, k.astype(base.dtype), offset=cache[i].offset)
                cache[i].update_and_fetch(k, v.astype(base.dtype))
            mx.eval([c.keys_and_values() for c in cache.aux + list(cache)])

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill."""
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = total = ids.shape[0]
        if cache is None:
            cache = self.make_cache()
        elif not isinstance(cache, PromptCache) or cache.aux is None:
            raise ValueError("kvp continues only a conversation it started (its aux cache)")
        base = self.model
        tail = min(self.tail, n)
        gap = cache.tokens[cache.aux[0].offset:]  # tokens the base holds that the aux has not seen
        head = ids[:n - tail]
        aux_ids = mx.concatenate([mx.array(gap, dtype=mx.int32), head]) if gap else head
        if aux_ids.shape[0]:
            self._run_aux(aux_ids, cache, predict_from=len(gap))
        t_aux = time.perf_counter() - start
        if progress:
            progress(total - tail, total)
        h = base.embed(ids[n - tail:][None])
        for i in range(base.n_layers):
            h = base.block(i, h, cache=cache[i]).h
        logits = base.head(h[:, -1:])[0, -1].astype(mx.float32)
        mx.eval(logits, [c.keys_and_values() for c in cache])
        cache.tokens.extend(ids.tolist())
        if progress:
            progress(total, total)
        stats = PrefillStats(self.name, total, cache[0].offset, time.perf_counter() - start,
                             {"aux_s": t_aux, "aux_tokens": int(aux_ids.shape[0]),
                              "aux": self.aux.kind, "tail": tail})
        return cache, logits, stats
