"""Torch mirror of edgeprefill.prefill: the same strategies and contract."""

from edgeprefill.mirror.prefill.full import FullPrefill
from edgeprefill.mirror.prefill.kv_prediction import KVPrediction

STRATEGIES = {"full": FullPrefill, "kvp": KVPrediction}

__all__ = ["FullPrefill", "KVPrediction", "STRATEGIES"]
