"""Prompt caches: mlx-lm's file format both ways, longest-common-prefix reuse, and refusals
(another model, another tokenizer, a damaged file, a budget) that write nothing."""
import json

import mlx.core as mx
import pytest
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from edgeprefill.cache import common_prefix, load_cache, reuse, save_cache
from edgeprefill.errors import EdgeprefillError
from edgeprefill.generate import generate
from edgeprefill.loading import load
from edgeprefill.prefill import FullPrefill
from edgeprefill.prefill.registry import build

DOC = [5, 17, 200, 3, 99, 42, 7, 300, 11, 12, 13, 250, 8, 64, 128, 33]


def _greedy(lm, ids, cache=None, n=5):
    return generate(lm.model, lm.tokenizer, ids, FullPrefill(lm.model), cache=cache,
                    max_tokens=n).tokens


def _mlx_lm_greedy(lm, cache, ids, n=5):
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(ids), lm.mlx_model, prompt_cache=cache,
                                        max_tokens=n)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_our_file_continues_in_mlx_lm_and_matches_a_cold_prefill(tiny_models, family, tmp_path):
    lm = load(str(tiny_models[family]))
    path = tmp_path / "c.safetensors"
    cache, _, _ = FullPrefill(lm.model).prefill(DOC)
    nbytes = save_cache(path, lm, cache, DOC)
    assert 0 < nbytes < path.stat().st_size + 1 and not list(tmp_path.glob(".*"))
    layers, meta = load_prompt_cache(str(path), return_metadata=True)
    assert meta["model"] == str(lm.path) and json.loads(meta["edgeprefill"])["exact"] is True
    question = [21, 90, 14, 6]
    cold = _greedy(lm, DOC + question)
    assert _mlx_lm_greedy(lm, layers, question) == cold


def test_mlx_lm_file_loads_here_and_the_prompt_continues_it(tiny_models, tmp_path):
    lm = load(str(tiny_models["llama"]))
    path = tmp_path / "m.safetensors"
    c = make_prompt_cache(lm.mlx_model)
    lm.mlx_model(mx.array([DOC]), cache=c)
    save_prompt_cache(str(path), c, {"model": str(lm.path), "tokenizer_config": "{}"})
    cache, info = load_cache(path, lm)
    assert info["strategy"] == "mlx-lm" and info["tokens"] is None
    question = [21, 90, 14, 6]
    cache, rest, reused = reuse(cache, info, question)
    assert rest == question and reused == len(DOC)
    assert _greedy(lm, rest, cache) == _greedy(lm, DOC + question)


def test_longest_common_prefix_is_reused_and_the_rest_prefilled(tiny_models, tmp_path):
    lm = load(str(tiny_models["qwen2"]))
    path = tmp_path / "c.safetensors"
    first = DOC + [21, 90, 14]
    cache, _, _ = FullPrefill(lm.model).prefill(first)
    save_cache(path, lm, cache, first)
    second = DOC + [77, 78, 79, 80]
    cache, info = load_cache(path, lm)
    cache, rest, reused = reuse(cache, info, second)
    assert reused == len(DOC) == common_prefix(first, second) and rest == [77, 78, 79, 80]
    assert cache[0].offset == len(DOC)
    assert _greedy(lm, rest, cache) == _greedy(lm, second)
    # the same prompt again: every token but the last is reused (its logits are needed)
    cache, info = load_cache(path, lm)
    cache, rest, reused = reuse(cache, info, first)
    assert reused == len(first) - 1 and rest == first[-1:]


