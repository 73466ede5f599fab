"""Importance scores (registry shared with the prune stage), exact-sparsity masks, channel shrink."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_util import run_cli
from edgec import importance as I
from edgec import masks as P
from edgec.errors import InputError

SCORES = ["magnitude", "taylor", "snip", "fisher", "fisher_w2", "random"]


@pytest.fixture(scope="module")
def digits():
    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model("digits_cnn")
    fit(model, loss_fn=lambda m, x, y: (F.cross_entropy(z := m(x), y), z), train_set=data.train, eval_set=None,
        cfg=TrainConfig(epochs=1, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    batches = I.sample_batches(data.train, 3, 64, seed=0)
    return model.eval(), data, batches


def _scores(model, batches, name, layers=None):
    layers = layers if layers is not None else P.prunable_layers(model, include_first_last=True)
    return layers, I.compute_scores(name, model, layers, batches=batches, seed=0)


def test_registry_names_and_errors(digits):
    model, _, _ = digits
    assert I.IMPORTANCE.names() == sorted(SCORES)
    with pytest.raises(InputError, match="did you mean 'taylor'"):
        I.IMPORTANCE.get("taylr")
    with pytest.raises(InputError, match="needs data"):
        I.compute_scores("taylor", model, P.prunable_layers(model))
    # the recipe field lists exactly the registry
    from edgec.stages.prune import PruneStage

    assert sorted(PruneStage.model_fields["importance"].annotation.__args__) == sorted(SCORES)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", SCORES)
def test_each_score_gives_exact_sparsity(digits, name, scope):
    model, _, batches = digits
    layers, scores = _scores(model, batches, name)
    assert [s.shape for s in scores] == [m.weight.shape for _, m in layers]
    assert all((s >= 0).all() and torch.isfinite(s).all() for s in scores)
    for sparsity in (0.3, 0.5, 0.9):
        masks = I.unstructured_masks(scores, sparsity, scope=scope)
        if scope == "global":
            n = sum(m.numel() for m in masks)
            assert sum(int((m == 0).sum()) for m in masks) == round(sparsity * n)
        else:
            for m in masks:
                assert int((m == 0).sum()) == round(sparsity * m.numel())


def test_different_scores_give_different_masks(digits):
    model, _, batches = digits
    masks = {n: I.unstructured_masks(_scores(model, batches, n)[1], 0.5) for n in SCORES}
    overlaps = {}
    for a, b in itertools.combinations(SCORES, 2):
        overlaps[(a, b)] = I.mask_overlap(masks[a], masks[b])
        assert overlaps[(a, b)] < 1.0, (a, b)
    assert I.mask_overlap(masks["taylor"], masks["taylor"]) == 1.0
    assert 0.4 < overlaps[("magnitude", "random")] < 0.6  # random is unrelated to everything
    print("pruned-set overlap at 50%:", {f"{a}/{b}": round(v, 3) for (a, b), v in overlaps.items()}, file=sys.stderr)


def _linear_case():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))), (torch.randn(7, 4), torch.randint(0, 3, (7,)))]

    def grad(x, y):  # CE of a linear layer: dL/dW = (softmax(Wx + b) - onehot(y))^T x / N
        p = torch.softmax(x @ lin.weight.detach().T + lin.bias.detach(), dim=1)
        return (p - F.one_hot(y, 3).float()).T @ x / len(y)

    return model, lin, batches, [grad(x, y) for x, y in batches]


def test_taylor_fisher_snip_equal_their_formulas_on_a_linear_layer():
    model, lin, batches, grads = _linear_case()
    layers = [("0", lin)]
    w = lin.weight.detach()
    taylor = I.compute_scores("taylor", model, layers, batches=batches)[0]
    assert torch.allclose(taylor, sum((w * g).abs() for g in grads), atol=1e-6)
    fisher = I.compute_scores("fisher", model, layers, batches=batches)[0]
    assert torch.allclose(fisher, sum(g * g for g in grads), atol=1e-7)
    fw2 = I.compute_scores("fisher_w2", model, layers, batches=batches)[0]
    assert torch.allclose(fw2, sum(g * g for g in grads) * w * w, atol=1e-7)
    snip = I.compute_scores("snip", model, layers, batches=batches)[0]
    raw = (w * (grads[0] + grads[1]) / 2).abs()
    assert torch.allclose(snip, raw / raw.sum(), atol=1e-6)
    assert snip.sum().item() == pytest.approx(1.0)
    # |w * sum g| != sum |w * g| once two batches disagree in sign: different rankings
    assert not torch.allclose(snip / snip.sum(), taylor / taylor.sum(), atol=1e-3)
    one = I.compute_scores("snip", model, layers, batches=batches[:1])[0]
    t1 = I.compute_scores("taylor", model, layers, batches=batches[:1])[0]
    assert torch.allclose(one, t1 / t1.sum(), atol=1e-6)  # with one batch they agree up to scale


def test_data_scores_touch_no_state(digits):
    model, _, batches = digits
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None  # left over from training
    frozen = model.conv1.weight
    frozen.requires_grad_(False)
    try:
        for name in ("taylor", "snip", "fisher"):
            _scores(model, batches, name)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        assert not frozen.requires_grad
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_random_is_seeded(digits):
    model, _, _ = digits
    layers = P.prunable_layers(model)
    a = I.compute_scores("random", model, layers, seed=1)
    b = I.compute_scores("random", model, layers, seed=1)
    c = I.compute_scores("random", model, layers, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_update_masks_takes_precomputed_scores(digits):
    import copy

    model, _, batches = digits
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    # default path unchanged: magnitude by name == magnitude precomputed
    l1 = P.prunable_layers(m1)
    P.update_masks(l1, 0.6, scope="global")
    l2 = P.prunable_layers(m2)
    P.update_masks(l2, 0.6, scope="global", scores=I.compute_scores("magnitude", m2, l2))
    assert all(torch.equal(a.weight_mask, b.weight_mask) for (_, a), (_, b) in zip(l1, l2))
    # taylor: exact count, and already-pruned weights stay pruned as sparsity grows
    m3 = copy.deepcopy(model)
    l3 = P.prunable_layers(m3)
    P.update_masks(l3, 0.3, scores=I.compute_scores("taylor", m3, l3, batches=batches))
    first = [m.weight_mask.clone() for _, m in l3]
    P.apply_masks(m3)
    P.update_masks(l3, 0.6, scope="layer", scores=I.compute_scores("taylor", m3, l3, batches=batches))
    for (_, m), f in zip(l3, first):
        assert int((m.weight_mask == 0).sum()) == round(0.6 * m.weight.numel())
        assert (m.weight_mask[f == 0] == 0).all()
    with pytest.raises(ValueError, match="one score tensor per layer"):
        P.update_masks(l3, 0.5, scores=[torch.ones(3)])


# ----------------------------------------------------------------------------------------------
# channels


def test_channel_masks_exact_counts():
    scores = [torch.rand(8, 4, 3, 3), torch.rand(16, 8), torch.rand(3, 2)]
    for s in (0.25, 0.5):
        masks = I.channel_masks(scores, s, scope="layer")
        assert [int((~m).sum()) for m in masks] == [round(s * 8), round(s * 16), round(s * 3)]
    ch = I.channel_scores(scores)
    assert torch.allclose(ch[0], scores[0].flatten(1).norm(dim=1))
    masks = I.channel_masks(scores, 0.5, scope="layer")
    assert torch.equal(masks[0], ch[0] > ch[0].sort().values[3])  # the 4 weakest channels go
    g = I.channel_masks(scores, 0.6, scope="global")
    assert sum(int((~m).sum()) for m in g) == round(0.6 * 27)
    assert all(int(m.sum()) >= 1 for m in g)
    # global with a layer that must keep one: still exact
    tiny = [torch.full((2, 1), 0.001), torch.ones(10, 1)]
    g = I.channel_masks(tiny, 0.5, scope="global")
    assert [int(m.sum()) for m in g] == [1, 5]


def _bn_noise(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so BN shifts do not hide mistakes
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("arch,shape", [("digits_cnn", (1, 8, 8)), ("resnet8", (3, 32, 32))])
@pytest.mark.parametrize("score", ["magnitude", "taylor"])
def test_shrink_channels_equals_masked_model(arch, shape, score):
    import copy

    from edgec.models import create_model

    torch.manual_seed(0)
    model = create_model(arch).eval()
    _bn_noise(model)
    x = torch.randn(16, *shape)
    y = torch.randint(0, 10, (16,))
    layers = I.channel_prunable_layers(model)
    scores = I.compute_scores(score, model, layers, batches=[(x, y)])
    keep = I.channel_masks(scores, 0.5, scope="layer")
    masked = copy.deepcopy(model)
    by_name = dict(masked.named_modules())
    I.zero_channels(masked, x[:1], {by_name[n]: k for (n, _), k in zip(layers, keep)})
    small = copy.deepcopy(model)
    by_name = dict(small.named_modules())
    I.shrink_channels(small, x[:1], {by_name[n]: k for (n, _), k in zip(layers, keep)})

    n_full = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 0.6 * n_full
    with torch.no_grad():
        z_full, z_masked, z_small = model(x), masked(x), small(x)
    assert z_small.shape == (16, 10)
    assert torch.allclose(z_small, z_masked, atol=1e-5), (z_small - z_masked).abs().max()
    assert not torch.allclose(z_full, z_masked, atol=1e-3)  # something was really removed
    if arch == "digits_cnn":  # no coupling: each layer keeps exactly half its channels
        assert (small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels) == (16, 32, 32)
        assert small.fc.in_features == 32 and small.bn2.num_features == 32
    print(f"{arch} {score}: params {n_full} -> {n_small}", file=sys.stderr)


def test_shrunk_model_exports_and_runs_in_ort(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgec.models import create_model

    model = create_model("digits_cnn").eval()
    layers = I.channel_prunable_layers(model)
    keep = I.channel_masks(I.compute_scores("magnitude", model, layers), 0.75, scope="layer")
    x = torch.randn(4, 1, 8, 8)
    I.shrink_channels(model, x[:1], {m: k for (_, m), k in zip(layers, keep)})
    from edgec.export.onnx_export import export_onnx

    path = tmp_path / "small.onnx"
    export_onnx(model, (1, 8, 8), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.allclose(out, ref, atol=1e-4)


def test_channel_errors():
    from edgec.models import create_model

    model = create_model("digits_cnn").eval()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(InputError, match="every channel"):
        I.shrink_channels(model, x, {model.conv1: torch.zeros(32, dtype=torch.bool)})
    with pytest.raises(InputError, match="entries"):
        I.shrink_channels(model, x, {model.conv1: torch.ones(5, dtype=torch.bool)})
    P.ensure_masks(P.prunable_layers(model))
    with pytest.raises(InputError, match="unstructured"):
        I.shrink_channels(model, x, {model.conv1: torch.ones(32, dtype=torch.bool)})


# ----------------------------------------------------------------------------------------------
# the prune stage with a data-aware score, through the CLI

PRUNE_RECIPE = """\
version: 1
name: taylor-prune
stages:
  - method: prune
    target_sparsity: 0.6
    importance: {importance}
    importance_batches: 2
    epochs: 1
    batch_size: 32
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
    update_every: 8
"""


@pytest.mark.integration
def test_prune_stage_importance_through_cli(tmp_path, capsys, digits):
    from edgec.runs import rebuild_model
    from edgec.models import save_weights

    model, _, _ = digits
    base = save_weights(model, tmp_path / "base.pt")
    masks = {}
    for name in ("taylor", "magnitude"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(PRUNE_RECIPE.format(importance=name))
        out = tmp_path / name
        res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", base, "--data", "digits",
                      "--recipe", recipe, "--out", out, "--device", "cpu", "--no-export")
        assert res.code == 0, res.err + res.out
        final = rebuild_model(out, "final")
        masked = P.masked_layers(final)
        total = sum(m.weight_mask.numel() for m in masked)
        assert sum(int((m.weight_mask == 0).sum()) for m in masked) == round(0.6 * total)
        masks[name] = [m.weight_mask for m in masked]
    assert I.mask_overlap(masks["taylor"], masks["magnitude"]) < 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(PRUNE_RECIPE.format(importance="taylr"))
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", base, "--data", "digits",
                  "--recipe", bad, "--out", tmp_path / "bad", "--device", "cpu", "--no-export")
    assert res.code != 0 and "importance" in res.err
