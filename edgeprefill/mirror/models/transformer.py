"""Torch mirror of edgeprefill.models.transformer: llama, qwen2, qwen3, layer by layer.

Module and parameter names equal the HF checkpoint keys (and so mlx-lm's), so a state dict
moves between the two sides by name. The KV cache is a module of position-indexed buffers
(register_buffer), as gpt-fast does and as Core ML's stateful models need.

Shapes: B batch, L tokens in this call, S keys attended, D hidden size, H query heads,
Hkv key/value heads, hd head dim.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass
class BlockOutput:
    """Same fields as the MLX side: h (B, L, D); keys, values (B, Hkv, L, hd) pre-RoPE;
    attn_row (B, S) and attn (B, H, m, S) when asked for."""

    h: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    attn_row: Optional[torch.Tensor] = None
    attn: Optional[torch.Tensor] = None


def rope_inv_freq(config, head_dim):
    """(hd/2,) float32 inverse frequencies for the config's RoPE (default, linear, llama3)."""
    base = float(config.get("rope_theta", 10000.0))
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(
            scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        medium = (wavelen <= old / low) & (wavelen >= old / high)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"RoPE scaling '{kind}' is not supported by the torch mirror")


def apply_rope(x, inv_freq, positions):
    """Rotate-half RoPE (the non-traditional layout mlx and HF use).

    Args:
        x: (B, H, L, hd).
        inv_freq: (hd/2,) float32.
        positions: (L,) absolute positions (negative rotates backwards).
    Returns:
        (B, H, L, hd), x's dtype.
    """
    theta = positions.to(torch.float32)[:, None] * inv_freq[None, :].to(x.device)
    cos, sin = theta.cos(), theta.sin()
    xf = x.to(torch.float32)
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(torch.float32)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config["hidden_size"]
        self.n_heads = config["num_attention_heads"]
        self.n_kv_heads = config.get("num_key_value_heads") or self.n_heads
        self.head_dim = config.get("head_dim") or d // self.n_heads
        self.scale = self.head_dim ** -0.5
        bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias", False))
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d,
                                bias=bias and config["model_type"] != "qwen2")
        if config["model_type"] == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config["hidden_size"], config["intermediate_size"]
        bias = bool(config.get("mlp_bias", False))
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList(
            [TransformerBlock(config) for _ in range(config["num_hidden_layers"])])
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])


class KVCache(nn.Module):
    """One layer's cache: rotated keys and values in buffers written by position.

    keys, values: (B, Hkv, max_len, hd) buffers; `offset` tokens are filled.
    """

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device))
        self.offset = 0

    def update_and_fetch(self, keys, values):
        """Write (B, Hkv, L, hd) keys/values at [offset, offset+L); return the filled part."""
        end = self.offset + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache full: {end} > {self.keys.shape[2]} positions")
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keys_and_values(self):
        return self.keys[:, :, :self.offset], self.values[:, :, :self.offset]


def causal_mask(n_queries, n_keys, device):
    """(L, S) bool mask: query j (at key position S-L+j) sees keys 0..S-L+j."""
    q = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    return q >= torch.arange(n_keys, device=device)[None, :]


