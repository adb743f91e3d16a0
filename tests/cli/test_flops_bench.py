"""Analytic FLOPs against a hand count, and the benchmark's JSON records."""
import json
import subprocess

from tests.conftest import CLI


def test_bench_json_records_are_complete_and_consistent(tiny_models, cli_env, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([*CLI, "bench", "--model",
                        str(tiny_models["llama"]), "--prompt-tokens", "16,40", "--trials", "2",
                        "--json", str(out)], env=cli_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for key in ("machine", "backend", "device", "mlx", "model", "blas", "matmul_gflops_fp32"):
        assert key in data["header"]
    recs = data["records"]
    assert {(x["strategy"], x["prompt_tokens"]) for x in recs} == {
        (s, n) for s in ("full", "mlx-lm") for n in (16, 40)}
    for x in recs:
        assert x["ttft_min_s"] <= x["ttft_s"] <= x["ttft_max_s"]
        assert abs(x["prefill_tok_s"] - x["prompt_tokens"] / x["ttft_s"]) < 1e-6
        assert x["ttft_flops"] > 0 and x["trials"] == 2
        # mlx-lm's own path and ours compute the same model: same first token, same NLL.
        assert x["first_token_agreement"] == 1.0 and x["first_token_kl"] < 1e-4
        assert abs(x["nll_ratio"] - 1.0) < 1e-4 and x["nll"] > 0


def test_bench_kvp_rows_plot_and_speed_only_modes(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    art = tmp_path / "art"
    r = subprocess.run([*CLI, "kvp", "fit", "--model", model,
                        "--aux", "T-0.50", "--tokens", "300", "--chunk", "60", "--eval-pairs",
                        "0", "--out", str(art)], env=cli_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = subprocess.run([*CLI, "bench", "--model", model,
                        "--strategies", "full,kvp,aux-only,runahead-kvp", "--kvp", str(art),
                        "--prompt-tokens", "24", "--trials", "2", "--continuation", "8",
                        "--json", str(out), "--plot", str(png)], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["header"]["artifacts"] == {"kvp": str(art), "kvp_card": {
        "aux": "T-0.50", "predictor_input": "hidden", "predictor_rank": None, "tail": 1,
        "steps": 0}}
    recs = {x["strategy"]: x for x in data["records"]}
    assert recs["kvp"]["ttft_flops"] < recs["full"]["ttft_flops"]
    assert recs["aux-only"]["ttft_flops"] < recs["full"]["ttft_flops"]
    assert recs["kvp"]["nll_ratio"] > 0 and recs["full"]["nll_ratio"] == 1.0
    # kvp with its aux prefill on 2 runahead workers: the same prediction, so the same quality
    ra = recs["runahead-kvp"]
    assert ra["trials"] == 2 and ra["ttft_flops"] == recs["kvp"]["ttft_flops"]
    for key in ("first_token_agreement", "first_token_kl", "nll_ratio"):
        assert abs(ra[key] - recs["kvp"][key]) < 1e-4, key
    assert png.read_bytes()[:4] == b"\x89PNG"
    # --kvp-tail: kvp and runahead-kvp both run the base over the last 4 tokens
    r = subprocess.run([*CLI, "bench", "--model", model,
                        "--strategies", "kvp,runahead-kvp", "--kvp", str(art), "--kvp-tail", "4",
                        "--prompt-tokens", "24", "--trials", "1", "--continuation", "8",
                        "--json", str(out)], env=cli_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["header"]["kvp_tail"] == 4
    t4 = {x["strategy"]: x for x in data["records"]}
    assert t4["kvp"]["ttft_flops"] > recs["kvp"]["ttft_flops"]
    assert t4["runahead-kvp"]["ttft_flops"] == t4["kvp"]["ttft_flops"]
    for key in ("first_token_kl", "nll_ratio"):
        assert abs(t4["runahead-kvp"][key] - t4["kvp"][key]) < 1e-4, key
    # speed only: random tokens, and a random-weight shape; quality is omitted, not faked
    for extra in (["--model", model, "--random-tokens"],
                  ["--shape", "tiny", "--strategies", "full,kvp,runahead-kvp"],
                  ["--backend", "mirror", "--shape", "tiny", "--aux-shape", "tiny",
                   "--strategies", "full,kvp"]):
        r = subprocess.run([*CLI, "bench", *extra,
                            "--prompt-tokens", "16", "--trials", "1", "--json", str(out)],
                           env=cli_env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        for x in json.loads(out.read_text())["records"]:
            assert x["first_token_agreement"] is None and x["nll_ratio"] is None
            assert x["ttft_s"] > 0
    r = subprocess.run([*CLI, "bench", "--shape", "llama-99b"],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "unknown --shape 'llama-99b'" in r.stderr


def test_bench_task_column_scores_answers_beside_full(tiny_models, cli_env, tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = subprocess.run([*CLI, "bench", "--model", str(tiny_models["llama"]), "--strategies",
                        "full,lazy-aggressive", "--prompt-tokens", "400", "--trials", "1",
                        "--task", "niah-single", "--task-rows", "2", "--haystack", "filler",
                        "--json", str(out), "--plot", str(png)], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["header"]["task"] == {"name": "niah-single", "rows": 2, "haystack": "filler"}
    for rec in data["records"]:
        assert rec["task"] == "niah-single" and rec["task_rows"] == 2
        assert 0.0 <= rec["task_accuracy"] <= 1.0 and len(rec["task_accuracy_ci95"]) == 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([*CLI, "bench", "--shape", "smollm2-135m", "--task", "niah-single"],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--task scores answers" in r.stderr
