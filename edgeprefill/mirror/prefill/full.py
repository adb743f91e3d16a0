"""Torch mirror of `full`: exact chunked prefill, same contract as the MLX strategy."""

import time

import torch

from edgeprefill.prefill.base import CPU_CHUNK, GPU_CHUNK, PrefillStats


def as_token_tensor(prompt_ids, device):
    """(N,) int64 tensor from a list, numpy array or tensor of token ids."""
    return torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids,
                           dtype=torch.long, device=device).reshape(-1)


def default_chunk_size(model):
    """The MLX rule (edgeprefill.prefill.base.default_chunk_size) for the mirror's device."""
    return GPU_CHUNK if torch.device(model.device).type == "cuda" else CPU_CHUNK


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class NoGrad:
    """Mixin for a mirror strategy that runs an MLX strategy's algorithm on torch tensors:
    its prefill and decoding without autograd."""

    @torch.no_grad()
    def prefill(self, prompt_ids, cache=None, progress=None):
        return super().prefill(prompt_ids, cache, progress)

    @torch.no_grad()
    def forward(self, ids, cache):
        return super().forward(ids, cache)


class FullPrefill:
    """Every prompt token through every layer, `chunk_size` tokens per forward call.

    Args:
        model: edgeprefill.mirror.models.Transformer.
        chunk_size: tokens per call.
    """

    name = "full"

    def __init__(self, model, chunk_size=None):
        self.model = model
        self.chunk_size = chunk_size or default_chunk_size(model)

    @torch.no_grad()
    def prefill(self, prompt_ids, cache=None, progress=None):
        """See edgeprefill.prefill; logits is a (V,) float32 tensor."""
        m = self.model
        synchronize(m.device)
        start = time.perf_counter()
        ids = as_token_tensor(prompt_ids, m.device)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        cache = cache if cache is not None else m.make_cache()
        for s in range(0, n, self.chunk_size):
            h = m.embed(ids[s:s + self.chunk_size][None])
            for i in range(m.n_layers):
                h = m.block(i, h, cache=cache[i]).h
            if progress:
                progress(min(s + self.chunk_size, n), n)
        logits = m.head(h[:, -1:])[0, -1].float()
        synchronize(m.device)
        stats = PrefillStats(self.name, n, cache[0].offset, time.perf_counter() - start,
                             {"chunk_size": self.chunk_size})
        return cache, logits, stats
