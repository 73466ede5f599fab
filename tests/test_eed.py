"""EED: ensemble of differently-pruned sub-models, its loss, and the dynamic-inference runtime."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_util import run_cli
from edgec.runtime.ensemble import DynamicEnsemble, calibrate_threshold, early_exit

# ----------------------------------------------------------------------------------------------
# the controller (numpy only)


def _probs(rows):
    return np.asarray(rows, dtype=np.float64)


def test_early_exit_confidence_and_agreement():
    # K=3 members, N=3 inputs, C=2 classes
    probs = _probs([
        [[0.95, 0.05], [0.60, 0.40], [0.55, 0.45]],
        [[0.90, 0.10], [0.70, 0.30], [0.20, 0.80]],
        [[0.10, 0.90], [0.10, 0.90], [0.10, 0.90]],
    ])
    pred, used, avg = early_exit(probs, threshold=0.9)
    assert used.tolist() == [1, 3, 3]  # input 0 confident after member 0; the others never reach 0.9
    assert pred.tolist() == [0, 1, 1]
    assert np.allclose(avg[1], probs[:, 1].mean(0))
    pred, used, _ = early_exit(probs, threshold=0.64)
    assert used.tolist() == [1, 2, 3]  # input 1: (0.6+0.7)/2 = 0.65 after two; input 2: 0.625
    assert pred.tolist() == [0, 0, 1]
    pred, used, _ = early_exit(probs, threshold=None, agree=2)
    assert used.tolist() == [2, 2, 3]  # inputs 0 and 1: members 0 and 1 agree on class 0
    pred, used, _ = early_exit(probs, threshold=None)
    assert used.tolist() == [3, 3, 3]
    assert pred.tolist() == probs.mean(0).argmax(1).tolist()


def test_calibrate_threshold_picks_the_cheapest_that_reaches_the_target():
    rng = np.random.default_rng(0)
    n, c = 400, 5
    y = rng.integers(0, c, n)
    easy = rng.random(n) < 0.6
    probs = np.full((3, n, c), 0.1 / (c - 1))
    for k in range(3):
        right = easy | (rng.random(n) < 0.6)  # hard inputs: each member right 60% of the time
        conf = np.where(easy, 0.95, 0.5)
        cls = np.where(right, y, (y + 1 + k) % c)
        probs[k] = (1 - conf)[:, None] / (c - 1)
        probs[k, np.arange(n), cls] = conf
    cal = calibrate_threshold(probs, y)
    assert cal["reached"] and cal["accuracy"] >= cal["full_accuracy"]
    assert 1.0 < cal["avg_members"] < 3.0  # easy inputs stop after one member
    # every lower threshold misses the target
    pred, used, _ = early_exit(probs, threshold=cal["threshold"] - 1e-9)
    assert (pred == y).mean() < cal["target_accuracy"] or used.mean() == cal["avg_members"]
    loose = calibrate_threshold(probs, y, tolerance=0.1)
    assert loose["avg_members"] <= cal["avg_members"]
    impossible = calibrate_threshold(probs, y, target_accuracy=1.0)
    assert not impossible["reached"] and impossible["threshold"] == float("inf") and impossible["avg_members"] == 3


def test_runtime_ensemble_imports_no_torch():
    code = "import sys, edgec.runtime.ensemble; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# the loss


def test_diversity_loss_and_eed_loss_terms():
    from edgec.attacks import Attack, InputSpace
    from edgec.models import create_model
    from edgec.stages.eed import Ensemble, diversity_loss, eed_loss, l1_of_kept
    from edgec import masks as P

    y = torch.tensor([0, 1])
    same = torch.randn(1, 2, 4).repeat(3, 1, 1)
    assert diversity_loss(same, y).item() == pytest.approx(1.0, abs=1e-5)
    big = 20.0  # members put their wrong-class mass on different classes: orthogonal
    apart = torch.zeros(2, 2, 4)
    apart[0, :, 2] = big
    apart[1, :, 3] = big
    assert diversity_loss(apart, y).item() == pytest.approx(0.0, abs=1e-6)

    torch.manual_seed(0)
    members = [create_model("digits_cnn") for _ in range(2)]
    for m in members:
        P.ensure_masks(P.prunable_layers(m))
    ens = Ensemble(members).eval()
    x = torch.rand(8, 1, 8, 8)  # valid pixels: the attack clamps to [0, 1]
    yy = torch.randint(0, 10, (8,))
    space = InputSpace.identity(1)
    atk = Attack(eps=0.0, steps=1, random_start=False)  # eps 0: the clean batch

    def loss(**kw):
        args = dict(attack=atk, space=space, ratio=1.0, diversity=0.0, misclassified_weight=0.0, l1=0.0)
        args.update(kw)
        return eed_loss(ens, x, yy, **args)[0].item()

    zs = ens(x, True)
    base = torch.stack([F.cross_entropy(z, yy) for z in zs]).mean().item()
    assert loss() == pytest.approx(base, rel=1e-5)
    wrong = (F.softmax(zs, -1).mean(0).argmax(-1) != yy).float()
    w = 1 + 2.0 * wrong
    weighted = torch.stack([(F.cross_entropy(z, yy, reduction="none") * w).mean() for z in zs]).mean().item()
    assert loss(misclassified_weight=2.0) == pytest.approx(weighted, rel=1e-5)
    assert loss(l1=1e-3) == pytest.approx(base + 1e-3 * l1_of_kept(ens).item(), rel=1e-5)
    assert loss(diversity=0.5) == pytest.approx(base + 0.5 * diversity_loss(zs, yy).item(), rel=1e-5)
    # the ensemble forward is the log of the averaged probabilities
    assert torch.allclose(ens(x).exp(), F.softmax(zs, -1).mean(0), atol=1e-6)


def test_member_subsets_restrict_each_members_cross_entropy():
    from edgec.attacks import Attack, InputSpace
    from edgec.models import create_model
    from edgec.stages.eed import Ensemble, MemberSubsets, eed_loss, split_target
    from edgec import masks as P

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(400, 1, 8, 8), torch.randint(0, 10, (400,)))
    ms = MemberSubsets(data, 10, 3, 0.5, seed=1)
    share = ms.bits
    assert share.any(1).all()  # no sample is left out of every member's share
    assert 0.4 < share.mean().item() < 0.65 and not torch.equal(share[:, 0], share[:, 1])
    assert torch.equal(MemberSubsets(data, 10, 3, 0.5, seed=1).bits, share)  # fixed by the seed
    x0, t0 = ms[7]
    y, w = split_target(t0[None], 10)
    assert int(y) == int(data[7][1]) and torch.equal(w[:, 0], share[7])
    assert int(t0.argmax()) == int(data[7][1])  # what the engine reads as the class of a soft target

    members = [create_model("digits_cnn") for _ in range(3)]
    for m in members:
        P.ensure_masks(P.prunable_layers(m))
    ens = Ensemble(members).eval()
    x = torch.stack([ms[i][0] for i in range(16)])
    t = torch.stack([ms[i][1] for i in range(16)])
    yy, wk = split_target(t, 10)
    args = dict(attack=Attack(eps=0.0, steps=1, random_start=False), space=InputSpace.identity(1), ratio=1.0,
                diversity=0.0, misclassified_weight=0.0, l1=0.0)
    zs = ens(x, True)
    own = torch.stack([(F.cross_entropy(z, yy, reduction="none") * wk[k]).sum() / wk[k].sum()
                       for k, z in enumerate(zs)]).mean().item()
    assert eed_loss(ens, x, t, **args)[0].item() == pytest.approx(own, rel=1e-5)
    everyone = torch.stack([F.cross_entropy(z, yy) for z in zs]).mean().item()
    assert eed_loss(ens, x, yy, **args)[0].item() == pytest.approx(everyone, rel=1e-5)
    assert abs(own - everyone) > 1e-4


# ----------------------------------------------------------------------------------------------
# end to end through the CLI, then the dynamic artifact in ONNX Runtime

EED_RECIPE = """\
version: 1
name: eed-digits
stages:
  - method: eed
    scores: [magnitude, taylor, fisher]
    target_sparsity: 0.5
    epochs: 2
    batch_size: 32
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    adversarial: {eps: 0.1, step: 0.03, steps: 3}
    member_subset: 0.7
