"""One transformer forward for llama, qwen2 and qwen3, exposed layer by layer.

The weights, quantized layers and RoPE modules are mlx-lm's own loaded modules; this file only
composes them, so every prefill strategy runs the same math:

    embed(ids) -> h
    block(i, h, ...) -> BlockOutput(h, keys (pre-RoPE, pre-k_norm), values, attn_row)
    head(h) -> logits

Shapes: B batch, L tokens in this call, S keys attended, D hidden size, H query heads,
Hkv key/value heads, hd head dim.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass
class BlockOutput:
    """What one transformer block returns.

    h: (B, L, D) hidden state leaving the block.
    keys: (B, Hkv, L, hd) keys of this call's tokens before k_norm and before RoPE.
    values: (B, Hkv, L, hd) values of this call's tokens.
    attn_row: (B, S) attention probabilities of the last query over all attended keys,
        averaged over query heads (only when asked for).
    attn: (B, H, m, S) attention probabilities of the last m queries, per head (only when
        asked for: token selection by GemFilter and SpecPrefill).
    """

    h: mx.array
    keys: mx.array
    values: mx.array
    attn_row: Optional[mx.array] = None
    attn: Optional[mx.array] = None


def apply_rope(rope, x, offset=0, positions=None):
    """Rotate (B, H, L, hd) queries or keys with an mlx-lm RoPE module.

    Args:
        rope: the attention's RoPE module (nn.RoPE, Llama3RoPE, ...).
        x: (B, H, L, hd).
        offset: absolute position of the first token when positions is None.
        positions: optional (L,) int array of absolute positions, any order; negative
            positions rotate backwards (the exact inverse of RoPE).
    Returns:
        (B, H, L, hd) rotated array.
    """
    if positions is None:
        return rope(x, offset=offset)
    # mx.fast.rope takes one offset per leading batch entry: put tokens on that axis.
    B, H, L, hd = x.shape
    xt = x.transpose(2, 0, 1, 3).reshape(L, B * H, 1, hd)
    out = rope(xt, offset=positions.astype(mx.int32))
    return out.reshape(L, B, H, hd).transpose(1, 2, 0, 3)


def last_query_attention(q_last, keys, scale, key_mask=None):
    """Attention probabilities of one query over keys, averaged over query heads.

    Args:
        q_last: (B, H, 1, hd) rotated query of the last token.
        keys: (B, Hkv, S, hd) rotated keys.
        scale: softmax scale (hd ** -0.5).
        key_mask: optional (S,) bool, False for keys the query may not see.
    Returns:
        (B, S) float32 probabilities.
    """
    B, H, _, hd = q_last.shape
    Hkv = keys.shape[1]
    q = q_last.reshape(B, Hkv, H // Hkv, hd).astype(mx.float32)
    scores = (q * scale) @ keys.astype(mx.float32).transpose(0, 1, 3, 2)  # (B, Hkv, rep, S)
    if key_mask is not None:
        scores = mx.where(key_mask, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1)
    return probs.reshape(B, H, -1).mean(axis=1)


def query_attention(q, keys, scale):
    """Attention probabilities of the last m queries over keys that end with their own.

    Args:
        q: (B, H, m, hd) rotated queries of the call's last m tokens.
        keys: (B, Hkv, S, hd) rotated keys in position order, the last m being the queries'
            own (query j sees keys 0 .. S - m + j).
        scale: softmax scale.
    Returns:
        (B, H, m, S) float32 probabilities.
    """
    B, H, m, hd = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, m, hd).astype(mx.float32)
    scores = (qg * scale) @ keys.astype(mx.float32)[:, :, None].transpose(0, 1, 2, 4, 3)
    visible = mx.arange(S)[None, :] <= (S - m + mx.arange(m))[:, None]  # (m, S)
    scores = mx.where(visible, scores, -mx.inf)
    return mx.softmax(scores, axis=-1).reshape(B, H, m, S)


class Transformer:
    """Per-layer view of an mlx-lm llama / qwen2 / qwen3 model.

    Args:
        model: the mlx-lm `Model` (from mlx_lm.utils.load_model).
        config: the model's HF config dict.
    """

    def __init__(self, model, config):
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported model_type {model_type!r}")
        self.model = model
        self.config = config
        self.model_type = model_type
        self.layers = model.model.layers
        attn = self.layers[0].self_attn
        self.n_layers = len(self.layers)
        self.n_heads = attn.n_heads
        self.n_kv_heads = attn.n_kv_heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.n_heads
        self.hidden_size = config["hidden_size"]
        self.vocab_size = config["vocab_size"]
        self.max_context = config.get("max_position_embeddings") or 2048
        self.has_qk_norm = hasattr(attn, "k_norm")

    @property
    def dtype(self):
        """Activation dtype: that of the embedding output."""
        emb = self.model.model.embed_tokens
        return getattr(emb, "scales", emb.weight).dtype

    def make_cache(self):
        """A fresh mlx-lm KV cache per layer (rotated keys, values)."""
        return [KVCache() for _ in range(self.n_layers)]

    def embed(self, ids):
        """(B, L) int token ids -> (B, L, D) hidden states."""
        return self.model.model.embed_tokens(ids)

    def head(self, h):
        """(B, L, D) hidden states -> (B, L, V) logits (final norm, then LM head)."""
        h = self.model.model.norm(h)
        if self.config.get("tie_word_embeddings", True) and not hasattr(self.model, "lm_head"):
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def project_kv(self, i, h):
        """Pre-RoPE keys and values of layer i for hidden states h entering that layer.

        Args:
            h: (B, L, D) hidden states entering block i.
        Returns:
            keys, values: (B, Hkv, L, hd) each; keys before k_norm and RoPE.
        """
        layer = self.layers[i]
        x = layer.input_layernorm(h)
        B, L, _ = x.shape
        k = layer.self_attn.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = layer.self_attn.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def rotate_keys(self, i, keys, offset=0, positions=None):
        """Pre-RoPE keys -> the rotated keys layer i stores in its cache (k_norm, then RoPE).

        Args:
            keys: (B, Hkv, L, hd) pre-RoPE keys (the space `block` returns).
            offset / positions: absolute positions, as in `apply_rope`.
        Returns:
            (B, Hkv, L, hd) keys as a KV cache holds them.
        """
        attn = self.layers[i].self_attn
        if self.has_qk_norm:
            keys = attn.k_norm(keys)
        return apply_rope(attn.rope, keys, offset, positions)

    def rotate_keys_stacked(self, layers, keys, offset=0):
        """rotate_keys for several layers at once (one k_norm and one RoPE call: every
        layer's RoPE is the same).

        Args:
            layers: base layer indices, one per row of `keys`.
            keys: (P, Hkv, L, hd) pre-RoPE keys, row s belonging to layer layers[s].
        Returns:
            (P, Hkv, L, hd) rotated keys.
        """
        attn = [self.layers[i].self_attn for i in layers]
        if self.has_qk_norm:
            w = mx.stack([a.k_norm.weight for a in attn])[:, None, None, :]
            keys = mx.fast.rms_norm(keys, None, attn[0].k_norm.eps) * w
        return apply_rope(attn[0].rope, keys, offset)

    def block(self, i, h, cache=None, offset=None, positions=None, prefix_kv=None,
              replace_kv=None, mask=None, runs=None, return_attn_row=False, attn_probs=0):
        """Run transformer block i.

        Args:
            i: layer index.
            h: (B, L, D) hidden states entering the block.
            cache: this layer's KVCache (or None); the call's rotated K/V are appended to it.
            offset: absolute position of h's first token (default: cache.offset or 0).
            positions: optional (L,) absolute positions for non-contiguous tokens.
            prefix_kv: optional (keys, values), (B, Hkv, P, hd), rotated keys of earlier
                positions to attend to in full before this call's tokens (after the cache).
            replace_kv: optional (keys, values), (B, Hkv, L, hd), pre-RoPE K/V used instead
                of this layer's own projections (KV Prediction's training path).
            mask: attention mask override ((L, S) bool/additive array or "causal");
                default: causal over this call's tokens, full over cache and prefix.
            runs: optional [(lo, hi, end)]: attention in spans instead of one call (for tokens
                at scattered positions over a cache in position order): queries lo..hi-1 of
                this call attend causally to keys 0..end-1, the last query to key end-1. Each
                span is a plain causal attention, which a fused kernel runs; one mask over
                scattered positions would not be.
            return_attn_row: also return the last query's attention row (LazyLLM).
            attn_probs: also return the per-head attention of the call's last m queries
                (m = attn_probs; the cache must hold keys in position order).
        Returns:
            BlockOutput.
        """
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        B, L, _ = x.shape
        if offset is None:
            offset = cache.offset if cache is not None else 0
        q = attn.q_proj(x).reshape(B, L, self.n_heads, -1)
        if replace_kv is None:
            k = attn.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = attn.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        else:
            k, v = replace_kv
        if self.has_qk_norm:
            q = attn.q_norm(q)
        q = apply_rope(attn.rope, q.transpose(0, 2, 1, 3), offset, positions)
        k_rot = self.rotate_keys(i, k, offset, positions)
        if cache is not None:
            keys, values = cache.update_and_fetch(k_rot, v)
        else:
            keys, values = k_rot, v
        if prefix_kv is not None:
            keys = mx.concatenate([prefix_kv[0], keys], axis=2)
            values = mx.concatenate([prefix_kv[1], values], axis=2)
        if runs is not None:
            out = mx.concatenate([scaled_dot_product_attention(
                q[:, :, lo:hi], keys[:, :, :end], values[:, :, :end], cache=cache,
                scale=attn.scale, mask="causal" if hi - lo > 1 else None)
                for lo, hi, end in runs], axis=2)
        else:
            if mask is None:
                mask = "causal" if L > 1 else None
            out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=attn.scale,
                                               mask=mask)
        h = h + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        row = last_query_attention(q[:, :, -1:], keys, attn.scale) if return_attn_row else None
        probs = query_attention(q[:, :, -attn_probs:], keys, attn.scale) if attn_probs else None
        return BlockOutput(h, k, v, row, probs)

    def __call__(self, ids, cache=None):
        """Plain forward: (B, L) ids -> (B, L, V) logits, appending to `cache` if given."""
        h = self.embed(ids)
        for i in range(self.n_layers):
            h = self.block(i, h, cache=None if cache is None else cache[i]).h
        return self.head(h)
