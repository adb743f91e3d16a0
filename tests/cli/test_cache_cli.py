"""`edgeprefill cache-prompt` and `generate --prompt-cache`: the cached answer equals the cold
one, the reuse is reported, and bad caches are refused in one line."""
import json

from tests.cli.test_generate_cli import _one_error_line, cli

DOC = "The river Danube flows through ten countries and four capitals. " * 4


def test_cache_prompt_then_generate_reuses_the_prefix(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    out = tmp_path / "doc.safetensors"
    (tmp_path / "doc.txt").write_text(DOC)
    r = cli(["cache-prompt", "--model", model, "--prompt-file", str(tmp_path / "doc.txt"),
             "--no-chat-template", "--out", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stderr and out.is_file() and not list(tmp_path.glob(".*"))
    ask = ["generate", "--model", model, "--prompt", DOC + "How many countries?",
           "--no-chat-template", "--max-tokens", "6", "--json"]
    cold = json.loads(cli(ask, cli_env).stdout)
    r = cli([*ask, "--prompt-cache", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    warm = json.loads(r.stdout)
    assert warm["text"] == cold["text"]
    s = warm["stats"]
    assert s["cached_tokens"] > 0 and s["cache_exact"] is True
    assert s["prompt_tokens"] + s["cached_tokens"] == cold["stats"]["prompt_tokens"]
    # kvp continues only caches it made: the rest is prefilled with full, and it says so
    r = cli([*ask, "--prompt-cache", str(out), "--strategy", "lazy"], cli_env)
    assert r.returncode == 0 and "prefilled with full" in r.stderr


def test_bad_caches_are_refused_in_one_line(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    out = tmp_path / "c.safetensors"
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(out),
             "--max-cache-mb", "0.001"], cli_env)
    _one_error_line(r, "budget")
    assert not out.exists() and not list(tmp_path.iterdir())
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(tmp_path / "c.bin")],
            cli_env)
    _one_error_line(r, ".safetensors")
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(out),
             "--strategy", "lazy"], cli_env)
    _one_error_line(r, "skips prompt positions")
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    r = cli(["generate", "--model", str(tiny_models["qwen3"]), "--prompt", "hi",
             "--prompt-cache", str(out)], cli_env)
    _one_error_line(r, "made for")
    out.write_bytes(b"not a cache")
    r = cli(["generate", "--model", model, "--prompt", "hi", "--prompt-cache", str(out)], cli_env)
    _one_error_line(r, "not a readable prompt cache")


def test_bench_prefix_mode_times_cold_file_and_memory(tiny_models, cli_env, tmp_path):
    out = tmp_path / "p.json"
    r = cli(["bench", "--model", str(tiny_models["qwen3"]), "--prefix-tokens", "96",
             "--prompt-tokens", "128,160", "--trials", "2", "--json", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())["records"]
    assert [(x["mode"], x["prompt_tokens"]) for x in recs] == [
        (m, n) for n in (128, 160) for m in ("cold", "warm-file", "warm-memory")]
    for x in recs:
        assert x["same_first_token"] and x["ttft_s"] > 0 and x["trials"] == 2
        assert x["new_tokens"] == x["prompt_tokens"] - 96
    assert all(x["load_s"] > 0 and x["file_bytes"] > 0 for x in recs if x["mode"] == "warm-file")
    r = cli(["bench", "--model", str(tiny_models["qwen3"]), "--prefix-tokens", "200",
             "--prompt-tokens", "128"], cli_env)
    _one_error_line(r, "--prefix-tokens")


def test_chat_starts_from_a_prompt_cache(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    out = tmp_path / "c.safetensors"
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(out)], cli_env)
    assert r.returncode == 0, r.stderr
    r = cli(["chat", "--model", model, "--prompt-cache", str(out), "--prompt", DOC,
             "--max-tokens", "4", "--strategy", "lazy"], cli_env)
    assert r.returncode == 0, r.stderr
    assert "prompt cache:" in r.stderr and "exact" in r.stderr
    assert "prefilled with full" in r.stderr


def test_cache_prompt_heals_an_approximate_file(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    art, out = tmp_path / "art", tmp_path / "k.safetensors"
    r = cli(["kvp", "fit", "--model", model, "--aux", "T-0.50", "--tokens", "300", "--chunk",
             "60", "--eval-pairs", "0", "--out", str(art)], cli_env)
    assert r.returncode == 0, r.stderr
    r = cli(["cache-prompt", "--model", model, "--prompt", DOC, "--out", str(out),
             "--strategy", "kvp", "--kvp", str(art)], cli_env)
    assert r.returncode == 0 and "approximate" in r.stderr, r.stderr
    r = cli(["cache-prompt", "--model", model, "--heal", str(out)], cli_env)
    assert r.returncode == 0 and "kvp -> exact" in r.stderr, r.stderr
    r = cli(["generate", "--model", model, "--prompt", DOC + "?", "--prompt-cache", str(out),
             "--max-tokens", "3", "--json"], cli_env)
    assert r.returncode == 0 and json.loads(r.stdout)["stats"]["cache_exact"] is True
