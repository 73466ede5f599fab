"""FGSM / PGD (L-inf, L2) in pixel space on normalised inputs, and PGD adversarial training."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from cli_util import run_cli
from edgec.attacks import Attack, InputSpace, adversarial_loss, fgsm, pgd, robust_accuracy
from edgec.errors import InputError

EPS = 0.1  # pixel units; digits have 17 grey levels, so 8/255 is half a level and barely moves a model


def _train_digits(epochs: int = 3):
    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model("digits_cnn")
    fit(model, loss_fn=lambda m, x, y: (F.cross_entropy(z := m(x), y), z), train_set=data.train, eval_set=None,
        cfg=TrainConfig(epochs=epochs, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    return model.eval(), data


def _tensors(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor([int(y) for y in ys])


@pytest.fixture(scope="module")
def trained():
    model, data = _train_digits()
    x, y = _tensors(data.eval)
    return model, data, InputSpace.from_bundle(data), x, y


# ----------------------------------------------------------------------------------------------
# the input space


def test_input_space_maps_digits_to_pixels(trained):
    _, data, space, x, _ = trained
    p = space.to_pixel(x)
    assert p.min().item() == pytest.approx(0.0, abs=1e-5) and p.max().item() == pytest.approx(1.0, abs=1e-5)
    # raw digits are 0..16: pixels are multiples of 1/16
    assert torch.allclose(p * 16, (p * 16).round(), atol=1e-4)
    assert torch.allclose(space.to_model(p), x, atol=1e-5)
    lo, hi = space.lower(x), space.upper(x)
    assert lo.shape == (1, 1, 1, 1)
    assert x.min() >= lo.min() - 1e-5 and x.max() <= hi.max() + 1e-5
    assert space.eps_model(8 / 255, x).item() == pytest.approx(8 / 255 / data.normalization["std"][0])


def test_input_space_per_channel_cifar_like():
    space = InputSpace.from_normalization({"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.5, 0.2], "input_scale": 1 / 255})
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(space.lower(x).flatten(), torch.tensor([-2.0, -0.8, -1.5]))
    assert torch.allclose(space.upper(x).flatten(), torch.tensor([2.0, 1.2, 3.5]))
    assert torch.allclose(space.eps_model(0.1, x).flatten(), torch.tensor([0.4, 0.2, 0.5]))
    assert torch.allclose(space.to_pixel(x)[:, :, 0, 0], torch.tensor([[0.5, 0.4, 0.3]] * 2))
    with pytest.raises(InputError, match="channels"):
        space.to_pixel(torch.zeros(1, 2, 4, 4))
    with pytest.raises(InputError, match="normalization"):
        InputSpace.from_normalization({})
    with pytest.raises(InputError, match="std"):
        InputSpace((0.0,), (0.0,))


def test_attack_config_is_checked():
    with pytest.raises(InputError, match="norm"):
        Attack(norm="l1")
    with pytest.raises(InputError, match="steps"):
        Attack(steps=0)


# ----------------------------------------------------------------------------------------------
# the ball and the valid range


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.8)])
@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_perturbation_inside_ball_and_pixel_range(trained, norm, eps, kind):
    model, _, space, x, y = trained
    x, y = x[:128], y[:128]
    g = torch.Generator().manual_seed(1)
    if kind == "pgd":
        xa = pgd(model, x, y, space=space, eps=eps, step=eps / 4, steps=5, norm=norm, generator=g)
    else:
        xa = fgsm(model, x, y, space=space, eps=eps, norm=norm)
    pa = space.to_pixel(xa)
    assert pa.min() >= -1e-6 and pa.max() <= 1 + 1e-6  # a valid image after mapping back
    d = space.pixel_delta(xa, x)
    if norm == "linf":
        size = d.abs().flatten(1).amax(1)
    else:
        size = d.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-5).all()
    # it really perturbs: most samples use (nearly) the whole budget (the pixel clamp can cut some)
    assert (size > 0.9 * eps).float().mean() > 0.5
    if norm == "linf" and kind == "fgsm":  # sign steps: every free pixel moved by exactly eps
        p = space.to_pixel(x)
        free = (p > eps + 1e-4) & (p < 1 - eps - 1e-4)
        moved = d.abs()[free]
        assert torch.allclose(moved, torch.full_like(moved, eps), atol=1e-5)


def test_pgd_beats_fgsm_on_trained_digits(trained):
    model, _, space, x, y = trained
    batches = [(x, y)]
    clean = robust_accuracy(model, batches, None, space)
    f = robust_accuracy(model, batches, Attack("fgsm", eps=EPS), space)
    p = robust_accuracy(model, batches, Attack("pgd", eps=EPS, steps=10), space, seed=0)
    p_l2 = robust_accuracy(model, batches, Attack("pgd", norm="l2", eps=0.8, steps=10), space)
    f_l2 = robust_accuracy(model, batches, Attack("fgsm", norm="l2", eps=0.8), space)
    print(f"digits_cnn eval: clean {clean:.3f}  FGSM-Linf {f:.3f}  PGD10-Linf {p:.3f}  (eps={EPS})  "
          f"FGM-L2 {f_l2:.3f}  PGD10-L2 {p_l2:.3f} (eps=0.8)")
    assert clean > 0.95
    assert f < clean - 0.1
    assert p < f - 0.05
    assert p_l2 < f_l2 - 0.05


def test_same_seed_same_batch_and_state_untouched(trained):
    model, _, space, x, y = trained
    x, y = x[:64], y[:64]
    model.train()
    model.bn1.eval()  # a module left in its own mode must keep it
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None
    try:
        a = pgd(model, x, y, space=space, eps=EPS, step=0.02, steps=3, generator=torch.Generator().manual_seed(7))
        b = pgd(model, x, y, space=space, eps=EPS, step=0.02, steps=3, generator=torch.Generator().manual_seed(7))
        c = pgd(model, x, y, space=space, eps=EPS, step=0.02, steps=3, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        torch.manual_seed(3)
        d1 = Attack(eps=EPS, steps=2)(model, x, y, space)
        torch.manual_seed(3)
        d2 = Attack(eps=EPS, steps=2)(model, x, y, space)
        assert torch.equal(d1, d2)  # no generator: torch's global RNG (checkpointed by the engine)
        assert model.training and not model.bn1.training and model.bn2.training
        assert all(p.grad is None for p in model.parameters())
        for k, v in model.state_dict().items():  # BN running stats untouched
            assert torch.equal(v, stats[k]), k
    finally:
        model.eval()


def test_targeted_moves_towards_target(trained):
    model, _, space, x, y = trained
    x, y = x[:64], y[:64]
    target = (y + 1) % 10
    xa = pgd(model, x, y=target, space=space, eps=0.3, step=0.05, steps=10, targeted=True,
             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hit = (model(xa).argmax(-1) == target).float().mean().item()
    assert hit > 0.5


def test_adversarial_loss_wrapper(trained):
    model, _, space, x, y = trained
    x, y = x[:32], y[:32]
    ce = lambda m, a, b: (F.cross_entropy(z := m(a), b), z)  # noqa: E731
    atk = Attack(eps=EPS, steps=3)
    clean, _ = adversarial_loss(ce, atk, space, ratio=0.0)(model, x, y)
    assert clean.item() == pytest.approx(ce(model, x, y)[0].item())
    pure, z = adversarial_loss(ce, atk, space, ratio=1.0, generator=torch.Generator().manual_seed(5))(model, x, y)
    xa = atk(model, x, y, space, generator=torch.Generator().manual_seed(5))
    assert pure.item() == pytest.approx(ce(model, xa, y)[0].item(), rel=1e-6)
    assert pure.item() > clean.item()
    half, _ = adversarial_loss(ce, atk, space, ratio=0.5, generator=torch.Generator().manual_seed(5))(model, x, y)
    assert half.item() == pytest.approx(0.5 * clean.item() + 0.5 * pure.item(), rel=1e-5)
    with pytest.raises(InputError):
        adversarial_loss(ce, atk, space, ratio=1.5)


# ----------------------------------------------------------------------------------------------
# against a maintained library (torchattacks: its code never imports torchvision, but its pip
# metadata pulls a torchvision whose ops do not load beside this CPU torch; install it with
# `pip install --no-deps torchattacks==3.5.1` to run this comparison)


@pytest.mark.parametrize("kind,norm,eps", [("fgsm", "linf", EPS), ("pgd", "linf", EPS), ("pgd", "l2", 0.8)])
def test_matches_torchattacks(trained, kind, norm, eps):
    ta = pytest.importorskip("torchattacks", reason="torchattacks not installed (pip install --no-deps torchattacks)")
    model, data, space, x, y = trained
    x, y = x[:128], y[:128]
    norm_cfg = data.normalization
    if kind == "fgsm":
        ref_atk = ta.FGSM(model, eps=eps)
        ours = fgsm(model, x, y, space=space, eps=eps, norm=norm)
    elif norm == "linf":
        ref_atk = ta.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)
        ours = pgd(model, x, y, space=space, eps=eps, step=eps / 4, steps=10, norm=norm, random_start=False)
    else:
        ref_atk = ta.PGDL2(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)
        ours = pgd(model, x, y, space=space, eps=eps, step=eps / 4, steps=10, norm=norm, random_start=False)
    ref_atk.set_normalization_used(mean=norm_cfg["mean"], std=norm_cfg["std"])
    # with set_normalization_used, torchattacks takes and returns normalised inputs and attacks in pixel space
    ref = ref_atk(x, y)
    diff = space.pixel_delta(ours, ref).abs()
    # identical up to float rounding (a sign of a near-zero gradient may flip on a few pixels)
    print(f"torchattacks {kind}-{norm}: max |diff| {diff.max().item():.2e}, share > 1e-4: {(diff > 1e-4).float().mean().item():.4f}")
    assert (diff > 1e-4).float().mean().item() < 0.01
    with torch.no_grad():
        agree = (model(ours).argmax(-1) == model(ref).argmax(-1)).float().mean().item()
    assert agree > 0.97


# ----------------------------------------------------------------------------------------------
# PGD-AT through the CLI


AT_RECIPE = """\
version: 1
name: digits-pgd-at
stages:
  - method: train
    epochs: 3
    batch_size: 32
    optimizer: adam
    lr: 0.002
    weight_decay: 0.0
{adv}
"""
ADV = """\
    adversarial: {attack: pgd, norm: linf, eps: 0.1, step: 0.03, steps: 3, random_start: true, ratio: 1.0}
