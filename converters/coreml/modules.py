"""Torch modules that Core ML converts: the torch mirror's math in fixed shapes, with the base's
KV cache as Core ML state.

One `ExportModel` wraps a mirror Transformer (and, for KV Prediction, a KVPredictor whose aux is
a truncation of the base, KVP-T) and is traced once per function:

- prefill (C tokens) and decode (C = 1): `forward(input_ids, position, last_index)`: the tokens at
  positions position .. position+C-1 run through every layer, their rotated K/V are written into
  the state at those positions, attention reads the whole state under a causal mask, and the
  logits of token `last_index` of the chunk come out. A short last chunk is padded: the padding's
  K/V land beyond the prompt, masked until decoding overwrites them.
- kvp_prefill (C tokens): the aux (the base's first m layers, exact, or trained copies of its
  last few where the artifact has them) runs over the chunk and writes its layers' K/V; the
  predictor maps the aux's features to the K/V of layers m..L-1, which are rotated with the
  base's RoPE at their absolute positions and written too. The prompt's last token then goes
  through `decode` (the base step of KV Prediction).

State: key_cache and value_cache, (layers, kv heads, context, head dim) float16.

Layouts: 'default' (B, S, C) activations, Linear layers, fused scaled_dot_product_attention;
'ane' (B, C, 1, S) activations with 1x1 convolutions and explicit per-head attention, the layout
Apple's ml-ane-transformers principles recommend for the Neural Engine.
"""

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -3.0e4  # fits float16; exp() of it is 0


def _conv_from_linear(lin):
    conv = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(lin.weight[:, :, None, None])
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
    return conv


def _layer_convs(layer):
    """A decoder layer's Linears as 1x1 convolutions, by name."""
    a, f = layer.self_attn, layer.mlp
    return nn.ModuleDict({n: _conv_from_linear(getattr(a, n)) for n in
                          ("q_proj", "k_proj", "v_proj", "o_proj")} | {
                         n: _conv_from_linear(getattr(f, n)) for n in
                         ("gate_proj", "up_proj", "down_proj")})


def _rms(x, weight, eps, dim):
    """RMS norm that survives float16: the squares of activations above 256 overflow it (the
    default model's residual stream reaches 2.5e4, mean squares 1e6), so the vector is first
    divided by its largest magnitude m; x/m * rsqrt(mean((x/m)^2) + eps/m^2) is the same norm."""
    xf = x.float()
    m = xf.abs().amax(dim, keepdim=True).clamp_min(1e-4)
    xs = xf / m
    xf = xs * torch.rsqrt(xs.pow(2).mean(dim, keepdim=True) + eps / (m * m))
    return xf * weight if weight is not None else xf


