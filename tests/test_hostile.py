"""Hostile input (issue 12): every failure is one message with its exit code, no traceback, nothing lost.

Recipe bombs and odd bytes, --force on a folder edgec did not create, a second writer on a live run
directory, unwritable --out, values that validate but would fail later.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_util import run_cli, subprocess_env

pytestmark = pytest.mark.usefixtures("private_cache")


def _edgec(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=cwd, timeout=timeout)


def _clean(res, code: int = 2) -> None:
    err = getattr(res, "err", None)
    err = res.stderr if err is None else err
    assert res.code == code if hasattr(res, "code") else res.returncode == code, err
    assert "Traceback" not in err and err.count("error:") == 1, err


def _compress(capsys, out: Path, *extra: str, recipe: str = "ptq-int8"):
    return run_cli(capsys, "compress", "--model", "digits_cnn", "--data", "digits", "--recipe", recipe,
                   "--device", "cpu", "--no-export", "--out", out, *extra)


# ---------------------------------------------------------------------------------------------
# item 1: usage errors need no click (typer >= 0.29 does not install it)


@pytest.mark.parametrize("args, needle", [
    (["compress", "--data", "digits", "--recipe", "demo"], "Missing option '--model'"),
    (["bench", "--threads", "abc", "x.onnx"], "--threads"),
    (["nosuch"], "No such command"),
])
def test_usage_errors_exit_2_without_click(tmp_path, args, needle):
    code = ("import sys; sys.modules['click'] = None\n"  # importing click fails, whatever is installed
            "from edgec.cli import main; sys.argv = ['edgec'] + sys.argv[1:]; main()")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=subprocess_env(), cwd=tmp_path, timeout=60)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# item 2 / 4: recipe loading is bounded


def _bomb(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nstages: [*l{levels}]\n"


def _limit_memory():  # a bomb that is not refused must fail the test, not take the machine's memory
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize("levels", [6, 9])
def test_alias_bomb_refused_at_once(tmp_path, levels):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb(levels))
    try:
        res = subprocess.run([sys.executable, "-m", "edgec", "recipes", "validate", str(p)], capture_output=True,
                             text=True, env=subprocess_env(), cwd=tmp_path, timeout=60, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("the alias bomb was still expanding after 60 s")
    _clean(res)
    assert "billion laughs" in res.stderr and len(res.stderr) < 1000


def test_aliases_within_the_limit_still_work(tmp_path):
    from edgec.recipe import load_recipe

    p = tmp_path / "anchors.yaml"
    p.write_text("stages:\n  - &p {method: prune, target_sparsity: 0.5, epochs: 1, lr: 0.001}\n"
                 "  - {<<: *p, method: prune, target_sparsity: 0.5}\n")
    assert load_recipe(str(p)).stages[0].target_sparsity == 0.5


@pytest.mark.parametrize("content, needle", [
    (b"\x80", "not UTF-8"),
    (b"stages: " + b"[" * 5000 + b"]" * 5000 + b"\n", "levels deep"),
    (b"seed: 1" + b"0" * 5000 + b"\nstages: [{method: ptq}]\n", "at line 1"),
    (b"stages: [{method: ptq}]\n" + b"# padding\n" * 200_000, "bytes"),
    (b"stages: [{method: ptq, observer: '" + b"x" * 100_000 + b"'}]\n", "observer"),
    (b"stages: [{method: '" + b"q" * 100_000 + b"'}]\n", "unknown method"),
    (b"stages: &a [*a]\n", "billion laughs"),  # a recursive alias (found by test_fuzz: 20 GB, then OOM-killed)
    (b"a: &x {b: [*x]}\nstages: [*x]\n", "billion laughs"),
    (b"\x00\x01\x02", "YAML"),
    (b"!!python/object/apply:os.system ['echo owned']\n", "YAML"),
])
def test_bad_recipe_bytes_exit_2_with_a_short_message(tmp_path, capsys, content, needle):
    p = tmp_path / "r.yaml"
    p.write_bytes(content)
    res = run_cli(capsys, "recipes", "validate", p)
    _clean(res)
    assert needle in res.err and len(res.err) < 2000, res.err[:3000]


def test_recipe_path_that_is_a_directory(tmp_path, capsys):
    res = run_cli(capsys, "recipes", "validate", tmp_path)
    _clean(res)
    assert "is a directory" in res.err


# ---------------------------------------------------------------------------------------------
# item 7: what validates runs; what would fail fails before anything is written


@pytest.mark.parametrize("override, needle", [
    ("stages.0.lr=.inf", "stages.0.lr"),
    ("stages.0.lr=.nan", "stages.0.lr"),
    ("seed=-1", "seed"),
    (f"seed={2**64}", "seed"),
    ("stages.0.warmup_epochs=9", "warmup_epochs"),
])
def test_recipe_values_that_would_fail_later_are_refused_up_front(tmp_path, capsys, override, needle):
    res = run_cli(capsys, "recipes", "validate", "demo", "--set", override)
    _clean(res)
    assert needle in res.err
    out = tmp_path / "run"
    res = _compress(capsys, out, "--set", override, recipe="demo")
    _clean(res)
    assert needle in res.err and not out.exists(), "nothing may be written before validation passes"


# ---------------------------------------------------------------------------------------------
# item 3 / 6: --force replaces only edgec run directories; one writer per run directory


def test_force_refuses_a_foreign_directory(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.txt").write_text("x")
    (d / "run.json").write_text('{"not": "edgec"}')  # a file of that name is not enough
    res = _compress(capsys, d, "--force")
    _clean(res)
    assert "not an edgec run directory" in res.err and "nothing was deleted" in res.err
    assert "--force" not in res.err.split("hint:")[-1], "the hint must not suggest --force"
    assert (d / "thesis.txt").read_text() == "x"


@pytest.fixture
def small_run(tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    res = _compress(capsys, out)
    assert res.code == 0, res.err
    return out


def test_force_replaces_an_edgec_run_directory(small_run, capsys):
    res = _compress(capsys, small_run, "--force")
    assert res.code == 0, res.err
    assert (small_run / "model_final.pt").is_file()


def test_second_writer_refused_with_the_holder_named(tmp_path, capsys):
    out = tmp_path / "live"
    code = ("import sys, time; from edgec.runlock import lock_run_dir\n"
            "lock = lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--force",), ("--resume",)):
            res = _compress(capsys, out, *extra)
            _clean(res)
            assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in res.err, res.err
        assert [p.name for p in out.iterdir()] == [".edgec.lock"], "the refused writers wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    res = _compress(capsys, out)  # the kernel released the dead holder's lock
    assert res.code == 0, res.err
    assert "took over the lock of a run that is gone" in res.out and f"pid {holder.pid}" in res.out


def test_lock_is_released_and_held_per_run(tmp_path):
    from edgec.errors import RunDirError
    from edgec.runlock import LOCK_FILE, lock_run_dir

    with lock_run_dir(tmp_path / "r") as lock:
        holder = json.loads((tmp_path / "r" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            lock_run_dir(tmp_path / "r")
    assert lock.taken_over is None
    with lock_run_dir(tmp_path / "r") as again:  # released: taken again, no takeover reported
        assert again.taken_over is None


def test_stale_lock_without_os_locks_decided_by_pid(tmp_path, monkeypatch):
    import edgec.runlock as rl

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r").mkdir()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / "r" / rl.LOCK_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(rl, "fcntl", None)  # a filesystem/OS without flock
    with rl.lock_run_dir(tmp_path / "r") as lock:
        assert lock.taken_over["pid"] == dead.pid
    (tmp_path / "r" / rl.LOCK_FILE).write_text(json.dumps({**record, "pid": os.getppid()}))  # alive
    with pytest.raises(rl.RunDirError, match=f"in use by pid {os.getppid()}"):
        rl.lock_run_dir(tmp_path / "r")


# ---------------------------------------------------------------------------------------------
# item 4: unwritable / odd output paths


def test_out_under_a_file_or_unwritable(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out, needle in ((tmp_path / "f" / "sub", "a part of its path is a file"), (Path("/proc/edgec-x"), "--out")):
        res = _compress(capsys, out)
        _clean(res)
        assert needle in res.err


def test_export_out_and_opset_checked_before_exporting(small_run, capsys):
    t0 = time.perf_counter()
    res = run_cli(capsys, "export", small_run, "--opset", "99")
    _clean(res)
    assert "--opset 99" in res.err and "13..21" in res.err
    res = run_cli(capsys, "export", small_run, "--out", "/proc/x.onnx")
    _clean(res)
    assert "/proc" in res.err
    assert time.perf_counter() - t0 < 10, "refused before rebuilding and exporting the model"


def test_atomic_files_get_the_umask_mode(tmp_path):
    from edgec.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# item 5: the divergence guard checks parameters and buffers before a checkpoint is written


def _fit_digits(ckpt: Path, *, lr: float, steps: int, epochs: int = 3, hooks=None):
    import torch

    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model

    torch.manual_seed(0)
    data = load_data("digits")
    model = create_model("digits_cnn")
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, ckpt_path=ckpt, dist=DistContext.single("cpu"), hooks=hooks,
        cfg=TrainConfig(epochs=epochs, batch_size=32, lr=lr, optimizer="sgd", weight_decay=0.0,
                        max_steps_per_epoch=steps))
    return model, data


def _assert_checkpoint_finite(ckpt: Path) -> None:
    import torch

    from edgec.data import to_numpy
    from edgec.data import load_data
    from edgec.models import create_model

    state = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    model = create_model("digits_cnn")
    model.load_state_dict(state["model"])
    x, _ = to_numpy(load_data("digits").eval)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.as_tensor(x[:64]))).all()


def test_divergence_in_a_buffer_keeps_the_last_finite_checkpoint(tmp_path):
    from edgec.engine import Hooks
    from edgec.errors import TrainingError

    ckpt = tmp_path / "c.pt"
    box = {}
    steps = {"n": 0}

    def poison():  # after step 5 (epoch 3 of 2-step epochs) a BatchNorm running variance becomes inf
        steps["n"] += 1
        if steps["n"] == 5:
            box["model"].bn2.running_var.fill_(float("inf"))

    import edgec.engine.loop as loop

    real_setup = loop._setup

    def setup(model, **kw):
        box["model"] = model
        return real_setup(model, **kw)

    pytest.MonkeyPatch().setattr(loop, "_setup", setup)
    try:
        with pytest.raises(TrainingError) as info:
            _fit_digits(ckpt, lr=0.01, steps=2, hooks=Hooks(after_step=poison))
    finally:
        loop._setup = real_setup
    assert "bn2.running_var became non-finite" in str(info.value)
    assert "end of epoch 2/3" in str(info.value) and str(ckpt) in str(info.value)
    _assert_checkpoint_finite(ckpt)


def test_divergence_with_a_huge_lr_never_checkpoints_inf(tmp_path):
    from edgec.errors import TrainingError

    ckpt = tmp_path / "c.pt"
    with pytest.raises(TrainingError, match="became non-finite at step"):
        _fit_digits(ckpt, lr=1e6, steps=1, epochs=4)
    _assert_checkpoint_finite(ckpt)  # (main: the run "finished" with inf running variances in the checkpoint)


def test_state_non_finite_from_the_start_is_not_divergence(tmp_path):
    import torch

    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model

    model = create_model("digits_cnn")
    model.register_buffer("threshold", torch.tensor(float("inf")))  # eed's uncalibrated early-exit threshold
    fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z),
        train_set=load_data("digits").train, eval_set=None, ckpt_path=tmp_path / "c.pt",
        dist=DistContext.single("cpu"), cfg=TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2))
    assert (tmp_path / "c.pt").is_file()


# ---------------------------------------------------------------------------------------------
# item 4: the device runner and `edgec bench` on hostile inputs and inconsistent models


def _onnx_conv(path: Path, in_channels: int, weight_channels: int) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, weight_channels, 3, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["C"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["C"], ["Y"], axes=[2, 3], keepdims=0)],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", in_channels, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _runtime(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgec.runtime", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


@pytest.mark.parametrize("array", [
    "np.array(['a', 'b'])", "np.zeros(2, dtype=[('a', 'f4'), ('b', 'i4')])", "np.zeros((1, 1, 8, 8), complex)",
    "np.array(['2020-01-01'], dtype='datetime64[D]')",
])
def test_runtime_refuses_non_numeric_npy(tmp_path, array):
    import numpy as np

    model = _onnx_conv(tmp_path / "m.onnx", 1, 1)
    np.save(tmp_path / "x.npy", eval(array, {"np": np}))
    res = _runtime(model, "--input", tmp_path / "x.npy")
    _clean(res)
    assert "dtype" in res.stderr and "numeric" in res.stderr


def test_inconsistent_model_is_one_message_in_runtime_and_bench(tmp_path, capsys):
    import numpy as np

    model = _onnx_conv(tmp_path / "bad.onnx", 3, 1)  # declares 3 input channels, its weights take 1
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    for args in (("--input", tmp_path / "x.npy"), ("--bench", "--runs", "2", "--warmup", "0")):
        res = _runtime(model, *args)
        _clean(res)
        assert "onnxruntime" in res.stderr
    res = run_cli(capsys, "bench", model, "--runs", "2", "--warmup", "0")
    _clean(res)
    assert "onnxruntime" in res.err and len(res.err) < 2000


def test_runtime_json_out_unwritable(tmp_path):
    model = _onnx_conv(tmp_path / "m.onnx", 1, 1)
    res = _runtime(model, "--bench", "--runs", "2", "--warmup", "0", "--json-out", "/proc/x/b.json")
    _clean(res)


# ---------------------------------------------------------------------------------------------
# item 8: ensemble manifests: every member hashed, every member inside the folder


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    import torch

    from edgec import masks as P
    from edgec.export.ensemble import export_dynamic
    from edgec.models import create_model
    from edgec.stages.eed import Ensemble

    torch.manual_seed(0)
    members = [create_model("digits_cnn") for _ in range(2)]
    for m in members:
        P.ensure_masks(P.prunable_layers(m))
    return Path(export_dynamic(Ensemble(members).eval(), (1, 8, 8), tmp_path_factory.mktemp("ens") / "ens"))


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    import shutil

    from edgec.runtime.ensemble import MANIFEST

    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    edit(m, dst)
    (dst / MANIFEST).write_text(json.dumps(m))
    return dst


def _outside(m, d):
    import shutil

    shutil.copy(d / m["members"][1], d.parent / "x.onnx")
    m["sha256"]["../x.onnx"] = m["sha256"][m["members"][1]]
    m["members"][1] = "../x.onnx"


def _symlink_out(m, d):
    import shutil

    shutil.copy(d / m["members"][1], d.parent / "y.onnx")
    (d / m["members"][1]).unlink()
    (d / m["members"][1]).symlink_to(d.parent / "y.onnx")


@pytest.mark.parametrize("edit, needle", [
    (lambda m, d: m.pop("sha256"), "needs its sha256"),
    (lambda m, d: m.update(sha256=None), "needs its sha256"),
    (lambda m, d: m["sha256"].update({m["members"][0]: None}), "needs its sha256"),
    (lambda m, d: m["sha256"].update({m["members"][0]: "abc"}), "needs its sha256"),
    (_outside, "outside the ensemble's folder"),
    (lambda m, d: m["members"].__setitem__(0, str((d / m["members"][0]).resolve())), "outside the ensemble's folder"),
    (_symlink_out, "outside the ensemble's folder"),
])
def test_ensemble_manifest_members_hashed_and_contained(ensemble_dir, tmp_path, capsys, edit, needle):
    from edgec.runtime import RunnerError
    from edgec.runtime.ensemble import DynamicEnsemble

    folder = _edit_manifest(ensemble_dir, tmp_path / "ens", edit)
    for verify in (True, False):
        with pytest.raises(RunnerError, match=needle):
            DynamicEnsemble.load(folder, verify=verify)
    res = run_cli(capsys, "bench", folder)
    _clean(res)
    assert needle in res.err
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    res = _runtime(folder, "--input", tmp_path / "x.npy")
    _clean(res)
    assert needle in res.stderr


# ---------------------------------------------------------------------------------------------
# item 9: the accuracy gate (bench.max_drop, exit 7)

COLLAPSE = """\
version: 1
name: collapse
stages:
  - {method: prune, target_sparsity: 0.99, epochs: 1, batch_size: 64, lr: 0.00001, optimizer: adam, weight_decay: 0.0}