def test_approximate_caches_are_marked_and_position_skipping_ones_refused(tiny_models, tmp_path):
    lm = load(str(tiny_models["llama"]))
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.prefill.kv_prediction import KVPrediction

    aux, pred = build_predictor(lm.model, "T-0.50", "hidden")
    cache, _, _ = KVPrediction(lm.model, aux, pred, tail=2).prefill(DOC)
    save_cache(tmp_path / "k.safetensors", lm, cache, DOC, "kvp", exact=False)
    _, info = load_cache(tmp_path / "k.safetensors", lm)
    assert info["exact"] is False and info["strategy"] == "kvp"
    for name in ("lazy-aggressive", "gemfilter"):
        cache, _, _ = build(name, lm, **({"keep": 0.5} if name == "gemfilter" else {})).prefill(DOC)
        with pytest.raises(EdgeprefillError, match="skips prompt positions"):
            save_cache(tmp_path / "x.safetensors", lm, cache, DOC, name, exact=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_refusals_name_the_problem_and_write_nothing(tiny_models, tmp_path):
    lm = load(str(tiny_models["llama"]))
    other = load(str(tiny_models["qwen3"]))
    path = tmp_path / "c.safetensors"
    cache, _, _ = FullPrefill(lm.model).prefill(DOC)
    with pytest.raises(EdgeprefillError, match="budget"):
        save_cache(path, lm, cache, DOC, max_bytes=100)
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(EdgeprefillError, match=".safetensors"):
        save_cache(tmp_path / "c.bin", lm, cache, DOC)
    save_cache(path, lm, cache, DOC)
    with pytest.raises(EdgeprefillError, match="made for"):
        load_cache(path, other)
    with pytest.raises(EdgeprefillError, match="no prompt cache"):
        load_cache(tmp_path / "missing.safetensors", lm)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EdgeprefillError, match="not a readable prompt cache"):
        load_cache(bad, lm)
    bad.write_bytes(path.read_bytes()[:-64])  # the header whole, the last array cut off
    with pytest.raises(EdgeprefillError, match="not a readable prompt cache"):
        load_cache(bad, lm)
    # an mlx-lm cache of another shape
    from edgeprefill.models.random import SHAPES, random_model_folder

    small = load(str(random_model_folder(tmp_path / "m3", shape={**SHAPES["tiny"],
                                                                 "num_hidden_layers": 3})))
    c = make_prompt_cache(small.mlx_model)
    small.mlx_model(mx.array([DOC]), cache=c)
    save_prompt_cache(str(tmp_path / "o.safetensors"), c, {"model": "x", "tokenizer_config": "{}"})
    with pytest.raises(EdgeprefillError, match="does not fit"):
        load_cache(tmp_path / "o.safetensors", lm)


def test_prefix_cache_in_memory_reuses_turns_and_stays_in_budget(tiny_models):
    import edgeprefill
    from edgeprefill.cache import PrefixCache

    lm = edgeprefill.load(str(tiny_models["llama"]))
    pc = PrefixCache()
    doc = "The river Danube flows through ten countries. " * 5
    runs = []
    for q in ("How many countries?", "Which river?", "How many countries?"):
        last = None
        for r in edgeprefill.stream_generate(lm, doc + q, max_tokens=4, prompt_cache=pc):
            last = r
        runs.append(last.stats)
    assert runs[0]["cached_tokens"] == 0
    assert runs[1]["cached_tokens"] > 20 and runs[1]["cache_exact"] is True
    assert runs[2]["cached_tokens"] > runs[1]["cached_tokens"]  # the same question again
    assert len(pc) == 2 and pc.nbytes <= pc.max_bytes  # the repeated turn replaced its entry
    # the answers equal the cold ones
    for q in ("How many countries?", "Which river?"):
        assert edgeprefill.generate(lm, doc + q, max_tokens=4, prompt_cache=pc) == \
            edgeprefill.generate(lm, doc + q, max_tokens=4)
    # a budget for one entry keeps only the newest; a position-skipping cache is not kept
    small = PrefixCache(max_bytes=int(pc.nbytes * 0.75))  # room for one entry, not two
    for q in ("a", "b"):
        edgeprefill.generate(lm, doc + q, max_tokens=2, prompt_cache=small)
    assert len(small) == 1 and small.nbytes <= small.max_bytes
    lazy = PrefixCache()
    edgeprefill.generate(lm, doc, max_tokens=2, strategy="lazy", prompt_cache=lazy)
    assert len(lazy) == 0


