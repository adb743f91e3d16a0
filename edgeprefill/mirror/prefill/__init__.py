"""Torch mirror of edgeprefill.prefill: the same strategies and contract."""

from edgeprefill.mirror.prefill.full import FullPrefill

STRATEGIES = {"full": FullPrefill}

__all__ = ["FullPrefill", "STRATEGIES"]
