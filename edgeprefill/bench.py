"""What the benchmarks run on: prompt sets of a given length, and random KV Prediction pairs
for speed-only runs of random-weight shapes (the bench and runahead commands share them)."""


def bench_prompt_sets(lm, n, count, continuation, random_tokens, seed=0):
    """[(prompt ids, continuation ids)] of held-out text, or random tokens (no continuation)."""
    import numpy as np

    if random_tokens:
        rng = np.random.default_rng((seed, n))
        vocab = min(lm.model.vocab_size, len(lm.tokenizer.vocab) if hasattr(
            lm.tokenizer, "vocab") else lm.model.vocab_size)
        return [(rng.integers(3, max(4, vocab), size=n).tolist(), []) for _ in range(count)]
    from edgeprefill.data import bench_prompts

    return [(ids[:n], ids[n:]) for ids in bench_prompts(lm.tokenizer, n, count, continuation)]


def random_kvp_pair(lm, aux_shape, dtype):
    """(aux, predictor) of random weights for speed-only kvp runs: a KVP-C aux of `aux_shape`
    (same random tokenizer), else the base's first half (T-0.50) with a hidden-state predictor."""
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.kvp.aux import AuxModel
    from edgeprefill.kvp.layer_map import compact_layer_map
    from edgeprefill.kvp.predictor import KVPredictor
    from edgeprefill.models.random import load_random

    base = lm.model
    if not aux_shape:
        aux, pred = build_predictor(base, "T-0.50", "hidden")
    else:
        small = load_random(aux_shape, dtype=dtype, seed=1).model
        aux = AuxModel(small, range(small.n_layers), "C")
        pred = KVPredictor(compact_layer_map(base.n_layers, small.n_layers), aux.kv_dim,
                           base.n_kv_heads, base.head_dim)
    pred.set_dtype(base.dtype)
    return aux, pred
