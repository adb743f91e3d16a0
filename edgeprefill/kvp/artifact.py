"""KV Prediction artifacts: a folder per (base, aux) pair.

    predictor.safetensors   K and V Linear weights and biases per base layer
    card.json               base identity and config hash, aux kind and layers, layer map,
                            how it was fitted (method, data, tokens, steps), measured quality

Loading refuses a card that does not match the loaded base, naming the differing field.
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from edgeprefill.errors import EdgeprefillError
from edgeprefill.fsio import atomic_folder
from edgeprefill.kvp.aux import AuxModel
from edgeprefill.kvp.layer_map import validate_layer_map
from edgeprefill.kvp.predictor import KVPredictor

FORMAT = "edgeprefill-kvp/1"
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "rope_theta", "tie_word_embeddings")


def config_hash(model):
    """Hash of a Transformer's architecture fields and a fingerprint of its weights."""
    arch = {k: model.config.get(k) for k in _ARCH_KEYS}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    norm = model.model.model.norm.weight.astype(mx.float32)
    h.update(np.round(np.array(norm), 5).tobytes())
    return h.hexdigest()[:16]


def save_artifact(path, predictor, aux, base, base_id, fit_info, quality=None):
    """Write an artifact folder atomically; returns its path."""
    path = Path(path)
    card = {
        "format": FORMAT,
        "base": {"id": base_id, "config_hash": config_hash(base)},
        "aux": {"kind": aux.kind, "layers": aux.layers},
        "layer_map": predictor.layer_map,
        "predictor_input": "kv",
        "fit": fit_info,
        "quality": quality or {},
    }
    with atomic_folder(path) as tmp:
        mx.save_safetensors(str(tmp / "predictor.safetensors"),
                            dict(tree_flatten(predictor.parameters())))
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
    return path


def read_card(path):
    path = Path(path)
    card_file = path / "card.json"
    if not card_file.is_file():
        raise EdgeprefillError(f"{path} is not a KV Prediction artifact (no card.json): "
                               "pass a folder made by `edgeprefill kvp fit`")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as e:
        raise EdgeprefillError(f"{card_file} is not valid JSON ({e}): re-create the artifact")
    if card.get("format") != FORMAT:
        raise EdgeprefillError(f"artifact field 'format' is {card.get('format')!r}, expected "
                               f"{FORMAT!r}: re-create it with this version")
    return card


def load_artifact(path, base):
    """(AuxModel, KVPredictor, card) for `base`, after checking the card matches it."""
    card = read_card(path)
    want = config_hash(base)
    got = card.get("base", {}).get("config_hash")
    if got != want:
        raise EdgeprefillError(
            f"artifact field 'base.config_hash' is {got} but the loaded base model's is {want} "
            f"(artifact made for '{card.get('base', {}).get('id')}'): use the matching model "
            "or fit a new artifact")
    layers = card["aux"]["layers"]
    if not layers or max(layers) >= base.n_layers:
        raise EdgeprefillError("artifact field 'aux.layers' names layers the base lacks: "
                               "re-create the artifact")
    try:
        validate_layer_map(card["layer_map"], base.n_layers, len(layers))
    except ValueError as e:
        raise EdgeprefillError(f"artifact field 'layer_map' is invalid ({e}): re-create it")
    aux = AuxModel(base, layers, card["aux"]["kind"])
    pred = KVPredictor(card["layer_map"], aux.kv_dim, base.n_kv_heads, base.head_dim)
    try:
        weights = mx.load(str(Path(path) / "predictor.safetensors"))
        pred.load_weights(list(weights.items()), strict=True)
    except Exception as e:
        raise EdgeprefillError(f"cannot load {path}/predictor.safetensors ({type(e).__name__}):"
                               " the artifact is corrupted; re-create it") from None
    pred.set_dtype(base.dtype)
    return aux, pred, card
