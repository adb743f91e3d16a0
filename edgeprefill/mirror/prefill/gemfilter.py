"""Torch mirror of edgeprefill.prefill.gemfilter: the same algorithm over the mirror model."""

import torch

from edgeprefill.mirror.prefill.full import default_chunk_size
from edgeprefill.mirror.prefill.selection import TorchOps
from edgeprefill.prefill.gemfilter import DEFAULT_KEEP, QUERIES
from edgeprefill.prefill.gemfilter import GemFilter as MlxGemFilter


class GemFilter(MlxGemFilter):
    """`gemfilter` on the torch mirror; arguments as the MLX strategy."""

    ops = TorchOps

    def __init__(self, model, keep=DEFAULT_KEEP, filter_layer=None, positions="fresh",
                 chunk_size=None, queries=QUERIES):
        super().__init__(model, keep, filter_layer, positions,
                         chunk_size or default_chunk_size(model), queries)

    @torch.no_grad()
    def prefill(self, prompt_ids, cache=None, progress=None):
        return super().prefill(prompt_ids, cache, progress)

    @torch.no_grad()
    def forward(self, ids, cache):
        return super().forward(ids, cache)
