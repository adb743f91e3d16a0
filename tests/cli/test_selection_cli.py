"""gemfilter, specprefill and kvp+specprefill from the command line and the Python API: they
run, report what they kept, and refuse bad options in one line."""
import json

import edgeprefill
from tests.cli.test_generate_cli import _one_error_line, cli

PROMPT = "The code word is amber-delta. " * 6 + "What is the code word?"


def test_generate_with_each_selection_strategy(tiny_models, tiny_quantized, cli_env):
    for args in (["--strategy", "gemfilter", "--keep", "0.5", "--filter-layer", "1"],
                 ["--strategy", "gemfilter", "--keep", "12", "--positions", "original"],
                 ["--strategy", "specprefill", "--draft", str(tiny_models["llama"]),
                  "--keep", "0.5", "--lookahead", "2", "--select-chunk", "4"]):
        r = cli(["generate", "--model", str(tiny_quantized), "--prompt", PROMPT,
                 "--max-tokens", "4", "--json", *args], cli_env)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)["stats"]
        assert s["strategy"] == args[1] and s["generated_tokens"] >= 1


def test_selection_options_are_checked_in_one_line(tiny_models, cli_env):
    model = str(tiny_models["llama"])
    r = cli(["generate", "--model", model, "--prompt", PROMPT, "--strategy", "specprefill"],
            cli_env)
    _one_error_line(r, "--draft")
    r = cli(["generate", "--model", model, "--prompt", PROMPT, "--strategy", "gemfilter",
             "--keep", "2.5"], cli_env)
    _one_error_line(r, "--keep")
    r = cli(["generate", "--model", model, "--prompt", PROMPT, "--strategy", "gemfilter",
             "--filter-layer", "40"], cli_env)
    _one_error_line(r, "--filter-layer")
    r = cli(["generate", "--model", model, "--prompt", PROMPT, "--strategy", "mlx-lm-x"],
            cli_env)
    _one_error_line(r, "mlx-lm-<step>")


def test_python_api_takes_selection_options_and_hands_the_cache_to_mlx_lm(tiny_models):
    from mlx_lm.generate import generate_step

    lm = edgeprefill.load(str(tiny_models["qwen3"]))
    text = edgeprefill.generate(lm, PROMPT, strategy="gemfilter", keep=0.5, max_tokens=3)
    assert isinstance(text, str)
    ids = lm.tokenizer.encode(PROMPT)
    r = edgeprefill.prefill(lm, ids[:-1], strategy="specprefill", draft=str(tiny_models["qwen3"]),
                            keep=0.5, select_chunk=4)
    assert r.stats.extra["kept"] < len(ids) - 1
    import mlx.core as mx

    step = generate_step(mx.array(ids[-1:]), lm.mlx_model,
                         prompt_cache=r.cache, max_tokens=2)
    assert len([t for t, _ in step]) == 2


def test_bench_times_and_splits_the_selection_strategies_on_both_backends(cli_env, tmp_path):
    import subprocess

    from tests.conftest import CLI

    out = tmp_path / "b.json"
    for backend, strategies in (("mlx", "full,mlx-lm,mlx-lm-64,lazy,gemfilter,specprefill,"
                                 "kvp+specprefill"),
                                ("mirror", "full,gemfilter,specprefill,kvp+specprefill")):
        r = subprocess.run([*CLI, "bench", "--shape", "tiny", "--backend", backend,
                            "--strategies", strategies, "--draft", "random:tiny", "--keep",
                            "0.25", "--prompt-tokens", "300", "--trials", "1", "--warmup", "0",
                            "--json", str(out)], env=cli_env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        recs = {x["strategy"]: x for x in json.loads(out.read_text())["records"]}
        assert set(recs) == set(strategies.split(","))
        full = recs["full"]["ttft_flops"]
        for name in ("gemfilter", "specprefill", "kvp+specprefill"):
            # (the random draft is the base's own shape here: specprefill costs more than full)
            assert 0 < recs[name]["ttft_flops"] < (2 * full if name == "specprefill" else full)
            assert 0 < recs[name]["split_s"].get("select_s", recs[name]["split_s"].get(
                "aux_s", 0)) < recs[name]["ttft_s"], name
        if backend == "mlx":
            assert recs["mlx-lm-64"]["ttft_flops"] == full
            assert "prune_s" in recs["lazy"]["split_s"]
