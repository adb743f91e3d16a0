"""Load the torch mirror: from an HF folder of unquantized safetensors (no MLX needed), or
from a model MLX has loaded (`mirror_from_mlx`: quantized layers dequantized by MLX itself, so
a 4-bit mlx-community model mirrors exactly what MLX computes; see convert.py).
"""

import json
from pathlib import Path

import numpy as np
import torch

from edgeprefill.errors import EdgeprefillError
from edgeprefill.mirror.models import Transformer
from edgeprefill.mirror.models.transformer import rope_inv_freq

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _torch_dtype(dtype):
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def mirror_from_folder(path, dtype=torch.float32, device="cpu"):
    """Torch mirror from an HF folder of unquantized safetensors."""
    from safetensors.numpy import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if "quantization" in config or "quantization_config" in config:
        raise EdgeprefillError(f"{path} holds quantized weights: build the mirror from the "
                               "loaded MLX model (edgeprefill.mirror.convert.mirror_from_mlx) instead")
    if "rope_theta" not in config and isinstance(config.get("rope_parameters"), dict):
        config["rope_theta"] = config["rope_parameters"].get("rope_theta", 10000.0)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    state = {k: v for k, v in state.items() if "rotary_emb.inv_freq" not in k}
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in state)
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return build_mirror(config, state, dtype, device)


def build_mirror(config, state, dtype, device):
    """Transformer on `device` in `dtype` holding `state` ({HF name: array}); strict by name."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise EdgeprefillError(f"mirror weights do not match the config: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    model = model.to(_torch_dtype(dtype))
    model.inv_freq = rope_inv_freq(config, model.head_dim).to(device)  # stays float32
    return model.eval()