"""


@pytest.mark.integration
def test_eed_through_cli_and_dynamic_runtime(tmp_path, capsys):
    from edgec import importance as I
    from edgec import masks as P
    from edgec.attacks import Attack, InputSpace, robust_accuracy
    from edgec.runs import rebuild_model
    from edgec.models import save_weights
    from edgec.export.ensemble import export_dynamic
    from edgec.stages.eed import Ensemble, member_probs

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_attacks import _tensors, _train_digits

    base_model, data = _train_digits(epochs=3)
    base = save_weights(base_model, tmp_path / "base.pt")
    recipe = tmp_path / "eed.yaml"
    recipe.write_text(EED_RECIPE)
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", base, "--data", "digits",
                  "--recipe", recipe, "--out", out, "--device", "cpu", "--no-export")
    assert res.code == 0, res.err + res.out
    ens = rebuild_model(out, "final")
    assert isinstance(ens, Ensemble) and len(ens.members) == 3
    masks = []
    for mem in ens.members:
        layers = P.masked_layers(mem)
        total = sum(m.weight_mask.numel() for m in layers)
        assert sum(int((m.weight_mask == 0).sum()) for m in layers) == round(0.5 * total)
        assert all(torch.equal(m.weight * (1 - m.weight_mask), torch.zeros_like(m.weight)) for m in layers)
        masks.append([m.weight_mask for m in layers])
    assert I.mask_overlap(masks[0], masks[1]) < 1 and I.mask_overlap(masks[0], masks[2]) < 1
    assert np.isfinite(float(ens.threshold))
    events = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    cal = next(e for e in events if e.get("event") == "eed_calibration")
    assert cal["reached"] and cal["accuracy"] >= cal["target_accuracy"]

    space = InputSpace.from_bundle(data)
    x, y = _tensors(data.eval)
    pgd = Attack("pgd", eps=0.1, step=0.025, steps=10)
    acc = {"base": (robust_accuracy(base_model, [(x, y)], None, space), robust_accuracy(base_model, [(x, y)], pgd, space)),
           "eed": (robust_accuracy(ens, [(x, y)], None, space), robust_accuracy(ens, [(x, y)], pgd, space)),
           "member0": (robust_accuracy(ens.members[0], [(x, y)], None, space),
                       robust_accuracy(ens.members[0], [(x, y)], pgd, space))}
    assert acc["eed"][0] > 0.9
    assert acc["eed"][1] > acc["base"][1] + 0.05  # adversarial fine-tuning of the ensemble pays off

    # the deployable dynamic artifact: K graphs + manifest, numpy + ORT controller
    folder = export_dynamic(ens, data.input_shape, tmp_path / "dyn", agree=None)
    dyn = DynamicEnsemble.load(folder)
    assert dyn.k == 3 and dyn.threshold == pytest.approx(float(ens.threshold))
    xn = x.numpy()
    probs_t, _ = member_probs(ens, data.eval, "cpu")
    probs_o = dyn.member_probs(xn)
    assert np.allclose(probs_o, probs_t.numpy(), atol=1e-4)
    assert (dyn.predict_full(xn) == ens(x).argmax(-1).numpy()).mean() > 0.99
    for thr, agree in ((float(ens.threshold), None), (0.999, None), (0.999, 2)):
        dyn.threshold, dyn.agree = thr, agree
        pred, used = dyn.predict(xn)
        sim_pred, sim_used, _ = early_exit(probs_o, threshold=thr, agree=agree)
        assert np.array_equal(used, sim_used) and (pred == sim_pred).mean() > 0.99
    dyn.threshold, dyn.agree = float(ens.threshold), None
    pred, used = dyn.predict(xn)
    lat = dyn.compare_latency(xn[:60], rounds=1, warmup=1)
    full, fast = lat["full"], lat["dynamic"]
    assert fast["avg_members"] < 3 and full["avg_members"] == 3
    print(f"EED digits: clean/PGD10(eps 0.1) base {acc['base'][0]:.3f}/{acc['base'][1]:.3f}, "
          f"member0 {acc['member0'][0]:.3f}/{acc['member0'][1]:.3f}, ensemble {acc['eed'][0]:.3f}/{acc['eed'][1]:.3f}; "
          f"dynamic acc {(pred == y.numpy()).mean():.3f} with {used.mean():.2f} members, "
          f"latency dynamic/full {fast['mean_ms']:.3f}/{full['mean_ms']:.3f} ms "
          f"(threshold {float(ens.threshold):.4f})", file=sys.stderr)
