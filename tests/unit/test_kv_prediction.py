"""KV Prediction: the identity test on every path, positions across turns, layer maps."""
import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.generate import generate
from edgeprefill.kvp.aux import AuxModel, layer_pruned_aux
from edgeprefill.kvp.layer_map import compact_layer_map, lp_kept_layers, lp_layer_map
from edgeprefill.kvp.predictor import KVPredictor
from edgeprefill.loading import load
from edgeprefill.prefill import FullPrefill
from edgeprefill.prefill.kv_prediction import KVPrediction


FAMILIES = ("llama", "qwen2", "qwen3")


def identity_kvp(model, chunk_size=512):
    """Aux = the base's own blocks, identity layer map, identity predictor."""
    aux = AuxModel(model, range(model.n_layers), "identity")
    pred = KVPredictor.identity(list(range(model.n_layers)), model.n_kv_heads, model.head_dim)
    return KVPrediction(model, aux, pred, chunk_size=chunk_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_predictor_reproduces_base_logits_on_prefill_and_decode(tiny_models, family):
    lm = load(str(tiny_models[family]))
    ids = lm.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    fcache, flogits, _ = FullPrefill(lm.model).prefill(ids)
    kcache, klogits, stats = identity_kvp(lm.model, chunk_size=4).prefill(ids)
    np.testing.assert_allclose(np.array(klogits), np.array(flogits), atol=1e-4, rtol=1e-4)
    assert stats.extra["aux_tokens"] == len(ids) - 1  # aux over prompt[:-1] only
    assert kcache[0].offset == fcache[0].offset == len(ids)  # no token fed twice
    for i in (0, lm.model.n_layers - 1):
        for a, b in zip(kcache[i].keys_and_values(), fcache[i].keys_and_values()):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4)
    for token in (7, 42):
        a = lm.model(mx.array([[token]]), kcache)
        b = lm.model(mx.array([[token]]), fcache)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_second_turn_predicts_at_the_right_positions(tiny_models, family):
    """Turn 2 runs the aux over the tokens it missed (last prompt token, replies) first, and
    places predicted keys at non-zero offsets: identity kvp must still equal full."""
    lm = load(str(tiny_models[family]))
    tok = lm.tokenizer
    turn1, turn2 = tok.encode("the quick brown fox"), tok.encode(" jumps over the lazy dog")
    results = {}
    for name, strategy in (("full", FullPrefill(lm.model)), ("kvp", identity_kvp(lm.model))):
        r1 = generate(lm.model, tok, turn1, strategy, max_tokens=5)
        r2 = generate(lm.model, tok, turn2, strategy, cache=r1.cache, max_tokens=5)
        results[name] = (r1, r2)
    (f1, f2), (k1, k2) = results["full"], results["kvp"]
    assert k1.tokens == f1.tokens and k2.tokens == f2.tokens
    assert k2.cache.aux[0].offset == k2.cache[0].offset - len(k2.tokens)
    assert k2.prefill.extra["aux_tokens"] == len(k1.tokens) + len(turn2) - 1


def test_single_token_prompt_runs_only_the_base_step(tiny_models):
    lm = load(str(tiny_models["llama"]))
    _, flogits, _ = FullPrefill(lm.model).prefill([17])
    _, klogits, stats = identity_kvp(lm.model).prefill([17])
    assert stats.extra["aux_tokens"] == 0
    np.testing.assert_allclose(np.array(klogits), np.array(flogits), atol=1e-5)


def test_layer_pruned_aux_predicts_differently_from_the_base(tiny_models):
    lm = load(str(tiny_models["llama"]))
    aux = layer_pruned_aux(lm.model, 0.5)
    assert aux.layers == [0, 2]
    pred = KVPredictor.identity(lp_layer_map(4, aux.layers), lm.model.n_kv_heads,
                                lm.model.head_dim)
    ids = lm.tokenizer.encode("the quick brown fox jumps")
    _, flogits, _ = FullPrefill(lm.model).prefill(ids)
    _, klogits, _ = KVPrediction(lm.model, aux, pred).prefill(ids)
    assert np.abs(np.array(klogits) - np.array(flogits)).max() > 1e-3


