"""The torch mirror equals the MLX path numerically, layer API and caches included."""
import mlx.core as mx
import numpy as np
import pytest
import torch

from edgeprefill.loading import load
from edgeprefill.mirror.convert import mirror_from_mlx
from edgeprefill.mirror.loading import mirror_from_folder
from edgeprefill.mirror.prefill import FullPrefill as TorchFull
from edgeprefill.prefill import FullPrefill


FAMILIES = ("llama", "qwen2", "qwen3")


ATOL = 2e-4


def _np(x):
    return x.detach().float().numpy() if torch.is_tensor(x) else np.array(x.astype(mx.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_mirror_logits_equal_mlx(tiny_models, family):
    lm = load(str(tiny_models[family]))
    ids = [5, 17, 200, 3, 99, 42, 7, 300]
    expected = _np(lm.model(mx.array([ids])))
    for mirror in (mirror_from_folder(tiny_models[family]), mirror_from_mlx(lm.model)):
        with torch.no_grad():
            got = _np(mirror(torch.tensor([ids])))
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mirror_prefill_then_decode_equals_mlx(tiny_models, family):
    lm = load(str(tiny_models[family]))
    mirror = mirror_from_mlx(lm.model)
    prompt = [5, 17, 200, 3, 99, 42, 7, 300, 11, 12, 13]
    cache, logits, stats = FullPrefill(lm.model, chunk_size=4).prefill(prompt)
    tcache, tlogits, tstats = TorchFull(mirror, chunk_size=4).prefill(prompt)
    assert stats.prompt_tokens == tstats.prompt_tokens == len(prompt)
    np.testing.assert_allclose(_np(tlogits), _np(logits), atol=ATOL, rtol=ATOL)
    for token in (8, 77, 150):
        step = _np(lm.model(mx.array([[token]]), cache))
        with torch.no_grad():
            tstep = _np(mirror(torch.tensor([[token]]), tcache))
        np.testing.assert_allclose(tstep, step, atol=ATOL, rtol=ATOL)
    k, v = cache[1].keys_and_values()
    tk, tv = tcache[1].keys_and_values()
    np.testing.assert_allclose(_np(tk), _np(k), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(_np(tv), _np(v), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mirror_block_api_matches_mlx(tiny_models, family):
    lm = load(str(tiny_models[family]))
    m, t = lm.model, mirror_from_mlx(lm.model)
    ids = [4, 9, 16, 25, 36, 49]
    out = m.block(1, m.embed(mx.array([ids])), return_attn_row=True)
    with torch.no_grad():
        tout = t.block(1, t.embed(torch.tensor([ids])), return_attn_row=True)
    for a, b in ((tout.h, out.h), (tout.keys, out.keys), (tout.values, out.values),
                 (tout.attn_row, out.attn_row)):
        np.testing.assert_allclose(_np(a), _np(b), atol=ATOL, rtol=ATOL)


def test_mirror_of_4bit_model_equals_mlx_quantized_forward(tiny_quantized):
    lm = load(str(tiny_quantized))
    mirror = mirror_from_mlx(lm.model)
    ids = [5, 17, 200, 3, 99, 42]
    with torch.no_grad():
        got = _np(mirror(torch.tensor([ids])))
    np.testing.assert_allclose(got, _np(lm.model(mx.array([ids]))), atol=1e-3, rtol=1e-3)


def test_mirror_module_names_are_the_checkpoint_keys(tiny_models):
    from safetensors.numpy import load_file

    keys = set(load_file(str(tiny_models["qwen2"] / "model.safetensors")))
    mirror = mirror_from_folder(tiny_models["qwen2"])
    assert set(mirror.state_dict()) == keys


def test_mirror_cache_is_registered_buffers(tiny_models):
    mirror = mirror_from_folder(tiny_models["llama"])
    cache = mirror.make_cache(max_len=32)
    names = dict(cache[0].named_buffers())
    assert set(names) == {"keys", "values"} and names["keys"].shape[2] == 32
