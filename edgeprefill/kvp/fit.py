"""Closed-form ridge fit of the KV predictor (aux frozen, base frozen).

For each predicted base layer i and each of K and V, solve
    W = argmin ||[X 1] W - Y||^2 + lam * ||W_no_bias||^2
with X the predictor's input from aux layer j_i (merged pre-RoPE K or V, or the normalized
hidden state) and Y the base layer i's pre-RoPE K (or V), over every position of the fitting
text. Only X^T X and X^T Y are accumulated (float64), so memory does not grow with the text and
one pass over it suffices.

A low-rank predictor (rank r) is the best rank-r approximation of a full-rank one in the error it
makes on the fitting text's inputs: per source aux layer, the stacked map W (in x outputs of every
layer it feeds) becomes W V^T V, V the top r right singular vectors of C^1/2 W, C the inputs'
covariance (reduced-rank regression). The biases absorb the mean input's share of the removed
part. `reduce_rank` does it for a ridge fit or for a trained predictor.
"""

import mlx.core as mx
import numpy as np

from edgeprefill.kvp.predictor import merge_heads


def _np64(x):
    """(1, L, C) mx -> (L, C) float64 numpy."""
    return np.array(x[0].astype(mx.float32)).astype(np.float64)


def _with_ones(x):
    """(T, D) features as float64 with a column of ones appended (the bias's input)."""
    x = _np64(x)
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


class RidgeAccumulator:
    """Running X^T X per (aux layer, K|V) and X^T Y per (base layer, K|V) for a predictor."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.xtx = {}
        self.xty = {}
        self.tokens = 0

    def add(self, aux_out, base_kv):
        """aux_out: AuxOutput of the aux over a window; base_kv: per base layer (keys,
        values), (1, Hkv, L, hd), None for layers the predictor does not predict."""
        pred = self.predictor
        xs = {}
        for i in pred.predicted:
            j = pred.layer_map[i]
            if j not in xs:
                xk, xv = pred.features(aux_out, j)
                xs[j] = {}
                for t, x in (("k", xk), ("v", xv)):
                    if t == "v" and xv is xk:
                        xs[j]["v"] = xs[j]["k"]
                        self.xtx[j, "v"] = self.xtx[j, "k"]
                        continue
                    x = _with_ones(x)
                    xs[j][t] = x
                    self.xtx[j, t] = self.xtx.get((j, t), 0) + x.T @ x
            for t, y in zip("kv", base_kv[i]):
                y = merge_heads(y)
                self.xty[i, t] = self.xty.get((i, t), 0) + xs[j][t].T @ _np64(y)
        self.tokens += aux_out.h.shape[1]

    def add_inputs(self, aux_out):
        """Accumulate X^T X alone (the input moments a rank reduction needs)."""
        pred = self.predictor
        for j in pred.sources:
            x = _with_ones(pred.features(aux_out, j)[0])
            self.xtx[j, "k"] = self.xtx.get((j, "k"), 0) + x.T @ x
        self.tokens += aux_out.h.shape[1]

    def moments(self):
        """{aux layer: (mean, covariance)} of the predictor's inputs so far."""
        out = {}
        for j in self.predictor.sources:
            xtx = self.xtx[j, "k"]
            d = xtx.shape[0] - 1
            mu = xtx[d, :d] / xtx[d, d]
            out[j] = mu, xtx[:d, :d] / xtx[d, d] - np.outer(mu, mu)
        return out

    def solve(self, lam):
        """Write the ridge solution into the predictor; lam is relative to the mean diagonal
        of X^T X. Returns the predictor."""
        pred = self.predictor
        for i in pred.predicted:
            j = pred.layer_map[i]
            s = pred._slot[i]
            for t, lins in (("k", pred.k_proj), ("v", pred.v_proj)):
                xtx = self.xtx[j, t]
                d = xtx.shape[0] - 1
                reg = lam * np.trace(xtx[:d, :d]) / d * np.eye(d + 1)
                reg[d, d] = 0.0  # the bias is not shrunk
                w = np.linalg.solve(xtx + reg, self.xty[i, t])
                lins[s].weight = mx.array(w[:d].T.astype(np.float32))
                lins[s].bias = mx.array(w[d].astype(np.float32))
        return pred


