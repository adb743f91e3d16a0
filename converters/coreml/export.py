"""Core ML export: torch mirror -> traced functions -> one multifunction .mlpackage.

Functions: `prefill` (a fixed chunk of C tokens), `decode` (one token) and, with a KV Prediction
artifact, `kvp_prefill` (aux + predictor writing the base's K/V). All share the float16 states
key_cache / value_cache (layers, kv heads, context, head dim); coremltools deduplicates the
weights the functions share when it saves the package.
"""

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from edgeprefill.converters.coreml import COMPUTE_UNITS, LAYOUTS, QUANTIZE  # noqa: F401  (re-exported)
from edgeprefill.errors import EdgeprefillError

FUNCTIONS = ("prefill", "decode", "kvp_prefill")


def check_options(context, chunk, quantize, layout, compute_units):
    """One-line errors for bad export options."""
    if quantize not in QUANTIZE:
        raise EdgeprefillError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quantize}")
    if layout not in LAYOUTS:
        raise EdgeprefillError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout}")
    if compute_units not in COMPUTE_UNITS:
        raise EdgeprefillError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}")
    if context < 32 or context % 32:
        raise EdgeprefillError(f"--context {context}: use a multiple of 32 (the Neural Engine's "
                               "state sizes), e.g. 1024")
    if chunk < 1 or chunk > context:
        raise EdgeprefillError(f"--chunk {chunk}: use 1..context tokens, e.g. 64")


def build(mirror_model, context, layout="default", predictor=None, aux=None):
    """The ExportModel (float32 torch, eval mode) for a mirror model and optional KVP-T pair
    (`aux`: its mirror AuxModel, whose trained block copies, if any, the package carries)."""
    import torch

    from edgeprefill.converters.coreml.modules import ExportModel

    copies = getattr(aux.model, "copies", None) if aux is not None else None
    for k, layer in (copies or {}).items():
        # The package has one cache per layer, read by the aux's copy and written for the
        # base; the pair's semantics key it with the base's own k_norm (qwen3), so a copy
        # whose k_norm was trained away from it has no single cache to write.
        norm = getattr(layer.self_attn, "k_norm", None)
        if norm is not None and not torch.equal(
                norm.weight, mirror_model.model.layers[int(k)].self_attn.k_norm.weight):
            raise EdgeprefillError(f"the pair's trained copy of block {k} has its own k_norm: "
                                   "the Core ML export needs the base's (kvp train keeps it "
                                   "frozen); retrain the pair or export without --kvp")
    em = ExportModel(mirror_model.float(), context, layout,
                     predictor.float() if predictor is not None else None,
                     len(aux.layers) if aux is not None else 0, copies)
    em.eval()
    for p in em.parameters():
        p.requires_grad_(False)
    return em.to(torch.device("cpu"))


def example_inputs(function, chunk):
    """Torch example inputs (all zeros) for tracing `function`."""
    import torch

    c = 1 if function == "decode" else chunk
    ids = torch.zeros((1, c), dtype=torch.int32)
    pos = torch.zeros((1,), dtype=torch.int32)
    if function == "kvp_prefill":
        return ids, pos
    return ids, pos, torch.zeros((1,), dtype=torch.int32)


def input_specs(function, chunk):
    import coremltools as ct

    c = 1 if function == "decode" else chunk
    specs = [ct.TensorType(name="input_ids", shape=(1, c), dtype=np.int32),
             ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
    if function != "kvp_prefill":
        specs.append(ct.TensorType(name="last_index", shape=(1,), dtype=np.int32))
    return specs


def convert_function(em, function, chunk, compute_units="ane"):
    """Trace `function` of the ExportModel and convert it to an ML program (iOS 18, float16)."""
    import coremltools as ct
    import torch

    em.function = "kvp_prefill" if function == "kvp_prefill" else "prefill"
    args = example_inputs(function, chunk)
    em.chunk_len = args[0].shape[1]
    keys = em.key_cache.clone(), em.value_cache.clone()
    with torch.no_grad():
        traced = torch.jit.trace(em, args, check_trace=False)
    em.key_cache.copy_(keys[0])  # tracing ran the function once: undo its writes
    em.value_cache.copy_(keys[1])
    em.chunk_len = None
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(b.shape), dtype=np.float16),
                           name=n) for n, b in (("key_cache", em.key_cache),
                                                ("value_cache", em.value_cache))]
    outputs = [ct.TensorType(name="next_position" if function == "kvp_prefill" else "logits")]
    return ct.convert(traced, inputs=input_specs(function, chunk), outputs=outputs,
                      states=states, minimum_deployment_target=ct.target.iOS18,
                      convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                      compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]),
                      skip_model_load=True)


