"""Torch mirror of edgeprefill.prefill.lazy: the same algorithm (one implementation) over the
mirror model, with torch array operations."""

import torch

from edgeprefill.mirror.prefill.full import NoGrad, as_token_tensor, synchronize
from edgeprefill.prefill.lazy import LazyPrefill as MlxLazyPrefill


class TorchOps:
    """The array operations LazyPrefill needs, for torch tensors on the model's device."""

    ints = staticmethod(lambda xs, model: torch.tensor(list(xs), dtype=torch.long,
                                                       device=model.device))
    tokens = staticmethod(lambda ids, model: as_token_tensor(ids, model.device))
    cat = staticmethod(lambda xs, axis: torch.cat(xs, dim=axis))
    stack = staticmethod(torch.stack)
    float32 = staticmethod(lambda x: x.float())
    order = staticmethod(lambda scores: torch.argsort(-scores.float()).tolist())
    eval = staticmethod(lambda *args: None)
    sync = staticmethod(lambda model: synchronize(model.device))


class LazyPrefill(NoGrad, MlxLazyPrefill):
    """`lazy` on the torch mirror; arguments as the MLX strategy. Caches are the mirror's
    buffer caches (make_cache(max_len))."""

    ops = TorchOps

    def __init__(self, model, schedule="default", chunk_size=None):
        super().__init__(model, schedule, chunk_size)
