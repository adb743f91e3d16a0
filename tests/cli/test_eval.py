"""`edgeprefill eval` and `kvp sweep`: quality metrics against the exact prefill."""
import json
import subprocess

import numpy as np

from tests.conftest import CLI


def _cli(args, env, timeout=600):
    return subprocess.run([*CLI, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_eval_cli_reports_every_metric(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    art = tmp_path / "art"
    r = _cli(["kvp", "fit", "--model", model, "--aux", "T-0.50", "--tokens", "300", "--chunk",
              "60", "--eval-pairs", "0", "--out", str(art)], cli_env)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "continuation": c}) for p, c in [
        ("the quick brown fox jumps over", " the lazy dog"),
        ("def add(a, b):\n    return", " a + b\n"),
        ("one two three four five", " six seven")]) + "\n")
    r = _cli(["eval", "--model", model, "--strategy", "full,kvp,aux-only", "--kvp", str(art),
              "--data", str(data), "--greedy-tokens", "4", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res = {x["strategy"]: x for x in out["results"]}
    assert res["full"]["first_token_agreement"] == 1.0 and res["full"]["nll_ratio"] == 1.0
    assert res["full"]["greedy_match"] == 4 and res["full"]["pairs"] == 3
    assert res["full"]["agreement_ci95"][1] == 1.0 and res["full"]["agreement_ci95"][0] < 0.5
    for name in ("kvp", "aux-only"):
        x = res[name]
        assert x["aux"] == "T-0.50" and 0 < x["flops_ratio"] < 1
        for key in ("first_token_kl", "nll", "nll_exact", "nll_ratio", "ttft_s"):
            assert np.isfinite(x[key])
        assert 0 <= x["near_ties"] <= 3 and 0 <= x["misses_second_choice"] <= 3
    assert res["kvp"]["tail"] == 1  # the card's
    # --kvp-tail overrides the card: a tail covering the whole prompt is the exact prefill
    r = _cli(["eval", "--model", model, "--strategy", "kvp", "--kvp", str(art), "--kvp-tail",
              "64", "--data", str(data), "--greedy-tokens", "4", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    x = json.loads(r.stdout)["results"][0]
    assert x["tail"] == 64 and x["first_token_kl"] < 1e-6 and x["nll_ratio"] < 1 + 1e-5
    assert x["flops_ratio"] > res["kvp"]["flops_ratio"]
    r = _cli(["eval", "--model", model, "--kvp", str(art), "--kvp-tail", "0", "--data",
              str(data)], cli_env)
    assert r.returncode == 2 and "argument --kvp-tail: 0 is below 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "continuation": "b"}\n{"prompt": "x"}\n')
    r = _cli(["eval", "--model", model, "--strategy", "full", "--data", str(bad)], cli_env)
    assert r.returncode == 1 and "bad.jsonl:2" in r.stderr and "continuation" in r.stderr
    r = _cli(["eval", "--model", model, "--strategy", "nope", "--data", str(data)], cli_env)
    assert r.returncode == 1 and "unknown strategy 'nope'" in r.stderr
    # the table: agreement with its 95% interval beside it
    r = _cli(["eval", "--model", model, "--strategy", "full", "--data", str(data),
              "--greedy-tokens", "2"], cli_env)
    assert r.returncode == 0, r.stderr
    assert "0.44-1.00" in r.stdout and "95% (Wilson) interval" in r.stdout


def test_sweep_writes_the_pareto_table_and_plot(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    r = _cli(["kvp", "sweep", "--model", model, "--kinds", "T-0.50,LP-0.50", "--pairs", "2",
              "--tokens", "240", "--chunk", "60", "--dir", str(tmp_path / "arts"), "--json",
              str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")], cli_env)
    assert r.returncode == 0, r.stderr
    recs = json.loads((tmp_path / "s.json").read_text())["records"]
    assert {(x["strategy"], x["aux"]) for x in recs} == {
        ("full", "-"), ("kvp", "T-0.50"), ("aux-only", "T-0.50"), ("kvp", "LP-0.50"),
        ("aux-only", "LP-0.50")}
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = _cli(["kvp", "sweep", "--model", model, "--kinds", "Q-0.5"], cli_env)
    assert r.returncode == 1 and "unknown aux kind 'Q-0.5'" in r.stderr


def test_eval_task_scores_greedy_answers_against_full_on_the_same_rows(tiny_models, cli_env,
                                                                       tmp_path):
    model = str(tiny_models["llama"])
    r = _cli(["eval", "--model", model, "--task", "niah-single", "--prompt-tokens", "400",
              "--rows", "3", "--strategy", "full,lazy-aggressive", "--haystack", "filler",
              "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["task"] == "niah-single" and out["command"].startswith("edgeprefill eval")
    recs = {x["strategy"]: x for x in out["records"]}
    assert set(recs) == {"full", "lazy-aggressive"} and recs["full"]["set"] == 400
    for rec in recs.values():
        s = rec["summary"]
        assert s["rows"] == 3 and len(rec["rows"]) == 3 and len(s["accuracy_ci95"]) == 2
        assert all(abs(x["prompt_tokens"] - 400) <= 8 and "output" in x for x in rec["rows"])
    full = recs["full"]["summary"]
    assert full["relative_accuracy"] in (1.0, None)  # None: full answered no row
    # a user's rows with answers are scored the same way
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Repeat: 7", "answer": "7"}) + "\n")
    r = _cli(["eval", "--model", model, "--data", str(data), "--strategy", "full", "--json"],
             cli_env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)["records"][0]
    assert rec["summary"]["rows"] == 1 and rec["rows"][0]["match"] in (0.0, 1.0)
    r = _cli(["eval", "--model", model, "--task", "niah-single", "--prompt-tokens", "99999"],
             cli_env)
    assert r.returncode == 1 and "does not fit the model's context" in r.stderr
