"""LazyLLM: keep-ratio 1 is full; pruning keeps positions and the last token; revival."""
import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.generate import generate
from edgeprefill.loading import load
from edgeprefill.prefill import FullPrefill
from edgeprefill.prefill.lazy import LazyPrefill, Schedule


PROMPT = "the quick brown fox jumps over the lazy dog and then it runs far away"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_keep_ratio_one_reproduces_full_on_prefill_and_decode(tiny_models, family):
    lm = load(str(tiny_models[family]))
    ids = lm.tokenizer.encode(PROMPT)
    full = generate(lm.model, lm.tokenizer, ids, FullPrefill(lm.model), max_tokens=6)
    lazy = generate(lm.model, lm.tokenizer, ids, LazyPrefill(lm.model, "none", chunk_size=5),
                    max_tokens=6)
    assert lazy.tokens == full.tokens
    _, a, _ = FullPrefill(lm.model).prefill(ids)
    _, b, stats = LazyPrefill(lm.model, "none").prefill(ids)
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4, rtol=1e-4)
    assert stats.extra["token_layers_fraction"] == 1.0


def test_pruned_prefill_is_the_same_in_chunks_and_takes_numpy_ids(tiny_models):
    lm = load(str(tiny_models["llama"]))
    ids = np.array(lm.tokenizer.encode(PROMPT * 3))  # numpy integers, as users pass them
    one, a, _ = LazyPrefill(lm.model, "aggressive").prefill(ids)
    many, b, _ = LazyPrefill(lm.model, "aggressive", chunk_size=4).prefill(list(ids))
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4, rtol=1e-4)
    assert one.seg_pos == many.seg_pos
    for k in range(len(one.aux_hidden)):
        assert sorted(one.aux_hidden[k]) == sorted(many.aux_hidden[k])
        for p in one.aux_hidden[k]:
            np.testing.assert_allclose(np.array(one.aux_hidden[k][p]),
                                       np.array(many.aux_hidden[k][p]), atol=1e-4)


def test_pruning_shrinks_nested_sets_keeps_last_token_and_positions(tiny_models):
    lm = load(str(tiny_models["llama"]))
    m = lm.model
    ids = lm.tokenizer.encode(PROMPT)
    n = len(ids)
    lazy = LazyPrefill(m, "aggressive")
    assert lazy.bounds == [1, 2, 3]
    cache, logits, stats = lazy.prefill(ids)
    per_layer = stats.extra["tokens_per_layer"]
    assert per_layer[0] == n and all(b <= a for a, b in zip(per_layer, per_layer[1:]))
    assert per_layer[-1] < n and stats.extra["token_layers_fraction"] < 1
    for a, b in zip(cache.seg_pos, cache.seg_pos[1:]):
        assert set(b) <= set(a) and b[-1] == n - 1  # nested; the last token never pruned
    for k, seg in enumerate(cache.seg_pos):  # a token is either present or in the Aux Cache
        assert set(seg) | set(cache.aux_hidden[k]) == set(cache.seg_pos[max(0, k - 1)])
    # the last segment's keys sit at their original positions: recompute one exactly
    full_cache, _, _ = FullPrefill(m).prefill(ids)
    np.testing.assert_allclose(np.array(cache[0].keys_and_values()[0]),
                               np.array(full_cache[0].keys_and_values()[0]), atol=1e-5)
    from edgeprefill.flops import prefill_flops
    from edgeprefill.prefill.registry import flops

    fl = flops("lazy-aggressive", lazy, lm.config, n)
    assert fl < prefill_flops(lm.config, n)


