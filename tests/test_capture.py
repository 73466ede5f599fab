"""Graph capture (edgec.capture) on user code with Python control flow, end to end through the CLI.

The user models below are written here, as a user would: a helper with a Python ``if`` on the input's
shape (so the model takes 8x8 and 16x16 inputs), a branch on an intermediate shape, a defaulted flag
``forward(self, x, embed=False)``. ``Plain`` computes exactly what ``Branchy`` computes on 8x8 input
and is what ``torch.fx.symbolic_trace`` takes: the two capture paths are compared on it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx

from cli_util import run_cli, subprocess_env

USER_MODELS = '''\
import torch
import torch.nn as nn
import torch.nn.functional as F


def fit8(x):
    """Let the model take any input size: pool larger inputs down to 8x8."""
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x


class _Body(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, num_classes)


class Plain(_Body):
    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        return self.fc(x)


class Branchy(_Body):
    def forward(self, x, embed=False):
        x = fit8(x)
        x = F.relu(self.bn1(self.conv1(x)))
        h, w = x.shape[-2:]
        x = F.relu(self.bn2(self.conv2(x)))
        if h > 4 and w > 4:
            x = F.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        if embed:
            return x
        return self.fc(x)


class ValueBranch(_Body):
    def forward(self, x):
        if x.mean() > 0:  # VALUE-BRANCH
            x = x * 0.5
        return Plain.forward(self, x)


class BatchBaked(_Body):
    def forward(self, x):
        x = fit8(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.reshape(len(x), -1))  # LEN-BATCH


class Stateful(Plain):
    calls = 0

    def forward(self, x):
        if x.shape[-1] != 8:
            x = fit8(x)
        self.calls = self.calls + 1
        return super().forward(x)


class Helpers(nn.Module):
    """Loops over shapes, tuple unpacking, math on sizes, a tensor factory sized by the batch."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1, groups=4) for _ in range(2)])
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        n, c, h, w = x.shape
        x = F.relu(self.stem(x))
        for i in range(len(self.blocks)):
            y = self.blocks[i](x)
            x = F.relu(y + x if y.shape == x.shape else y)
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([t / (t.shape[1] ** 0.5) for t in (a, b)], 1)
        for s in x.shape[2:]:
            if s > 4:
                x = F.avg_pool2d(x, 2)
                break
        x = F.adaptive_avg_pool2d(x, 2) + torch.zeros(x.size(0), 16, 1, 1)
        return self.fc(torch.flatten(x, 1))


