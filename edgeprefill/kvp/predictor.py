"""The KV predictor: per predicted base layer, one Linear (with bias) for K and one for V.

Outputs are base layer i's pre-RoPE (pre-k_norm) keys / values. Inputs, per artifact:
- 'kv' (the paper): aux layer j_i's pre-RoPE keys / values, KV heads merged per position;
- 'hidden': the hidden state leaving aux layer j_i, RMS-normalized (no gain). Every layer's K/V
  is a linear map of its own RMS-normalized input, so this is the natural linear-predictor input
  when the aux's last hidden state approximates the base's at that depth (KVP-T);
- 'hidden-in': the same for the hidden state entering aux layer j_i;
- 'hidden2': both, concatenated (twice the input width).
Base layers listed as `exact` are not predicted: the aux computed them with the base's own
weights on the base's own inputs (the leading layers of a truncated aux), so they are copied.

A low-rank predictor (`rank` r, hidden inputs only) first maps each aux layer's features to r
dimensions with one shared Linear (no bias), and every base layer it feeds reads those r
numbers: per token 2 r (in + P * 2 * out) FLOPs for P layers fed from one aux layer, instead of
P * 2 * 2 * in * out. A truncated aux feeds all its predicted layers from its last layer, so
this is where the predictor's cost goes (`kvp fit|train --predictor-rank`).
"""

import mlx.core as mx
import mlx.nn as nn

SOURCES = ("kv", "hidden", "hidden-in", "hidden2")


def merge_heads(x):
    """(B, Hkv, L, hd) -> (B, L, Hkv * hd)."""
    B, H, L, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * hd)


def split_heads(x, n_heads):
    """(B, L, Hkv * hd) -> (B, Hkv, L, hd)."""
    B, L, C = x.shape
    return x.reshape(B, L, n_heads, C // n_heads).transpose(0, 2, 1, 3)


def hidden_features(h, eps=1e-6):
    """(B, L, D) hidden states -> the same, RMS-normalized in float32."""
    h = h.astype(mx.float32)
    return h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + eps)


def input_dim(aux, source):
    """Predictor input width for an aux model and input kind."""
    if source == "kv":
        return aux.kv_dim
    return aux.hidden_size * (2 if source == "hidden2" else 1)


def check_rank(rank, source):
    """Raise ValueError unless `rank` (None: full rank) suits a predictor input `source`."""
    if rank is None:
        return
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"predictor rank must be an integer >= 1, got {rank!r}")
    if source == "kv":
        raise ValueError("a low-rank predictor needs a hidden-state input (hidden, hidden-in, "
                         "hidden2), not 'kv'")


class PredictorPlan:
    """Which base layers are predicted from which aux features, and how: the logic shared by
    the MLX predictor and its torch mirror (each supplies the array hooks and the Linears)."""

    def _plan(self, layer_map, in_dim, base_kv_heads, base_head_dim, source, exact, rank=None):
        if source not in SOURCES:
            raise ValueError(f"predictor input must be one of {SOURCES}, got {source!r}")
        check_rank(rank, source)
        self.layer_map = list(layer_map)
        self.source = source
        self.exact = sorted(exact)
        self.predicted = [i for i in range(len(self.layer_map)) if i not in set(self.exact)]
        self._slot = {i: s for s, i in enumerate(self.predicted)}
        self.base_kv_heads = base_kv_heads
        self.base_head_dim = base_head_dim
        self.in_dim = in_dim
        self.rank = rank
        # The aux layers whose features feed predicted layers: one down-projection each.
        self.sources = sorted({self.layer_map[i] for i in self.predicted})
        self._dslot = {j: s for s, j in enumerate(self.sources)}

    @property
    def proj_in(self):
        """Input width of the per-layer K and V Linears."""
        return self.rank or self.in_dim

    @property
    def out_dim(self):
        """Output width of the K and V Linears: the base's KV heads merged."""
        return self.base_kv_heads * self.base_head_dim

    def token_flops(self):
        """FLOPs per token (multiply-add = 2): the down-projections, then a K and a V Linear
        (with bias) per predicted layer, `out_dim` wide."""
        down = 2 * len(self.sources) * self.in_dim * self.rank if self.rank else 0
        return down + len(self.predicted) * 2 * 2 * (self.proj_in + 1) * self.out_dim

    def hidden_layers(self):
        """Aux layers whose output hidden state the predictor reads (-1: the embedding)."""
        js = {self.layer_map[i] for i in self.predicted}
        out = set()
        if self.source in ("hidden", "hidden2"):
            out |= js
        if self.source in ("hidden-in", "hidden2"):
            out |= {j - 1 for j in js}
        return out

    def features(self, aux_out, j, skip=0):
        """(xk, xv), each (B, L - skip, in_dim): the inputs aux layer j gives its base layers."""
        if self.source != "kv":
            parts = {"hidden": [j], "hidden-in": [j - 1], "hidden2": [j, j - 1]}[self.source]
            xs = [self._hidden(aux_out.hidden[a][:, skip:]) for a in parts]
            x = xs[0] if len(xs) == 1 else self._cat(xs)
            if self.rank:
                down = self.down[self._dslot[j]]
                x = down(self._cast(x, down.weight.dtype))
            return x, x
        k, v = aux_out.kv[j]
        return self._merge(k[:, :, skip:]), self._merge(v[:, :, skip:])

    def predict(self, i, xk, xv):
        """Base layer i's (keys, values), (B, Hkv_B, L, hd_B) pre-RoPE, from its features."""
        s = self._slot[i]
        dt = self.k_proj[s].weight.dtype
        k = self.k_proj[s](self._cast(xk, dt))
        v = self.v_proj[s](self._cast(xv, dt))
        return self._split(k, self.base_kv_heads), self._split(v, self.base_kv_heads)

    def base_kv(self, aux_out, skip=0, layers=None):
        """Yield (i, keys, values) for every base layer (or those in `layers`) from one aux
        forward's output, dropping its first `skip` positions; exact layers are the aux's own
        K/V."""
        feats = {}
        for i, j in enumerate(self.layer_map):
            if layers is not None and i not in layers:
                continue
            if i in self._slot:
                if j not in feats:
                    feats[j] = self.features(aux_out, j, skip)
                yield (i, *self.predict(i, *feats[j]))
            else:
                k, v = aux_out.kv[j]
                yield i, k[:, :, skip:], v[:, :, skip:]


