"""Long-prompt tasks: the generators (seeded, the asked length, the answer placed once) and the
scoring (exact match of every answer, code-line's first line, Wilson interval, x full)."""

import json

import pytest

from edgeprefill.errors import EdgeprefillError
from edgeprefill.loading import load
from edgeprefill.tasks import (TASKS, make_rows, read_task_rows, row_ids, score_output,
                               summarize_rows)


@pytest.fixture(scope="module")
def tok(tiny_models):
    return load(str(tiny_models["llama"])).tokenizer


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n", [800, 1600])
def test_rows_are_seeded_and_as_long_as_asked(tok, task, n):
    rows = make_rows(tok, task, n, 3, haystack="prose", seed=1)
    assert rows == make_rows(tok, task, n, 3, haystack="prose", seed=1)
    assert rows != make_rows(tok, task, n, 3, haystack="prose", seed=2)
    for r in rows:
        assert abs(len(row_ids(tok, r)) - n) <= 0.02 * n and r["prompt_tokens"] == len(
            row_ids(tok, r))


@pytest.mark.parametrize("haystack", ["filler", "prose", "code"])
@pytest.mark.parametrize("task", ["niah-single", "niah-multikey", "niah-multivalue"])
def test_each_needle_value_is_in_the_prompt_once(tok, task, haystack):
    for r in make_rows(tok, task, 800, 4, haystack=haystack):
        for a in r["answers"]:
            assert r["prompt"].count(a) == 1, (a, haystack)
        assert r["answer_prefix"] and r["chat"]


def test_vartrack_chains_its_names_in_order_and_code_line_is_the_next_line(tok):
    for r in make_rows(tok, "vartrack", 800, 3, haystack="filler"):
        names = r["answers"]
        value = r["answer_prefix"].split("value ")[1].split(",")[0]
        assert r["prompt"].count(f"VAR {names[0]} = {value}.") == 1
        pos = [r["prompt"].index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
        assert pos == sorted(pos) and r["prompt"].index(value) < pos[0]
    for r in make_rows(tok, "vartrack-1", 800, 3, haystack="prose"):
        (name,) = r["answers"]
        value = r["answer_prefix"].split("value ")[1].split(" ")[0]
        assert r["prompt"].count(f"VAR {name} = {value}.") == 1 and "VAR" not in r[
            "prompt"].replace(f"VAR {name} = {value}.", "")
        assert r["answer_prefix"].endswith("is VAR")
    assert [len(r["answers"]) for r in make_rows(tok, "vartrack-3", 800, 2)] == [3, 3]
    for bad in ("vartrack-0", "vartrack-6", "vartrack-x", "needle"):
        with pytest.raises(EdgeprefillError, match="unknown task"):
            make_rows(tok, bad, 800, 1)
    for r in make_rows(tok, "code-line", 800, 3):
        assert not r["chat"] and r["prompt"].endswith("\n") and r["line"].strip() == r[
            "answers"][0]


def test_scoring_needs_every_answer_and_compares_code_lines_exactly():
    row = {"task": "niah-multivalue", "answers": ["1234567", "7654321"]}
    assert score_output(row, " 1234567, 7654321.")["match"] == 1.0
    assert score_output(row, " 1234567 and 765432")["match"] == 0.0
    code = {"task": "code-line", "answers": ["x = f(1)"], "line": "    x = f(1)"}
    assert score_output(code, "    x = f(1)\nmore")["match"] == 1.0
    miss = score_output(code, "x = f(2)\n")
    assert miss["match"] == 0.0 and 0.8 < miss["similarity"] < 1.0
    res = [{"match": m, "ttft_s": 1.0} for m in (1, 1, 0, 1)]
    full = [{"match": m, "ttft_s": 2.0} for m in (1, 1, 1, 1)]
    s = summarize_rows(res, full)
    assert s["accuracy"] == 0.75 and s["accuracy_full"] == 1.0 and s["relative_accuracy"] == 0.75
    lo, hi = s["accuracy_ci95"]
    assert 0.2 < lo < 0.75 < hi < 1.0


def test_bad_task_names_and_user_rows_get_one_line_errors(tok, tmp_path):
    with pytest.raises(EdgeprefillError, match="unknown task 'warp'"):
        make_rows(tok, "warp", 300, 1)
    with pytest.raises(EdgeprefillError, match="unknown haystack"):
        make_rows(tok, "niah-single", 300, 1, haystack="sand")
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"prompt": "Say 42.", "answer": "42"}) + "\n"
                 + json.dumps({"prompt": "Two numbers", "answer": ["1", "2"], "chat": False}))
    rows = read_task_rows(f)
    assert rows[0]["answers"] == ["42"] and rows[1]["answers"] == ["1", "2"]
    assert rows[0]["chat"] and not rows[1]["chat"]
    f.write_text(json.dumps({"prompt": "no answer"}))
    with pytest.raises(EdgeprefillError, match=r'rows.jsonl:1 needs a non-empty "prompt" and'):
        read_task_rows(f)


def test_decoding_stops_only_where_more_text_cannot_change_the_score():
    from edgeprefill.tasks import answered

    rows = [{"task": "niah-multivalue", "answers": ["1234567", "7654321"]},
            {"task": "code-line", "answers": ["x = f(1)"], "line": "    x = f(1)"}]
    texts = ["", " 1234567", " 1234567, 7654321", " 1234567, 7654321.\n", "\n", "\n\n    x = f",
             "\n\n    x = f(1)", "\n\n    x = f(1)\n", "x = f(2)\ny"]
    for row in rows:
        for t in texts:
            if answered(row, t):
                for more in ("", " 1234567", "\nx = f(1)", "zz\n"):
                    assert score_output(row, t + more) == score_output(row, t), (row, t, more)
    assert answered(rows[0], texts[2]) and not answered(rows[0], texts[1])
    assert answered(rows[1], texts[7]) and not answered(rows[1], texts[6])
