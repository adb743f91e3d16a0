"""The public Python API (load, generate, stream_generate, prefill) and its hand-off to mlx-lm."""
import numpy as np
import pytest

import edgeprefill


PROMPT = list(range(3, 43))  # 40 token ids


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return edgeprefill.load(str(tiny_models["llama"]))


def test_worker_strategies_keep_the_contract_and_sample_like_any_other(tiny):
    """runahead prefills on two worker processes; its cache and logits come back as arrays, so
    greedy decoding equals full's and temperature sampling runs (the pool is closed after)."""
    full = edgeprefill.generate(tiny, PROMPT, max_tokens=6)
    assert edgeprefill.generate(tiny, PROMPT, strategy="runahead", workers=2, max_tokens=6) == full
    r = edgeprefill.prefill(tiny, PROMPT, strategy="runahead", workers=2)
    ref = edgeprefill.prefill(tiny, PROMPT)
    np.testing.assert_allclose(np.array(r.logits), np.array(ref.logits), atol=1e-4)
    assert r.stats.extra["workers"] == 2 and r.cache[0].offset == ref.cache[0].offset
    text = edgeprefill.generate(tiny, PROMPT, strategy="runahead", workers=2, max_tokens=6,
                                temp=0.8, seed=3)
    assert isinstance(text, str)