def digits16():
    """The digits, upsampled to 16x16 (a second input size for the same model)."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from edgec.data import load_data

    b = load_data("digits")

    def up(ds):
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return TensorDataset(F.interpolate(torch.stack(xs), size=16, mode="nearest"), torch.as_tensor(ys))

    return replace(b, spec="", train=up(b.train), eval=up(b.eval), input_shape=(1, 16, 16))
'''


def _line_of(marker: str) -> int:
    return next(i for i, line in enumerate(USER_MODELS.splitlines(), 1) if marker in line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("capture")


@pytest.fixture(scope="module")
def user_file(workdir) -> Path:
    p = workdir / "user_models.py"
    p.write_text(USER_MODELS)
    return p


@pytest.fixture(scope="module")
def um(user_file):
    spec = importlib.util.spec_from_file_location("user_models_capture_test", user_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(um, name: str, path: Path, epochs: int) -> Path:
    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import save_weights

    torch.manual_seed(0)
    data = load_data("digits")
    model = getattr(um, name)()
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, cfg=TrainConfig(epochs=epochs, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0),
        ckpt_path=None, dist=DistContext.single("cpu"))
    return save_weights(model, path)


@pytest.fixture(scope="module")
def weights(workdir, um) -> Path:
    """Branchy trained briefly on digits in FP32 (Plain has the same parameters)."""
    return _train(um, "Branchy", workdir / "branchy_fp32.pt", 3)


@pytest.fixture(scope="module")
def helpers_weights(workdir, um) -> Path:
    return _train(um, "Helpers", workdir / "helpers_fp32.pt", 6)


# ------------------------------------------------------------------------------------------------
# capture itself (in process, fast)


def test_symbolic_models_keep_the_exact_fx_graph(um):
    from edgec.capture import capture

    m = um.Plain().eval()
    gm = capture(m, torch.randn(2, 1, 8, 8))
    assert gm.meta["edgec_capture"].path == "symbolic"
    assert gm.code == fx.symbolic_trace(m).code


def test_both_paths_give_the_same_graph_on_a_model_both_take(um):
    from edgec.capture import _concrete

    m = um.Plain().eval()
    forced = _concrete(m, (torch.randn(2, 1, 8, 8),), {})
    assert forced.meta["edgec_capture"].path == "concrete" and forced.meta["edgec_capture"].decisions == []
    assert forced.code == fx.symbolic_trace(m).code


def test_shape_branches_resolved_per_input_size(um):
    from edgec.capture import capture

    torch.manual_seed(0)
    m = um.Branchy().eval()
    g8 = capture(m, torch.randn(2, 1, 8, 8))
    g16 = capture(m, torch.randn(2, 1, 16, 16))
    assert g8.meta["edgec_capture"].path == g16.meta["edgec_capture"].path == "concrete"
    assert "adaptive_avg_pool2d" not in g8.code and "adaptive_avg_pool2d" in g16.code
    # the 8x8 capture of Branchy is the symbolic trace of Plain: same ops on the same modules
    assert g8.code == fx.symbolic_trace(um.Plain()).code
    # batch stays dynamic; outputs equal the eager model's at other batch sizes
    for x in (torch.randn(5, 1, 8, 8), torch.randn(1, 1, 8, 8)):
        assert torch.allclose(g8(x), m(x))
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(g16(x), m(x))
    # the user's own modules and parameters (same objects, same names)
    assert dict(g8.named_parameters()).keys() == dict(m.named_parameters()).keys()
    assert g8.conv1 is m.conv1 and g8.fc.weight is m.fc.weight
    assert [n.target for n in g8.graph.nodes if n.op == "call_module"] == ["conv1", "bn1", "conv2", "bn2", "fc"]


def test_capture_changes_nothing_in_the_model(um):
    from edgec.capture import capture

    m = um.Branchy().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    capture(m, torch.randn(2, 1, 16, 16))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # no BN stat update


def test_same_graph_from_real_samples_and_from_the_rebuild_input(um):
    from edgec.capture import capture, example_from_data, example_from_shape
    from edgec.data import load_data

    data = load_data("digits")
    m = um.Helpers().eval()
    real = capture(m, example_from_data(data))
    rebuilt = capture(m, example_from_shape(data.input_shape))
    assert real.code == rebuilt.code and real.meta["edgec_capture"].path == "concrete"
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(real(x), m(x), atol=1e-6)
    assert "torch.zeros(size" in real.code  # the batch-sized factory stays a node


def test_defaulted_flag_traces_symbolically(um):
    """Issue 11 item 4: forward(self, x, embed=False) -- made concrete at the default, no dangling input."""
    from edgec.capture import capture

    class Flagged(um.Plain):
        def forward(self, x, embed=False):
            z = super().forward(x)
            return z if not embed else z * 0

    m = Flagged().eval()
    gm = capture(m)  # no example input needed: fx takes it
    assert gm.meta["edgec_capture"].path == "symbolic"
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(gm(x), m(x))


def test_container_and_none_defaults(um):
    """Defaults that are tuples / None / str / int: baked in, one input left, the output unflattened."""
    from edgec.capture import capture

    class Sized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x, size=(8, 8), mode="avg", mask=None, k: int = 2):
            if x.shape[-2:] != size:
                x = torch.nn.functional.adaptive_avg_pool2d(x, size) if mode == "avg" else x[..., :8, :8]
            if mask is not None:
                x = x * mask
            return {"logits": self.fc(x.flatten(1)) * k}

    m = Sized().eval()
    for s in (8, 16):
        gm = capture(m, torch.randn(2, 1, s, s))
        assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
        x = torch.randn(3, 1, s, s)
        assert torch.equal(gm(x)["logits"], m(x)["logits"])


def test_value_branch_is_one_clear_error(um, user_file):
    from edgec.capture import capture
    from edgec.errors import InputError

    with pytest.raises(InputError) as info:
        capture(um.ValueBranch().eval(), torch.randn(2, 1, 8, 8))
    msg = str(info.value)
    assert f"{user_file}:{_line_of('VALUE-BRANCH')}" in msg
    assert "x.mean() > 0" in msg and "depends on tensor values" in msg and "torch.where" in msg


def test_batch_specialisation_and_python_state_are_refused(um, user_file):
    from edgec.capture import capture
    from edgec.errors import InputError

    with pytest.raises(InputError, match="depends on the batch size") as info:
        capture(um.BatchBaked().eval(), torch.randn(2, 1, 8, 8))
    assert f"{user_file}:{_line_of('LEN-BATCH')}" in str(info.value)
    with pytest.raises(InputError, match=r"changes Python state: `self.calls`"):
        capture(um.Stateful().eval(), torch.randn(2, 1, 16, 16))


def test_quantize_model_takes_an_example_input(um):
    from edgec.errors import InputError
    from edgec.quant.prepare import QuantSpec, quantize_model
    from edgec.targets import get_target

    m = um.Branchy().eval()
    with pytest.raises(InputError, match="example input"):
        quantize_model(m, QuantSpec(), get_target("x86"))
    gm, report = quantize_model(m, QuantSpec(), get_target("x86"), torch.randn(2, 1, 16, 16))
    assert report.quantized == ["conv1", "conv2", "fc"] and not report.left_float


def test_byte_budget_sees_the_folded_batchnorms(um):
    from edgec.budget import plan_bytes

    m = um.Branchy()
    blind = plan_bytes(m, target_bytes=10**6)
    seen = plan_bytes(m, target_bytes=10**6, example_input=torch.randn(2, 1, 8, 8))
    assert not blind.traced and blind.foldable_bn == 0
    assert seen.traced and seen.foldable_bn == 2 and seen.predicted_bytes < blind.predicted_bytes


# ------------------------------------------------------------------------------------------------
# end to end through the CLI: compress -> export -> bench

FAST = ("--set", "bench.runs=5", "--set", "bench.warmup=1", "--device", "cpu")
UNIFORM = ("--set", "stages.0.precision.keep_slow_float=false")  # qat-int8 / ptq-int8: the uniform integer graph


def _compress(capsys, out, model, weights, data, recipe, *sets):
    from cli_util import uniform_precision

    # these tests are about capture: the uniform integer graph, not this CPU's timing (edgec.mixed_precision)
    args = ["compress", "--model", model, "--data", data, "--recipe", recipe, "--out", out, *FAST,
            *uniform_precision(recipe, cli=True)]
    if weights:
        args += ["--weights", weights]
    for s in sets:
        args += ["--set", s]
    return run_cli(capsys, *args)


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]


def _eval_x(data_spec: str) -> np.ndarray:
    from edgec.data import load_data

    d = load_data(data_spec)
    return torch.stack([d.eval[i][0] for i in range(len(d.eval))]).numpy()


def _agreement(run: Path, x: np.ndarray) -> float:
    a = _ort_logits(run / "export/model_fp32.onnx", x).argmax(1)
    b = _ort_logits(run / "export/model_compressed.onnx", x).argmax(1)
    return float((a == b).mean())


def _report(capsys, line: str) -> None:
    with capsys.disabled():  # the numbers, visible with -s
        print("\n" + line)


def _check_run(run: Path, kernels: str) -> dict:
    rows = json.loads((run / "report.json").read_text())["rows"]
    fp32, comp = rows
    assert comp["parity_top1"] >= 0.99, comp
    assert comp["integer_kernels"] == kernels, comp
    return comp


@pytest.fixture(scope="module")
def digits_x():
    return _eval_x("digits")


@pytest.fixture(scope="module")
def plain_qat(workdir, user_file, weights):
    """The symbolic-trace path on the same weights (Plain == Branchy on 8x8)."""
    out = workdir / "plain_qat"
    res = _main("compress", "--model", f"{user_file}:Plain", "--weights", weights, "--data", "digits",
                "--recipe", "qat-int8", "--out", out, "--set", "stages.0.epochs=1", *FAST, *UNIFORM)
    assert res == 0
    return out


def _main(*args) -> int:
    from edgec.cli import main

    old = sys.argv
    sys.argv = ["edgec", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


@pytest.mark.integration
def test_branchy_qat_int8_digits_export_bench(workdir, user_file, weights, plain_qat, digits_x, capsys):
    out = workdir / "branchy_qat"
    res = _compress(capsys, out, f"{user_file}:Branchy", weights, "digits", "qat-int8", "stages.0.epochs=1")
    assert res.code == 0, res.err + res.out
    comp = _check_run(out, "3/3")
    plain = _check_run(plain_qat, "3/3")
    agree, agree_plain = _agreement(out, digits_x), _agreement(plain_qat, digits_x)
    _report(capsys, f"qat-int8 digits: agreement with FP32 concrete {agree:.4f} vs symbolic {agree_plain:.4f}; "
          f"acc {comp['accuracy']:.4f} vs {plain['accuracy']:.4f}; parity {comp['parity_top1']:.4f}")
    assert agree >= agree_plain - 0.01
    assert comp["accuracy"] > 0.85
    # the CLI's own export (rebuild_model from run.json's input shape) and bench of that file
    onnx = workdir / "again.onnx"
    res = run_cli(capsys, "export", out, "--out", onnx)
    assert res.code == 0 and "3/3 Conv/Gemm" in res.out, res.err + res.out
    np.testing.assert_allclose(_ort_logits(onnx, digits_x[:64]),
                               _ort_logits(out / "export/model_compressed.onnx", digits_x[:64]), atol=1e-5)
    js = workdir / "bench.json"
    res = run_cli(capsys, "bench", onnx, "--data", "digits", "--runs", "5", "--warmup", "1", "--json", js)
    assert res.code == 0, res.err
    assert json.loads(js.read_text())["accuracy"] == pytest.approx(comp["accuracy"], abs=1e-9)


@pytest.mark.integration
@pytest.mark.parametrize("data", ["digits", "digits16"])
def test_branchy_prune_qat_int8(workdir, user_file, weights, data, capsys):
    spec = "digits" if data == "digits" else f"python:{user_file}:digits16"
    out = workdir / f"branchy_prune_qat_{data}"
    res = _compress(capsys, out, f"{user_file}:Branchy", weights, spec, "prune-qat-int8",
                    "stages.0.epochs=1", "stages.1.epochs=1")
    assert res.code == 0, res.err + res.out
    comp = _check_run(out, "3/3")
    agree = _agreement(out, _eval_x(spec))
    _report(capsys, f"prune-qat-int8 {data}: acc {comp['accuracy']:.4f}, agreement with FP32 {agree:.4f}, "
          f"sparsity {comp['sparsity']:.3f}")
    assert agree >= 0.9 and comp["sparsity"] > 0.2  # conv2 at 50 % (first and last layers are not pruned)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["qat-int8", "prune-qat-int8"])
def test_helpers_model_qat_and_prune(workdir, user_file, helpers_weights, digits_x, recipe, capsys):
    """Loops over shapes, chunk/cat, math on sizes, a batch-sized torch.zeros, grouped convs, residual adds."""
    out = workdir / f"helpers_{recipe}"
    res = _compress(capsys, out, f"{user_file}:Helpers", helpers_weights, "digits", recipe,
                    *(("stages.0.epochs=1",) if recipe == "qat-int8" else ("stages.0.epochs=1", "stages.1.epochs=1")))
    assert res.code == 0, res.err + res.out
    comp = _check_run(out, "4/4")
    agree = _agreement(out, digits_x)
    _report(capsys, f"Helpers {recipe}: acc {comp['accuracy']:.4f}, agreement with FP32 {agree:.4f}, "
                    f"parity {comp['parity_top1']:.4f}")
    assert agree >= 0.9


@pytest.mark.integration
def test_branchy_qat_int8_second_input_size(workdir, user_file, weights, capsys):
    spec = f"python:{user_file}:digits16"
    out = workdir / "branchy_qat16"
    res = _compress(capsys, out, f"{user_file}:Branchy", weights, spec, "qat-int8", "stages.0.epochs=1")
    assert res.code == 0, res.err + res.out
    comp = _check_run(out, "3/3")
    assert json.loads((out / "run.json").read_text())["input_shape"] == [1, 16, 16]
    agree = _agreement(out, _eval_x(spec))
    _report(capsys, f"qat-int8 digits 16x16: acc {comp['accuracy']:.4f}, agreement with FP32 {agree:.4f}")
    assert agree >= 0.9


@pytest.mark.integration
@pytest.mark.parametrize("recipe,sets", [
    ("ptq-int8", ()),
    ("qkd", ("stages.0.epochs=3", "stages.0.weight_bits=8", "stages.0.act_bits=8")),
    ("pqk", ("stages.0.epochs=1", "stages.0.kd_epochs=1")),
    ("psg", ("stages.0.epochs=1", "stages.1.weight_bits=8")),
])
def test_other_quantizing_recipes_on_a_branching_model(workdir, user_file, weights, recipe, sets, capsys):
    out = workdir / f"branchy_{recipe}"
    res = _compress(capsys, out, f"{user_file}:Branchy", weights, "digits", recipe,
                    "export.parity_samples=360", "bench.enabled=false", *sets)
    assert res.code == 0, res.err + res.out
    par = json.loads((out / "export/model_compressed.check.json").read_text())["parity"]
    _report(capsys, f"{recipe}: parity {par['top1_agreement']:.4f}, {par['fused_compute']}/{par['compute_nodes']} "
          f"integer {par['integer_ops']}")
    assert par["top1_agreement"] >= 0.99 and par["fused_compute"] == par["compute_nodes"] == 3, par


@pytest.mark.integration
def test_eed_on_a_branching_model(workdir, user_file, weights, capsys):
    recipe = workdir / "eed_tiny.yaml"
    recipe.write_text("""\
