"""Low-rank KV predictor (`--predictor-rank`): the reduction, its FLOPs, the mirror, the
artifact and the CLI (fit, train --init) with their refusals."""
import json
import subprocess

import pytest

from tests.conftest import CLI


RANK = 8


def _cli(args, env):
    return subprocess.run([*CLI, *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_fit_and_train_low_rank_pairs_and_their_refusals(tiny_models, cli_env, tmp_path):
    model = str(tiny_models["llama"])
    full, low, trained = tmp_path / "full", tmp_path / "low", tmp_path / "trained"
    fit = ["kvp", "fit", "--model", model, "--aux", "T-0.50", "--input", "hidden2", "--tokens",
           "400", "--chunk", "64", "--eval-pairs", "0"]
    r = _cli(fit + ["--predictor-rank", str(RANK), "--out", str(low)], cli_env)
    assert r.returncode == 0, r.stderr
    assert f"rank {RANK}" in r.stderr
    card = json.loads((low / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["predictor_input"] == "hidden2"
    r = _cli(["generate", "--model", model, "--prompt", "the quick brown fox", "--strategy",
              "kvp", "--kvp", str(low), "--max-tokens", "3", "--json"], cli_env)
    assert r.returncode == 0, r.stderr
    # refusals: one line, exit 1, nothing written (the same check serves fit and train)
    bad = tmp_path / "bad"
    r = _cli(fit + ["--input", "kv", "--predictor-rank", "4", "--out", str(bad)], cli_env)
    assert r.returncode == 1 and "hidden-state input" in r.stderr and not bad.exists(), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    from edgeprefill.errors import EdgeprefillError
    from edgeprefill.kvp.pairs import check_rank

    with pytest.raises(EdgeprefillError, match="integer >= 1"):
        check_rank(0, "hidden2")
    # kvp train --init a full-rank pair --predictor-rank R: reduced, then trained
    r = _cli(fit + ["--out", str(full)], cli_env)
    assert r.returncode == 0, r.stderr
    train = ["kvp", "train", "--model", model, "--aux", "T-0.50", "--input", "hidden2",
             "--steps", "2", "--batch", "2", "--seq", "16", "--tokens", "400", "--ridge-tokens",
             "300", "--backend", "mirror", "--eval-pairs", "0", "--checkpoint-every", "1"]
    r = _cli(train + ["--init", str(full), "--predictor-rank", str(RANK), "--out", str(trained)],
             cli_env)
    assert r.returncode == 0, r.stderr
    card = json.loads((trained / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["fit"]["steps"] == 2
    assert card["fit"]["rank_init"] == {"from": "the --init pair's full-rank predictor",
                                        "rank": RANK, "moments_tokens": 300}
    # resuming rebuilds the low-rank predictor the checkpoint holds (no second reduction)
    r = _cli(train[:train.index("--steps") + 1] + ["3"] + train[train.index("--steps") + 2:]
             + ["--init", str(full), "--predictor-rank", str(RANK), "--out", str(trained),
                "--resume"], cli_env)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr
    card = json.loads((trained / "card.json").read_text())
    assert card["predictor_rank"] == RANK and card["fit"]["steps"] == 3
    assert card["fit"]["rank_init"]["rank"] == RANK
    bad = tmp_path / "bad"
    r = _cli(train + ["--init", str(trained), "--predictor-rank", "4", "--out", str(bad)],
             cli_env)
    assert r.returncode == 1 and f"has rank {RANK}" in r.stderr and not bad.exists(), r.stderr
    # a card whose rank is not a positive integer is refused on load
    card["predictor_rank"] = -2
    (trained / "card.json").write_text(json.dumps(card))
    r = _cli(["generate", "--model", model, "--prompt", "hi", "--strategy", "kvp", "--kvp",
              str(trained), "--max-tokens", "2"], cli_env)
    assert r.returncode == 1 and "predictor_rank" in r.stderr, r.stderr
