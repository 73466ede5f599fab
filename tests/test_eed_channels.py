"""EED with channel-pruned members (``structure: channel``): each member physically smaller, the K scores
removing different channels, the shapes rebuilt from the run directory's architecture record."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cli_util import run_cli
from edgec.errors import RecipeError
from edgec.recipe import load_recipe
from edgec.stages.eed import _channel_overlap, _kept_channels

RECIPE = """\
version: 1
name: eed-channels-digits
stages:
  - method: eed
    structure: channel
    scores: [magnitude, taylor]
    target_macs: 0.5
    epochs: 1
    batch_size: 64
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    max_train_samples: 500
    adversarial: {eps: 0.1, step: 0.05, steps: 2}
bench:
  enabled: false
"""


def test_kept_channels_follow_the_shifting_positions_of_the_history():
    sizes = {("a", True): 6, ("b", True): 4}
    # step 1 removes original 1 and 4; step 2 removes position 0 of what is left (= original 0)
    kept = _kept_channels([("a", True, [1, 4]), ("a", True, [0]), ("zz", True, [0])], sizes)
    assert kept == {("a", True): [2, 3, 5]}
    other = {("a", True): [0, 1, 5], ("b", True): [0, 1]}
    # removed: {0, 1, 4} vs {2, 3, 4} in a, {} vs {2, 3} in b -> 1 common of 7
    assert _channel_overlap(kept, other, sizes) == pytest.approx(1 / 7)
    assert _channel_overlap(kept, kept, sizes) == 1.0


def test_structure_settings_are_validated(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    with pytest.raises(RecipeError, match="remove target_sparsity"):
        load_recipe(str(p), ["stages.0.target_sparsity=0.3"])
    with pytest.raises(RecipeError, match="apply to structure: channel"):
        load_recipe(str(p), ["stages.0.structure=weight", "stages.0.target_macs=0.4"])


@pytest.mark.integration
def test_channel_members_are_smaller_different_and_rebuild_from_disk(tmp_path, capsys):
    import onnxruntime as ort

    from edgec.runs import rebuild_model
    from edgec.stages.eed import Ensemble

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_cli_e2e import train_digits

    weights = train_digits(tmp_path / "fp32.pt", epochs=2)
    recipe = tmp_path / "eed.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--recipe", recipe, "--out", out, "--device", "cpu")
    assert res.code == 0, res.err + res.out
    events = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    ch = next(e for e in events if e.get("event") == "eed_channels")
    assert all(r["macs_ratio"] <= 0.5 and r["params"] < ch["input_params"] for r in ch["members"])
    assert ch["removed_overlap"][0] < 1.0  # the two scores removed different channels

    fp32 = json.loads((out / "export/model_fp32.check.json").read_text())
    check = json.loads((out / "export/ensemble/ensemble.check.json").read_text())
    assert all(m["params_total"] < 0.7 * fp32["params_total"] for m in check["members"])  # smaller graphs
    assert check["pred_agreement"] >= 0.99

    ens = rebuild_model(out)  # from stages/stage0.arch.json + the state_dict, no pickle
    assert isinstance(ens, Ensemble)
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in ens.members]
    assert shapes[0] != shapes[1]
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    for k, mem in enumerate(ens.members):
        sess = ort.InferenceSession(str(out / f"export/ensemble/member{k}.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            ref = mem(torch.from_numpy(x)).numpy()
        assert np.abs(got - ref).max() < 1e-4