def test_prefix_cache_keeps_exact_answers_exact_and_drops_entries_a_turn_extends(tiny_models):
    import edgeprefill
    from edgeprefill.cache import PrefixCache
    from edgeprefill.prefill import FullPrefill

    lm = edgeprefill.load(str(tiny_models["llama"]))
    ids = list(range(5, 45))
    full = FullPrefill(lm.model)

    def cache_of(n):
        c = full.prefill(ids[:n])[0]
        c.tokens = ids[:n]
        return c

    pc = PrefixCache()
    assert pc.store(cache_of(30), "kvp", exact=False)
    # an exact lookup skips the approximate entry; an approximate one takes it
    assert pc.lookup(ids, exact_only=True) == (None, None)
    c, info = pc.lookup(ids)
    assert len(c.tokens) == 30 and info["exact"] is False
    # an exact store of the same tokens replaces it; an approximate store does not replace that
    assert pc.store(cache_of(30), "full", exact=True) and len(pc) == 1
    assert pc.store(cache_of(30), "kvp", exact=False) and len(pc) == 1
    assert pc.lookup(ids, exact_only=True)[1]["exact"] is True
    # a longer exact entry that extends it replaces it (its lookups are served by the new one)
    assert pc.store(cache_of(36), "full", exact=True) and len(pc) == 1
    c, _ = pc.lookup(ids[:31] + [3], exact_only=True)
    assert len(c.tokens) == 31  # trimmed from the 36-token entry
    # an approximate extension keeps the exact prefix beside it
    assert pc.store(cache_of(40), "kvp", exact=False) and len(pc) == 2
    assert len(pc.lookup(ids + [1], exact_only=True)[0].tokens) == 36
    assert pc.nbytes == sum(e[1] for e in pc.entries.values())


def test_an_approximate_strategy_reuses_a_prefix_only_where_full_on_the_rest_is_cheaper(
        tiny_models):
    import edgeprefill
    from edgeprefill.cache import PrefixCache

    lm = edgeprefill.load(str(tiny_models["llama"]))
    pc = PrefixCache()
    doc = "The river Danube flows through ten countries. " * 8
    edgeprefill.generate(lm, doc + "Which river?", max_tokens=2, prompt_cache=pc)

    def last(prompt):
        for r in edgeprefill.stream_generate(lm, prompt, strategy="lazy", max_tokens=2,
                                             prompt_cache=pc):
            pass
        return r
    # the same long document: full on the few new tokens beats lazy on the whole prompt
    warm = last(doc + "How many countries?")
    assert warm.stats["cached_tokens"] > 100 and warm.strategy == "full"
    # only the chat template's header is shared: lazy runs on the whole prompt itself
    cold = last("An unrelated question about clouds and rain, asked at some length. " * 3)
    assert cold.stats["cached_tokens"] == 0 and cold.strategy == "lazy"


def test_a_reused_prefix_never_writes_into_the_entry_it_came_from(tiny_models):
    """mlx-lm appends with item assignment, which changes an array object in place: the copy
    a lookup hands out must not share array objects with the stored entry (it did once, and a
    repeated prompt then decoded over another request's tokens)."""
    import mlx.core as mx
    import numpy as np

    import edgeprefill
    from edgeprefill.cache import PrefixCache
    from edgeprefill.prefill import FullPrefill

    lm = edgeprefill.load(str(tiny_models["llama"]))
    full = FullPrefill(lm.model)
    ids = list(range(5, 45))
    cache = full.prefill(ids)[0]
    cache.tokens = list(ids)
    pc = PrefixCache()
    pc.store(cache)
    before = [np.array(c.keys) for c in next(iter(pc.entries.values()))[0]]
    reused, _ = pc.lookup(ids[:30] + [7, 8, 9])  # trimmed to 30, then extended by 3
    full.prefill([7, 8, 9], cache=reused)
    mx.eval([c.keys for c in reused])
    after = [np.array(c.keys) for c in next(iter(pc.entries.values()))[0]]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # the same prompt again, through the API: the same answer as cold
    prompt = "The river Danube flows through ten countries. Which river?"
    cold = edgeprefill.generate(lm, prompt, max_tokens=6)
    pc = PrefixCache()
    edgeprefill.generate(lm, prompt, max_tokens=6, prompt_cache=pc)
    edgeprefill.generate(lm, prompt[:-6] + "Which sea?", max_tokens=6, prompt_cache=pc)
    assert edgeprefill.generate(lm, prompt, max_tokens=6, prompt_cache=pc) == cold


