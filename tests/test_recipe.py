"""Recipe schema: strict validation, every problem at once, overrides, shipped recipes."""
from __future__ import annotations

import pytest

from cli_util import run_cli
from edgec.errors import RecipeError
from edgec.recipe import load_recipe, shipped_recipes, validate_recipe


def test_shipped_recipes_validate():
    names = set(shipped_recipes())
    assert {"qat-int8", "prune-qat-int8", "ptq-int8", "demo"} <= names
    for name in names:
        assert load_recipe(name).version == 1


def test_all_problems_listed_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages:\n  - method: qat\n    epochs: many\n    weight_bits: 12\n"
                   "    wieght_bits: 4\n  - method: prun\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(bad))
    text = str(info.value)
    assert "stages.0.epochs" in text and "stages.0.weight_bits" in text
    assert "stages.0.wieght_bits: unknown key" in text
    assert "unknown method 'prun'" in text
    assert len(info.value.problems) == 4


def test_overrides_apply_and_bad_paths_reported():
    r = load_recipe("prune-qat-int8", ["stages.0.target_sparsity=0.8", "stages.1.kd.temperature=2", "target=arm64"])
    assert r.stages[0].target_sparsity == 0.8 and r.stages[1].kd.temperature == 2 and r.target == "arm64"
    with pytest.raises(RecipeError) as info:
        load_recipe("qat-int8", ["stages.5.epochs=1", "noequals"])
    assert len(info.value.problems) == 2


def test_structure_rules():
    with pytest.raises(RecipeError, match="prune stages must come before"):
        validate_recipe({"stages": [{"method": "qat"}, {"method": "prune", "target_sparsity": 0.5}]}, [])
    with pytest.raises(RecipeError, match="at least 1"):
        validate_recipe({"stages": []}, [])


def test_cli_malformed_yaml_exit_2_no_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("stages:\n  - method: qat\n   epochs: [1\n")
    res = run_cli(capsys, "recipes", "validate", bad)
    assert res.code == 2
    assert "not valid YAML at line" in res.err and "Traceback" not in res.err


def test_cli_unknown_recipe_did_you_mean(capsys):
    res = run_cli(capsys, "recipes", "show", "qat-int9")
    assert res.code == 2 and "did you mean 'qat-int8'" in res.err


def test_cli_recipes_list_and_validate(capsys):
    res = run_cli(capsys, "recipes", "list")
    assert res.code == 0 and "prune-qat-int8" in res.out
    res = run_cli(capsys, "recipes", "validate", "qat-int8", "--set", "stages.0.epochs=2")
    assert res.code == 0 and "epochs: 2" in res.out
