"""Token selection (gemfilter, specprefill, kvp+specprefill): keeping every token is the exact
prefill; a selective prefill equals the exact model with the dropped tokens masked out; the
mirror runs the same selections; bad options get one line."""
import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from edgeprefill.errors import EdgeprefillError
from edgeprefill.generate import generate
from edgeprefill.loading import load
from edgeprefill.models.transformer import query_attention
from edgeprefill.prefill import FullPrefill
from edgeprefill.prefill.gemfilter import GemFilter
from edgeprefill.prefill.selection import MlxOps, check_keep, keep_count, pooled, select
from edgeprefill.prefill.specprefill import KVPSpecPrefill, SpecPrefill

IDS = [5, 17, 200, 3, 99, 42, 7, 300, 11, 12, 13, 250, 8, 64, 128, 33, 21, 90, 14, 6]


def _np(x):
    return x.detach().float().numpy() if torch.is_tensor(x) else np.array(x.astype(mx.float32))


def test_select_keeps_the_start_the_end_whole_chunks_and_exactly_k():
    scores = np.array([0.1, 0.9, 0.8, 0.0, 0.0, 0.7, 0.2, 0.3, 0.0, 0.05])
    assert select(scores, 3).tolist() == [1, 2, 9]  # the last token always, then the best
    # chunks of 2 over the first 8 tokens (the last 2 always): [0, 1] (mean 0.5) first, then
    # the best token of [2, 3] (mean 0.4) fills the budget
    assert select(scores, 5, chunk=2, last=2).tolist() == [0, 1, 2, 8, 9]
    assert len(select(scores, 7, chunk=3, last=1)) == 7
    assert select(scores, 10).tolist() == list(range(10))
    assert select(scores, 4, first=2).tolist() == [0, 1, 2, 9]
    assert select(scores, 99).tolist() == list(range(10))



def _select_by_loop(scores, k, chunk, last, first):
    """select() written as the plain loop it replaces: chunks in order of mean score (a
    chunk's mean over up to `chunk` tokens, past the head if it ends there), whole while they
    fit, the next one's best tokens to fill the budget."""
    n = len(scores)
    if k >= n:
        return list(range(n))
    last = min(last, k)
    first = min(first, k - last, n - last)
    kept = set(range(n - last, n)) | set(range(first))
    budget, head = k - len(kept), n - last
    starts = list(range(first, head, chunk))
    means = [float(np.mean(scores[s:s + chunk].astype(np.float64))) for s in starts]
    for c in sorted(range(len(starts)), key=lambda c: -means[c]):  # sorted() is stable
        span = list(range(starts[c], min(starts[c] + chunk, head)))
        if budget <= 0:
            break
        if len(span) > budget:
            span = sorted(span, key=lambda j: -scores[j])[:budget]
        kept.update(span)
        budget -= len(span)
    return sorted(kept)


def test_select_equals_the_loop_it_vectorizes_with_ties_and_edge_sizes():
    rng = np.random.default_rng(0)
    for case in range(1500):
        n = int(rng.integers(1, 150))
        scores = rng.random(n).astype(np.float32)
        if case % 3 == 0:  # many ties: the order among equal chunks must be the same
            scores = np.round(scores * 3).astype(np.float32)
        k, chunk = int(rng.integers(1, n + 3)), int(rng.integers(1, 40))
        last, first = int(rng.integers(0, 40)), int(rng.integers(0, 10))
        got = select(scores, k, chunk, last, first).tolist()
        assert got == _select_by_loop(scores, k, chunk, last, first), (n, k, chunk, last, first)
        assert len(got) == min(k, n)

def test_keep_count_reads_fractions_and_counts():
    assert keep_count(0.25, 100) == 25 and keep_count(1.0, 100) == 100
    assert keep_count(30, 100) == 30 and keep_count(500, 100) == 100
    assert keep_count(0.001, 100) == 1
    for bad in (0, -1, 1.5, "a", True):
        with pytest.raises(EdgeprefillError, match="--keep"):
            check_keep(bad)


