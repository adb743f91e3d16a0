"""Torch mirror of edgeprefill.kvp.predictor.KVPredictor (same parameter names, so the
artifact's predictor.safetensors loads on either side)."""

import torch
from torch import nn

from edgeprefill.kvp.predictor import SOURCES


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


class KVPredictor(nn.Module):
    """Arguments and methods as the MLX KVPredictor."""

    def __init__(self, layer_map, in_dim, base_kv_heads, base_head_dim, source="kv", exact=()):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"predictor input must be one of {SOURCES}, got {source!r}")
        self.layer_map = list(layer_map)
        self.source = source
        self.exact = sorted(exact)
        self.predicted = [i for i in range(len(self.layer_map)) if i not in set(self.exact)]
        self._slot = {i: s for s, i in enumerate(self.predicted)}
        self.base_kv_heads = base_kv_heads
        self.in_dim = in_dim
        out = base_kv_heads * base_head_dim
        self.k_proj = nn.ModuleList(nn.Linear(in_dim, out) for _ in self.predicted)
        self.v_proj = nn.ModuleList(nn.Linear(in_dim, out) for _ in self.predicted)

    def hidden_layers(self):
        js = {self.layer_map[i] for i in self.predicted}
        out = set()
        if self.source in ("hidden", "hidden2"):
            out |= js
        if self.source in ("hidden-in", "hidden2"):
            out |= {j - 1 for j in js}
        return out

    def features(self, aux_out, j, skip=0):
        if self.source != "kv":
            parts = {"hidden": [j], "hidden-in": [j - 1], "hidden2": [j, j - 1]}[self.source]
            xs = [hidden_features(aux_out.hidden[a][:, skip:]) for a in parts]
            x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)
            return x, x
        k, v = aux_out.kv[j]
        return merge_heads(k[:, :, skip:]), merge_heads(v[:, :, skip:])

    def predict(self, i, xk, xv):
        s = self._slot[i]
        dt = self.k_proj[s].weight.dtype
        k = self.k_proj[s](xk.to(dt))
        v = self.v_proj[s](xv.to(dt))
        return split_heads(k, self.base_kv_heads), split_heads(v, self.base_kv_heads)

    def base_kv(self, aux_out, skip=0):
        feats = {}
        for i, j in enumerate(self.layer_map):
            if i in self._slot:
                if j not in feats:
                    feats[j] = self.features(aux_out, j, skip)
                yield (i, *self.predict(i, *feats[j]))
            else:
                k, v = aux_out.kv[j]
                yield i, k[:, :, skip:], v[:, :, skip:]


def predictor_to_torch(pred, device="cpu", dtype=torch.float32):
    """Torch copy of an MLX KVPredictor (same layout and weights)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    tp = KVPredictor(pred.layer_map, pred.in_dim, pred.base_kv_heads,
                     pred.k_proj[0].weight.shape[0] // pred.base_kv_heads if pred.k_proj else 1,
                     pred.source, pred.exact)
    state = {k: torch.from_numpy(np.array(v.astype(mx.float32)))
             for k, v in tree_flatten(pred.parameters())}
    tp.load_state_dict(state, strict=True)
    return tp.to(device=device, dtype=dtype)


def predictor_state_to_mlx(tp, pred):
    """Write a torch KVPredictor's weights into the MLX KVPredictor `pred` (same layout)."""
    import mlx.core as mx

    items = [(k, mx.array(v.detach().float().cpu().numpy())) for k, v in tp.state_dict().items()]
    pred.load_weights(items, strict=True)
    return pred