bench: {runs: 3, warmup: 0, rounds: 1}
export: {parity_samples: 50}
"""


def test_collapsed_run_fails_the_accuracy_gate_after_the_report(tmp_path, capsys):
    from test_cli_e2e import train_digits

    weights = train_digits(tmp_path / "fp32.pt", epochs=2)
    (tmp_path / "collapse.yaml").write_text(COLLAPSE)
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits",
                  "--recipe", tmp_path / "collapse.yaml", "--device", "cpu", "--out", out)
    assert res.code == 7, res.err
    assert "accuracy gate" in res.err and "at chance level" in res.err and "Traceback" not in res.err
    assert (out / "report.json").is_file(), "the report is written before the gate fails the command"


def _rows(a0, a1):
    return [{"accuracy": a0}, {"accuracy": a1}]


def test_accuracy_gate_rules():
    import numpy as np

    from edgec.errors import AccuracyDropped
    from edgec.pipeline import check_accuracy_gate
    from edgec.recipe import load_recipe

    labels = np.arange(100) % 10  # chance: 10 %
    gate = load_recipe("demo")
    assert gate.bench.max_drop == 0.2 and AccuracyDropped.exit_code == 7
    check_accuracy_gate(gate, _rows(0.98, 0.80), labels)  # an 18-point drop passes the generous default
    with pytest.raises(AccuracyDropped, match="more than bench.max_drop=0.2"):
        check_accuracy_gate(gate, _rows(0.98, 0.70), labels)
    with pytest.raises(AccuracyDropped, match="at chance"):
        check_accuracy_gate(load_recipe("demo", ["bench.max_drop=1"]), _rows(0.98, 0.11), labels)
    check_accuracy_gate(gate, _rows(0.11, 0.10), labels)  # a model at chance from the start did not collapse
    tight = load_recipe("demo", ["bench.max_drop=0.01"])
    with pytest.raises(AccuracyDropped):
        check_accuracy_gate(tight, _rows(0.98, 0.96), labels)
    check_accuracy_gate(load_recipe("demo", ["bench.max_drop=null"]), _rows(0.98, 0.10), labels)  # off
    check_accuracy_gate(gate, _rows(None, None), labels)  # bench disabled: nothing to gate


# ---------------------------------------------------------------------------------------------
# item 10: the smaller ones


def test_one_class_data_is_refused(tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    import edgec
    from edgec.errors import DataError
    from edgec.models import create_model

    x = torch.randn(64, 1, 8, 8)
    ds = TensorDataset(x, torch.zeros(64, dtype=torch.long))
    with pytest.raises(DataError, match="1 class; classification needs at least 2"):
        edgec.compress(create_model("digits_cnn"), (ds, ds), "ptq-int8", out=tmp_path / "o", device="cpu",
                       export=False)
    assert not (tmp_path / "o").exists()


def test_random_bytes_weights_do_not_suggest_trust_pickle(tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(bytes(range(256)) * 8)
    res = _compress(capsys, tmp_path / "o", "--weights", tmp_path / "w.pt")
    _clean(res)
    assert "not a PyTorch checkpoint" in res.err and "trust-pickle" not in res.err


def test_export_refuses_a_model_file_changed_since_the_run(tmp_path, capsys):
    src = tmp_path / "mynet.py"
    src.write_text("from edgec.models import create_model\n\n"
                   "def build(num_classes=10):\n    return create_model('digits_cnn', num_classes=num_classes)\n")
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", f"{src}:build", "--data", "digits", "--recipe", "ptq-int8",
                  "--device", "cpu", "--no-export", "--out", out)
    assert res.code == 0, res.err
    assert json.loads((out / "run.json").read_text())["model_file_sha256"]
    src.write_text(src.read_text() + "print('this code runs on every export')\n")
    res = run_cli(capsys, "export", out)
    _clean(res)
    assert "changed since the run" in res.err and "--trust-model-file" in res.err
    assert not (out / "export").exists()
    res = run_cli(capsys, "export", out, "--trust-model-file")
    assert res.code == 0, res.err


def test_recipes_show_on_bad_bytes(tmp_path, capsys):
    (tmp_path / "r.yaml").write_bytes(b"stages: []\n\x80\n")
    res = run_cli(capsys, "recipes", "show", tmp_path / "r.yaml")
    _clean(res)
    assert "not UTF-8" in res.err