def test_pooled_is_a_centred_average_then_the_max_over_heads():
    rng = np.random.default_rng(0)
    probs = rng.random((1, 3, 2, 20)).astype(np.float32)
    got = np.array(pooled(MlxOps, mx.array(probs), 16, window=5))
    pad = np.pad(probs[0, :, :, :16], ((0, 0), (0, 0), (2, 2)))
    ref = np.stack([pad[..., j:j + 5].mean(-1) for j in range(16)], -1).max(0)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_query_attention_is_causal_softmax_per_head():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    got = np.array(query_attention(mx.array(q), mx.array(k), 0.5))
    for h in range(4):
        for j in range(3):
            s = 0.5 * k[0, h // 2] @ q[0, h, j]
            s[7 - 3 + j + 1:] = -np.inf
            e = np.exp(s - s.max())
            np.testing.assert_allclose(got[0, h, j], e / e.sum(), atol=1e-5)


def _tiny_pair(m):
    from edgeprefill.kvp.pairs import build_predictor

    mx.random.seed(0)
    return build_predictor(m, "T-0.50", "hidden")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_keeping_every_token_is_the_exact_prefill(tiny_models, family):
    lm = load(str(tiny_models[family]))
    m = lm.model
    _, ref, _ = FullPrefill(m).prefill(IDS)
    aux, pred = _tiny_pair(m)
    for strat in (GemFilter(m, keep=1.0), GemFilter(m, keep=1.0, positions="original"),
                  SpecPrefill(m, m, keep=1.0),
                  KVPSpecPrefill(m, aux, pred, keep=1.0, select_chunk=3, tail=2)):
        _, logits, stats = strat.prefill(IDS)
        np.testing.assert_allclose(_np(logits), _np(ref), atol=1e-4, rtol=1e-4)
    full = generate(m, lm.tokenizer, IDS, FullPrefill(m), max_tokens=5)
    same = generate(m, lm.tokenizer, IDS, GemFilter(m, keep=1.0, positions="original"),
                    max_tokens=5)
    assert same.tokens == full.tokens


def _masked_reference(m, ids, kept, extra=()):
    """The exact model over every token, the dropped ones hidden from every other query by
    the mask: at original positions this is what a selective prefill must compute."""
    n = len(ids)
    seen = np.zeros(n, dtype=bool)
    seen[kept] = True
    mask = (np.arange(n)[None, :] <= np.arange(n)[:, None]) & (seen[None, :] | np.eye(n, dtype=bool))
    h = m.embed(mx.array([ids + list(extra)])[:, :n])
    for i in range(m.n_layers):
        h = m.block(i, h, mask=mx.array(mask)).h
    return m.head(h[:, -1:])[0, -1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_original_positions_equal_the_exact_model_with_the_dropped_tokens_masked(tiny_models,
                                                                                 family):
    lm = load(str(tiny_models[family]))
    m = lm.model
    strat = GemFilter(m, keep=8, filter_layer=1, positions="original", queries=1)
    strat.keep_first, strat.keep_last = 1, 2
    cache, logits, stats = strat.prefill(IDS)
    assert stats.extra["kept"] == 8 and cache.next_pos == len(IDS) and cache[0].offset == 8
    scores = strat.scores(mx.array(IDS), {})
    kept = strat.choose(scores, 8)
    assert kept[0] == 0 and kept[-2:].tolist() == [len(IDS) - 2, len(IDS) - 1]
    assert len(set(kept.tolist()) - {0, len(IDS) - 2, len(IDS) - 1}) == 5
    np.testing.assert_allclose(_np(logits), _np(_masked_reference(m, IDS, kept)), atol=1e-4)
    # decoding continues at position n over the kept tokens
    step = strat.forward(mx.array([[77]]), cache)
    ref = _masked_reference(m, IDS + [77], np.append(kept, len(IDS)))
    np.testing.assert_allclose(_np(step[0, -1]), _np(ref), atol=1e-4)
    assert cache.next_pos == len(IDS) + 1


def test_fresh_positions_are_a_short_prompt_of_the_kept_tokens(tiny_models):
    lm = load(str(tiny_models["qwen3"]))
    m = lm.model
    strat = GemFilter(m, keep=0.5, queries=4)
    strat.keep_last = 3
    cache, logits, _ = strat.prefill(IDS)
    kept = strat.choose(strat.scores(mx.array(IDS), {}), 10)
    _, ref, _ = FullPrefill(m).prefill([IDS[j] for j in kept])
    np.testing.assert_allclose(_np(logits), _np(ref), atol=1e-4)
    assert cache.next_pos == 10


def test_specprefill_scores_with_lookahead_and_keeps_whole_chunks(tiny_models):
    lm = load(str(tiny_models["llama"]))
    m = lm.model
    strat = SpecPrefill(m, m, keep=0.5, lookahead=3, select_chunk=4)
    strat.keep_first, strat.keep_last = 0, 4
    cache, logits, stats = strat.prefill(IDS)
    assert stats.extra["kept"] == 10 and stats.extra["lookahead"] == 3
    x = stats.extra  # the time split the bench reports: its parts fit in the selection time
    assert 0 < x["draft_prefill_s"] and 0 < x["lookahead_s"] and 0 <= x["rank_s"]
    assert x["draft_prefill_s"] + x["lookahead_s"] + x["rank_s"] <= x["select_s"] <= stats.ttft_s
    scores = strat.scores(mx.array(IDS), {})
    assert scores.shape == (len(IDS),) and np.all(scores > 0)
    kept = strat.choose(scores, 10)
    assert kept.tolist() == select(scores, 10, 4, last=4).tolist()
    assert set(range(16, 20)) <= set(kept.tolist())
    np.testing.assert_allclose(_np(logits), _np(_masked_reference(m, IDS, kept)), atol=1e-4)


def test_fused_mode_computes_the_kept_tokens_exactly_over_the_predicted_rest(tiny_models):
    """kvp+specprefill: the kept tokens' K/V are the ones the base computes over the predicted
    cache, and the rest stays kvp's prediction."""
    from edgeprefill.prefill.kv_prediction import KVPrediction

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    aux, pred = _tiny_pair(m)
    kvp_cache, _, _ = KVPrediction(m, aux, pred, tail=3).prefill(IDS)
    fused = KVPSpecPrefill(m, aux, pred, keep=4, select_chunk=2, tail=3)
    fused.keep_first = 0
    cache, logits, stats = fused.prefill(IDS)
    assert stats.extra["kept"] == 4 and cache[0].offset == len(IDS)
    assert cache.aux[0].offset == len(IDS)  # the aux saw the tail too
    k_pred = _np(kvp_cache[m.n_layers - 1].keys_and_values()[0])[0, 0]
    k_fused = _np(cache[m.n_layers - 1].keys_and_values()[0])[0, 0]
    changed = np.flatnonzero(np.abs(k_fused - k_pred).max(-1) > 1e-5)
    assert len(changed) and set(changed.tolist()) <= set(range(len(IDS)))
    assert len(set(changed.tolist()) & set(range(len(IDS) - 3))) == 4  # the kept ones
    # and it decodes: a second turn runs as kvp
    out = generate(m, lm.tokenizer, IDS, fused, max_tokens=4)
    assert len(out.tokens) == 4


def _fused_reference(m, kvp, ids, kept, tail):
    """kvp+specprefill's exact pass written the plain way: one masked attention per layer over
    [the predicted K/V of the head, the kept and tail tokens' own K/V], the kept positions
    hidden in the first part."""
    n = len(ids)
    m0 = n - tail
    cache = kvp.predicted_cache(mx.array(ids[:m0], dtype=mx.int32), room=tail)
    q_idx = np.concatenate([kept, np.arange(m0, n)])
    predicted = np.ones(m0, dtype=bool)
    predicted[kept] = False
    visible = np.concatenate([(np.arange(m0)[None, :] <= q_idx[:, None]) & predicted[None],
                              q_idx[None, :] <= q_idx[:, None]], axis=1)
    qpos = mx.array(q_idx.astype(np.int32))
    h = m.embed(mx.array(np.array(ids)[q_idx][None], dtype=mx.int32))
    for i in range(m.n_layers):
        k, v = cache[i].keys_and_values()
        h = m.block(i, h, positions=qpos, prefix_kv=(k, v), mask=mx.array(visible)).h
    return m.head(h[:, -1:])[0, -1].astype(mx.float32)


@pytest.mark.parametrize("max_runs", [256, 0])
def test_fused_exact_pass_matches_one_masked_attention(tiny_models, monkeypatch, max_runs):
    """The fused mode's exact pass (K/V written at their positions, then attention in causal
    spans, or one masked call past MAX_RUNS spans) gives the plain masked pass's logits."""
    sp = importlib.import_module("edgeprefill.prefill.specprefill")
    from edgeprefill.prefill.kv_prediction import KVPrediction

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    aux, pred = _tiny_pair(m)
    kept = np.array([0, 1, 5, 6, 7, 11])  # three spans, then the tail's
    monkeypatch.setattr(sp, "select", lambda *a, **k: kept)
    monkeypatch.setattr(sp, "MAX_RUNS", max_runs)
    fused = KVPSpecPrefill(m, aux, pred, keep=len(kept), select_chunk=1, tail=4)
    _, logits, _ = fused.prefill(IDS)
    ref = _fused_reference(m, KVPrediction(m, aux, pred, tail=4), IDS, kept, 4)
    np.testing.assert_allclose(_np(logits), _np(ref), atol=1e-4)
    assert sp.position_runs(np.array([0, 1, 5, 6, 7, 11, 16, 17])) == [
        (0, 2, 2), (2, 5, 8), (5, 6, 12), (6, 8, 18)]


@pytest.mark.parametrize("name", ["gemfilter", "specprefill", "kvp+specprefill"])
def test_mirror_makes_the_same_selection_and_logits(tiny_models, name):
    from edgeprefill.mirror.convert import mirror_from_mlx
    from edgeprefill.mirror.prefill import GemFilter as TGem
    from edgeprefill.mirror.prefill import KVPSpecPrefill as TFused
    from edgeprefill.mirror.prefill import SpecPrefill as TSpec
    from edgeprefill.mirror.convert import pair_to_torch

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    t = mirror_from_mlx(m)
    if name == "gemfilter":
        a, b = GemFilter(m, keep=12, filter_layer=2), TGem(t, keep=12, filter_layer=2)
        a.keep_last = b.keep_last = 4
    elif name == "specprefill":
        a = SpecPrefill(m, m, keep=0.5, lookahead=2, select_chunk=3)
        b = TSpec(t, t, keep=0.5, lookahead=2, select_chunk=3)
        a.keep_last = b.keep_last = 3
    else:
        aux, pred = _tiny_pair(m)
        taux, tpred = pair_to_torch(aux, pred, t)
        a = KVPSpecPrefill(m, aux, pred, keep=5, select_chunk=2, tail=3)
        b = TFused(t, taux, tpred, keep=5, select_chunk=2, tail=3)
    cache, logits, stats = a.prefill(IDS)
    tcache, tlogits, tstats = b.prefill(IDS)
    assert stats.extra["kept"] == tstats.extra["kept"]
    np.testing.assert_allclose(_np(tlogits), _np(logits), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(_np(tcache[1].keys_and_values()[0]),
                               _np(cache[1].keys_and_values()[0]), atol=2e-4, rtol=2e-4)


def test_registry_options_and_one_line_errors(tiny_models, tmp_path):
    from edgeprefill.flops import prefill_flops
    from edgeprefill.prefill.registry import build, flops

    lm = load(str(tiny_models["llama"]))
    g = build("gemfilter", lm, keep=0.25, filter_layer=1)
    assert g.filter_layer == 1 and g.positions == "fresh"
    assert flops("gemfilter", g, lm.config, 4000) < 0.6 * prefill_flops(lm.config, 4000)
    with pytest.raises(EdgeprefillError, match="--filter-layer"):
        build("gemfilter", lm, filter_layer=99)
    with pytest.raises(EdgeprefillError, match="takes no draft"):
        build("gemfilter", lm, draft="x")
    with pytest.raises(EdgeprefillError, match="--positions"):
        build("gemfilter", lm, positions="middle")
    with pytest.raises(EdgeprefillError, match="needs a draft"):
        build("specprefill", lm)
    s = build("specprefill", lm, draft=str(tiny_models["llama"]), keep=0.5)
    assert flops("specprefill", s, lm.config, 64) > 0
    from edgeprefill.models.random import SHAPES, random_model_folder

    other = random_model_folder(tmp_path / "other", shape={**SHAPES["tiny"], "vocab_size": 512})
    with pytest.raises(EdgeprefillError, match="tokenizer"):
        build("specprefill", lm, draft=str(other))


def test_fused_default_keep_is_a_fraction_with_a_floor(tiny_models):
    from edgeprefill.prefill.specprefill import FUSED_MIN_KEEP

    m = load(str(tiny_models["llama"])).model
    aux, pred = _tiny_pair(m)
    fused = KVPSpecPrefill(m, aux, pred, tail=3)
    assert FUSED_MIN_KEEP == 160
    assert [fused.kept_count(n) for n in (0, 100, 1000, 8000)] == [0, 100, 160, 400]
    assert KVPSpecPrefill(m, aux, pred, keep=0.1).kept_count(1000) == 100  # as given
    assert KVPSpecPrefill(m, aux, pred, keep=20).kept_count(1000) == 20


def test_fused_mode_on_a_prompt_shorter_than_its_tail_is_the_exact_prefill(tiny_models):
    m = load(str(tiny_models["llama"])).model
    aux, pred = _tiny_pair(m)
    _, logits, _ = KVPSpecPrefill(m, aux, pred, tail=len(IDS) + 5).prefill(IDS)
    _, ref, _ = FullPrefill(m).prefill(IDS)
    np.testing.assert_allclose(_np(logits), _np(ref), atol=1e-4)
