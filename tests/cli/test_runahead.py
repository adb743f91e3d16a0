"""KV-Runahead and tsp over real mx.distributed processes (ring backend on 127.0.0.1)."""
import json
import subprocess

import pytest

from edgeprefill.loading import load
from tests.conftest import CLI


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load(str(tiny_models["qwen3"]))


def _random_pair_artifact(lm, spec, source, folder):
    """An artifact folder: aux `spec` of the tiny base with a random-weight predictor."""
    import mlx.core as mx

    from edgeprefill.kvp.artifact import save_artifact
    from edgeprefill.kvp.pairs import build_predictor

    mx.random.seed(3)
    aux, pred = build_predictor(lm.model, spec, source)
    return save_artifact(folder, pred, aux, lm.model, lm.model_id, {"method": "random"})


def test_runahead_on_two_workers_equals_full(lm):
    from edgeprefill.distributed.pool import run_prefill

    ids = list(range(5, 28))  # balanced split, n not divisible by p
    r = run_prefill(lm, ids, "runahead", 2, timeout=120, check=True)
    assert r["max_logit_diff"] < 1e-4 and r["max_cache_diff"] < 1e-4
    assert r["cache_offset"] == len(ids) and sum(r["sizes"]) == len(ids)


def test_dead_worker_gives_a_clear_error_without_hanging(lm, tmp_path):
    from edgeprefill.distributed.launch import launch
    from edgeprefill.errors import EdgeprefillError

    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"strategy": "runahead", "ids": list(range(5, 25))}]}))
    args = ["--model", lm.spec, "--jobs", str(jobs), "--out", str(tmp_path / "out.json"),
            "--die-rank", "1"]
    with pytest.raises(EdgeprefillError, match="runahead worker"):
        launch(2, args, timeout=30)
    assert not (tmp_path / "out.json").exists()


