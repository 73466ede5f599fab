"""edgec.architecture: a shrunk architecture recorded as JSON and re-applied to a fresh instance (no pickle)."""
import json

import pytest
import torch
from torch import nn

from edgec import architecture as A
from edgec.errors import InputError
from edgec.models import create_model

tp = pytest.importorskip("torch_pruning")


def _shrunk_resnet20():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=0.4, ignored_layers=[model.fc], round_to=4)
    pruner.step()
    return model, x


def test_record_apply_rebuilds_shrunk_resnet20(tmp_path):
    model, x = _shrunk_resnet20()
    fresh = create_model("resnet20", num_classes=10)
    with pytest.raises(RuntimeError):  # the point: a state_dict alone does not fit
        fresh.load_state_dict(model.state_dict())
    A.save(model, tmp_path / "arch.json")
    rec = A.load(tmp_path / "arch.json")
    json.dumps(rec)
    assert rec["modules"]["conv1"]["out_channels"] < 16
    fresh = A.apply(create_model("resnet20", num_classes=10), rec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert A.record(fresh) == rec


def test_apply_names_the_module_that_does_not_fit():
    model, _ = _shrunk_resnet20()
    rec = A.record(model)
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(InputError, match="conv1"):
        A.apply(other, rec)
    fresh = create_model("resnet20", num_classes=10)
    fresh.conv1 = nn.Conv1d(3, 16, 3)
    with pytest.raises(InputError, match="'conv1' is a Conv1d"):
        A.apply(fresh, rec)
    with pytest.raises(InputError, match="not an edgec architecture record"):
        A.apply(create_model("resnet20", num_classes=10), {"modules": {}})


def test_norm_and_conv1d_shapes_roundtrip():
    def net():
        return nn.Sequential(nn.Conv1d(4, 8, 3), nn.GroupNorm(2, 8), nn.Conv1d(8, 6, 1), nn.LayerNorm(5),
                             nn.Flatten(), nn.Linear(30, 3))
    a = net()
    a[0], a[1], a[2] = nn.Conv1d(4, 4, 3), nn.GroupNorm(2, 4), nn.Conv1d(4, 6, 1)
    b = A.apply(net(), A.record(a))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 7)
    assert torch.equal(a(x), b(x)) and b[1].num_channels == 4 and b[2].in_channels == 4
