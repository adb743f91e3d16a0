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


PARALLEL_STRATEGIES = ("runahead", "tsp", "runahead-kvp")  # prefill on worker processes
KVP_STRATEGIES = ("kvp", "aux-only", "runahead-kvp")  # take a KV Prediction pair


def check_kvp_tail(tail):
    """Refuse a kvp tail that is not an integer >= 1 (None: the pair's card decides)."""
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
        raise EdgeprefillError(f"--kvp-tail must be >= 1 (got {tail!r}): pass a whole number "
                               "of tokens")


def pair_options(lm, name, kvp=None, kvp_tail=None, say=None):
    """make_strategy options that pick a kvp pair: `kvp` (a pair folder; default: the model's
    pair, installed on first use for the bundled model) and `kvp_tail` (the base's exact tail;
    default: the pair's card). Empty for strategies that take no pair."""
    if name not in KVP_STRATEGIES:
        return {}
    from edgeprefill.kvp.pairs import ensure_default_pair

    check_kvp_tail(kvp_tail)
    opts = {"tail": kvp_tail} if kvp_tail is not None and name != "aux-only" else {}
    return {"artifact": kvp or ensure_default_pair(lm, say=say), **opts}


def strategy_for(lm, name="full", kvp=None, kvp_tail=None, say=None, **options):
    """The named strategy (the CLI's names) over a loaded model: see make_strategy and
    pair_options. The worker-process strategies are refused here (their launcher is the CLI's).

    Args:
        lm: edgeprefill.loading.LoadedModel.
        name: full, kvp, aux-only, lazy[-<schedule>|-K1:K2:K3], runahead-streams.
    """
    if not isinstance(name, str):
        raise EdgeprefillError(f"strategy must be a name like 'kvp' (got {type(name).__name__})")
    if name in PARALLEL_STRATEGIES:
        raise EdgeprefillError(
            f"strategy '{name}' prefills on worker processes and runs from the command line "
            f"only: use `edgeprefill generate --strategy {name}`, or 'runahead-streams' here")
    return make_strategy(name, lm.model, **pair_options(lm, name, kvp, kvp_tail, say), **options)


__all__ = ["PARALLEL_STRATEGIES", "pair_options", "strategy_for",
           "PrefillStats", "PromptCache", "FullPrefill", "AuxOnly", "KVPrediction",
           "LazyPrefill", "SCHEDULES", "STRATEGIES", "StreamRunahead", "make_strategy"]
