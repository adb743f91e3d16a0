"""Prefill strategies. Each one has the same contract:

    strategy.prefill(prompt_ids, cache=None, progress=None) -> (cache, logits, stats)

prompt_ids: (N,) int token ids (a list or an mx.array) to add to `cache` (None: a new cache).
cache: per-layer KV caches, ready for decoding at offset + N.
logits: (V,) float32 logits of the first output token.
stats: PrefillStats.
"""

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.base import PrefillStats, PromptCache
from edgeprefill.prefill.full import FullPrefill
from edgeprefill.prefill.kv_prediction import KVPrediction

STRATEGIES = {"full": FullPrefill, "kvp": KVPrediction}


def make_kvp(model, artifact=None, **options):
    """KV Prediction from an artifact folder (checked against `model`)."""
    from pathlib import Path

    from edgeprefill.kvp.artifact import load_artifact

    if artifact is None or not Path(artifact).exists():
        raise EdgeprefillError(
            f"no KV Prediction artifact at {artifact}: run `edgeprefill kvp fit` (or "
            "`make kvp-default` for the default model) or pass --kvp FOLDER")
    aux, predictor, _ = load_artifact(artifact, model)
    return KVPrediction(model, aux, predictor, **options)


def make_strategy(name, model, **options):
    """Build the named prefill strategy over a Transformer.

    kvp takes `artifact` (a folder made by `edgeprefill kvp fit`).
    """
    if name == "kvp":
        return make_kvp(model, **options)
    if name not in STRATEGIES:
        raise EdgeprefillError(
            f"unknown strategy '{name}': choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](model, **options)


__all__ = ["PrefillStats", "PromptCache", "FullPrefill", "STRATEGIES", "make_strategy"]
