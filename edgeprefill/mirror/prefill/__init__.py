"""Torch mirror of edgeprefill.prefill: the same strategies and contract."""

from edgeprefill.mirror.prefill.full import FullPrefill
from edgeprefill.mirror.prefill.gemfilter import GemFilter
from edgeprefill.mirror.prefill.kv_prediction import KVPrediction
from edgeprefill.mirror.prefill.lazy import LazyPrefill
from edgeprefill.mirror.prefill.specprefill import KVPSpecPrefill, SpecPrefill

STRATEGIES = {"full": FullPrefill, "kvp": KVPrediction, "lazy": LazyPrefill,
              "gemfilter": GemFilter, "specprefill": SpecPrefill,
              "kvp+specprefill": KVPSpecPrefill}

__all__ = ["FullPrefill", "GemFilter", "KVPrediction", "LazyPrefill", "SpecPrefill",
           "KVPSpecPrefill", "STRATEGIES"]