def test_aux_only_keeps_out_of_the_base_models_prompt_caches(tiny_models, tmp_path):
    """aux-only's cache is the aux model's: storing it once made the next request crash."""
    import edgeprefill
    from edgeprefill.cache import PrefixCache, save_cache
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.prefill.aux_only import AuxOnly

    lm = edgeprefill.load(str(tiny_models["llama"]))
    mx.random.seed(0)
    aux, _ = build_predictor(lm.model, "T-0.50", "hidden")
    aux_only = AuxOnly(lm.model, aux)
    pc = PrefixCache()
    prompt = "The river Danube flows through ten countries. " * 4
    edgeprefill.generate(lm, prompt + "Which?", strategy=aux_only, max_tokens=3, prompt_cache=pc)
    assert len(pc) == 0
    edgeprefill.generate(lm, prompt + "How?", max_tokens=3, prompt_cache=pc)  # full: stored
    for r in edgeprefill.stream_generate(lm, prompt + "Why?", strategy=aux_only, max_tokens=3,
                                         prompt_cache=pc):
        pass
    assert r.stats["cached_tokens"] == 0 and r.strategy == "aux-only" and len(pc) == 1
    full = FullPrefill(lm.model).prefill(DOC)[0]
    save_cache(tmp_path / "c.safetensors", lm, full, DOC)
    with pytest.raises(EdgeprefillError, match="its own model"):
        edgeprefill.generate(lm, DOC + [5], strategy=aux_only, prompt_cache=tmp_path / "c.safetensors")


def test_stop_sequences_hold_back_partial_matches_and_cut_the_text():
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.generate import StopScanner, check_stop

    scan = StopScanner(["END", "\n\n"])
    shown = [scan.feed(s) for s in ("Hello E", "N", "ough. E", "ND and more")]
    assert [o for o, _ in shown] == ["Hello ", "", "ENough. ", ""]
    assert shown[-1][1] is True and scan.text == "Hello ENough. "
    scan = StopScanner(["<|x|>"])
    assert scan.feed("a <|") == ("a ", False)
    assert scan.flush("y") == ("<|y", False) and scan.text == "a <|y"
    assert check_stop(None) == [] and check_stop("x") == ["x"]
    for bad in (["a", ""], ["a"] * 5, [1], 3):
        with pytest.raises(EdgeprefillError, match="stop"):
            check_stop(bad)


def test_generate_stops_at_a_stop_sequence_and_keeps_the_cache(tiny_models):
    import edgeprefill
    from edgeprefill.cache import PrefixCache

    lm = edgeprefill.load(str(tiny_models["llama"]))
    free = edgeprefill.generate(lm, "Tell me a story.", max_tokens=12)
    assert len(free) > 4
    stop = free[3:5]
    pc = PrefixCache()
    last, text = None, ""
    for r in edgeprefill.stream_generate(lm, "Tell me a story.", max_tokens=12, stop=[stop],
                                         prompt_cache=pc):
        text += r.text
        last = r
    assert text == free[:free.index(stop)] and last.finish_reason == "stop"
    assert len(pc) == 1  # a stopped answer still leaves its prompt cached


