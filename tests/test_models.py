"""Model zoo, model specs and safe weight loading (edgec.models)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.fx
from torch import nn

from edgec.errors import ModelError
from edgec.models import create_model, list_models, load_weights, model_info, resolve_model, save_weights

ZOO_NAMES = ["resnet8", "resnet20", "resnet32", "resnet56", "digits_cnn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_params(depth: int, num_classes: int = 10, in_channels: int = 3, option_b: bool = True) -> int:
    """Hand formula: bias-free convs, BN = 2 params per channel, Linear with bias."""
    n = (depth - 2) // 6
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_channels, 16, 3) + bn(16)
    cin = 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            if cin != w and option_b:
                total += conv(cin, w, 1) + bn(w)
            cin = w
    return total + 64 * num_classes + num_classes


# ---------------------------------------------------------------------------------------- zoo
def test_list_models():
    assert list_models() == ["bcresnet1", "bcresnet1.5", "bcresnet2", "bcresnet3", "bcresnet6", "bcresnet8",
                             "bcresnet_asc", "bcresnet_asc_nonorm", "bcresnet_asc_rfn",
                             "digits_cnn", "resnet8", "resnet20", "resnet32", "resnet56"]
    assert list_models("resnet*") == ["resnet8", "resnet20", "resnet32", "resnet56"]
    assert list_models("*vit*") == []


def test_import_is_torch_free():
    import subprocess

    code = "import sys, edgec.models as m; m.list_models(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_shape_and_fx_trace(name):
    info = model_info(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, *info["input_shape"])
    y = model(x)
    assert y.shape == (2, 7)

    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), y)
    # Quantization-friendly graph: every module called once (no shared ReLU), ReLUs not inplace.
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(called) == len(set(called))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    if name.startswith("resnet"):
        adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
        assert len(adds) == 3 * ((int(name[6:]) - 2) // 6)  # one residual add per block


@pytest.mark.parametrize("depth", [8, 20, 32, 56])
def test_resnet_param_counts(depth):
    name = f"resnet{depth}"
    assert n_params(create_model(name)) == cifar_resnet_params(depth)
    assert model_info(name)["params"] == cifar_resnet_params(depth)
    assert n_params(create_model(name, num_classes=100)) == cifar_resnet_params(depth, num_classes=100)
    assert n_params(create_model(name, in_channels=1)) == cifar_resnet_params(depth, in_channels=1)


def test_resnet20_reference_counts():
    # He et al.: 0.27M with parameter-free option-A shortcuts; option B adds two 1x1 conv+BN.
    assert cifar_resnet_params(20, option_b=False) == 269_722
    assert n_params(create_model("resnet20")) == 272_474 == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)


def test_digits_cnn_params_and_width():
    from edgec.models.small import digits_cnn

    expected = (1 * 32 * 9 + 64) + (32 * 64 * 9 + 128) + (64 * 64 * 9 + 128) + (64 * 10 + 10)
    assert n_params(create_model("digits_cnn")) == expected == 56_554
    assert model_info("digits_cnn") == {
        "name": "digits_cnn",
        "description": model_info("digits_cnn")["description"],
        "input_shape": (1, 8, 8),
        "num_classes": 10,
        "params": 56_554,
    }
    small = digits_cnn(num_classes=3, width=8)
    assert small(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert small.conv2.out_channels == 16 and small.fc.in_features == 16


def test_unknown_zoo_name_did_you_mean():
    # difflib ties resnet32/resnet20 for "resnet2O"; both are offered
    with pytest.raises(ModelError, match=r"unknown model 'resnet2O'; did you mean .*'resnet20'"):
        resolve_model("resnet2O")
    with pytest.raises(ModelError, match=r"did you mean .*'resnet20'"):
        model_info("resnet2O")
    with pytest.raises(ModelError, match=r"did you mean 'digits_cnn'"):
        create_model("digit_cnn")


def test_bad_constructor_args():
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        create_model("resnet20", num_classes=0)
    from edgec.models.resnet_cifar import ResNetCifar

    with pytest.raises(ModelError, match="6n\\+2"):
        ResNetCifar(21)


# -------------------------------------------------------------------------------------- specs
FACTORY_SRC = textwrap.dedent(
    """
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(x)

    def build(num_classes=10):
        return Net(num_classes)

    def build_fixed():
        return Net(5)

    def build_kwargs(**kw):
        return Net(kw.get("num_classes", 10))

    def not_a_model():
        return 42

    instance = Net()
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"edgec_test_usernet_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


def test_file_spec(user_module):
    _, path = user_module
    model = resolve_model(f"{path}:build", num_classes=3)
    assert model.fc.out_features == 3
    assert resolve_model(f"{path}:build").fc.out_features == 10
    assert resolve_model(f"{path}:Net", num_classes=4).fc.out_features == 4  # a class is a factory too


