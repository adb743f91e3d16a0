"""Torch mirror of edgeprefill.kvp.predictor.KVPredictor (same parameter names, so the
artifact's predictor.safetensors loads on either side)."""

import torch
from torch import nn

from edgeprefill.kvp.predictor import PredictorPlan


def merge_heads(x):
    """(B, Hkv, L, hd) -> (B, L, Hkv * hd)."""
    B, H, L, hd = x.shape
    return x.transpose(1, 2).reshape(B, L, H * hd)


def split_heads(x, n_heads):
    """(B, L, Hkv * hd) -> (B, Hkv, L, hd)."""
    B, L, C = x.shape
    return x.view(B, L, n_heads, C // n_heads).transpose(1, 2)


def hidden_features(h, eps=1e-6):
    h = h.float()
    return h * torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps)


class KVPredictor(PredictorPlan, nn.Module):
    """Arguments and methods as the MLX KVPredictor (the shared PredictorPlan)."""

    _merge = staticmethod(merge_heads)
    _split = staticmethod(split_heads)
    _hidden = staticmethod(hidden_features)
    _cat = staticmethod(lambda xs: torch.cat(xs, dim=-1))
    _cast = staticmethod(lambda x, dt: x.to(dt))

    def __init__(self, layer_map, in_dim, base_kv_heads, base_head_dim, source="kv", exact=(),
                 rank=None):
        nn.Module.__init__(self)
        self._plan(layer_map, in_dim, base_kv_heads, base_head_dim, source, exact, rank)
        if rank:
            self.down = nn.ModuleList(nn.Linear(in_dim, rank, bias=False) for _ in self.sources)
        self.k_proj = nn.ModuleList(nn.Linear(self.proj_in, self.out_dim) for _ in self.predicted)
        self.v_proj = nn.ModuleList(nn.Linear(self.proj_in, self.out_dim) for _ in self.predicted)
