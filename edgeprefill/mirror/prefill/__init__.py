"""Torch mirror of edgeprefill.prefill: the same strategies and contract."""

from edgeprefill.mirror.prefill.full import FullPrefill
from edgeprefill.mirror.prefill.kv_prediction import KVPrediction
from edgeprefill.mirror.prefill.lazy import LazyPrefill

STRATEGIES = {"full": FullPrefill, "kvp": KVPrediction, "lazy": LazyPrefill}

__all__ = ["FullPrefill", "KVPrediction", "LazyPrefill", "STRATEGIES"]
