"""`edgeprefill generate` as a user runs it: streamed text, --json stats, stdin, bad input."""
from edgeprefill.generate import generate
from edgeprefill.loading import load
from edgeprefill.prefill import build


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax(tiny_models):
    lm = load(str(tiny_models["llama"]))
    ids = lm.tokenizer.encode("the quick brown fox jumps")
    full = build("full", lm)
    a = generate(lm.model, lm.tokenizer, ids, full, max_tokens=12, temp=1.0, seed=3)
    b = generate(lm.model, lm.tokenizer, ids, full, max_tokens=12, temp=1.0, seed=3)
    assert a.tokens == b.tokens
    greedy = generate(lm.model, lm.tokenizer, ids, full, max_tokens=3)
    import mlx.core as mx

    first = int(mx.argmax(lm.model(mx.array([ids]))[0, -1]))
    assert greedy.tokens[0] == first


def test_eos_stops_generation(tiny_models):
    lm = load(str(tiny_models["llama"]))
    ids = lm.tokenizer.encode("the quick brown fox")
    full = build("full", lm)
    # Make the greedy first token the EOS token: generation must stop right there.
    first = generate(lm.model, lm.tokenizer, ids, full, max_tokens=1).tokens[0]
    lm.tokenizer._eos_token_ids = {first}
    r = generate(lm.model, lm.tokenizer, ids, full, max_tokens=10)
    assert r.finish_reason == "eos" and r.tokens == [first] and r.text == ""


def test_multi_turn_extends_the_cache(tiny_models):
    lm = load(str(tiny_models["llama"]))
    full = build("full", lm)
    one = lm.tokenizer.encode("the quick brown fox")
    r1 = generate(lm.model, lm.tokenizer, one, full, max_tokens=4)
    two = lm.tokenizer.encode(" jumps over")
    r2 = generate(lm.model, lm.tokenizer, two, full, cache=r1.cache, max_tokens=2)
    assert r2.prefill.prompt_tokens == len(two)
    assert r2.prefill.context_tokens == len(one) + len(r1.tokens) - 1 + len(two)