def test_generate_cli_with_runahead_workers(tiny_models, cli_env):
    from edgeprefill.generate import build_prompt, generate
    from edgeprefill.prefill import FullPrefill

    lm = load(str(tiny_models["llama"]))
    prompt = "the quick brown fox jumps over the lazy dog"
    r = subprocess.run([*CLI, "generate", "--model", lm.spec,
                        "--prompt", prompt, "--strategy", "runahead", "--workers", "2",
                        "--max-tokens", "5", "--json"], env=cli_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    full = generate(lm.model, lm.tokenizer, build_prompt(lm.tokenizer, prompt),
                    FullPrefill(lm.model), max_tokens=5, temp=0.0)
    assert out["text"] == full.text and out["stats"]["extra"]["workers"] == 2


def test_generate_cli_with_runahead_kvp_equals_kvp(tiny_models, cli_env, tmp_path):
    from edgeprefill.distributed.pool import run_prefill
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.generate import build_prompt, generate
    from edgeprefill.prefill import build

    lm = load(str(tiny_models["llama"]))
    art = _random_pair_artifact(lm, "T-0.50", "hidden", tmp_path / "art")
    prompt = "the quick brown fox jumps over the lazy dog"
    r = subprocess.run([*CLI, "generate", "--model", lm.spec,
                        "--prompt", prompt, "--strategy", "runahead-kvp", "--kvp", str(art),
                        "--workers", "2", "--max-tokens", "5", "--json"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ids = build_prompt(lm.tokenizer, prompt)
    kvp = generate(lm.model, lm.tokenizer, ids, build("kvp", lm, kvp=art),
                   max_tokens=5, temp=0.0)
    assert out["text"] == kvp.text and out["stats"]["extra"]["bytes_moved"] > 0
    with pytest.raises(EdgeprefillError, match="no KV Prediction pair"):
        run_prefill(lm, ids, "runahead-kvp", 2, artifact=tmp_path / "missing")


def test_tune_writes_a_table_and_the_projection_reads_it(tiny_models, cli_env, tmp_path):
    out, rec, proj = tmp_path / "table.json", tmp_path / "tune.json", tmp_path / "proj.json"
    model = str(tiny_models["llama"])
    r = subprocess.run([*CLI, "runahead", "tune", "--model", model,
                        "--workers", "2", "--prompt-tokens", "40", "--alphas", "0,1",
                        "--trials", "1", "--with-tsp", "--json", str(rec), "--out", str(out)],
                       env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    (entry,) = table.values()
    assert entry["2"]["40"] in (0.0, 1.0)
    (run,) = json.loads(rec.read_text())["runs"]
    assert [x["strategy"] for x in run["results"]] == ["runahead", "runahead", "tsp"]
    assert len(run["link"]) == 5 and all(x["round_trip_s"] > 0 for x in run["link"])
    r = subprocess.run([*CLI, "runahead", "project", "--model", model,
                        "--workers", "2,4", "--prompt-tokens", "64", "--measured", str(rec),
                        "--json", str(proj), "--plot", str(tmp_path / "p.png")], env=cli_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    p = json.loads(proj.read_text())
    assert {(x["workers"], x["n"]) for x in p["projection"]} >= {(2, 64), (4, 64), (2, 40)}
    assert len(p["validation"]) == 3 and all(x["predicted_s"] > 0 for x in p["validation"])
    assert (tmp_path / "p.png").stat().st_size > 0
    r = subprocess.run([*CLI, "runahead", "project", "--model", model,
                        "--measured", str(out)], env=cli_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "cannot read a tune record" in r.stderr


def test_three_workers_equal_one_process_for_runahead_tsp_and_runahead_kvp(lm, tmp_path):
    """One launch of 3 ring workers runs every case. runahead and tsp: cache and logits equal
    `full` (uneven partition, more workers than tokens, tsp's padded even split). runahead as the
    aux prefill of kvp: the cache (base and aux) and logits equal single-process kvp for a
    truncated aux with a hidden-state predictor and a layer-pruned aux with the paper's K/V
    predictor, on uneven and default partitions, with more workers than the aux has tokens,
    and for a one-token prompt (the base step only)."""
    from edgeprefill.distributed.pool import run_jobs
    from edgeprefill.prefill import build
    from edgeprefill.prefill.runahead import kvp_runahead_bytes, runahead_bytes
    from edgeprefill.quality import continuation_logits, mean_nll

    t50 = _random_pair_artifact(lm, "T-0.50", "hidden", tmp_path / "t50")
    lp50 = _random_pair_artifact(lm, "LP-0.50", "kv", tmp_path / "lp50")
    ids = list(range(5, 28))
    cont = list(range(40, 46))
    jobs = [{"strategy": "runahead", "ids": ids, "sizes": [12, 7, 4], "check": True},
            {"strategy": "runahead", "ids": ids[:2], "check": True},
            {"strategy": "tsp", "ids": ids[:10], "check": True},
            {"strategy": "runahead-kvp", "ids": ids, "artifact": str(t50), "check": True,
             "sizes": [12, 7, 3], "continuation": cont},
            {"strategy": "runahead-kvp", "ids": ids, "artifact": str(lp50), "check": True},
            {"strategy": "runahead-kvp", "ids": ids[:3], "artifact": str(t50), "check": True},
            {"strategy": "runahead-kvp", "ids": ids[:1], "artifact": str(t50), "check": True}]
    rep = run_jobs(lm, jobs, 3, timeout=180)
    for job, r in zip(jobs, rep["results"]):
        assert r["max_logit_diff"] < 1e-4 and r["max_cache_diff"] < 1e-4, (job, r)
        assert r["cache_offset"] == len(job["ids"])
        aux_tokens = len(job["ids"]) - (job["strategy"] == "runahead-kvp")  # prompt[:-1]
        assert sum(r["sizes"]) == aux_tokens
    res = rep["results"]
    assert res[0]["sizes"] == [12, 7, 4] and res[1]["sizes"] == [1, 1]
    assert res[3]["sizes"] == [12, 7, 3] and res[5]["sizes"] == [1, 1] and res[6]["sizes"] == [0]
    kvp = build("kvp", lm, kvp=t50)
    cache, logits, _ = kvp.prefill(ids)
    assert abs(res[3]["nll"] - mean_nll(continuation_logits(lm.model, cache, logits, cont),
                                        cont)) < 1e-4
    # a truncated aux of the base hands on as many K/V bytes as runahead over the base
    assert kvp_runahead_bytes(kvp, [12, 7, 3]) == runahead_bytes(lm.model, [12, 7, 3])
    assert res[3]["bytes"] == runahead_bytes(lm.model, [12, 7, 3])