def test_healing_replaces_a_kvp_cache_by_the_exact_one_and_kvp_continues(tiny_models):
    from edgeprefill.cache import Healer, heal
    from edgeprefill.conversation import Conversation
    from edgeprefill.kvp.pairs import build_predictor
    from edgeprefill.prefill.kv_prediction import KVPrediction

    lm = load(str(tiny_models["llama"]))
    m = lm.model
    mx.random.seed(0)
    aux, pred = build_predictor(m, "T-0.50", "hidden")
    kvp = KVPrediction(m, aux, pred, tail=2)
    approx, _, _ = kvp.prefill(DOC)
    exact, _, _ = FullPrefill(m).prefill(DOC)
    last = m.n_layers - 1
    gap = lambda c: float(mx.abs(c[last].keys_and_values()[0] - exact[last].keys_and_values()[0]).max())  # noqa: E731
    assert gap(approx) > 1e-3
    healed = heal(lm, approx)
    assert gap(healed) < 1e-5 and healed.aux is approx.aux and healed.tokens == DOC
    # in the background: ready at the boundary, refused when the cache moved on
    h = Healer(lm, approx)
    h.wait()
    assert gap(h.take(approx)) < 1e-5
    moved = kvp.prefill([7, 8], cache=approx)[0]
    assert h.take(moved) is None
    # a conversation: kvp turns, healed between turns, and kvp still continues after it
    conv = Conversation(lm, "kvp", build=lambda name: kvp)
    conv.auto_heal = True
    for text in ("first question about rivers", "and a second one"):
        ids, new = conv.prompt_ids(text)
        r = generate(m, lm.tokenizer, new, conv.strategy, cache=conv.cache, max_tokens=3)
        conv.finish_turn(text, r.text, r)
        assert conv.exact is False and conv.healer is not None
        conv.healer.wait()
    conv._swap_healed()
    assert conv.exact is True and conv.cache.aux is not None
    ref, _, _ = FullPrefill(m).prefill(conv.cache.tokens)
    assert float(mx.abs(conv.cache[last].keys_and_values()[0]
                        - ref[last].keys_and_values()[0]).max()) < 1e-5


def test_kv_bits_quantize_the_cache_decoding_reads(tmp_path):
    from mlx_lm.models.cache import QuantizedKVCache

    from edgeprefill.cache import quantize
    from edgeprefill.models.random import SHAPES, random_model_folder

    shape = {**SHAPES["tiny"], "hidden_size": 128}  # head dim 32: a quantization group
    lm = load(str(random_model_folder(tmp_path / "m", shape=shape)))
    ids = DOC * 4
    exact = generate(lm.model, lm.tokenizer, ids, FullPrefill(lm.model), max_tokens=6)
    for bits in (8, 4):
        r = generate(lm.model, lm.tokenizer, ids, FullPrefill(lm.model), max_tokens=6,
                     kv_bits=bits)
        assert all(isinstance(c, QuantizedKVCache) and c.bits == bits for c in r.cache)
        assert r.cache[0].offset == len(ids) + 5 and len(r.tokens) == 6
    assert r.tokens[0] == exact.tokens[0]  # the first token comes from the exact prefill
    cache, _, _ = build("lazy", lm).prefill(ids)
    with pytest.raises(EdgeprefillError, match="--kv-bits"):
        quantize(cache, 8)
    with pytest.raises(EdgeprefillError, match="4 or 8"):
        quantize(FullPrefill(lm.model).prefill(ids)[0], 3)


def test_quantized_caches_round_trip_through_files_both_ways(tmp_path):
    from mlx_lm.models.cache import QuantizedKVCache

    from edgeprefill.cache import quantize
    from edgeprefill.models.random import SHAPES, random_model_folder

    lm = load(str(random_model_folder(tmp_path / "m", shape={**SHAPES["tiny"],
                                                             "hidden_size": 128})))
    cache, _, _ = FullPrefill(lm.model).prefill(DOC)
    quantize(cache, 8)
    path = tmp_path / "q.safetensors"
    save_cache(path, lm, cache, DOC, "full", exact=False)
    layers = load_prompt_cache(str(path))  # mlx-lm reads it
    assert isinstance(layers[0], QuantizedKVCache) and layers[0].bits == 8
    loaded, info = load_cache(path, lm)
    assert info["exact"] is False and loaded[0].offset == len(DOC)
    question = [21, 90, 14, 6]
    loaded, rest, n = reuse(loaded, info, DOC + question)
    assert n == len(DOC) and rest == question
    assert len(_greedy(lm, rest, loaded)) == 5
