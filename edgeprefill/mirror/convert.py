"""MLX <-> torch: the one place weights cross between the MLX path and its torch mirror.

The mirror has the MLX side's files and class names (models/transformer.py, prefill/*.py,
kvp/{aux,predictor,train}.py, loading.py); this module has no MLX twin. It converts a loaded
model (quantized layers dequantized by MLX itself), a KV Prediction pair (aux, predictor) and,
after training on the mirror, the trained weights back.
"""

import numpy as np
import torch


def to_numpy(x):
    """float32 numpy copy of an mx.array (or a numpy array as it is)."""
    import mlx.core as mx

    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else np.asarray(x)


def to_mlx(t):
    """float32 mx.array of a torch tensor."""
    import mlx.core as mx

    return mx.array(t.detach().float().cpu().numpy())


def mlx_state_dict(mlx_model):
    """{HF name: float32 numpy array} of an mlx-lm model, quantized weights dequantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    state = {}
    for name, module in tree_flatten(mlx_model.leaf_modules(), is_leaf=lambda m: isinstance(
            m, nn.Module)):
        params = dict(tree_flatten(module.parameters()))
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.get("biases"),
                              group_size=module.group_size, bits=module.bits,
                              mode=getattr(module, "mode", "affine"))
            params = {k: v for k, v in params.items() if k not in ("weight", "scales", "biases")}
            params["weight"] = w
        for k, v in params.items():
            state[f"{name}.{k}"] = to_numpy(v)
    return state


def mirror_from_mlx(model, dtype=torch.float32, device="cpu"):
    """Torch mirror of an edgeprefill.models.Transformer, with the same (dequantized) weights."""
    from edgeprefill.mirror.loading import build_mirror

    config = dict(model.config)
    config["tie_word_embeddings"] = not hasattr(model.model, "lm_head")
    return build_mirror(config, mlx_state_dict(model.model), dtype, device)


def predictor_to_torch(pred, device="cpu", dtype=torch.float32):
    """Torch copy of an MLX KVPredictor (same layout and weights)."""
    from mlx.utils import tree_flatten

    from edgeprefill.mirror.kvp.predictor import KVPredictor

    tp = KVPredictor(pred.layer_map, pred.in_dim, pred.base_kv_heads, pred.base_head_dim,
                     pred.source, pred.exact, pred.rank)
    state = {k: torch.from_numpy(to_numpy(v)) for k, v in tree_flatten(pred.parameters())}
    tp.load_state_dict(state, strict=True)
    return tp.to(device=device, dtype=dtype)


def predictor_to_mlx(tp, pred):
    """Write a torch KVPredictor's weights into the MLX KVPredictor `pred` (same layout)."""
    pred.load_weights([(k, to_mlx(v)) for k, v in tp.state_dict().items()], strict=True)
    return pred


def aux_to_torch(aux, tbase):
    """Mirror AuxModel of an MLX AuxModel made of `tbase`'s blocks (tbase: the mirror of the
    MLX base): the base's own blocks, except an artifact's trained copies (aux.safetensors),
    which are mirrored with their weights (frozen; view.train_copies(True) to train them)."""
    from edgeprefill.mirror.kvp.aux import AuxModel
    from edgeprefill.mirror.kvp.train import AuxView

    copied = getattr(aux.model, "copied", None)
    if not copied:
        return AuxModel(tbase, aux.layers, aux.kind)
    view = AuxView(tbase, copied)
    view.load_aux_weights({k: to_numpy(v) for k, v in aux.model.aux_weights().items()})
    view.train_copies(False)
    return AuxModel(view, aux.layers, aux.kind)


def pair_to_torch(aux, pred, tbase):
    """(mirror aux, mirror predictor) of an MLX pair over the mirror base `tbase`: an aux of
    the base's own blocks runs the mirror base's, a KVP-C aux a mirror of its own model."""
    tbase_aux = tbase
    if aux.kind == "C":  # the MLX copies' view keeps the small model itself as _base
        own = getattr(aux.model, "_base", aux.model)
        tbase_aux = mirror_from_mlx(own, tbase.dtype, tbase.device)
    return aux_to_torch(aux, tbase_aux), predictor_to_torch(pred, tbase.device, tbase.dtype)


def trained_pair_to_mlx(trainer, aux, pred):
    """After training on the mirror: (MLX predictor, aux copies' weights or None, MLX aux)
    holding the trainer's weights (`aux`, `pred`: the MLX pair it started from)."""
    from edgeprefill.kvp.train import trainable_aux
    from edgeprefill.mirror.kvp.train import AuxView

    predictor_to_mlx(trainer.predictor, pred)
    view = trainer.aux.model
    if not isinstance(view, AuxView):
        return pred, None, aux
    weights = {k: to_mlx(v) for k, v in view.aux_weights().items()}
    mlx_aux = aux if hasattr(aux.model, "copied") else trainable_aux(aux, view.copied)
    mlx_aux.model.load_aux_weights(weights)
    return pred, weights, mlx_aux
