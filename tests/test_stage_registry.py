"""The stage registry: a method is one module under edgec/stages/ (config class + handler), nothing else."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgec.recipe import METHODS, QUANT_METHODS, validate_recipe
from edgec.stages.registry import STAGES, discover

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_module_registers_its_config_and_handler():
    discover()
    assert set(METHODS) == set(STAGES.names())
    assert set(QUANT_METHODS) == {"qat", "ptq", "qkd", "pqk"}
    for name in METHODS:
        m = STAGES.get(name)
        assert m.config.model_fields["method"].annotation.__args__ == (name,)
        for step in ("prepare", "run", "convert"):
            assert callable(getattr(m.handler, step))


def test_unknown_method_lists_the_registered_ones():
    from edgec.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        validate_recipe({"stages": [{"method": "qatt"}]}, [])
    assert "did you mean 'qat'" in str(e.value)


TOY = '''
"""toy: scale every weight by a factor (a method added as one module, for the registry test)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from edgec.stages.config import Strict
from edgec.stages.registry import register_stage


class ToyStage(Strict):
    method: Literal["toy"]
    factor: float = Field(0.5, gt=0)


class ToyHandler:
    def prepare(self, model, cfg, ctx):
        return model

    def run(self, model, cfg, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(cfg.factor)
        return {"scaled": cfg.factor}

    def convert(self, model, cfg, ctx):
        return model


register_stage("toy", ToyStage, ToyHandler())
'''


@pytest.mark.integration
def test_a_new_method_is_one_module(tmp_path):
    """Copy the package, add edgec/stages/toy.py only, and run a recipe that uses it through the CLI."""
    # run from tmp_path: `python -m` puts the working directory first on sys.path
    shutil.copytree(ROOT / "edgec", tmp_path / "pkg" / "edgec", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pkg" / "edgec" / "stages" / "toy.py").write_text(TOY)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("version: 1\nname: toy\nstages:\n  - method: toy\n    factor: 0.25\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "edgec", "compress", "--model", "digits_cnn", "--data", "digits",
                           "--recipe", str(recipe), "--out", str(out), "--no-export", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch

    before = torch.load(out / "model_input.pt", weights_only=True)["model"]
    after = torch.load(out / "model_final.pt", weights_only=True)["model"]
    k = next(k for k, v in before.items() if v.is_floating_point() and v.abs().sum() > 0)
    assert torch.allclose(after[k], 0.25 * before[k])
    bad = subprocess.run([sys.executable, "-m", "edgec", "recipes", "validate", str(recipe), "--set",
                          "stages.0.factor=-1"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert bad.returncode == 2 and "stages.0.factor" in bad.stderr
