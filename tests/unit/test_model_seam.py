"""The per-layer API (embed / block / head) equals mlx-lm's own forward for every family."""
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from edgeprefill.loading import load
from edgeprefill.models import apply_rope


FAMILIES = ("llama", "qwen2", "qwen3")


TOL = {"float32": 1e-5, "float16": 2e-2}


def _close(a, b, dtype):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    np.testing.assert_allclose(a, b, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_mlx_lm_without_cache(tiny_models, family, dtype):
    lm = load(str(tiny_models[family]), dtype=dtype)
    ids = mx.array([[5, 17, 200, 3, 99, 42, 7, 300]])
    _close(lm.model(ids), lm.model.model(ids), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_mlx_lm_with_cache_prefill_and_decode(tiny_models, family, dtype):
    lm = load(str(tiny_models[family]), dtype=dtype)
    ours, theirs = lm.model.make_cache(), make_prompt_cache(lm.model.model)
    prompt = mx.array([[5, 17, 200, 3, 99, 42, 7, 300, 11, 12]])
    # Two prefill chunks, then single-token decode steps.
    for chunk in (prompt[:, :6], prompt[:, 6:], mx.array([[8]]), mx.array([[77]])):
        _close(lm.model(chunk, ours), lm.model.model(chunk, theirs), dtype)
    k_ours, v_ours = ours[2].keys_and_values()
    k_theirs, v_theirs = theirs[2].keys_and_values()
    _close(k_ours, k_theirs, dtype)
    _close(v_ours, v_theirs, dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_returns_pre_rope_keys_that_rotate_into_the_cache(tiny_models, family):
    lm = load(str(tiny_models[family]))
    m = lm.model
    cache = m.make_cache()
    h = m.embed(mx.array([[4, 9, 16, 25, 36]]))
    out = m.block(1, h, cache=cache[1])
    keys, values = cache[1].keys_and_values()
    _close(m.rotate_keys(1, out.keys, offset=0), keys, "float32")
    _close(out.values, values, "float32")
    k, v = m.project_kv(1, h)
    _close(k, out.keys, "float32")
    _close(v, out.values, "float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_kv_with_own_projections_changes_nothing(tiny_models, family):
    m = load(str(tiny_models[family])).model
    h = m.embed(mx.array([[4, 9, 16, 25, 36, 49]]))
    plain = m.block(2, h)
    replaced = m.block(2, h, replace_kv=(plain.keys, plain.values))
    _close(replaced.h, plain.h, "float32")
    other = m.block(2, h, replace_kv=(plain.keys + 1.0, plain.values))
    assert float(mx.abs(other.h - plain.h).max()) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_kv_equals_cached_prefix(tiny_models, family):
    """A chunk attending to a handed-over prefix K/V equals the same chunk after a cache."""
    m = load(str(tiny_models[family])).model
    ids = mx.array([[4, 9, 16, 25, 36, 49, 64, 81, 100]])
    cache = m.make_cache()
    h = m.embed(ids)
    first = m.block(0, h[:, :5], cache=cache[0])
    cached = m.block(0, h[:, 5:], cache=cache[0])
    prefix = (m.rotate_keys(0, first.keys, 0), first.values)
    handed = m.block(0, h[:, 5:], offset=5, prefix_kv=prefix)
    _close(handed.h, cached.h, "float32")


def test_rope_at_explicit_positions_matches_offset_and_inverts():
    import mlx.nn as nn

    rope = nn.RoPE(16, base=10000.0)
    x = mx.random.normal((2, 3, 7, 16))
    at_offset = apply_rope(rope, x, offset=11)
    at_positions = apply_rope(rope, x, positions=mx.arange(11, 18))
    _close(at_positions, at_offset, "float32")
    back = apply_rope(rope, at_positions, positions=-mx.arange(11, 18))
    _close(back, x, "float32")


def test_attention_row_is_a_distribution_over_visible_keys(tiny_models):
    m = load(str(tiny_models["llama"])).model
    h = m.embed(mx.array([[4, 9, 16, 25, 36, 49]]))
    out = m.block(0, h, return_attn_row=True)
    assert out.attn_row.shape == (1, 6)
    np.testing.assert_allclose(float(out.attn_row.sum()), 1.0, atol=1e-5)
    assert float(out.attn_row.min()) > 0