class KVPredictor(PredictorPlan, nn.Module):
    """Linear maps from aux features to base K/V.

    Args:
        layer_map: j_i, the aux layer feeding each base layer.
        in_dim: input width (aux KV heads * head dim for 'kv', hidden size for 'hidden').
        base_kv_heads, base_head_dim: the base's KV layout.
        source: one of SOURCES.
        exact: base layers copied from the aux (no Linear).
        rank: None (full rank) or r: a shared (in_dim -> r) down-projection per source aux
            layer, then (r -> out) Linears per predicted layer.
    """

    _merge = staticmethod(merge_heads)
    _split = staticmethod(split_heads)
    _hidden = staticmethod(hidden_features)
    _cat = staticmethod(lambda xs: mx.concatenate(xs, axis=-1))
    _cast = staticmethod(lambda x, dt: x.astype(dt))

    def __init__(self, layer_map, in_dim, base_kv_heads, base_head_dim, source="kv", exact=(),
                 rank=None):
        nn.Module.__init__(self)
        self._plan(layer_map, in_dim, base_kv_heads, base_head_dim, source, exact, rank)
        if rank:
            self.down = [nn.Linear(in_dim, rank, bias=False) for _ in self.sources]
        self.k_proj = [nn.Linear(self.proj_in, self.out_dim) for _ in self.predicted]
        self.v_proj = [nn.Linear(self.proj_in, self.out_dim) for _ in self.predicted]

    @classmethod
    def identity(cls, layer_map, kv_heads, head_dim, dtype=mx.float32):
        """A 'kv' predictor that copies K/V (aux and base of the same KV layout)."""
        pred = cls(layer_map, kv_heads * head_dim, kv_heads, head_dim)
        eye = mx.eye(kv_heads * head_dim, dtype=dtype)
        for lin in pred.k_proj + pred.v_proj:
            lin.weight = eye
            lin.bias = mx.zeros((kv_heads * head_dim,), dtype=dtype)
        return pred


class StackedPredictor:
    """A KVPredictor's Linears stacked for inference: the keys (and values) of every
    predicted base layer come out of one batched matmul instead of one Linear per layer (on
    a GPU the per-layer kernels and host dispatches, not the FLOPs, dominate this step).
    Build it after the predictor's weights are final.

    Args:
        pred: a KVPredictor.
    """

    def __init__(self, pred):
        self.pred = pred
        self.layers = list(pred.predicted)
        self.aux_layers = sorted({pred.layer_map[i] for i in self.layers})
        rows = [self.aux_layers.index(pred.layer_map[i]) for i in self.layers]
        self.rows = None if rows == list(range(len(rows))) else mx.array(rows)
        self.weights = [(mx.stack([lin.weight.T for lin in projs]),
                         mx.stack([lin.bias for lin in projs])[:, None, :])
                        for projs in (pred.k_proj, pred.v_proj)]
        mx.eval(self.weights)

    def __call__(self, aux_out, skip=0):
        """(keys, values), each (P, Hkv_B, L - skip, hd_B) pre-RoPE, row s being base layer
        self.layers[s]: what pred.predict gives layer by layer."""
        pred = self.pred
        feats = [pred.features(aux_out, j, skip) for j in self.aux_layers]
        out = []
        for t, (w, b) in enumerate(self.weights):
            x = mx.concatenate([f[t] for f in feats], axis=0)  # (J, L, in)
            if self.rows is not None and len(self.aux_layers) > 1:
                x = x[self.rows]  # (P, L, in): each layer's aux features
            y = x.astype(w.dtype) @ w + b  # (P, L, out); one aux layer broadcasts
            out.append(split_heads(y, pred.base_kv_heads))
        return out[0], out[1]
