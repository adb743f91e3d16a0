"""KV Prediction artifacts: a folder per (base, aux) pair.

    predictor.safetensors   K and V Linear weights and biases per predicted base layer (and
                            the shared down-projections of a low-rank predictor)
    card.json               base identity and config hash, aux kind and layers, layer map,
                            predictor input ('kv' or 'hidden'), rank (low-rank only) and
                            exact (copied) layers,
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
from edgeprefill.kvp.predictor import SOURCES, KVPredictor, check_rank, input_dim

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


def save_artifact(path, predictor, aux, base, base_id, fit_info, quality=None, tail=1,
                  aux_weights=None):
    """Write an artifact folder atomically; returns its path.

    aux_weights: {'layers.<k>.<name>': array} of trained aux blocks (aux.safetensors), or None
    when the aux is the base's own blocks.
    """
    path = Path(path)
    card = {
        "format": FORMAT,
        "base": {"id": base_id, "config_hash": config_hash(base)},
        "aux": {"kind": aux.kind, "layers": aux.layers,
                "weights": "aux.safetensors" if aux_weights else "base"},
        "tail": tail,
        "layer_map": predictor.layer_map,
        "predictor_input": predictor.source,
        "exact_layers": predictor.exact,
        "fit": fit_info,
        "quality": quality or {},
    }
    if predictor.rank:
        card["predictor_rank"] = predictor.rank
    if aux_weights:  # the blocks trained as copies; the aux's others are the base's own
        card["aux"]["trained_layers"] = sorted({int(n.split(".")[1]) for n in aux_weights})
    if aux.model is not base and not hasattr(aux.model, "copied"):  # KVP-C: its own model
        card["aux"].update(weights="model", model=getattr(aux, "spec", None),
                           config_hash=config_hash(aux.model))
    with atomic_folder(path) as tmp:
        mx.save_safetensors(str(tmp / "predictor.safetensors"),
                            dict(tree_flatten(predictor.parameters())))
        if aux_weights:
            mx.save_safetensors(str(tmp / "aux.safetensors"), dict(aux_weights))
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
    if not isinstance(card, dict):
        raise EdgeprefillError(f"{card_file} holds a {type(card).__name__}, not an object: "
                               "re-create the artifact")
    if card.get("format") != FORMAT:
        raise EdgeprefillError(f"artifact field 'format' is {card.get('format')!r}, expected "
                               f"{FORMAT!r}: re-create it with this version")
    for field, ok, what in CARD_FIELDS:
        value = card
        for key in field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if not ok(value):
            raise EdgeprefillError(f"{card_file}: field '{field}' is {value!r}, expected {what}: "
                                   "re-create the artifact")
    return card


def _int_list(v):
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


# Fields every card must hold: (dotted name, check, what is expected).
CARD_FIELDS = (
    ("base", lambda v: isinstance(v, dict), "an object"),
    ("base.config_hash", lambda v: isinstance(v, str), "a string"),
    ("aux", lambda v: isinstance(v, dict), "an object"),
    ("aux.kind", lambda v: isinstance(v, str), "a string"),
    ("aux.layers", _int_list, "a list of layer indices"),
    ("layer_map", _int_list, "a list of aux layer indices"),
)


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
    if card["aux"].get("weights") != "model" and (not layers or max(layers) >= base.n_layers):
        raise EdgeprefillError("artifact field 'aux.layers' names layers the base lacks: "
                               "re-create the artifact")
    try:
        validate_layer_map(card["layer_map"], base.n_layers, len(layers))
    except ValueError as e:
        raise EdgeprefillError(f"artifact field 'layer_map' is invalid ({e}): re-create it")
    exact = card.get("exact_layers", [])
    if any(layers[:card["layer_map"][i] + 1] != list(range(card["layer_map"][i] + 1))
           for i in exact):
        raise EdgeprefillError("artifact field 'exact_layers' names base layers the aux does "
                               "not compute exactly: re-create the artifact")
    aux = AuxModel(base, layers, card["aux"]["kind"])
    if card["aux"].get("weights") == "model":  # KVP-C
        aux = _load_compact_aux(card, base)
    elif card["aux"].get("weights", "base") != "base":
        from edgeprefill.kvp.train import trainable_aux

        aux = trainable_aux(aux, card["aux"].get("trained_layers"))
        try:
            aux.model.load_aux_weights(mx.load(str(Path(path) / card["aux"]["weights"])))
        except Exception as e:
            raise EdgeprefillError(f"cannot load {path}/{card['aux']['weights']} "
                                   f"({type(e).__name__}): the artifact is corrupted; "
                                   "re-create it") from None
    tail = card.get("tail", 1)
    if not isinstance(tail, int) or tail < 1:
        raise EdgeprefillError(f"artifact field 'tail' is {tail!r}, expected an integer >= 1: "
                               "re-create the artifact")
    source = card.get("predictor_input", "kv")
    if source not in SOURCES:
        raise EdgeprefillError(f"artifact field 'predictor_input' is {source!r}, expected one "
                               f"of {SOURCES}: re-create the artifact")
    rank = card.get("predictor_rank")
    try:
        check_rank(rank, source)
    except ValueError as e:
        raise EdgeprefillError(f"artifact field 'predictor_rank' is invalid ({e}): re-create "
                               "the artifact") from None
    in_dim = input_dim(aux, source)
    pred = KVPredictor(card["layer_map"], in_dim, base.n_kv_heads, base.head_dim, source, exact,
                       rank)
    try:
        weights = mx.load(str(Path(path) / "predictor.safetensors"))
        pred.load_weights(list(weights.items()), strict=True)
    except Exception as e:
        raise EdgeprefillError(f"cannot load {path}/predictor.safetensors ({type(e).__name__}):"
                               " the artifact is corrupted; re-create it") from None
    pred.set_dtype(base.dtype)
    return aux, pred, card


def _load_compact_aux(card, base):
    """The KVP-C aux model named by the card, checked against its recorded hash."""
    from edgeprefill.loading import load

    spec = card["aux"].get("model")
    if not spec:
        raise EdgeprefillError("artifact field 'aux.model' is missing: re-create the artifact")
    lm = load(spec, dtype=str(base.dtype).split(".")[-1])
    got = config_hash(lm.model)
    if got != card["aux"].get("config_hash"):
        raise EdgeprefillError(f"artifact field 'aux.config_hash' is {card['aux'].get('config_hash')}"
                               f" but the aux model at {spec} has {got}: use the model it was "
                               "fitted with or fit a new artifact")
    return AuxModel(lm.model, range(lm.model.n_layers), "C")
