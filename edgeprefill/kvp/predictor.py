"""The KV predictor: per base layer, one Linear (with bias) for K and one for V.

Inputs are the aux layer j_i's pre-RoPE keys / values with its KV heads merged into one vector
per position; outputs are the base layer i's pre-RoPE (pre-k_norm) keys / values.
"""

import mlx.core as mx
import mlx.nn as nn


def merge_heads(x):
    """(B, Hkv, L, hd) -> (B, L, Hkv * hd)."""
    B, H, L, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * hd)


def split_heads(x, n_heads):
    """(B, L, Hkv * hd) -> (B, Hkv, L, hd)."""
    B, L, C = x.shape
    return x.reshape(B, L, n_heads, C // n_heads).transpose(0, 2, 1, 3)


class KVPredictor(nn.Module):
    """Linear maps from aux K/V to base K/V, one pair per base layer.

    Args:
        layer_map: j_i, the aux layer feeding each base layer.
        aux_dim: aux KV heads * aux head dim.
        base_kv_heads, base_head_dim: the base's KV layout.
    """

    def __init__(self, layer_map, aux_dim, base_kv_heads, base_head_dim):
        super().__init__()
        self.layer_map = list(layer_map)
        self.base_kv_heads = base_kv_heads
        out = base_kv_heads * base_head_dim
        self.k_proj = [nn.Linear(aux_dim, out, bias=True) for _ in self.layer_map]
        self.v_proj = [nn.Linear(aux_dim, out, bias=True) for _ in self.layer_map]

    def predict(self, i, aux_keys, aux_values):
        """Base layer i's K/V from aux layer j_i's.

        Args:
            aux_keys, aux_values: (B, Hkv_A, L, hd_A) pre-RoPE.
        Returns:
            keys, values: (B, Hkv_B, L, hd_B) pre-RoPE, pre-k_norm.
        """
        k = self.k_proj[i](merge_heads(aux_keys))
        v = self.v_proj[i](merge_heads(aux_values))
        return split_heads(k, self.base_kv_heads), split_heads(v, self.base_kv_heads)

    @classmethod
    def identity(cls, layer_map, kv_heads, head_dim, dtype=mx.float32):
        """A predictor that copies K/V (aux and base of the same KV layout)."""
        pred = cls(layer_map, kv_heads * head_dim, kv_heads, head_dim)
        eye = mx.eye(kv_heads * head_dim, dtype=dtype)
        for lin in pred.k_proj + pred.v_proj:
            lin.weight = eye
            lin.bias = mx.zeros((kv_heads * head_dim,), dtype=dtype)
        return pred
