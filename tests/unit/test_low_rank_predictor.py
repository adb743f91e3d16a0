"""Low-rank KV predictor (`--predictor-rank`): the reduction, its FLOPs, the mirror, the
artifact and the CLI (fit, train --init) with their refusals."""
import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.loading import load


RANK = 8


def _fitted(m, source="hidden2", rank=None):
    """(aux, ridge-fitted T-0.50 predictor, its input moments, the fitting windows)."""
    from edgeprefill.kvp.fit import RidgeAccumulator, collect_pair
    from edgeprefill.kvp.pairs import build_predictor

    aux, pred = build_predictor(m, "T-0.50", source)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, m.vocab_size, 48).tolist() for _ in range(8)]
    acc = RidgeAccumulator(pred)
    for ids in chunks:
        acc.add(*collect_pair(m, aux, pred, ids))
    return aux, acc.solve(1e-3), acc.moments(), chunks


def _outputs(pred, aux, chunks):
    """Every predicted layer's K and V over the windows, stacked: (tokens, outputs)."""
    rows = []
    for ids in chunks:
        out = aux.forward(mx.array(ids)[None], aux.make_cache(), pred.hidden_layers())
        rows.append(np.concatenate([np.array(t[0].transpose(1, 0, 2).reshape(len(ids), -1))
                                    for i, k, v in pred.base_kv(out) if i in pred._slot
                                    for t in (k, v)], axis=1))
    return np.concatenate(rows).astype(np.float64)


def test_reduction_is_exact_at_full_rank_and_best_below(tiny_models):
    """At rank = input width the low-rank predictor is the full one; below, its error on the
    fitting inputs falls with the rank and beats a plain (unweighted) truncated SVD of the
    same maps, which the input covariance weighting is for."""
    from edgeprefill.kvp.fit import input_moments, reduce_rank

    m = load(str(tiny_models["llama"])).model
    aux, pred, moments, chunks = _fitted(m)
    full = _outputs(pred, aux, chunks)
    assert moments.keys() == set(pred.sources) == {pred.layer_map[-1]}
    again = input_moments(aux, pred, chunks)  # the pass `kvp train --init` makes
    for j in moments:
        np.testing.assert_allclose(again[j][1], moments[j][1], rtol=1e-6, atol=1e-9)
    exact = reduce_rank(pred, pred.in_dim, moments)
    assert exact.rank == pred.in_dim and exact.down[0].weight.shape == (pred.in_dim,) * 2
    np.testing.assert_allclose(_outputs(exact, aux, chunks), full, atol=2e-4)
    errs = []
    for r in (4, RANK, 16):
        low = reduce_rank(pred, r, moments)
        errs.append(float(((_outputs(low, aux, chunks) - full) ** 2).mean()))
    assert errs[0] > errs[1] > errs[2] > 0
    # the plain truncated SVD of the stacked (in, outputs) map at rank RANK, biases kept
    j = pred.sources[0]
    lins = [lin for s in range(len(pred.predicted)) for lin in (pred.k_proj[s], pred.v_proj[s])]
    w = np.concatenate([np.array(lin.weight).T for lin in lins], axis=1).astype(np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    plain = reduce_rank(pred, RANK, moments)
    plain.down[0].weight = mx.array((w @ vt[:RANK].T).T.astype(np.float32))
    for n in range(len(pred.predicted)):
        for t, lin in enumerate((plain.k_proj[n], plain.v_proj[n])):
            src = lins[2 * n + t]
            cols = slice((2 * n + t) * src.weight.shape[0], (2 * n + t + 1) * src.weight.shape[0])
            lin.weight = mx.array(vt[:RANK, cols].T.astype(np.float32))
            lin.bias = src.bias
    assert j == pred.layer_map[-1]
    assert errs[1] < float(((_outputs(plain, aux, chunks) - full) ** 2).mean())
    with pytest.raises(ValueError, match="low-rank already"):
        reduce_rank(exact, 4, moments)


def test_low_rank_flops_mirror_and_stacked_path(tiny_models):
    """token_flops counts the down-projection once per source layer; the strategy's analytic
    FLOPs use it; the torch mirror and the stacked inference path give the same K/V."""
    import torch

    from edgeprefill.kvp.fit import reduce_rank
    from edgeprefill.kvp.predictor import StackedPredictor
    from edgeprefill.mirror.convert import predictor_to_torch
    from edgeprefill.prefill.kv_prediction import KVPrediction
    from edgeprefill.prefill.registry import flops

    lm = load(str(tiny_models["qwen3"]))
    m = lm.model
    aux, pred, moments, chunks = _fitted(m)
    low = reduce_rank(pred, RANK, moments)
    out_dim = m.n_kv_heads * m.head_dim
    P = len(pred.predicted)
    assert low.token_flops() == 2 * pred.in_dim * RANK + P * 4 * (RANK + 1) * out_dim
    assert pred.token_flops() == P * 4 * (pred.in_dim + 1) * out_dim
    n = 40
    f_full, f_low = (flops("kvp", KVPrediction(m, aux, p, tail=4), lm.config, n)
                     for p in (pred, low))
    assert f_full - f_low == (n - 4) * (pred.token_flops() - low.token_flops())
    ids = mx.array(chunks[0])[None]
    out = aux.forward(ids, aux.make_cache(), low.hidden_layers())
    ref = {i: (np.array(k), np.array(v)) for i, k, v in low.base_kv(out) if i in low._slot}
    ks, vs = StackedPredictor(low)(out)
    for s, i in enumerate(low.predicted):
        np.testing.assert_allclose(np.array(ks[s]), ref[i][0][0], atol=1e-5)
        np.testing.assert_allclose(np.array(vs[s]), ref[i][1][0], atol=1e-5)
    tp = predictor_to_torch(low)
    assert tp.rank == RANK and tp.down[0].weight.shape == (RANK, pred.in_dim)

    class Out:  # the mirror reads hidden states off an AuxOutput-like object
        hidden = {a: torch.from_numpy(np.array(h)) for a, h in out.hidden.items()}
    for i, k, v in tp.base_kv(Out, layers=low.predicted):
        np.testing.assert_allclose(k.detach().numpy(), ref[i][0], atol=1e-5)
        np.testing.assert_allclose(v.detach().numpy(), ref[i][1], atol=1e-5)