def test_paper_layer_lists_and_maps():
    assert lp_kept_layers(8, 0.75) == [0, 1, 2, 4, 5, 6]
    assert lp_kept_layers(30, 0.5) == list(range(0, 30, 2))
    assert lp_kept_layers(30, 0.25) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert lp_layer_map(30, lp_kept_layers(30, 0.5)) == [i // 2 for i in range(30)]
    assert lp_layer_map(30, lp_kept_layers(30, 0.25)) == [i // 4 for i in range(30)]
    assert lp_layer_map(8, lp_kept_layers(8, 0.75)) == [0, 1, 2, 2, 3, 4, 5, 5]
    expected = [i // 2 for i in range(24)] + [12, 13, 14, 15]
    assert compact_layer_map(28, 16) == expected


def test_ridge_fit_recovers_identity_and_artifact_round_trips(tiny_models, tmp_path):
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.kvp.artifact import load_artifact, save_artifact
    from edgeprefill.kvp.fit import fit_ridge

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    aux = AuxModel(m, range(m.n_layers), "identity")
    rng = np.random.default_rng(0)
    chunks = [rng.integers(3, m.vocab_size, size=48).tolist() for _ in range(8)]
    empty = KVPredictor(list(range(m.n_layers)), aux.kv_dim, m.n_kv_heads, m.head_dim)
    pred, tokens = fit_ridge(m, aux, empty, chunks, lam=1e-6)
    assert tokens == 8 * 48
    ids = lm.tokenizer.encode("the quick brown fox jumps over")
    _, flogits, _ = FullPrefill(m).prefill(ids)
    _, klogits, _ = KVPrediction(m, aux, pred).prefill(ids)
    np.testing.assert_allclose(np.array(klogits), np.array(flogits), atol=1e-2, rtol=1e-2)

    art = save_artifact(tmp_path / "art", pred, aux, m, "tiny-llama",
                        {"method": "ridge", "tokens": tokens})
    aux2, pred2, card = load_artifact(art, m)
    assert card["fit"]["tokens"] == tokens and aux2.layers == aux.layers
    _, klogits2, _ = KVPrediction(m, aux2, pred2).prefill(ids)
    np.testing.assert_allclose(np.array(klogits2), np.array(klogits), atol=1e-6)

    other = load(str(tiny_models["qwen3"])).model
    with pytest.raises(EdgeprefillError, match="'base.config_hash'"):
        load_artifact(art, other)
    with pytest.raises(EdgeprefillError, match="no card.json"):
        load_artifact(tmp_path, m)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_truncated_aux_copies_its_layers_exactly_and_predicts_the_rest(tiny_models, family):
    """KVP-T: base layers the aux runs are written exactly; with a hidden-state predictor fitted
    on random text, the deep layers are predicted, and a full-depth T aux equals the base."""
    from edgeprefill.kvp.aux import make_aux
    from edgeprefill.kvp.fit import fit_ridge

    lm = load(str(tiny_models[family]))
    m = lm.model
    aux, layer_map, exact = make_aux(m, "T-0.50")
    assert aux.layers == [0, 1] and layer_map == [0, 1, 1, 1] and exact == [0, 1]
    assert aux.kind == "T-0.50"
    pred = KVPredictor(layer_map, m.hidden_size, m.n_kv_heads, m.head_dim, "hidden", exact)
    assert pred.predicted == [2, 3] and len(pred.k_proj) == 2
    rng = np.random.default_rng(1)
    chunks = [rng.integers(3, m.vocab_size, size=40).tolist() for _ in range(6)]
    pred, _ = fit_ridge(m, aux, pred, chunks, lam=1e-3)
    ids = lm.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    fcache, flogits, _ = FullPrefill(m).prefill(ids)
    kcache, klogits, _ = KVPrediction(m, aux, pred).prefill(ids)
    n = len(ids) - 1
    for i in (0, 1):  # exact layers: the base's own cache for the first N-1 positions
        for a, b in zip(kcache[i].keys_and_values(), fcache[i].keys_and_values()):
            np.testing.assert_allclose(np.array(a)[:, :, :n], np.array(b)[:, :, :n], atol=1e-5)
    deep = np.array(kcache[3].keys_and_values()[1])[:, :, :n]
    assert np.abs(deep - np.array(fcache[3].keys_and_values()[1])[:, :, :n]).max() > 1e-4
    assert np.isfinite(np.array(klogits)).all()
    # a full-depth truncated aux is the base: every layer exact, no predictor weights at all
    full_aux, full_map, full_exact = make_aux(m, "T-0.99")
    assert full_exact == [0, 1, 2, 3]
    none = KVPredictor(full_map, m.hidden_size, m.n_kv_heads, m.head_dim, "hidden", full_exact)
    _, logits, _ = KVPrediction(m, full_aux, none).prefill(ids)
    np.testing.assert_allclose(np.array(logits), np.array(flogits), atol=1e-4, rtol=1e-4)


def test_aux_kind_errors_name_the_choices(tiny_models):
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.kvp.aux import make_aux

    m = load(str(tiny_models["llama"])).model
    for bad in ("LP-0.4", "T-1.5", "X-0.5", "T-abc"):
        with pytest.raises(EdgeprefillError, match="T-0.50"):
            make_aux(m, bad)


def test_aux_only_strategy_is_the_aux_model_alone(tiny_models):
    """aux-only prefills and decodes with the aux's own layers and head; with every base layer
    kept it is the base."""
    from edgeprefill.prefill.aux_only import AuxOnly

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    ids = lm.tokenizer.encode("the quick brown fox")
    full = generate(m, lm.tokenizer, ids, FullPrefill(m), max_tokens=6)
    same = generate(m, lm.tokenizer, ids, AuxOnly(m, AuxModel(m, range(4), "T"), chunk_size=3),
                    max_tokens=6)
    assert same.tokens == full.tokens
    half = AuxOnly(m, layer_pruned_aux(m, 0.5))
    cache, logits, stats = half.prefill(ids)
    assert len(cache) == 2 and stats.extra["aux_layers"] == 2
    h = m.embed(mx.array([ids]))
    for layer in (0, 2):
        h = m.block(layer, h).h
    np.testing.assert_allclose(np.array(logits), np.array(m.head(h)[0, -1]), atol=1e-4)


def test_bundled_default_pair_is_complete():
    """The trained T-0.50 pair shipped for the default model: card, weights and layer map agree
    (SmolLM2-135M: 30 layers, 3 KV heads of 64, hidden 576; 15 predicted layers read through
    one rank-384 down-projection of the 1152 hidden2 inputs; trained copies of the aux's last
    4 blocks; an exact tail of 32, trained for)."""
    import json

    import mlx.core as mx

    from edgeprefill.kvp.pairs import bundled_dir

    folder = bundled_dir() / "SmolLM2-135M-Instruct-T-0.50"
    card = json.loads((folder / "card.json").read_text())
    w = mx.load(str(folder / "predictor.safetensors"))
    predicted = [i for i in range(len(card["layer_map"])) if i not in card["exact_layers"]]
    assert card["aux"]["kind"] == "T-0.50" and card["predictor_input"] == "hidden2"
    assert len(predicted) == 15 and len(w) == 4 * len(predicted) + 1
    assert card["predictor_rank"] == 384 and w["down.0.weight"].shape == (384, 2 * 576)
    assert w["k_proj.0.weight"].shape == (192, 384) and w["v_proj.14.bias"].shape == (192,)
    assert card["quality"]["pairs"] == 40 and card["quality"]["nll_ratio"] <= 1.10
    assert card["tail"] == 32  # the base runs the prompt's last 32 tokens itself
    assert card["fit"]["train_tail"] == 32  # and it was trained for every tail up to that
    aux = mx.load(str(folder / "aux.safetensors"))
    assert card["aux"]["weights"] == "aux.safetensors"
    assert card["aux"]["trained_layers"] == [11, 12, 13, 14]
    assert {k.split(".")[1] for k in aux} == {"11", "12", "13", "14"} and len(aux) == 4 * 9
    assert aux["layers.14.mlp.gate_proj.weight"].shape == (1536, 576)


def test_an_earlier_bundled_pair_is_replaced_but_a_local_fit_is_kept(tmp_path):
    import json
    import shutil

    from edgeprefill.kvp.pairs import bundled_dir, stale_bundled_copy

    shipped = bundled_dir() / "SmolLM2-135M-Instruct-T-0.50"
    old = tmp_path / "installed"
    shutil.copytree(shipped, old)
    assert not stale_bundled_copy(old, shipped)  # the current release's copy
    (old / "predictor.safetensors").chmod(0o644)
    (old / "predictor.safetensors").write_bytes(b"an earlier release")
    assert stale_bundled_copy(old, shipped)
    shutil.copy(shipped / "predictor.safetensors", old / "predictor.safetensors")
    (old / "aux.safetensors").unlink()  # a release before trained aux blocks shipped
    assert stale_bundled_copy(old, shipped)
    shutil.copy(shipped / "aux.safetensors", old / "aux.safetensors")
    card = json.loads((old / "card.json").read_text())
    (old / "card.json").chmod(0o644)
    (old / "card.json").write_text(json.dumps({**card, "tail": card["tail"] + 1}))
    assert stale_bundled_copy(old, shipped)  # the same weights, an earlier card (its tail)
    card = json.loads((old / "card.json").read_text())
    card["fit"]["method"] = "ridge"  # fitted on this machine: the user's own, kept
    (old / "card.json").chmod(0o644)
    (old / "card.json").write_text(json.dumps(card))
    assert not stale_bundled_copy(old, shipped)
    assert not stale_bundled_copy(tmp_path / "missing", shipped)


@pytest.mark.parametrize("family,spec,source", [("qwen3", "LP-0.50", "kv"),
                                                ("llama", "T-0.50", "hidden2")])
def test_stacked_prediction_equals_layer_by_layer(tiny_models, family, spec, source):
    """The inference path predicts every layer in one batched matmul and one RoPE call, into
    views of one buffer: the same cache as one Linear, k_norm and RoPE per layer."""
    from edgeprefill.kvp.pairs import build_predictor

    m = load(str(tiny_models[family])).model
    mx.random.seed(5)
    aux, pred = build_predictor(m, spec, source)
    ids = list(range(7, 40))
    kvp = KVPrediction(m, aux, pred, chunk_size=12)  # three aux chunks: views, then appends
    cache, _, _ = kvp.prefill(ids)
    out = aux.forward(mx.array(ids[:-1])[None], aux.make_cache(), pred.hidden_layers())
    for i, k, v in pred.base_kv(out):
        k = m.rotate_keys(i, k.astype(m.dtype), offset=0)
        got_k, got_v = cache[i].keys_and_values()
        np.testing.assert_allclose(np.array(got_k)[:, :, :-1], np.array(k), atol=1e-5)
        np.testing.assert_allclose(np.array(got_v)[:, :, :-1], np.array(v), atol=1e-5)
    one = KVPrediction(m, aux, pred, chunk_size=512)
    cache1, _, _ = one.prefill(ids)
    i = pred.predicted[0]
    assert cache1[i].offset == len(ids) and cache1[i].keys.shape[2] % cache1[i].step == 0


@pytest.mark.parametrize("family,spec,source", [("qwen3", "LP-0.50", "kv"),
                                                ("llama", "T-0.50", "hidden")])
def test_overlapped_base_step_equals_sequential(tiny_models, family, spec, source):
    """The GPU path queues each base layer's one-token step on a second stream as soon as its
    K/V are predicted: the same cache and logits as running the aux first, then the base."""
    from edgeprefill.kvp.pairs import build_predictor

    m = load(str(tiny_models[family])).model
    mx.random.seed(6)
    aux, pred = build_predictor(m, spec, source)
    ids = list(range(9, 40))
    seq, ov = (KVPrediction(m, aux, pred, overlap=o, tail=3) for o in (False, True))
    c1, l1, s1 = seq.prefill(ids)
    c2, l2, s2 = ov.prefill(ids)
    assert not s1.extra["overlap"] and s2.extra["overlap"]
    np.testing.assert_allclose(np.array(l2), np.array(l1), atol=1e-5)
    for a, b in zip(list(c1) + c1.aux, list(c2) + c2.aux):
        assert a.offset == b.offset
        for x, y in zip(a.keys_and_values(), b.keys_and_values()):
            np.testing.assert_allclose(np.array(y), np.array(x), atol=1e-5)
    # a second turn continues the overlapped cache on the sequential path
    _, l3, s3 = ov.prefill(ids[:7], c2)
    _, l4, _ = seq.prefill(ids[:7], c1)
    assert not s3.extra["overlap"]
    np.testing.assert_allclose(np.array(l3), np.array(l4), atol=1e-5)
