"""Low-rank KV predictor (`--predictor-rank`): the reduction, its FLOPs, the mirror, the
artifact and the CLI (fit, train --init) with their refusals."""

import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.loading import load
from tests.conftest import CLI

RANK = 8


def _fitted(m, source="hidden2", rank=None):
    """(aux, ridge-fitted T-0.50 predictor, its input moments, the fitting windows)."""
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.fit import RidgeAccumulator, collect_pair

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

    from edgeprefill.flops import flops_options, strategy_flops
    from edgeprefill.kvp.fit import reduce_rank
    from edgeprefill.kvp.predictor import StackedPredictor
    from edgeprefill.mirror.kvp.predictor import predictor_to_torch
    from edgeprefill.prefill.kv_prediction import KVPrediction

    lm = load(str(tiny_models["qwen3"]))
    m = lm.model
    aux, pred, moments, chunks = _fitted(m)
    low = reduce_rank(pred, RANK, moments)
    out_dim = m.n_kv_heads * m.head_dim
    P = len(pred.predicted)
    assert low.token_flops() == 2 * pred.in_dim * RANK + P * 4 * (RANK + 1) * out_dim
    assert pred.token_flops() == P * 4 * (pred.in_dim + 1) * out_dim
    n = 40
    f_full, f_low = (strategy_flops("kvp", lm.config, n, **flops_options(
        KVPrediction(m, aux, p, tail=4))) for p in (pred, low))
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


def _cli(args, env):
    return subprocess.run([*CLI, *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_fit_and_train_low_rank_pairs_and_their_refusals(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    full, low, trained = tmp_path / "full", tmp_path / "low", tmp_path / "trained"
    fit = ["kvp", "fit", "--model", model, "--aux", "T-0.50", "--input", "hidden2", "--tokens",
           "400", "--chunk", "64", "--eval-pairs", "0"]
    r = _cli(fit + ["--predictor-rank", str(RANK), "--out", str(low)], cli_env)
    assert r.returncode == 0, r.stderr
    assert f"rank {RANK}" in r.stderr
    card = json.loads((low / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["predictor_input"] == "hidden2"
    r = _cli(["generate", "--model", model, "--prompt", "the quick brown fox", "--strategy",
              "kvp", "--kvp", str(low), "--max-tokens", "3", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    # refusals: one line, exit 1, nothing written (the same check serves fit and train)
    bad = tmp_path / "bad"
    r = _cli(fit + ["--input", "kv", "--predictor-rank", "4", "--out", str(bad)], cli_env)
    assert r.returncode == 1 and "hidden-state input" in r.stderr and not bad.exists(), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    from edgeprefill.kvp.pairs import check_rank
    from edgeprefill.errors import EdgeprefillError

    with pytest.raises(EdgeprefillError, match="integer >= 1"):
        check_rank(0, "hidden2")
    # kvp train --init a full-rank pair --predictor-rank R: reduced, then trained
    r = _cli(fit + ["--out", str(full)], cli_env)
    assert r.returncode == 0, r.stderr
    train = ["kvp", "train", "--model", model, "--aux", "T-0.50", "--input", "hidden2",
             "--steps", "2", "--batch", "2", "--seq", "16", "--tokens", "400", "--ridge-tokens",
             "300", "--backend", "mirror", "--eval-pairs", "0", "--checkpoint-every", "1"]
    r = _cli(train + ["--init", str(full), "--predictor-rank", str(RANK), "--out", str(trained)],
             cli_env)
    assert r.returncode == 0, r.stderr
    card = json.loads((trained / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["fit"]["steps"] == 2
    assert card["fit"]["rank_init"] == {"from": "the --init pair's full-rank predictor",
                                        "rank": RANK, "moments_tokens": 300}
    # resuming rebuilds the low-rank predictor the checkpoint holds (no second reduction)
    r = _cli(train[:train.index("--steps") + 1] + ["3"] + train[train.index("--steps") + 2:]
             + ["--init", str(full), "--predictor-rank", str(RANK), "--out", str(trained),
                "--resume"], cli_env)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr
    card = json.loads((trained / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["fit"]["steps"] == 3
    assert card["fit"]["rank_init"]["rank"] == RANK
    bad = tmp_path / "bad"
    r = _cli(train + ["--init", str(trained), "--predictor-rank", "4", "--out", str(bad)],
             cli_env)
    assert r.returncode == 1 and f"has rank {RANK}" in r.stderr and not bad.exists(), r.stderr
    # a card whose rank is not a positive integer is refused on load
    card["predictor_rank"] = -2
    (trained / "card.json").write_text(json.dumps(card))
    r = _cli(["generate", "--model", model, "--prompt", "hi", "--strategy", "kvp", "--kvp",
              str(trained), "--max-tokens", "2"], cli_env)
    assert r.returncode == 1 and "predictor_rank" in r.stderr, r.stderr
