"""Prefill strategies. Each one has the same contract:

    strategy.prefill(prompt_ids, cache=None, progress=None) -> (cache, logits, stats)

prompt_ids: (N,) int token ids (a list or an mx.array) to add to `cache` (None: a new cache).
cache: per-layer KV caches, ready for decoding at offset + N.
logits: (V,) float32 logits of the first output token.
stats: PrefillStats.
"""

from edgeprefill.errors import EdgeprefillError
from edgeprefill.prefill.base import PrefillStats
from edgeprefill.prefill.full import FullPrefill

STRATEGIES = {"full": FullPrefill}


def make_strategy(name, model, **options):
    """Build the named prefill strategy over a Transformer."""
    if name not in STRATEGIES:
        raise EdgeprefillError(
            f"unknown strategy '{name}': choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](model, **options)


__all__ = ["PrefillStats", "FullPrefill", "STRATEGIES", "make_strategy"]
