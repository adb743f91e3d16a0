"""KV Prediction: the identity test on every path, positions across turns, layer maps."""
from tests.conftest import CLI


def test_kvp_fit_cli_then_generate_with_the_artifact(tiny_models, cli_env, tmp_path):
    import json
    import subprocess

    art = tmp_path / "art"
    model = str(tiny_models["llama"])
    r = subprocess.run([*CLI, "kvp", "fit", "--model", model,
                        "--aux", "LP-0.50", "--tokens", "400", "--chunk", "64", "--eval-pairs", "2", "--out",
                        str(art)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = json.loads((art / "card.json").read_text())
    assert card["aux"] == {"kind": "LP-0.50", "layers": [0, 2], "weights": "base"}
    assert card["predictor_input"] == "kv" and card["tail"] == 1
    assert 0 <= card["quality"]["first_token_agreement"] <= 1 and card["quality"]["pairs"] == 2
    assert card["layer_map"] == [0, 0, 1, 1] and card["fit"]["method"] == "ridge"
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", "the quick brown fox", "--strategy", "kvp", "--kvp",
                        str(art), "--max-tokens", "4", "--json"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["strategy"] == "kvp" and stats["extra"]["aux"] == "LP-0.50"
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", "hi", "--strategy", "kvp", "--kvp", str(tmp_path / "none")],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no KV Prediction pair" in r.stderr


def test_compact_aux_fit_generate_and_tokenizer_refusal(tiny_models, cli_env, tmp_path):
    """KVP-C through the CLI: a 2-layer model of the same tokenizer as the aux; a model with
    another tokenizer is refused with a one-line error; the artifact reloads its aux model."""
    import json
    import subprocess

    from edgeprefill.models.random import random_model_folder

    small = random_model_folder(tmp_path / "small", "llama", "tiny", seed=3,
                                num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    other = random_model_folder(tmp_path / "other", "llama", "tiny", seed=4, vocab_size=320)
    model, art = str(tiny_models["llama"]), tmp_path / "art"
    base = [*CLI, "kvp", "fit", "--model", model, "--aux", "C",
            "--tokens", "240", "--chunk", "60", "--eval-pairs", "0"]
    r = subprocess.run(base + ["--aux-model", str(small), "--out", str(art)], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = json.loads((art / "card.json").read_text())
    assert card["aux"]["kind"] == "C" and card["aux"]["weights"] == "model"
    assert card["layer_map"] == [0, 0, 1, 1]
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", "the quick brown fox", "--strategy", "kvp", "--kvp",
                        str(art), "--max-tokens", "3", "--json"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["extra"]["aux"] == "C"
    r = subprocess.run(base + ["--aux-model", str(other), "--out", str(tmp_path / "x")],
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "tokenizer differs" in r.stderr
    assert not (tmp_path / "x").exists()
    r = subprocess.run(base + ["--out", str(tmp_path / "y")], env=cli_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "--aux-model" in r.stderr
