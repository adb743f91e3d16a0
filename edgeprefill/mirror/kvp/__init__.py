"""Torch mirror of edgeprefill.kvp: aux models, predictor, training (for NVIDIA GPUs)."""