version: 1
name: eed-tiny
target: x86
stages:
  - method: eed
    scores: [magnitude, random]
    target_sparsity: 0.5
    epochs: 1
    batch_size: 128
    optimizer: sgd
    lr: 0.005
    momentum: 0.9
    weight_decay: 0.0
    max_train_samples: 512
    adversarial: {attack: pgd, norm: linf, eps: 0.03, step: 0.01, steps: 1, random_start: true, ratio: 1.0}
bench: {runs: 3, warmup: 1}
""")
    out = workdir / "eed"
    res = run_cli(capsys, "compress", "--model", f"{user_file}:Branchy", "--weights", weights, "--data", "digits",
                  "--recipe", recipe, "--out", out, "--device", "cpu")
    assert res.code == 0, res.err + res.out
    assert (out / "report.json").is_file()


@pytest.mark.integration
def test_value_branch_through_the_cli(workdir, user_file, capsys):
    res = run_cli(capsys, "compress", "--model", f"{user_file}:ValueBranch", "--data", "digits", "--recipe",
                  "qat-int8", "--out", workdir / "value", "--set", "stages.0.epochs=1", "--device", "cpu")
    assert res.code == 2
    assert f"{user_file}:{_line_of('VALUE-BRANCH')}" in res.err and "depends on tensor values" in res.err
    assert "Traceback" not in res.err


@pytest.mark.integration
def test_resume_after_kill_on_a_branching_model(workdir, user_file, weights, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
version: 1
name: kill
target: x86
stages:
  - method: prune
    target_sparsity: 0.5
    epochs: 1
    batch_size: 64
    optimizer: adam
    lr: 0.001
    weight_decay: 0.0
  - method: qat
    epochs: 4
    batch_size: 64
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
    precision: {keep_slow_float: false}  # two runs compared: a measured choice may differ between them
""")
    env = subprocess_env(OMP_NUM_THREADS="1", EDGEC_NO_PROGRESS="1")

    def cmd(out, *extra):
        return [sys.executable, "-m", "edgec", "compress", "--model", f"{user_file}:Branchy", "--weights",
                str(weights), "--data", f"python:{user_file}:digits16", "--recipe", str(recipe), "--out", str(out),
                "--device", "cpu", "--no-export", *extra]

    full = subprocess.run(cmd(tmp_path / "a"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "b"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "stage1.pt"  # the first QAT epoch is done
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pt").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd(out, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "model_final.pt", weights_only=True)["model"]
    b = torch.load(out / "model_final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the exact rebuild from run.json (random input of the run's shape) takes the trained state
    from edgec.runs import rebuild_model

    model = rebuild_model(out, "final")
    assert "adaptive_avg_pool2d" in model.code


@pytest.mark.integration
@pytest.mark.skipif(not (Path(os.environ.get("EDGEC_DATA", "/nonexistent")) / "cifar10").is_dir(),
                    reason="CIFAR-10 not found under $EDGEC_DATA/cifar10")
def test_cifar10_32x32_input(workdir, user_file, capsys):
    """The same model class on 3x32x32 CIFAR-10 (fit8 pools 32 -> 8): captured for that shape."""
    root = Path(os.environ["EDGEC_DATA"]) / "cifar10"
    out = workdir / "cifar"
    res = run_cli(capsys, "compress", "--model", f"{user_file}:Branchy", "--data", f"cifar10:{root}",
                  "--recipe", "qat-int8", "--out", out, "--set", "stages.0.epochs=1",
                  "--set", "stages.0.max_train_samples=256", "--set", "export.parity_samples=200",
                  "--set", "bench.enabled=false", "--device", "cpu", *UNIFORM)
    assert res.code == 0, res.err + res.out
    par = json.loads((out / "export/model_compressed.check.json").read_text())["parity"]
    assert par["top1_agreement"] >= 0.99 and par["fused_compute"] == par["compute_nodes"] == 3, par
