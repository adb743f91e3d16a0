"""Loading: HF folders, 4-bit folders, GGUF files, hub ids, and every bad input."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.errors import EdgeprefillError
from edgeprefill.gguf import convert_gguf, unpermute_qk
from edgeprefill.loading import load, resolve_model_path
from tests.gguf_fixture import llama_cpp_permute, write_tiny_gguf


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).normal(size=(48, 20)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)


@pytest.mark.parametrize("quantize", [False, True])
def test_gguf_converts_to_the_same_model(tiny_models, tmp_path, quantize):
    gguf_file = write_tiny_gguf(tiny_models["llama"], tmp_path / "tiny.gguf", quantize=quantize)
    folder = convert_gguf(gguf_file, tmp_path / "converted")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["model_type"] == "llama"
    original = load(str(tiny_models["llama"]))
    converted = load(str(folder))
    assert converted.model.model.model.layers[0].self_attn.rope.base == 10000.0
    ids = mx.array([[5, 17, 200, 3, 99, 42]])
    a, b = np.array(original.model(ids)), np.array(converted.model(ids))
    tol = 5e-2 if quantize else 1e-5
    np.testing.assert_allclose(b, a, atol=tol, rtol=tol)
    text = "What is the capital of France?"
    assert converted.tokenizer.encode(text) == original.tokenizer.encode(text)


def test_gguf_path_loads_through_the_cache(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPREFILL_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tiny_models["llama"], tmp_path / "tiny.gguf")
    first = resolve_model_path(str(gguf_file))
    assert first.is_relative_to(tmp_path / "cache")
    assert resolve_model_path(str(gguf_file)) == first  # converted once, reused


def test_rope_theta_nested_by_transformers5_is_honoured(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "nested")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load(str(folder))
    assert lm.model.model.model.layers[0].self_attn.rope.base == 100000.0


def test_mlx_community_4bit_folder_loads_and_runs(tiny_quantized):
    lm = load(str(tiny_quantized))
    import mlx.nn as nn

    assert isinstance(lm.model.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    logits = lm.model(mx.array([[5, 17, 200]]))
    assert logits.shape == (1, 3, lm.model.vocab_size)
    assert bool(mx.all(mx.isfinite(logits)))


def test_hub_id_offline_fails_with_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EdgeprefillError, match="cannot download 'mlx-community/Some-Model'.*offline"):
        resolve_model_path("mlx-community/Some-Model")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/folder", "model path not found"),
    ("missing.gguf", "model path not found"),
    ("not a model", "model not found"),
    ("", "no model given"),
])
def test_bad_model_specs_are_refused(spec, message):
    with pytest.raises(EdgeprefillError, match=message):
        resolve_model_path(spec)


def test_unsupported_model_type_is_refused(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "mamba")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeprefillError, match="model_type 'mamba' is not supported"):
        load(str(folder))


def test_corrupted_weights_are_refused(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EdgeprefillError, match="cannot load weights"):
        load(str(folder))


def test_corrupted_gguf_is_refused_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EdgeprefillError, match="cannot read GGUF"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
