"""`kvp train --recipe`: the shipped pair's recipe, stage chaining, overrides, resumption."""
import json

import pytest

from edgeprefill.errors import EdgeprefillError
from edgeprefill.kvp.recipe import TrainConfig, load_recipe, stage_configs

from ..conftest import ROOT


RECIPE = ROOT / "recipes" / "smollm2-135m-t050.yaml"


SHIPPED = ROOT / "edgeprefill" / "assets" / "SmolLM2-135M-Instruct-T-0.50" / "card.json"


def test_the_shipped_recipe_ends_in_the_shipped_cards_configuration(tmp_path):
    """The recipe's last stage trains what the card says was trained (its fit record), from the
    stage before; the stages add up to the card's steps since the ridge fit."""
    card = json.loads(SHIPPED.read_text())
    fit = card["fit"]
    stages = stage_configs(load_recipe(RECIPE), {}, tmp_path)
    name, last, _ = stages[-1]
    assert last.init == str(tmp_path / stages[-2][0])
    for key in ("steps", "batch", "seq", "lr", "objective", "aux_weight", "kv_weight",
                "self_kv"):
        assert getattr(last, key) == fit[key], key
    assert last.window == fit["train_tail"] and last.tail == card["tail"]
    assert last.predictor_rank == card["predictor_rank"] == fit["rank_init"]["rank"]
    assert last.input == card["predictor_input"] and last.aux == card["aux"]["kind"]
    assert last.data == "site" and last.backend == "mirror" and last.device == "cuda"
    assert fit["backend"] == "mirror-cuda" and fit["precision"] == "bf16"  # auto on cuda
    # the pair trains copies of the aux's last 4 blocks, grown at stage p6 from p1's 2
    assert card["aux"]["trained_layers"] == [11, 12, 13, 14]
    grown = [c.train_aux_layers for _, c, _ in stages]
    assert grown[0] == 2 and 4 in grown and max(grown) == len(card["aux"]["trained_layers"])
    before = sum(c.stop_step or c.steps for _, c, _ in stages[:-1])
    assert abs(before - 21400) < 10  # the README's 21400 steps before the rank-384 stage
    assert stages[0][1].init is None  # the first stage starts from a ridge fit


def test_overrides_apply_to_every_stage_and_bad_recipes_name_the_problem(tmp_path):
    stages = stage_configs(load_recipe(RECIPE), {"steps": 3, "backend": "mlx"}, tmp_path)
    assert all(c.steps == 3 and c.backend == "mlx" for _, c, _ in stages)
    bad = tmp_path / "bad.yaml"
    for text, message in [("stages: []", "no list of stages"),
                          ("stages: [{steps: 3}]", "stage 1 needs a name"),
                          ("stages: [{name: a, stepz: 3}]", "unknown option 'stepz'"),
                          ("stages: [{name: a}\n", "not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(EdgeprefillError, match=message):
            load_recipe(bad)
    with pytest.raises(EdgeprefillError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(EdgeprefillError, match="--train-tail"):
        TrainConfig(train_tail=4, self_kv="predicted").check()
