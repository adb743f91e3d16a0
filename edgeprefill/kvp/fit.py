"""Closed-form ridge fit of the KV predictor (aux frozen, base frozen).

For each base layer i and each of K and V, solve
    W = argmin ||[X 1] W - Y||^2 + lam * ||W_no_bias||^2
with X the aux layer j_i's merged pre-RoPE K (or V) and Y the base layer i's, over every
position of the fitting text. Only X^T X and X^T Y are accumulated (float64), so memory does
not grow with the text and one pass over it suffices.
"""

import mlx.core as mx
import numpy as np

from edgeprefill.kvp.predictor import KVPredictor, merge_heads


def _merged(x):
    """(1, Hkv, L, hd) mx -> (L, Hkv*hd) float64 numpy."""
    return np.array(merge_heads(x)[0].astype(mx.float32)).astype(np.float64)


class RidgeAccumulator:
    """Running X^T X and X^T Y per (aux layer, base layer) pair for K and for V."""

    def __init__(self, layer_map):
        self.layer_map = list(layer_map)
        self.xtx = {}  # (aux layer, 'k'|'v') -> (d_a+1, d_a+1)
        self.xty = {}  # (base layer, 'k'|'v') -> (d_a+1, d_b)
        self.tokens = 0

    def add(self, aux_kv, base_kv):
        """aux_kv / base_kv: per-layer lists of (keys, values), (1, Hkv, L, hd)."""
        xs = {}
        for j in sorted(set(self.layer_map)):
            for t, x in zip("kv", aux_kv[j]):
                x = _merged(x)
                x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
                xs[j, t] = x
                self.xtx[j, t] = self.xtx.get((j, t), 0) + x.T @ x
        for i, j in enumerate(self.layer_map):
            for t, y in zip("kv", base_kv[i]):
                self.xty[i, t] = self.xty.get((i, t), 0) + xs[j, t].T @ _merged(y)
        self.tokens += xs[self.layer_map[0], "k"].shape[0]

    def solve(self, predictor, lam):
        """Write the ridge solution into `predictor` (a KVPredictor); lam is relative to
        the mean diagonal of X^T X."""
        for i, j in enumerate(self.layer_map):
            for t, lins in (("k", predictor.k_proj), ("v", predictor.v_proj)):
                xtx = self.xtx[j, t]
                d = xtx.shape[0] - 1
                reg = lam * np.trace(xtx[:d, :d]) / d * np.eye(d + 1)
                reg[d, d] = 0.0  # the bias is not shrunk
                w = np.linalg.solve(xtx + reg, self.xty[i, t])
                lins[i].weight = mx.array(w[:d].T.astype(np.float32))
                lins[i].bias = mx.array(w[d].astype(np.float32))
        return predictor


def collect_pair(base, aux, ids):
    """Aux K/V and base K/V over one (L,) chunk of token ids, each from a fresh cache."""
    x = mx.array(ids, dtype=mx.int32)[None]
    _, aux_kv = aux.forward(x, aux.make_cache())
    h = base.embed(x)
    cache = base.make_cache()
    base_kv = []
    for i in range(base.n_layers):
        out = base.block(i, h, cache=cache[i])
        h = out.h
        base_kv.append((out.keys, out.values))
    mx.eval(aux_kv, base_kv)
    return aux_kv, base_kv


def fit_ridge(base, aux, layer_map, chunks, lam=1e-3, progress=None):
    """Fit a KVPredictor in closed form.

    Args:
        base: edgeprefill.models.Transformer.
        aux: edgeprefill.kvp.aux.AuxModel.
        layer_map: j_i per base layer.
        chunks: iterable of token-id lists (each a causal window of fitting text).
        lam: ridge strength relative to the data's scale.
        progress: optional callable(tokens_done) after each chunk.
    Returns:
        (KVPredictor, tokens used).
    """
    acc = RidgeAccumulator(layer_map)
    for ids in chunks:
        acc.add(*collect_pair(base, aux, ids))
        if progress:
            progress(acc.tokens)
    pred = KVPredictor(layer_map, aux.kv_dim, base.n_kv_heads, base.head_dim)
    return acc.solve(pred, lam), acc.tokens