class Transformer(nn.Module):
    """Torch per-layer model with the MLX side's API (embed / block / head).

    Args:
        config: HF config dict (model_type llama, qwen2 or qwen3).
    """

    def __init__(self, config):
        super().__init__()
        if config.get("model_type") not in FAMILIES:
            raise ValueError(f"unsupported model_type {config.get('model_type')!r}")
        self.config = config
        self.model_type = config["model_type"]
        self.model = Model(config)
        self.tied = bool(config.get("tie_word_embeddings", True))
        if not self.tied:
            self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        attn = self.model.layers[0].self_attn
        self.n_layers = config["num_hidden_layers"]
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.hidden_size = config["hidden_size"]
        self.vocab_size = config["vocab_size"]
        self.max_context = config.get("max_position_embeddings") or 2048
        self.has_qk_norm = self.model_type == "qwen3"
        self.register_buffer("inv_freq", rope_inv_freq(config, self.head_dim), persistent=False)

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def make_cache(self, max_len=None, batch=1):
        """Per-layer buffer caches of `max_len` positions (default: the model's context)."""
        max_len = max_len or self.max_context
        return [KVCache(batch, self.n_kv_heads, max_len, self.head_dim, self.dtype, self.device)
                for _ in range(self.n_layers)]

    def embed(self, ids):
        """(B, L) int64 ids -> (B, L, D)."""
        return self.model.embed_tokens(ids)

    def head(self, h):
        """(B, L, D) -> (B, L, V) logits."""
        h = self.model.norm(h)
        return F.linear(h, self.model.embed_tokens.weight) if self.tied else self.lm_head(h)

    def _positions(self, offset, positions, n, device):
        if positions is not None:
            return positions.to(device)
        return torch.arange(offset, offset + n, device=device)

    def project_kv(self, i, h):
        """Pre-RoPE keys and values of layer i for h entering it: (B, Hkv, L, hd) each."""
        layer = self.model.layers[i]
        x = layer.input_layernorm(h)
        B, L, _ = x.shape
        k = layer.self_attn.k_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        return k, v

    def rotate_keys(self, i, keys, offset=0, positions=None):
        """Pre-RoPE keys (B, Hkv, L, hd) -> cached keys (k_norm, then RoPE)."""
        attn = self.model.layers[i].self_attn
        if self.has_qk_norm:
            keys = attn.k_norm(keys)
        pos = self._positions(offset, positions, keys.shape[2], keys.device)
        return apply_rope(keys, self.inv_freq, pos)

    def block(self, i, h, cache=None, offset=None, positions=None, prefix_kv=None,
              replace_kv=None, mask=None, runs=None, return_attn_row=False, attn_probs=0):
        """Run block i; arguments and result as edgeprefill.models.Transformer.block.

        mask: optional (L, S) bool (True = attend) override.
        """
        layer = self.model.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        B, L, _ = x.shape
        if offset is None:
            offset = cache.offset if cache is not None else 0
        q = attn.q_proj(x).view(B, L, self.n_heads, -1)
        if replace_kv is None:
            k = attn.k_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(x).view(B, L, self.n_kv_heads, -1).transpose(1, 2)
        else:
            k, v = replace_kv
        if self.has_qk_norm:
            q = attn.q_norm(q)
        pos = self._positions(offset, positions, L, h.device)
        q = apply_rope(q.transpose(1, 2), self.inv_freq, pos)
        k_rot = self.rotate_keys(i, k, offset, positions)
        if cache is not None:
            keys, values = cache.update_and_fetch(k_rot, v)
        else:
            keys, values = k_rot, v
        if prefix_kv is not None:
            keys = torch.cat([prefix_kv[0], keys], dim=2)
            values = torch.cat([prefix_kv[1], values], dim=2)
        gqa = self.n_heads != self.n_kv_heads
        if runs is not None:
            out = torch.cat([F.scaled_dot_product_attention(
                q[:, :, lo:hi], keys[:, :, :end], values[:, :, :end], scale=attn.scale,
                attn_mask=causal_mask(hi - lo, end, h.device) if hi - lo > 1 else None,
                enable_gqa=gqa) for lo, hi, end in runs], dim=2)
        else:
            S = keys.shape[2]
            # a whole causal sequence needs no mask tensor: is_causal lets SDPA pick a fused
            # kernel
            is_causal = mask is None and L > 1 and S == L
            if mask is None and L > 1 and not is_causal:
                mask = causal_mask(L, S, h.device)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 scale=attn.scale, is_causal=is_causal,
                                                 enable_gqa=gqa)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        row = last_query_attention(q[:, :, -1:], keys, attn.scale) if return_attn_row else None
        probs = query_attention(q[:, :, -attn_probs:], keys, attn.scale) if attn_probs else None
        return BlockOutput(h, k, v, row, probs)

    def forward(self, ids, cache=None):
        """(B, L) ids -> (B, L, V) logits, appending to `cache` if given."""
        h = self.embed(ids)
        for i in range(self.n_layers):
            h = self.block(i, h, cache=None if cache is None else cache[i]).h
        return self.head(h)


def last_query_attention(q_last, keys, scale):
    """(B, H, 1, hd) query, (B, Hkv, S, hd) keys -> (B, S) probabilities averaged over heads."""
    B, H, _, hd = q_last.shape
    Hkv = keys.shape[1]
    q = q_last.reshape(B, Hkv, H // Hkv, hd).float()
    probs = torch.softmax((q * scale) @ keys.float().transpose(-1, -2), dim=-1)
    return probs.reshape(B, H, -1).mean(dim=1)


def query_attention(q, keys, scale):
    """(B, H, m, hd) queries of the call's last m tokens, (B, Hkv, S, hd) keys ending with
    theirs -> (B, H, m, S) probabilities per head (as the MLX side)."""
    B, H, m, hd = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, m, hd).float()
    scores = (qg * scale) @ keys.float()[:, :, None].transpose(-1, -2)
    ar = torch.arange(S, device=q.device)
    visible = ar[None, :] <= (S - m + torch.arange(m, device=q.device))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(B, H, m, S)
