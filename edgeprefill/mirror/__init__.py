"""Torch mirror of the MLX path: same families, same per-layer API, same files and class names.

It runs in CI, gives GPU timings on NVIDIA machines, trains KV Prediction pairs on a GPU, and is
the source of the Core ML export. Layout, file for file with edgeprefill/: models/transformer.py,
loading.py, prefill/{full,kv_prediction,lazy}.py (the strategies the registry gives a mirror),
kvp/{aux,predictor,train}.py. One rule for sharing code with the MLX side: framework-free logic
(schedules, layer maps, predictor plans, the lazy algorithm over an ops table, the training loop)
lives in the MLX module of the same name and the mirror imports or subclasses it; tensor code is
written for each. Weights cross in one module, convert.py.
"""
