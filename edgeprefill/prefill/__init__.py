"""Prefill strategies. Each one has the same contract:

    strategy.prefill(prompt_ids, cache=None, progress=None) -> (cache, logits, stats)

prompt_ids: (N,) int token ids (a list or an mx.array) to add to `cache` (None: a new cache).
cache: per-layer KV caches, ready for decoding at offset + N.
logits: (V,) float32 logits of the first output token.
stats: PrefillStats.

Every strategy is declared once, in registry.py; `build(name, lm, **options)` makes one.
"""

from edgeprefill.prefill.aux_only import AuxOnly
from edgeprefill.prefill.base import PrefillStats, PromptCache
from edgeprefill.prefill.full import FullPrefill, MlxLmPrefill
from edgeprefill.prefill.gemfilter import GemFilter
from edgeprefill.prefill.kv_prediction import KVPrediction
from edgeprefill.prefill.lazy import SCHEDULES, LazyPrefill
from edgeprefill.prefill.registry import STRATEGIES, build, build_mirror, names, parse
from edgeprefill.prefill.runahead import StreamRunahead
from edgeprefill.prefill.specprefill import KVPSpecPrefill, SpecPrefill

__all__ = ["PrefillStats", "PromptCache", "FullPrefill", "MlxLmPrefill", "AuxOnly",
           "KVPrediction", "LazyPrefill", "GemFilter", "SpecPrefill", "KVPSpecPrefill", "SCHEDULES", "StreamRunahead", "STRATEGIES", "build",
           "build_mirror", "names", "parse"]