def test_module_spec(user_module):
    name, _ = user_module
    assert resolve_model(f"{name}:build", num_classes=3).fc.out_features == 3
    assert resolve_model(f"{name}:build_kwargs", num_classes=6).fc.out_features == 6


def test_factory_without_num_classes_is_called_without_it(user_module):
    name, _ = user_module
    with pytest.warns(UserWarning, match="does not accept num_classes=3"):
        model = resolve_model(f"{name}:build_fixed", num_classes=3)
    assert model.fc.out_features == 5
    assert resolve_model(f"{name}:build_fixed").fc.out_features == 5  # nothing requested: no warning


def test_spec_errors(user_module, tmp_path):
    name, path = user_module
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(f"{tmp_path / 'nope.py'}:build")
    with pytest.raises(ModelError, match=r"cannot import module 'no_such_pkg_xyz\.nets'"):
        resolve_model("no_such_pkg_xyz.nets:build")
    with pytest.raises(ModelError, match=r"no attribute 'biuld'; did you mean 'build'"):
        resolve_model(f"{name}:biuld")
    with pytest.raises(ModelError, match=r"no attribute 'biuld'; did you mean 'build'"):
        resolve_model(f"{path}:biuld")
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        resolve_model(f"{name}:not_a_model")
    with pytest.raises(ModelError, match="nn.Module instance, not a factory"):
        resolve_model(f"{name}:instance")
    with pytest.raises(ModelError, match="names no factory"):
        resolve_model(str(path))
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ModelError, match="importing model file .* failed: ModuleNotFoundError"):
        resolve_model(f"{broken}:build")


# ------------------------------------------------------------------------------------ weights
def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet8", num_classes=4)
    src.eval()(torch.randn(2, 3, 32, 32))  # touch BN buffers too
    with torch.no_grad():
        src.bn1.running_mean.uniform_()
    path = save_weights(src, tmp_path / "sub" / "w.pt")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["w.pt"]  # no tmp left
    assert set(torch.load(path, weights_only=True)) == {"model"}

    dst = resolve_model("resnet8", num_classes=4, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "ddp_prefix"])
def test_weights_accepted_layouts(tmp_path, wrap):
    src = create_model("digits_cnn")
    sd = src.state_dict()
    obj = {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "ddp_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    dst = load_weights(create_model("digits_cnn"), tmp_path / "w.pt")
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_weights_key_mismatch(tmp_path):
    torch.save(create_model("resnet8").state_dict(), tmp_path / "r8.pt")
    with pytest.raises(ModelError) as exc:
        resolve_model("resnet20", weights=tmp_path / "r8.pt")
    msg = str(exc.value)
    assert "missing keys (" in msg and "layer1.1.conv1.weight" in msg
    assert "... and" in msg  # long lists are cut after 10
    assert "same architecture / num_classes" in msg

    sd = create_model("digits_cnn").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["bn3.running_var"]
    torch.save(sd, tmp_path / "d.pt")
    with pytest.raises(ModelError) as exc:
        resolve_model("digits_cnn", weights=tmp_path / "d.pt")
    msg = str(exc.value)
    assert "missing keys (1):\n    bn3.running_var" in msg
    assert "unexpected keys (1):\n    extra.weight" in msg


def test_weights_shape_mismatch_num_classes(tmp_path):
    save_weights(create_model("digits_cnn", num_classes=10), tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"shape mismatches \(2\):\n    fc.weight: file \(10, 64\) vs model \(3, 64\)"):
        resolve_model("digits_cnn", num_classes=3, weights=tmp_path / "w.pt")


def test_pickled_module_needs_trust_pickle(user_module, tmp_path):
    name, _ = user_module
    model = resolve_model(f"{name}:build", num_classes=3)
    torch.save(model, tmp_path / "whole.pt")  # the whole module, pickled
    with pytest.raises(ModelError, match="--trust-pickle") as exc:
        resolve_model(f"{name}:build", num_classes=3, weights=tmp_path / "whole.pt")
    assert "pickled object" in str(exc.value) and "arbitrary code" in str(exc.value)
    assert f"{name}.Net" in str(exc.value)

    loaded = resolve_model(f"{name}:build", num_classes=3, weights=tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_missing_and_bad_weights_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("digits_cnn", weights=tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for f in ("text.pt", "empty.pt"):
        for trust in (False, True):
            with pytest.raises(ModelError, match="not a"):
                resolve_model("digits_cnn", weights=tmp_path / f, trust_pickle=trust)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nosd.pt")
    with pytest.raises(ModelError, match="not a state_dict"):
        resolve_model("digits_cnn", weights=tmp_path / "nosd.pt")
