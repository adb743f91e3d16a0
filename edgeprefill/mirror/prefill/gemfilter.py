"""Torch mirror of edgeprefill.prefill.gemfilter: the same algorithm over the mirror model."""

from edgeprefill.mirror.prefill.full import NoGrad, default_chunk_size
from edgeprefill.mirror.prefill.selection import TorchOps
from edgeprefill.prefill.gemfilter import DEFAULT_KEEP, QUERIES
from edgeprefill.prefill.gemfilter import GemFilter as MlxGemFilter


class GemFilter(NoGrad, MlxGemFilter):
    """`gemfilter` on the torch mirror; arguments as the MLX strategy."""

    ops = TorchOps

    def __init__(self, model, keep=DEFAULT_KEEP, filter_layer=None, positions="fresh",
                 chunk_size=None, queries=QUERIES):
        super().__init__(model, keep, filter_layer, positions,
                         chunk_size or default_chunk_size(model), queries)
