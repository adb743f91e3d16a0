"""KV Prediction training path (MLX and torch mirror), the mirror's kvp strategy, kvp train."""
import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from edgeprefill.loading import load
from edgeprefill.prefill.kv_prediction import KVPrediction
from tests.conftest import CLI


def test_kvp_train_cli_mirror_then_generate(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    art = tmp_path / "art"
    cmd = [*CLI, "kvp", "train", "--model", model, "--aux",
           "LP-0.50", "--steps", "4", "--batch", "2", "--seq", "16", "--tokens", "400",
           "--ridge-tokens", "300", "--backend", "mirror", "--checkpoint-every", "2",
           "--eval-pairs", "2", "--out", str(art)]
    r = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    card = json.loads((art / "card.json").read_text())
    assert card["fit"]["method"] == "ridge+gradient" and card["fit"]["steps"] == 4
    assert card["aux"]["weights"] == "aux.safetensors" and (art / "aux.safetensors").is_file()
    assert 0 <= card["quality"]["first_token_agreement"] <= 1
    log = [json.loads(x) for x in (tmp_path / "art.train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    r = subprocess.run(cmd[:cmd.index("--steps") + 1] + ["6"] + cmd[cmd.index("--steps") + 2:]
                       + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and json.loads((art / "card.json").read_text())["fit"]["steps"] == 6
    r = subprocess.run([*CLI, "generate", "--model", model,
                        "--prompt", "the quick brown fox", "--strategy", "kvp", "--kvp",
                        str(art), "--max-tokens", "3", "--json"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "new"), "--resume"], env=cli_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no checkpoint" in r.stderr and not (tmp_path / "new").exists()


def test_training_only_the_last_aux_blocks_without_the_aux_term(tiny_models, cli_env, tmp_path):
    """--train-aux-layers K copies and trains only the aux's last K blocks (the others stay the
    base's own), --aux-weight 0 drops the aux's own loss term; the card names the trained
    blocks and the artifact loads with exactly those copies; with --init, a larger K adds
    copies before the trained ones and keeps their weights, a smaller one is refused."""
    from edgeprefill.kvp.train import loss_terms
    from edgeprefill.prefill import build

    lm = load(str(tiny_models["llama"]))
    art = tmp_path / "art"
    r = subprocess.run([*CLI, "kvp", "train", "--model", lm.spec,
                        "--aux", "T-0.50", "--train-aux-layers", "1", "--aux-weight", "0",
                        "--steps", "3", "--batch", "2", "--seq", "16", "--tokens", "400",
                        "--ridge-tokens", "300", "--backend", "mirror", "--eval-pairs", "0",
                        "--out", str(art)], env=cli_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    card = json.loads((art / "card.json").read_text())
    assert card["aux"]["trained_layers"] == [1] and card["fit"]["aux_weight"] == 0
    assert card["fit"]["self_kv"] == "exact" and card["fit"]["kv_weight"] == 1.0  # defaults
    assert card["fit"]["train_tail"] == 1 and card["tail"] == 1
    assert {k.split(".")[1] for k in mx.load(str(art / "aux.safetensors"))} == {"1"}
    kvp = build("kvp", lm, kvp=art)
    assert kvp.aux.model.copied == [1]
    _, logits, _ = kvp.prefill(list(range(5, 20)))
    assert np.isfinite(np.array(logits)).all()
    ids = mx.array(np.random.default_rng(0).integers(3, lm.model.vocab_size, size=(1, 9)))
    total, t_base, _, l1 = loss_terms(lm.model, kvp.aux, kvp.predictor, ids[:, :-1], ids[:, 1:],
                                      "kl", aux_weight=0.0)
    assert abs(total.item() - (t_base + l1).item()) < 1e-5
    r = subprocess.run([*CLI, "kvp", "train", "--model", lm.spec,
                        "--aux", "T-0.50", "--train-aux-layers", "5", "--steps", "1",
                        "--tokens", "400", "--ridge-tokens", "300", "--seq", "16",
                        "--eval-pairs", "0", "--out", str(tmp_path / "x")], env=cli_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "has only 2 blocks" in r.stderr
    for bad, msg in ((["--precision", "bf16"], "--precision is for --backend mirror"),
                     (["--kv-weight", "-1"], "argument --kv-weight: -1 is below 0"),
                     (["--tail", "0"], "argument --tail: 0 is below 1"),
                     (["--self-kv", "predicted", "--train-tail", "8"],
                      "--train-tail needs --self-kv exact"),
                     (["--tail", "16", "--seq", "16"], "--train-tail 16 (default: --tail) must "
                      "be below --seq 16")):
        r = subprocess.run([*CLI, "kvp", "train", "--model",
                            lm.spec, "--out", str(tmp_path / "x")] + bad, env=cli_env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode in (1, 2) and msg in r.stderr  # 2: refused when parsed
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
    # continuing from the artifact (its copies and predictor): the card says from what
    r = subprocess.run([*CLI, "kvp", "train", "--model", lm.spec,
                        "--aux", "T-0.50", "--init", str(art), "--aux-weight", "0",
                        "--self-kv", "predicted", "--steps", "1", "--batch", "2", "--seq", "16", "--tokens", "400",
                        "--backend", "mirror", "--eval-pairs", "0", "--out",
                        str(tmp_path / "art2")], env=cli_env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    card2 = json.loads((tmp_path / "art2" / "card.json").read_text())
    assert card2["aux"]["trained_layers"] == [1] and card2["fit"]["method"] == "gradient"
    assert card2["fit"]["self_kv"] == "predicted" and card2["fit"]["train_aux"] is True
    assert card2["fit"]["init"] == {"artifact": "art", "method": "ridge+gradient", "steps": 3,
                                    "data": card["fit"]["data"]}
    # growing the copies: the trained one keeps its weights, the new one starts as the base's
    from mlx.utils import tree_flatten

    from edgeprefill.kvp.artifact import load_artifact
    from edgeprefill.kvp.train import grow_copies

    aux1, pred1, _ = load_artifact(art, lm.model)
    grown = grow_copies(aux1, [0, 1])
    prompt = list(range(5, 20))  # a new copy is the base's block: nothing changes until trained
    assert mx.array_equal(KVPrediction(lm.model, grown, pred1).prefill(prompt)[1],
                          KVPrediction(lm.model, aux1, pred1).prefill(prompt)[1])
    assert grown.model.copied == [0, 1] and grown.model.layers[1] is aux1.model.layers[1]
    assert grown.model.layers[0] is not lm.model.layers[0]
    for (n, w), (_, w0) in zip(tree_flatten(grown.model.layers[0].parameters()),
                               tree_flatten(lm.model.layers[0].parameters())):
        assert mx.array_equal(w, w0), n
    with pytest.raises(ValueError, match=r"blocks \[1\] are trained copies"):
        grow_copies(aux1, [0])
    grow = ["--model", lm.spec, "--aux", "T-0.50", "--aux-weight", "0", "--steps", "1",
            "--batch", "2", "--seq", "16", "--tokens", "400", "--eval-pairs", "0"]
    r = subprocess.run([*CLI, "kvp", "train", *grow, "--init",
                        str(art), "--train-aux-layers", "2", "--tail", "4", "--backend", "mirror",
                        "--out", str(tmp_path / "art3")], env=cli_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    card3 = json.loads((tmp_path / "art3" / "card.json").read_text())
    assert card3["aux"]["trained_layers"] == [0, 1]
    assert card3["tail"] == 4 and card3["fit"]["train_tail"] == 4  # trained for the card's tail
    assert {k.split(".")[1] for k in mx.load(str(tmp_path / "art3" / "aux.safetensors"))} == {
        "0", "1"}
    for bad, msg in ((["--train-aux-layers", "1"], "already trains aux blocks [0, 1]; pass at "
                      "least 2"), (["--train-aux", "no"], "aux blocks [0, 1] are trained copies")):
        r = subprocess.run([*CLI, "kvp", "train", *grow, "--init",
                            str(tmp_path / "art3"), *bad, "--out", str(tmp_path / "y")],
                           env=cli_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 1 and not (tmp_path / "y").exists()
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
