"""Torch mirror of the MLX path: same families, same per-layer API, same file layout.

It runs in CI, gives GPU timings on NVIDIA machines, and is the source of the Core ML export.
"""
