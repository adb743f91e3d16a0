"""Prefill strategies. Each one has the same contract:

    strategy.prefill(prompt_ids, cache=None, progress=None) -> (cache, logits, stats)

prompt_ids: (N,) int token ids (a list or an mx.array) to add to `cache` (None: a new cache).
cache: per-layer KV caches, ready for decoding at offset + N.
logits: (V,) float32 logits of the first output token.
stats: PrefillStats.
"""

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.aux_only import AuxOnly
from edgeprefill.prefill.base import PrefillStats, PromptCache
from edgeprefill.prefill.full import FullPrefill
from edgeprefill.prefill.kv_prediction import KVPrediction
from edgeprefill.prefill.lazy import SCHEDULES, LazyPrefill
from edgeprefill.prefill.runahead import StreamRunahead

STRATEGIES = {"full": FullPrefill, "kvp": KVPrediction, "aux-only": AuxOnly,
              "lazy": LazyPrefill, "runahead-streams": StreamRunahead}


def make_kvp(model, artifact=None, aux_only=False, **options):
    """KV Prediction (or its aux alone) from an artifact folder (checked against `model`)."""
    from pathlib import Path

    from edgeprefill.kvp.artifact import load_artifact

    if artifact is None or not Path(artifact).exists():
        raise EdgeprefillError(
            f"no KV Prediction artifact at {artifact}: run `edgeprefill kvp fit` (or "
            "`make kvp-default` for the default model) or pass --kvp FOLDER")
    aux, predictor, card = load_artifact(artifact, model)
    if aux_only:
        return AuxOnly(model, aux, **options)
    options.setdefault("tail", card.get("tail", 1))
    return KVPrediction(model, aux, predictor, **options)


def make_strategy(name, model, **options):
    """Build the named prefill strategy over a Transformer.

    kvp and aux-only take `artifact` (a folder made by `edgeprefill kvp fit`).
    """
    if name in ("kvp", "aux-only"):
        return make_kvp(model, aux_only=name == "aux-only", **options)
    if name.startswith("lazy-"):  # lazy-<schedule> or lazy-K1:K2:K3
        return LazyPrefill(model, schedule=name[5:], **options)
    if name not in STRATEGIES:
        raise EdgeprefillError(
            f"unknown strategy '{name}': choose one of {', '.join(sorted(STRATEGIES))}, "
            f"or lazy-<schedule> ({', '.join(SCHEDULES)}) or lazy-K1:K2:K3 (the fractions of "
            "tokens kept at 30%, 60% and 90% of the layers)")
    return STRATEGIES[name](model, **options)


__all__ = ["PrefillStats", "PromptCache", "FullPrefill", "AuxOnly", "KVPrediction",
           "LazyPrefill", "SCHEDULES", "STRATEGIES", "StreamRunahead", "make_strategy"]
