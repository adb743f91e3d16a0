"""`full`: exact chunked prefill of the base model (what mlx-lm does; the baseline)."""

import time

import mlx.core as mx

from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size


def as_token_array(prompt_ids):
    """(N,) int32 mx.array from a list or array of token ids; refuses an empty prompt."""
    ids = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(list(prompt_ids))
    ids = ids.astype(mx.int32).reshape(-1)
    if ids.shape[0] == 0:
        raise ValueError("prefill needs at least one token")
    return ids


class FullPrefill:
    """Run every prompt token through every layer, `chunk_size` tokens at a time.

    Only the last position goes through the LM head. A smaller chunk wastes less of the
    masked half of each causal score matrix; a larger one keeps matmuls efficient.

    Args:
        model: edgeprefill.models.Transformer.
        chunk_size: tokens per forward call.
    """

    name = "full"

    def __init__(self, model, chunk_size=None):
        self.model = model
        self.chunk_size = chunk_size or default_chunk_size()

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill. `progress(done, total)` is called after each chunk."""
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = ids.shape[0]
        m = self.model
        cache = cache if cache is not None else PromptCache(m.make_cache())
        done = 0
        while done < n:
            chunk = ids[done:done + self.chunk_size][None]
            h = m.embed(chunk)
            for i in range(m.n_layers):
                h = m.block(i, h, cache=cache[i]).h
            done += chunk.shape[1]
            if done < n:
                mx.eval([c.keys_and_values() for c in cache])
                if progress:
                    progress(done, n)
        logits = m.head(h[:, -1:])[0, -1].astype(mx.float32)
        mx.eval(logits, [c.keys_and_values() for c in cache])
        if isinstance(cache, PromptCache):
            cache.tokens.extend(ids.tolist())
        if progress:
            progress(n, n)
        stats = PrefillStats(self.name, n, cache[0].offset, time.perf_counter() - start,
                             {"chunk_size": self.chunk_size})
        return cache, logits, stats
