"""Core ML export: every function of the package runs in the numpy MIL interpreter and matches
the torch mirror (Linux has no Core ML runtime); structural checks; on macOS, Core ML itself.

Tolerances (logits of a tiny random model, |logit| up to ~3): float16 weights and compute
rel. max logit error < 1e-2 and state error < 1e-2; int8 weights < 2e-2; int4 block / 4-bit
palette < 0.15 with logit cosine > 0.97 -- all with the same top-1 token.
"""
import platform

import numpy as np
import pytest

from edgeprefill.loading import load


CHUNK, CONTEXT = 16, 64

pytest.importorskip("coremltools")


PROMPT = [(7 * i + 3) % 300 for i in range(25)]  # 1.5 chunks + 1: a padded last chunk


def _t_pair(lm, source="hidden", copies=0, rank=None):
    """A ridge-fitted KVP-T 0.50 pair on random text: (MLX aux, MLX predictor, torch
    predictor, mirror aux, mirror base); `copies`: its last blocks become perturbed copies
    (as after `kvp train --train-aux-layers`); `rank`: a low-rank predictor."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from edgeprefill.kvp.aux import make_aux
    from edgeprefill.kvp.fit import fit_ridge
    from edgeprefill.kvp.predictor import KVPredictor, input_dim
    from edgeprefill.kvp.train import trainable_aux
    from edgeprefill.mirror.convert import aux_to_torch, mirror_from_mlx, predictor_to_torch

    m = lm.model
    aux, layer_map, exact = make_aux(m, "T-0.50")
    if copies:
        aux = trainable_aux(aux, aux.layers[-copies:])
        for k in aux.model.copied:
            layer = aux.model.layers[k]
            noise = [(n, w * (1 + 0.2 * mx.random.normal(w.shape, key=mx.random.key(k))))
                     for n, w in tree_flatten(layer.trainable_parameters())]
            layer.update(tree_unflatten(noise))
    pred = KVPredictor(layer_map, input_dim(aux, source), m.n_kv_heads, m.head_dim, source,
                       exact)
    rng = np.random.default_rng(1)
    pred, _ = fit_ridge(m, aux, pred, [rng.integers(3, m.vocab_size, 40).tolist()
                                       for _ in range(6)], lam=1e-3, rank=rank)
    mirror = mirror_from_mlx(m)
    return aux, pred, predictor_to_torch(pred), aux_to_torch(aux, mirror), mirror


def _export(lm, tmp_path, layout="default", quantize="none", kvp=None, decode=True,
            context=CONTEXT):
    from edgeprefill.converters.coreml import export as ex
    from edgeprefill.mirror.convert import mirror_from_mlx

    mirror = kvp[4] if kvp else mirror_from_mlx(lm.model)
    pred, aux = (kvp[2], kvp[3]) if kvp else (None, None)
    em = ex.build(mirror, context, layout, pred, aux)
    fns = ["prefill"] + (["decode"] if decode else []) + (["kvp_prefill"] if kvp else [])
    models = {f: ex.quantize_model(ex.convert_function(em, f, CHUNK), quantize,
                                   mirror.vocab_size) for f in fns}
    out = ex.save_package(models, tmp_path / f"m-{layout}-{quantize}.mlpackage")
    return out, mirror, pred, aux


def _check(report, rel, cos=0.999):
    for fn, r in report.items():
        assert r["top1_match"], (fn, r)
        assert r["rel_logit_diff"] < rel and r["logit_cosine"] > cos, (fn, r)
        assert r["max_state_diff"] < max(rel, 1e-2), (fn, r)


@pytest.mark.parametrize("family,layout,copies,rank", [
    ("llama", "default", 0, None), ("qwen3", "ane", 1, 6)])
def test_package_matches_the_mirror_in_the_interpreter(tiny_models, tmp_path, family, layout,
                                                       copies, rank):
    """qwen3/ane also carries a trained copy of the aux's last block (kvp_prefill runs it,
    prefill and decode run the base's own) and a low-rank predictor (its shared
    down-projection a 1x1 convolution too, like the K/V Linears)."""
    from edgeprefill.converters.coreml.export import package_report
    from edgeprefill.converters.coreml.verify import verify_package

    lm = load(str(tiny_models[family]))
    kvp = _t_pair(lm, copies=copies, rank=rank)
    assert kvp[2].rank == rank
    out, mirror, pred, aux = _export(lm, tmp_path, layout, kvp=kvp)
    report = verify_package(out, mirror, pred, aux, CHUNK, PROMPT)
    assert set(report) == {"prefill", "decode", "kvp_prefill"}
    _check(report, 1e-2)
    # an exact tail (the card's): kvp_prefill over the head, then prefill over the tail, in
    # one chunk (3) or across two (20 > CHUNK), against the mirror's KVPrediction
    from edgeprefill.converters.coreml.export import load_program
    from edgeprefill.converters.coreml.verify import verify_kvp

    prog = load_program(out)
    for tail in (3, 20):
        r = verify_kvp(out, prog, mirror, pred, aux, CHUNK, PROMPT, tail, CONTEXT)
        assert r["tail"] == tail and r["top1_match"], r
        assert r["rel_logit_diff"] < 1e-2 and r["max_state_diff"] < 1e-2, r
    rep = package_report(out)
    m = lm.model
    shape = [m.n_layers, m.n_kv_heads, CONTEXT, m.head_dim]
    assert rep["states"] == {"key_cache": shape, "value_cache": shape}
    assert CONTEXT % 32 == 0 and not rep["fp32_ops"]  # float16 compute throughout
    assert rep["ops"]["coreml_update_state"] > 0 and rep["ops"]["slice_update"] > 0
    if layout == "default":  # fused attention, one op per layer and function
        n_fn = len(rep["functions"])
        assert rep["fused_attention"] == m.n_layers * 2 + m.n_layers // 2 and n_fn == 3
    else:  # 1x1 convolutions instead of linear layers (the head stays a linear)
        assert rep["ops"]["conv"] > 0 and rep["ops"].get("linear", 0) <= len(rep["functions"])


@pytest.mark.parametrize("family,quantize,rel,cos", [
    ("qwen2", "int8", 2e-2, 0.999),  # qwen2: biased q/k/v projections, untied head
    ("llama", "int4-block", 0.15, 0.97), ("llama", "palette4", 0.15, 0.97)])
def test_quantized_packages_stay_close(tiny_models, tmp_path, family, quantize, rel, cos):
    from edgeprefill.converters.coreml.export import load_program, package_report
    from edgeprefill.converters.coreml.mil_interp import OPS
    from edgeprefill.converters.coreml.verify import verify_package

    lm = load(str(tiny_models[family]))
    # a 256-position context: its RoPE tables (256 x 16) are above the compression threshold,
    # and must stay float16 (compressed positions wreck attention)
    out, mirror, _, _ = _export(lm, tmp_path, "default", quantize, decode=False, context=256)
    _check(verify_package(out, mirror, None, None, CHUNK, PROMPT), rel, cos)
    rep = package_report(out)
    op = "constexpr_lut_to_dense" if quantize == "palette4" else "constexpr_blockwise_shift_scale"
    m = lm.model
    shapes = [tuple(o.outputs[0].shape) for fn in load_program(out).functions.values()
              for o in fn.operations if o.op_type == op]
    assert (m.vocab_size, m.hidden_size) in shapes  # the embedding table is compressed
    assert (256, m.head_dim) not in shapes  # the RoPE tables are not
    assert rep["ops"][op] >= m.n_layers * 5  # q, o, gate, up, down at least
    # the interpreter's dequantization equals coremltools' own for every compressed weight
    prog = load_program(out)
    checked = 0
    for fn in prog.functions.values():
        for o in fn.operations:
            if o.op_type == op:
                params = {k: np.asarray(v.val) for k, v in o.inputs.items()}
                np.testing.assert_allclose(OPS[op](params), o.materialized_val_inference(),
                                           rtol=1e-3, atol=1e-3)
                checked += 1
    assert checked > 0


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML predict runs on macOS only; "
                    "the interpreter tests above cover Linux")
def test_core_ml_predict_matches_the_mirror_on_macos(tiny_models, tmp_path):
    import coremltools as ct

    from edgeprefill.converters.coreml.verify import compare, mirror_reference

    lm = load(str(tiny_models["llama"]))
    out, mirror, _, _ = _export(lm, tmp_path)
    model = ct.models.MLModel(str(out), function_name="prefill")
    state = model.make_state()
    logits = None
    for s in range(0, len(PROMPT), CHUNK):
        part = PROMPT[s:s + CHUNK]
        ids = np.array([part + [0] * (CHUNK - len(part))], dtype=np.int32)
        logits = model.predict({"input_ids": ids, "position": np.array([s], dtype=np.int32),
                                "last_index": np.array([len(part) - 1], dtype=np.int32)},
                               state=state)["logits"]
    _, ref = mirror_reference(mirror, PROMPT, CONTEXT, CHUNK)
    assert compare(logits, ref)["rel_logit_diff"] < 2e-2


def test_float16_safe_norm_with_massive_activations(tiny_models, tmp_path):
    """Residual streams of real models reach 1e4 (SmolLM2: 2.5e4): squaring them overflows
    float16, so the exported RMS norm rescales first. Embeddings scaled by 2000 reproduce it."""
    import torch

    from edgeprefill.converters.coreml import export as ex
    from edgeprefill.converters.coreml.verify import verify_package
    from edgeprefill.mirror.convert import mirror_from_mlx

    lm = load(str(tiny_models["llama"]))
    mirror = mirror_from_mlx(lm.model)
    with torch.no_grad():
        mirror.model.embed_tokens.weight.mul_(2000.0)
    em = ex.build(mirror, CONTEXT, "default")
    out = ex.save_package({"prefill": ex.convert_function(em, "prefill", CHUNK)},
                          tmp_path / "big.mlpackage")
    report = verify_package(out, mirror, None, None, CHUNK, PROMPT)
    assert report["prefill"]["top1_match"] and report["prefill"]["logit_cosine"] > 0.999


def test_export_refuses_a_copy_with_its_own_k_norm(tiny_models):
    """The package's one cache per layer is keyed by the base's k_norm: a trained copy whose
    k_norm moved off it (kvp train keeps it frozen) is refused with a one-line reason."""
    import torch

    from edgeprefill.converters.coreml import export as ex
    from edgeprefill.errors import EdgeprefillError

    lm = load(str(tiny_models["qwen3"]))
    _, _, tpred, taux, mirror = _t_pair(lm, copies=1)
    with torch.no_grad():
        for layer in taux.model.copies.values():
            layer.self_attn.k_norm.weight.mul_(1.5)
    with pytest.raises(EdgeprefillError, match="own k_norm"):
        ex.build(mirror, CONTEXT, "default", tpred, taux)
