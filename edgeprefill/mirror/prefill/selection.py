"""Torch mirror of edgeprefill.prefill.selection: the array operations the selection
strategies run on (their algorithms are the MLX files' own)."""

import numpy as np
import torch

from edgeprefill.mirror.prefill.full import as_token_tensor, synchronize


class TorchOps:
    """edgeprefill.prefill.selection.MlxOps for torch tensors on the model's device."""

    tokens = staticmethod(lambda ids, model: as_token_tensor(ids, model.device))
    ints = staticmethod(lambda xs, model: torch.as_tensor(np.asarray(xs, dtype=np.int64),
                                                          device=model.device))
    bools = staticmethod(lambda xs, model: torch.as_tensor(np.asarray(xs, dtype=bool),
                                                           device=model.device))
    eval = staticmethod(lambda *args: None)
    sync = staticmethod(lambda model: synchronize(model.device))
    argmax = staticmethod(lambda x: torch.argmax(x, dim=-1))
    maximum = staticmethod(torch.maximum)
    stack = staticmethod(torch.stack)
    float32 = staticmethod(lambda x: x.float())
    numpy = staticmethod(lambda x: x.float().cpu().numpy())
    cat = staticmethod(lambda xs, axis: torch.cat(xs, dim=axis))
    zeros = staticmethod(lambda shape, like: torch.zeros(shape, dtype=like.dtype,
                                                         device=like.device))
    cumsum = staticmethod(lambda x, axis: torch.cumsum(x, dim=axis))
    max = staticmethod(lambda x, axis: x.amax(dim=axis))

    @staticmethod
    def assign(buf, idx, values):
        buf[:, :, idx] = values