def test_decoding_revives_tokens_with_the_kv_full_would_compute_from_their_inputs(tiny_models):
    lm = load(str(tiny_models["llama"]))
    m = lm.model
    ids = lm.tokenizer.encode(PROMPT)
    lazy = LazyPrefill(m, Schedule("t", (0.3, 0.6, 0.9), (0.3, 0.9, 0.9)))
    cache, _, _ = lazy.prefill(ids)
    seg = 1
    start = lazy.starts[seg]
    before = dict(cache.aux_hidden[seg])
    assert before
    revived = []
    for token in (5, 9, 12, 40):  # decode until something is revived
        lazy.forward(mx.array([[token]]), cache)
        revived = [p for p in before if p in cache.seg_pos[seg]]
        if revived:
            break
    assert revived, "no token was revived"
    keys, values = cache[start].keys_and_values()
    for p in revived:
        row = cache.seg_pos[seg].index(p)
        k, v = m.project_kv(start, before[p][None, None])
        k = m.rotate_keys(start, k, positions=mx.array([p], dtype=mx.int32))
        np.testing.assert_allclose(np.array(keys[:, :, row]), np.array(k[:, :, 0]), atol=1e-5)
        np.testing.assert_allclose(np.array(values[:, :, row]), np.array(v[:, :, 0]), atol=1e-5)
        assert p not in cache.aux_hidden[seg]  # computed once at this layer
    for i in range(m.n_layers):  # never more work than full
        assert cache[i].offset <= cache.next_pos


@pytest.mark.parametrize("schedule", ["none", "aggressive"])
def test_mirror_lazy_equals_mlx_through_decoding(tiny_models, schedule):
    import torch

    from edgeprefill.mirror.convert import mirror_from_mlx
    from edgeprefill.mirror.prefill import LazyPrefill as TorchLazy

    lm = load(str(tiny_models["qwen3"]))
    ids = lm.tokenizer.encode(PROMPT)
    ours = LazyPrefill(lm.model, schedule, chunk_size=4)
    theirs = TorchLazy(mirror_from_mlx(lm.model), schedule, chunk_size=4)
    c1, l1, s1 = ours.prefill(ids)
    c2, l2, s2 = theirs.prefill(ids, cache=theirs.make_cache(64))
    assert s1.extra["tokens_per_layer"] == s2.extra["tokens_per_layer"]
    assert c1.seg_pos == c2.seg_pos
    np.testing.assert_allclose(l2.numpy(), np.array(l1), atol=2e-4, rtol=2e-4)
    for token in (5, 9, 12):
        a = ours.forward(mx.array([[token]]), c1)
        b = theirs.forward(torch.tensor([[token]]), c2)
        np.testing.assert_allclose(b.numpy(), np.array(a), atol=3e-4, rtol=3e-4)
    assert c1.seg_pos == c2.seg_pos


def test_custom_keep_schedule_matches_the_named_one_and_sets_the_flops(tiny_models):
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.flops import prefill_flops
    from edgeprefill.prefill import build, parse
    from edgeprefill.prefill.registry import flops as strategy_flops

    lm = load(str(tiny_models["llama"]))
    ids = lm.tokenizer.encode(PROMPT)
    named = build("lazy-aggressive", lm)
    custom = build("lazy-0.5:0.5:0.5", lm)
    assert custom.schedule.keep == named.schedule.keep and custom.bounds == named.bounds
    _, a, s1 = named.prefill(ids)
    _, b, s2 = custom.prefill(ids)
    np.testing.assert_array_equal(np.array(b), np.array(a))
    assert s2.extra["schedule"] == "0.5:0.5:0.5"
    assert s2.extra["tokens_per_layer"] == s1.extra["tokens_per_layer"]
    # keeping more costs more: the knob that sets lazy's FLOPs to a budget
    flops = [strategy_flops("lazy", build(f"lazy-{k}", lm), lm.config, 200)
             for k in ("0.5:0.5:0.5", "0.8:0.6:0.5", "1:1:1")]
    assert flops[0] < flops[1] < flops[2] == prefill_flops(lm.config, 200)
    assert parse("lazy-0.9:0.8:0.7")[1] == "0.9:0.8:0.7"
    for bad in ("0.7:0.6", "0:0.5:0.5", "1.2:0.5:0.5", "a:b:c"):
        with pytest.raises(EdgeprefillError, match=f"unknown lazy schedule '{bad}'.*K1:K2:K3"):
            parse(f"lazy-{bad}")
