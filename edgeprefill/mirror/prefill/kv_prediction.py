"""Torch mirror of edgeprefill.prefill.kv_prediction.KVPrediction (same steps and contract)."""

import time

import torch

from edgeprefill.mirror.prefill.full import as_token_tensor, default_chunk_size, synchronize
from edgeprefill.prefill.base import PrefillStats


class KVPrediction:
    """Args as the MLX strategy: model (mirror Transformer), aux (mirror AuxModel), predictor
    (mirror KVPredictor), chunk_size, tail. The cache is a list of mirror KVCaches with an
    `aux` attribute (the aux's caches) and `tokens`."""

    name = "kvp"

    def __init__(self, model, aux, predictor, chunk_size=None, tail=1):
        self.model, self.aux, self.predictor = model, aux, predictor
        self.chunk_size, self.tail = chunk_size or default_chunk_size(model), tail

    def make_cache(self, max_len=None):
        from edgeprefill.prefill.base import PromptCache

        cache = PromptCache(self.model.make_cache(max_len))
        cache.aux = self.aux.make_cache(max_len)
        return cache

    def _run_aux(self, ids, cache, predict_from, room=0):
        """The aux over `ids`, predicted base K/V appended for ids[predict_from:]."""
        m = self.model
        hidden_from = self.predictor.hidden_layers()
        for s in range(0, ids.shape[0], self.chunk_size):
            chunk = ids[s:s + self.chunk_size]
            out = self.aux.forward(chunk[None], cache.aux, hidden_from)
            skip = max(0, predict_from - s)
            if skip >= chunk.shape[0]:
                continue
            for i, k, v in self.predictor.base_kv(out, skip):
                k = m.rotate_keys(i, k.to(m.dtype), offset=cache[i].offset)
                cache[i].update_and_fetch(k, v.to(m.dtype))

    @torch.no_grad()
    def prefill(self, prompt_ids, cache=None, progress=None):
        m = self.model
        synchronize(m.device)
        start = time.perf_counter()
        ids = as_token_tensor(prompt_ids, m.device)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        cache = cache if cache is not None else self.make_cache()
        tail = min(self.tail, n)
        gap = cache.tokens[cache.aux[0].offset:]
        aux_ids = torch.cat([torch.as_tensor(gap, dtype=torch.long, device=m.device),
                             ids[:n - tail]])
        self._run_aux(aux_ids, cache, predict_from=len(gap))
        t_aux = time.perf_counter() - start
        h = m.embed(ids[n - tail:][None])
        for i in range(m.n_layers):
            h = m.block(i, h, cache=cache[i]).h
        logits = m.head(h[:, -1:])[0, -1].float()
        cache.tokens.extend(ids.tolist())
        synchronize(m.device)
        stats = PrefillStats(self.name, n, cache[0].offset, time.perf_counter() - start,
                             {"aux_s": t_aux, "aux_tokens": int(aux_ids.shape[0]),
                              "aux": self.aux.kind, "tail": tail})
        return cache, logits, stats