class ExportModel(nn.Module):
    """Args:
        model: mirror Transformer (float32 weights; Core ML casts to float16).
        context: state length (positions 0 .. context-1).
        layout: 'default' or 'ane'.
        predictor: mirror KVPredictor of a KVP-T artifact (aux = base layers 0..m-1), or None.
        aux_layers: m, the aux's layer count (with predictor).
        aux_copies: {str(i): mirror decoder layer} trained copies the aux runs in place of the
            base's block i (an artifact's aux.safetensors); kvp_prefill writes their K/V, the
            base's own blocks serve prefill and decode.
    """

    def __init__(self, model, context, layout="default", predictor=None, aux_layers=0,
                 aux_copies=None):
        super().__init__()
        self.function = "prefill"  # which entry point forward() traces: prefill | kvp_prefill
        # tokens per call while tracing: a Python constant, so no shape arithmetic reaches the
        # converter (it mis-types sizes as 1-element tensors); None in eager use
        self.chunk_len = None
        if layout not in ("default", "ane"):
            raise ValueError(f"layout must be 'default' or 'ane', not {layout!r}")
        self.m = model
        self.layout = layout
        self.context = context
        self.L, self.H, self.Hkv, self.hd = (model.n_layers, model.n_heads, model.n_kv_heads,
                                             model.head_dim)
        self.rep = self.H // self.Hkv
        shape = (self.L, self.Hkv, context, self.hd)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float16))
        pos = torch.arange(context, dtype=torch.float32)
        theta = pos[:, None] * model.inv_freq.float()[None, :]
        theta = torch.cat([theta, theta], dim=-1)  # rotate-half layout: (context, hd)
        self.register_buffer("rope_cos", theta.cos(), persistent=False)
        self.register_buffer("rope_sin", theta.sin(), persistent=False)
        self.register_buffer("key_positions", torch.arange(context, dtype=torch.int32),
                             persistent=False)
        self.predictor = predictor
        self.aux_layers = aux_layers
        self.aux_copies = nn.ModuleDict(aux_copies or {})
        if layout == "ane":  # 1x1 convolutions in place of every Linear
            self.convs = nn.ModuleList(_layer_convs(layer) for layer in model.model.layers)
            self.aux_convs = nn.ModuleDict(
                {k: _layer_convs(layer) for k, layer in self.aux_copies.items()})
            if predictor is not None:
                if predictor.rank:
                    self.pred_down = nn.ModuleList(_conv_from_linear(x) for x in predictor.down)
                self.pred_k = nn.ModuleList(_conv_from_linear(x) for x in predictor.k_proj)
                self.pred_v = nn.ModuleList(_conv_from_linear(x) for x in predictor.v_proj)

    # ---- helpers shared by both layouts -------------------------------------------------
    def _len(self, x, dim):
        return self.chunk_len if self.chunk_len is not None else x.shape[dim]

    def _rope(self, x, cos, sin):
        """x (1, heads, C, hd) float; cos/sin (C, hd)."""
        half = self.hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _write(self, i, position, k_rot, v):
        """Write (1, Hkv, C, hd) rotated keys and values at positions position.. of layer i."""
        p0 = position[0]
        C = self._len(k_rot, 2)
        self.key_cache[i:i + 1, :, p0:p0 + C, :] = k_rot.half()
        self.value_cache[i:i + 1, :, p0:p0 + C, :] = v.half()

    def _attend(self, i, q, mask):
        """q (1, H, C, hd) rotated -> (1, H, C, hd) over the whole state of layer i; grouped
        query heads folded into the query axis so the cache is read once per KV head."""
        keys = self.key_cache[i:i + 1].float()
        values = self.value_cache[i:i + 1].float()
        qg = q.reshape(1, self.Hkv, -1, self.hd)
        maskg = mask.repeat(self.rep, 1)
        if self.layout == "default":
            # the default scale (1/sqrt(hd)): with an explicit one coremltools decomposes the
            # op instead of emitting iOS 18's fused scaled_dot_product_attention
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=maskg)
        else:
            scores = torch.matmul(qg * self.hd ** -0.5, keys.transpose(2, 3)) + maskg
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
        return out.reshape(1, self.H, -1, self.hd)

    def _positions(self, position, C):
        pos = position + torch.arange(C, dtype=torch.int32)
        cos = self.rope_cos[pos.long()]
        sin = self.rope_sin[pos.long()]
        visible = self.key_positions[None, :] <= pos[:, None]
        mask = torch.where(visible, torch.zeros((), dtype=torch.float32),
                           torch.full((), MASK_VALUE, dtype=torch.float32))
        return pos, cos, sin, mask

    # ---- one block, per layout ----------------------------------------------------------
    def _norm(self, norm, x):
        if self.layout == "default":
            return _rms(x, norm.weight.float(), norm.eps, -1)
        return _rms(x, norm.weight.float()[None, :, None, None], norm.eps, 1)

    def _layer(self, i, aux=False):
        """Block i's decoder layer: the aux's trained copy when `aux` and there is one."""
        if aux and str(i) in self.aux_copies:
            return self.aux_copies[str(i)]
        return self.m.model.layers[i]

    def _proj(self, i, name, x, aux=False):
        if self.layout == "default":
            layer = self._layer(i, aux)
            mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            return mod(x)
        if aux and str(i) in self.aux_copies:
            return self.aux_convs[str(i)][name](x)
        return self.convs[i][name](x)

    def _heads(self, x, n):
        """Projection output -> (1, n, C, hd)."""
        if self.layout == "default":  # (1, C, n*hd)
            return x.reshape(1, -1, n, self.hd).transpose(1, 2)
        return x.reshape(1, n, self.hd, -1).transpose(2, 3)  # (1, n*hd, 1, C)

    def _unheads(self, x):
        """(1, H, C, hd) -> the layout's activation."""
        if self.layout == "default":
            return x.transpose(1, 2).reshape(1, -1, self.H * self.hd)
        return x.transpose(2, 3).reshape(1, self.H * self.hd, 1, -1)

    def _kv(self, i, h, aux=False):
        """Layer i's pre-RoPE keys (after k_norm for qwen3) and values, (1, Hkv, C, hd)."""
        layer = self._layer(i, aux)
        x = self._norm(layer.input_layernorm, h)
        k = self._heads(self._proj(i, "k_proj", x, aux), self.Hkv)
        v = self._heads(self._proj(i, "v_proj", x, aux), self.Hkv)
        return x, k, v

    def _block(self, i, h, position, cos, sin, mask, aux=False):
        """Block i over h, its K/V written to the state; `aux`: the aux's copy of it if any."""
        layer = self._layer(i, aux)
        attn = layer.self_attn
        x, k, v = self._kv(i, h, aux)
        q = self._heads(self._proj(i, "q_proj", x, aux), self.H)
        if self.m.has_qk_norm:
            q = _rms(q, attn.q_norm.weight.float(), attn.q_norm.eps, -1)
            k = _rms(k, attn.k_norm.weight.float(), attn.k_norm.eps, -1)
        self._write(i, position, self._rope(k, cos, sin), v)
        out = self._attend(i, self._rope(q, cos, sin), mask)
        h = h + self._proj(i, "o_proj", self._unheads(out), aux)
        x = self._norm(layer.post_attention_layernorm, h)
        gate = self._proj(i, "gate_proj", x, aux)
        return h + self._proj(i, "down_proj", F.silu(gate) * self._proj(i, "up_proj", x, aux),
                              aux)

    def _embed(self, input_ids):
        h = self.m.model.embed_tokens(input_ids.long()).float()  # (1, C, D)
        return h if self.layout == "default" else h.transpose(1, 2)[:, :, None, :]

    def _head(self, h, last_index):
        if self.layout == "ane":
            h = h[:, :, 0, :].transpose(1, 2)
        h = torch.index_select(h, 1, last_index.long())  # (1, 1, D)
        h = _rms(h, self.m.model.norm.weight.float(), self.m.model.norm.eps, -1)
        w = self.m.model.embed_tokens.weight if self.m.tied else self.m.lm_head.weight
        return F.linear(h, w.float())[:, 0]  # (1, V)

    # ---- the functions -------------------------------------------------------------------
    def forward(self, input_ids, position, last_index=None):
        """The entry point `self.function` names (traced once per function)."""
        if self.function == "kvp_prefill":
            return self.kvp_prefill(input_ids, position)
        return self.prefill(input_ids, position, last_index)

    def prefill(self, input_ids, position, last_index):
        """prefill / decode: (1, C) int32 ids, (1,) int32 first position, (1,) int32 index of
        the token whose logits to return -> (1, V) float logits."""
        _, cos, sin, mask = self._positions(position, self._len(input_ids, 1))
        h = self._embed(input_ids)
        for i in range(self.L):
            h = self._block(i, h, position, cos, sin, mask)
        return self._head(h, last_index)

    def kvp_prefill(self, input_ids, position):
        """KV Prediction over a chunk: the aux's exact layers, then predicted K/V for the rest.
        Returns (1,) int32: the position after the chunk."""
        pred = self.predictor
        _, cos, sin, mask = self._positions(position, self._len(input_ids, 1))
        h = self._embed(input_ids)
        hidden = {-1: h}
        kv = {}
        for a in range(self.aux_layers):
            if pred.source == "kv":
                _, k, v = self._kv(a, h, aux=True)
                kv[a] = (k, v)
            h = self._block(a, h, position, cos, sin, mask, aux=True)
            hidden[a] = h
        feats = {}  # aux layer -> its hidden features (down-projected for a low-rank one)
        for s, i in enumerate(pred.predicted):
            j = pred.layer_map[i]
            if pred.source == "kv":
                xk = self._merge(kv[j][0])
                xv = self._merge(kv[j][1])
            else:
                if j not in feats:
                    feats[j] = self._hidden_features(j, hidden)
                xk = xv = feats[j]
            if self.layout == "default":
                k = self._heads(pred.k_proj[s](xk), self.Hkv)
                v = self._heads(pred.v_proj[s](xv), self.Hkv)
            else:
                k = self._heads(self.pred_k[s](xk), self.Hkv)
                v = self._heads(self.pred_v[s](xv), self.Hkv)
            if self.m.has_qk_norm:
                kn = self.m.model.layers[i].self_attn.k_norm
                k = _rms(k, kn.weight.float(), kn.eps, -1)
            self._write(i, position, self._rope(k, cos, sin), v)
        return position + self._len(input_ids, 1)

    def _hidden_features(self, j, hidden):
        """The predictor's input from aux layer j's hidden states (RMS-normalized, then the
        shared down-projection of a low-rank predictor), in the layout's activation form."""
        pred = self.predictor
        dim = -1 if self.layout == "default" else 1
        parts = {"hidden": [j], "hidden-in": [j - 1], "hidden2": [j, j - 1]}[pred.source]
        feats = [_rms(hidden[a], None, 1e-6, dim) for a in parts]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=dim)
        if pred.rank:
            d = pred._dslot[j]
            x = pred.down[d](x) if self.layout == "default" else self.pred_down[d](x)
        return x

    def _merge(self, x):
        """(1, Hkv, C, hd) -> the layout's activation of width Hkv*hd."""
        if self.layout == "default":
            return x.transpose(1, 2).reshape(1, -1, self.Hkv * self.hd)
        return x.transpose(2, 3).reshape(1, self.Hkv * self.hd, 1, -1)