def collect_pair(base, aux, predictor, ids):
    """The aux's output and the base's K/V (predicted layers only) over one (L,) window of
    token ids, each from a fresh cache. A truncated aux's output seeds the base at its depth."""
    x = mx.array(ids, dtype=mx.int32)[None]
    aux_out = aux.forward(x, aux.make_cache(), predictor.hidden_layers())
    start = 0
    if aux.model is base and aux.layers == list(range(aux.n_layers)):
        h, start = aux_out.h, aux.n_layers
    else:
        h = base.embed(x)
    base_kv = [None] * base.n_layers
    base_kv[:start] = aux_out.kv[:start]  # the same blocks on the same inputs
    last = max(predictor.predicted, default=-1)
    for i in range(start, last + 1):
        out = base.block(i, h)
        h = out.h
        base_kv[i] = (out.keys, out.values)
    mx.eval(aux_out.h, aux_out.kv, aux_out.hidden, [kv for kv in base_kv if kv is not None])
    return aux_out, base_kv


def reduce_rank(pred, rank, moments):
    """A rank-`rank` KVPredictor (MLX) approximating the full-rank, hidden-input `pred`.

    Args:
        pred: a full-rank KVPredictor with a hidden-state input.
        rank: r.
        moments: {source aux layer: (mean, covariance)} of its inputs (RidgeAccumulator).
    """
    from edgeprefill.kvp.predictor import KVPredictor

    if pred.rank:
        raise ValueError(f"the predictor is low-rank already (rank {pred.rank})")
    out_dim = pred.out_dim
    low = KVPredictor(pred.layer_map, pred.in_dim, pred.base_kv_heads, pred.base_head_dim,
                      pred.source, pred.exact, rank)
    for j in pred.sources:
        fed = [pred._slot[i] for i in pred.predicted if pred.layer_map[i] == j]
        lins = [lin for s in fed for lin in (pred.k_proj[s], pred.v_proj[s])]
        w = np.concatenate([_np64(lin.weight.T[None]) for lin in lins], axis=1)  # (in, outs)
        b = np.concatenate([_np64(lin.bias[None, None])[0] for lin in lins])
        mu, cov = moments[j]
        evals, evecs = np.linalg.eigh(cov)
        half = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T  # C^1/2
        v = np.linalg.svd(half @ w, full_matrices=False)[2][:rank]  # (r', outs), r' <= r
        if v.shape[0] < rank:  # more rank than the map has: pad with zero directions
            v = np.concatenate([v, np.zeros((rank - v.shape[0], v.shape[1]))])
        down = w @ v.T  # (in, r)
        b = b + mu @ (w - down @ v)  # the mean input's share of what the truncation drops
        low.down[low._dslot[j]].weight = mx.array(down.T.astype(np.float32))
        for n, s in enumerate(fed):
            for t, lin in enumerate((low.k_proj[s], low.v_proj[s])):
                cols = slice((2 * n + t) * out_dim, (2 * n + t + 1) * out_dim)
                lin.weight = mx.array(v[:, cols].T.astype(np.float32))
                lin.bias = mx.array(b[cols].astype(np.float32))
    low.set_dtype(pred.k_proj[0].weight.dtype)
    return low


def input_moments(aux, predictor, chunks, progress=None):
    """{aux layer: (mean, covariance)} of `predictor`'s inputs over token-id windows."""
    acc = RidgeAccumulator(predictor)
    for ids in chunks:
        x = mx.array(ids, dtype=mx.int32)[None]
        acc.add_inputs(aux.forward(x, aux.make_cache(), predictor.hidden_layers()))
        if progress:
            progress(acc.tokens)
    return acc.moments()


def fit_ridge(base, aux, predictor, chunks, lam=1e-3, progress=None, rank=None):
    """Fit a KVPredictor in closed form.

    Args:
        base: edgeprefill.models.Transformer.
        aux: edgeprefill.kvp.aux.AuxModel.
        predictor: the KVPredictor to fit (its layer map, input and exact layers set).
        chunks: iterable of token-id lists (each a causal window of fitting text).
        lam: ridge strength relative to the data's scale.
        progress: optional callable(tokens_done) after each chunk.
        rank: None, or r: the fit reduced to a rank-r predictor (`reduce_rank`).
    Returns:
        (predictor, tokens used).
    """
    acc = RidgeAccumulator(predictor)
    for ids in chunks:
        acc.add(*collect_pair(base, aux, predictor, ids))
        if progress:
            progress(acc.tokens)
    pred = acc.solve(lam)
    if rank:
        pred = reduce_rank(pred, rank, acc.moments())
    return pred, acc.tokens
