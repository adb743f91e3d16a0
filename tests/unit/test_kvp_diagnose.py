"""kvp diagnose: its unrepaired hybrid is kvp itself, its fully repaired one is the exact
prefill, the needle finder points at the needle's tokens, and bad input gets one line."""
import subprocess

import pytest

from edgeprefill.kvp.diagnose import diagnose_rows, layer_parts, needle_positions
from edgeprefill.loading import load
from edgeprefill.prefill import FullPrefill
from edgeprefill.prefill.kv_prediction import KVPrediction
from edgeprefill.tasks import make_rows, row_ids, run_rows

from tests.conftest import CLI


@pytest.fixture(scope="module")
def setup(tiny_models):
    import mlx.core as mx

    from edgeprefill.kvp.pairs import build_predictor

    lm = load(str(tiny_models["llama"]))
    mx.random.seed(0)
    aux, pred = build_predictor(lm.model, "T-0.50", "hidden")
    return lm, KVPrediction(lm.model, aux, pred, tail=3)


def test_needle_positions_cover_the_needle_sentence(setup):
    lm, _ = setup
    for task in ("niah-single", "niah-multikey", "vartrack-1", "vartrack"):
        for row in make_rows(lm.tokenizer, task, 400, 2, haystack="filler"):
            ids = row_ids(lm.tokenizer, row)
            spots = needle_positions(lm.tokenizer, ids)
            text = lm.tokenizer.decode([ids[i] for i in spots])
            for answer in row["answers"]:
                assert answer in text, (task, answer)
            rest = lm.tokenizer.decode([t for i, t in enumerate(ids) if i not in set(spots)])
            assert not any(a in rest for a in row["answers"])
            assert "The grass is green" not in text  # the needles, not the haystack
    assert needle_positions(lm.tokenizer, lm.tokenizer.encode("no needle here")) == []


def test_unrepaired_is_kvp_and_fully_repaired_is_the_exact_prefill(setup):
    lm, kvp = setup
    rows = make_rows(lm.tokenizer, "niah-multikey", 500, 3, haystack="filler")
    out = diagnose_rows(lm, kvp, rows, groups=2)
    v = out["variants"]
    assert [r["output"] for r in v["kvp"]] == [r["output"] for r in run_rows(lm, kvp, rows)]
    full = run_rows(lm, FullPrefill(lm.model), rows)
    assert [r["output"] for r in v["exact"]] == [r["output"] for r in full]
    parts = layer_parts(kvp, 2)
    assert [p[0] for p in parts] == [k for k in v if k.startswith("layers")]
    covered = sorted(i for _, ls in parts for i in ls)
    assert covered == list(range(lm.model.n_layers))
    assert all(n > 0 for n in out["needle_tokens"])
    assert {"needle tokens", "all but needle tokens"} <= set(v)


def test_diagnose_refuses_a_task_without_needles(tiny_models, cli_env):
    for task, msg in (("code-line", "needs a needle task"), ("warp", "unknown task 'warp'")):
        r = subprocess.run([*CLI, "kvp", "diagnose", "--model", str(tiny_models["llama"]),
                            "--task", task], capture_output=True, text=True, env=cli_env)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_healed_first_turn_answers_the_follow_up_as_full_does(setup):
    from edgeprefill.kvp.diagnose import _Prepared  # noqa: F401  (module imports cleanly)
    from edgeprefill.tasks import followup_ids, run_followup

    lm, _ = setup
    rows = make_rows(lm.tokenizer, "niah-multikey", 340, 3, haystack="filler")
    for row in rows:
        first, second = followup_ids(lm.tokenizer, row)
        assert row["followup"]["answers"][0] in row["prompt"]
        assert row["followup"]["answers"] != row["answers"]
        assert second[:len(first) - 3] == first[:len(first) - 3] and len(second) > len(first)
    # the follow-up's new tokens fit the exact tail: after healing, kvp's second turn is exact
    kvp = KVPrediction(setup[1].model, setup[1].aux, setup[1].predictor, tail=160)
    full = run_followup(lm, FullPrefill(lm.model), rows)
    healed = run_followup(lm, kvp, rows, heal=True)
    assert [r["output"] for r in healed] == [r["output"] for r in full]
    assert all(r["first_turn_tokens"] > 300 for r in full)
    assert all(r["prompt_tokens"] - r["first_turn_tokens"] < 160 for r in full)


def test_followup_refuses_rows_without_a_second_question(setup, tiny_models, cli_env):
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.tasks import run_followup

    lm, _ = setup
    rows = make_rows(lm.tokenizer, "niah-single", 500, 1, haystack="filler")
    with pytest.raises(EdgeprefillError, match="use niah-multikey"):
        run_followup(lm, FullPrefill(lm.model), rows)
    r = subprocess.run([*CLI, "eval", "--model", str(tiny_models["llama"]), "--task",
                        "niah-single", "--followup"], capture_output=True, text=True, env=cli_env)
    assert r.returncode != 0 and "--followup needs --task niah-multikey" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_hybrids_take_each_part_from_the_cache_they_name(setup):
    import mlx.core as mx
    import numpy as np

    from edgeprefill.kvp.diagnose import _hybrid
    from edgeprefill.prefill.full import as_token_array

    lm, kvp = setup
    ids = as_token_array(list(range(5, 45)))
    exact = FullPrefill(lm.model).prefill(ids)[0]
    predicted = kvp.predicted_cache(ids)
    n, m, spots = lm.model.n_layers, 40, [3, 4, 20]

    def same(a, b):
        return np.allclose(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))

    cases = [({}, lambda i, t: False), ({"layers": [0]}, lambda i, t: i == 0),
             ({"tokens": spots}, lambda i, t: t in spots),
             ({"tokens": spots, "invert": True}, lambda i, t: t not in spots),
             ({"layers": range(n)}, lambda i, t: True)]
    for how, is_exact in cases:
        h = _hybrid(kvp, exact, predicted, m, **how)
        for i in range(n):
            for t in (0, 3, 20, 39):
                src = exact if is_exact(i, t) else predicted
                for a, b in ((h[i].keys, src[i].keys), (h[i].values, src[i].values)):
                    assert same(a[:, :, t], b[:, :, t]), (how, i, t)
    for i in kvp.predictor.predicted:  # the test means something: the two caches differ there
        assert not same(exact[i].keys[:, :, :m], predicted[i].keys[:, :, :m])


def test_parts_choose_the_hybrids(setup, tiny_models, cli_env):
    lm, kvp = setup
    rows = make_rows(lm.tokenizer, "niah-single", 300, 1, haystack="filler")
    out = diagnose_rows(lm, kvp, rows, parts=("needles",))
    assert list(out["variants"]) == ["kvp", "needle tokens", "all but needle tokens", "exact"]
    r = subprocess.run([*CLI, "kvp", "diagnose", "--model", str(tiny_models["llama"]),
                        "--parts", "layers,heads"], capture_output=True, text=True, env=cli_env)
    assert r.returncode != 0 and "--parts takes layers, needles" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_followup_heals_only_caches_that_can_heal(setup):
    from edgeprefill.prefill.registry import build
    from edgeprefill.tasks import evaluate_followup

    lm, kvp = setup
    rows = make_rows(lm.tokenizer, "niah-multikey", 340, 1, haystack="filler")
    recs = evaluate_followup(lm, {"kvp": kvp, "lazy": build("lazy", lm)}, {340: rows})
    assert [(r["strategy"], r["healed"]) for r in recs] == [
        ("full", False), ("kvp", False), ("kvp", True), ("lazy", False)]
    assert all(r["summary"]["rows"] == 1 for r in recs)