"""


def test_recipe_adversarial_block_is_strict():
    from edgec.errors import RecipeError
    from edgec.recipe import validate_recipe

    base = {"stages": [{"method": "train", "adversarial": {"attack": "pgd", "eps": 0.03}}]}
    r = validate_recipe(base, [])
    adv = r.stages[0].adversarial
    assert (adv.attack, adv.norm, adv.steps, adv.step, adv.ratio, adv.random_start) == ("pgd", "linf", 10, None, 1.0, True)
    assert Attack.from_config(adv) == Attack("pgd", "linf", 0.03, None, 10, True)
    with pytest.raises(RecipeError) as info:
        validate_recipe({"stages": [{"method": "train", "adversarial": {"epsilon": 0.03, "norm": "l1", "ratio": 2}}]}, [])
    text = str(info.value) + "\n".join(getattr(info.value, "problems", []) or [])
    for key in ("adversarial.epsilon", "adversarial.norm", "adversarial.ratio"):
        assert key in text, text


@pytest.mark.integration
def test_pgd_at_through_cli(tmp_path, capsys):
    from edgec.runs import rebuild_model
    from edgec.models import save_weights

    model, data = _train_digits(epochs=2)
    base = save_weights(model, tmp_path / "base.pt")
    space = InputSpace.from_bundle(data)
    x, y = _tensors(data.eval)
    robust = {}
    for name, adv in (("clean", ""), ("at", ADV)):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(AT_RECIPE.format(adv=adv))
        out = tmp_path / name
        res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", base, "--data", "digits",
                      "--recipe", recipe, "--out", out, "--device", "cpu", "--no-export")
        assert res.code == 0, res.err + res.out
        final = rebuild_model(out, "final").eval()
        robust[name] = (robust_accuracy(final, [(x, y)], None, space),
                        robust_accuracy(final, [(x, y)], Attack("pgd", eps=EPS, step=0.025, steps=10), space))
        lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        train_acc = [r["train_acc"] for r in lines if "train_acc" in r and r.get("epoch") is not None]
        robust[name] += (train_acc[-1],)
    print("fine-tune clean vs PGD-AT (clean acc, PGD10 acc, last train acc):", robust, file=sys.stderr)
    clean_ft, at = robust["clean"], robust["at"]
    assert at[1] > clean_ft[1] + 0.1  # PGD-AT makes the model robust
    assert at[0] > 0.85  # at a modest cost in clean accuracy
    assert at[2] < clean_ft[2]  # train accuracy is measured on adversarial batches
