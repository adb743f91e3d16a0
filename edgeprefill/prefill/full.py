"""`full`: exact chunked prefill of the base model (what mlx-lm does; the baseline)."""

import time

import mlx.core as mx
import numpy as np

from edgeprefill.prefill.base import PrefillStats, PromptCache, default_chunk_size


def as_token_array(prompt_ids):
    """(N,) int32 mx.array from a list, numpy array or mx.array of token ids (Python or
    numpy integers); refuses an empty prompt."""
    ids = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(
        np.asarray(list(prompt_ids), dtype=np.int64))
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


class MlxLmPrefill:
    """`mlx-lm`: mlx-lm's own prefill, as its `generate_step` runs it (its model and cache,
    the prompt but the last token in steps of `prefill_step_size`, then the last token), the
    anchor users know. Exact, like `full`; only the code path differs. (generate_step itself is
    not called: it starts the next decoding step before yielding the first token, which would
    put that token in the cache and its time in the TTFT.)

    Args:
        model: edgeprefill.models.Transformer (its `.model` is the mlx-lm model that runs).
        prefill_step_size: mlx-lm's default, 2048.
    """

    name = "mlx-lm"

    def __init__(self, model, prefill_step_size=2048):
        self.model, self.step = model, prefill_step_size

    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill."""
        start = time.perf_counter()
        ids = as_token_array(prompt_ids)
        n = ids.shape[0]
        model = self.model.model
        cache = cache if cache is not None else PromptCache(self.model.make_cache())
        done = 0
        while n - done > 1:
            k = min(self.step, n - 1 - done)
            model(ids[done:done + k][None], cache=cache)
            mx.eval([c.state for c in cache])
            done += k
        logits = model(ids[done:][None], cache=cache)[0, -1].astype(mx.float32)
        mx.eval(logits)
        cache.tokens.extend(ids.tolist())
        return cache, logits, PrefillStats(self.name, n, cache[0].offset,
                                           time.perf_counter() - start)
