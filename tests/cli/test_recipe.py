"""`kvp train --recipe`: the shipped pair's recipe, stage chaining, overrides, resumption."""
import json
import subprocess

from ..conftest import CLI


def test_a_two_stage_recipe_runs_chains_and_resumes(tiny_models, cli_env, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""name: tiny
defaults: {aux: T-0.50, input: hidden, objective: kl, seq: 16, batch: 2, tokens: 400,
           ridge_tokens: 300, warmup: 1, eval_pairs: 0, checkpoint_every: 1}
stages:
  - {name: first, steps: 2, train_aux_layers: 1}
  - {name: second, steps: 3, stop_step: 2, tail: 2}
""")
    out = tmp_path / "pair"
    cmd = [*CLI, "kvp", "train", "--model", str(tiny_models["llama"]), "--recipe", str(recipe),
           "--out", str(out)]
    r = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["tail"] == 2 and card["fit"]["steps"] == 2  # stopped at stop_step
    assert card["fit"]["init"]["artifact"] == "first" and card["fit"]["init"]["steps"] == 2
    assert card["aux"]["trained_layers"]  # the first stage's copies trained on
    stages = tmp_path / "pair.stages"
    assert (stages / "first" / "card.json").is_file() and (stages / "second").is_dir()
    r = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr.count("done before, kept") == 2, r.stderr
