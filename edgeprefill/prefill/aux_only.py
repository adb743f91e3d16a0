"""`aux-only`: the KV Prediction aux model run alone, prefill and decoding (the paper's
baseline at the same TTFT FLOPs as kvp with that aux)."""

import time

import mlx.core as mx

from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size
from edgeprefill.prefill.full import as_token_array


class AuxOnly:
    """Args:
        model: the base edgeprefill.models.Transformer (for its context window).
        aux: an edgeprefill.kvp.aux.AuxModel; it prefills and decodes on its own cache.
        chunk_size: tokens per forward call.
    """

    base_cache = False  # its cache is the aux model's: prompt caches of the base do not apply

    name = "aux-only"

    def __init__(self, model, aux, chunk_size=None):
        self.model = model
        self.aux = aux
        self.chunk_size = chunk_size or default_chunk_size()

    def forward(self, ids, cache):
        """(1, L) ids -> (1, L, V) logits of the aux model, extending its cache."""
        return self.aux.logits(self.aux.forward(ids, cache).h)

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill; the cache holds the aux's layers, not the base's."""
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = ids.shape[0]
        cache = cache if cache is not None else PromptCache(self.aux.make_cache())
        for s in range(0, n, self.chunk_size):
            h = self.aux.forward(ids[s:s + self.chunk_size][None], cache).h
            mx.eval(h, [c.keys_and_values() for c in cache])
            if progress:
                progress(min(n, s + self.chunk_size), n)
        logits = self.aux.logits(h[:, -1:])[0, -1].astype(mx.float32)
        mx.eval(logits)
        cache.tokens.extend(ids.tolist())
        stats = PrefillStats(self.name, n, cache[0].offset, time.perf_counter() - start,
                             {"aux": self.aux.kind, "aux_layers": self.aux.n_layers})
        return cache, logits, stats
