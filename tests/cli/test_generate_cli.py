"""`edgeprefill generate` as a user runs it: streamed text, --json stats, stdin, bad input."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import CLI


def cli(args, env, stdin=None, timeout=120):
    return subprocess.run([*CLI, *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(r, fragment):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgeprefill") and ": error: " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_generate_json_reports_text_and_stats(tiny_models, cli_env):
    r = cli(["generate", "--model", str(tiny_models["llama"]), "--prompt", "What is the capital?",
             "--max-tokens", "7", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["stats"]
    assert s["strategy"] == "full" and s["generated_tokens"] <= 7
    assert s["prompt_tokens"] > 5 and s["ttft_s"] > 0 and s["prefill_tok_s"] > 0
    assert s["finish_reason"] in ("eos", "length")
    assert isinstance(out["text"], str)


def test_generate_streams_text_and_prints_speed_line(tiny_models, cli_env):
    r = cli(["generate", "--model", str(tiny_models["qwen3"]), "--prompt", "Hello there",
             "--max-tokens", "5"], cli_env)
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr and "prefill" in r.stderr and "decode" in r.stderr


def test_prompt_dash_reads_stdin(tiny_models, cli_env):
    args = ["generate", "--model", str(tiny_models["llama"]), "--max-tokens", "4", "--json"]
    piped = cli(args + ["--prompt", "-"], cli_env, stdin="The quick brown fox")
    direct = cli(args + ["--prompt", "The quick brown fox"], cli_env)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["text"] == json.loads(direct.stdout)["text"]


def test_bad_inputs_give_one_clear_line(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    _one_error_line(cli(["generate", "--model", "/nope/model", "--prompt", "hi"], cli_env),
                    "model path not found")
    _one_error_line(cli(["generate", "--model", model, "--prompt", "   "], cli_env),
                    "prompt is empty")
    _one_error_line(cli(["generate", "--model", model, "--prompt", "-"], cli_env, stdin=""),
                    "prompt is empty")
    _one_error_line(cli(["generate", "--model", model, "--prompt", "word " * 600], cli_env),
                    "context is 512")
    _one_error_line(cli(["generate", "--model", model, "--prompt", "hi", "--max-tokens", "0"],
                        cli_env), "--max-tokens")
    _one_error_line(cli(["generate", "--model", model, "--prompt", "hi", "--strategy", "magic"],
                        cli_env), "unknown strategy 'magic'")
    broken = shutil.copytree(tiny_models["llama"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    _one_error_line(cli(["generate", "--model", str(broken), "--prompt", "hi"], cli_env),
                    "cannot load weights")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (broken / "config.json").write_text(json.dumps(cfg))
    _one_error_line(cli(["generate", "--model", str(broken), "--prompt", "hi"], cli_env),
                    "model_type 'gpt_neox' is not supported")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only")
def test_cli_runs_mlx_on_openblas_when_installed(cli_env):
    from edgeprefill.blas import find_openblas

    if find_openblas() is None:
        pytest.skip("libopenblas0-pthread not installed")
    r = cli(["info", "--json", "--size", "256"], cli_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blas"] == "openblas"
    cli_env["EDGEPREFILL_BLAS"] = "bundled"
    r = cli(["info", "--json", "--size", "256"], cli_env)
    assert json.loads(r.stdout)["blas"] == "bundled"