def embedding_ops(mlmodel, vocab):
    """Names of the ops that read the token-embedding table (its gather and, when tied, the
    output head): the gathered constant of shape (vocab, hidden)."""
    names = []
    for fn in mlmodel._mil_program.functions.values():
        for op in fn.operations:
            if op.op_type != "gather" or op.x.op is None or op.x.op.op_type != "const":
                continue
            if op.x.rank == 2 and op.x.shape[0] == vocab:
                names += [child.name for child in op.x.child_ops]
    return sorted(set(names))


def quantize_model(mlmodel, mode, vocab):
    """Weight compression through coremltools.optimize: linear/conv weights and the embedding
    table. Other gathered constants -- the RoPE cos/sin tables -- stay float16 (quantizing them
    wrecks positions; the embedding is named op by op so its gather and a tied head agree)."""
    if mode == "none":
        return mlmodel
    from coremltools.optimize import coreml as cto

    if mode in ("int8", "int4-block"):
        cfg = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8" if mode == "int8" else "int4",
            granularity="per_channel" if mode == "int8" else "per_block", block_size=32,
            weight_threshold=2048)
        run = cto.linear_quantize_weights
    else:
        cfg = cto.OpPalettizerConfig(nbits=4, mode="uniform", granularity="per_grouped_channel",
                                     group_size=16, weight_threshold=2048)
        run = cto.palettize_weights
    config = cto.OptimizationConfig(op_type_configs={"linear": cfg, "conv": cfg},
                                    op_name_configs={n: cfg for n in embedding_ops(mlmodel, vocab)})
    return run(mlmodel, config)


def op_histogram(program):
    """Counter of op types over every function of a pymil Program."""
    hist = Counter()
    for fn in program.functions.values():
        for op in fn.operations:
            hist[op.op_type] += 1
    return hist


def save_package(models, out, default="prefill", progress=None):
    """Write {function: MLModel} as one multifunction .mlpackage at `out`, atomically."""
    import coremltools as ct

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            path = tmp / f"{name}.mlpackage"
            model.save(str(path))
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        final = tmp / out.name
        ct.utils.save_multifunction(desc, str(final))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_program(path):
    """The pymil Program of a saved .mlpackage (every function), for inspection and the numpy
    interpreter."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, str(weights))


def _dtype_name(var):
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(var.dtype)
    except Exception:  # noqa: BLE001  (tuples, states)
        return None


def package_report(path):
    """{size_bytes, functions, states, ops, fp32_ops, sdpa, compute_precision} of a package."""
    path = Path(path)
    prog = load_program(path)
    hist = op_histogram(prog)
    states, fp32 = {}, Counter()
    for fname, fn in prog.functions.items():
        for name, var in fn.inputs.items():
            if "state" in str(var.sym_type).lower() or getattr(var, "is_state", False):
                states[name] = [int(x) for x in var.sym_type.wrapped_type().get_shape()]
        for op in fn.operations:
            if op.op_type in ("const", "read_state", "coreml_update_state", "cast"):
                continue
            if any(_dtype_name(o) == "fp32" for o in op.outputs):
                fp32[op.op_type] += 1
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    meta = json.loads((path / "Manifest.json").read_text()) if (path / "Manifest.json").is_file() \
        else {}
    return {"size_bytes": size, "functions": sorted(prog.functions), "states": states,
            "ops": dict(sorted(hist.items(), key=lambda kv: -kv[1])), "fp32_ops": dict(fp32),
            "fused_attention": hist.get("scaled_dot_product_attention", 0),
            "manifest_items": len(meta.get("itemInfoEntries", {}))}
