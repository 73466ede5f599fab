"""edgec bench --remote against a real OpenSSH server on 127.0.0.1 (tests/sshd_util.py), nothing mocked:
the same JSON as a local bench plus the device's facts, the budget gate, the EED ensemble, and one
clear error (exit 2) for each way a device can be unusable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.bench import bench
from edgec.bench.remote import check_runtime_supports, ort_limits
from edgec.devices import load_devices, resolve_device
from edgec.errors import (BudgetExceeded, DeviceAuthError, DeviceError, DeviceSetupError, DeviceUnreachable,
                          HostKeyError, InputError)

from sshd_util import free_port, keygen, start_sshd

REPO = Path(__file__).resolve().parents[1]


def _graph_model(path: Path, *, op="MatMul", domain="", opset=17, ir=8) -> Path:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    node = (helper.make_node("MatMul", ["X", "W"], ["Y"]) if op == "MatMul"
            else helper.make_node(op, ["X"], ["Y"], domain=domain))
    out_shape = ["N", 4] if op == "MatMul" else ["N", 8]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                          [w] if op == "MatMul" else [])
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(g, opset_imports=ops, ir_version=ir), str(path))
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _graph_model(tmp_path_factory.mktemp("m") / "mm.onnx")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((64, 8)).astype(np.float32), (np.arange(64) % 4).astype(np.int64)


@pytest.fixture(scope="module")
def devices(sshd, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("devices")
    nopkg = tmp_path / "venv-bare"  # a real Python without numpy / onnxruntime
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(nopkg)], check=True, timeout=120)
    other = keygen(tmp_path / "stranger")  # a key the server does not know
    changed = tmp_path / "known_changed"
    fake = keygen(tmp_path / "fakehost")
    changed.write_text(sshd.known_hosts_line(" ".join(Path(str(fake) + ".pub").read_text().split()[:2])))
    empty = tmp_path / "known_empty"
    empty.write_text("")
    return sshd.devices_yaml(
        tmp_path / "devices.yaml",
        nopython={"python": "/nonexistent/python3"},
        nonumpy={"python": str(nopkg / "bin" / "python")},
        stranger={"identity_file": str(other)},
        unknownkey={"known_hosts": str(empty)},
        changedkey={"known_hosts": str(changed)},
        down={"port": free_port(), "connect_timeout_s": 5},
        gpu={"providers": ["CUDAExecutionProvider"]},
        slow={"timeout_s": 3},
    )


def _cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def _work_empty(sshd) -> bool:
    return list((sshd.root / "work").iterdir()) == []


# ------------------------------------------------------------------------------- the measurement
@pytest.mark.remote
def test_remote_bench_same_json_as_local_plus_device(sshd, devices, model, data):
    x, y = data
    local = bench(model, eval_x=x, eval_y=y, runs=20)
    remote = bench(model, eval_x=x, eval_y=y, runs=20, remote="loop", devices_file=devices)
    assert set(remote) == set(local)  # the same JSON, device facts included in both
    assert remote["accuracy"] == local["accuracy"] and remote["samples"] == 64
    assert remote["weight_bytes_deployed"] == local["weight_bytes_deployed"]
    assert remote["latency_ms"]["p50"] > 0 and remote["peak_rss_mb"] > 0
    dev = remote["device"]
    assert dev["remote"] is True and dev["name"] == "loop" and dev["url"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    for key in ("machine", "cpu", "onnxruntime", "providers", "python", "numpy"):
        assert dev[key]
    assert remote["target"] == f"loop ({dev['machine']})" and remote["emulated"] is False
    assert local["device"]["remote"] is False and local["target"].startswith("local (")
    assert _work_empty(sshd)  # the device's bench folder is removed


@pytest.mark.remote
def test_cli_remote_json_and_budget(sshd, model, tmp_path):
    out = tmp_path / "b.json"
    devs = sshd.devices_yaml(tmp_path / "d.yaml")
    res = _cli("bench", model, "--remote", "loop", "--devices", devs, "--runs", "10", "--json", out)
    assert res.returncode == 0, res.stderr
    assert "edgec bench on loop (" in res.stdout
    assert json.loads(out.read_text())["device"]["name"] == "loop"
    res = _cli("bench", model, "--remote", "loop", "--runs", "10", "--budget-ms", "1e-9", "--json", out,
               env_extra={"EDGEC_DEVICES": str(devs)})  # the file from the environment variable
    assert res.returncode == 5, res.stderr
    assert "exceeds the budget" in res.stderr and "on loop (" in res.stderr
    assert json.loads(out.read_text())["device"]["name"] == "loop"  # results saved before the gate fails
    assert _work_empty(sshd)


@pytest.mark.remote
def test_ssh_url(sshd, model):
    """--remote ssh://user@host:port, with the key and known_hosts a devices file would name."""
    dev = resolve_device(f"ssh://{sshd.user}@127.0.0.1:{sshd.port}")
    dev = dev.model_copy(update={"identity_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts),
                                 "python": sys.executable})
    res = bench(model, runs=5, remote=dev)
    assert res["device"]["url"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
    assert res["target"].startswith(f"ssh://{sshd.user}@127.0.0.1:{sshd.port} (")


@pytest.mark.remote
def test_budget_exceeded_carries_device_results(sshd, devices, model):
    with pytest.raises(BudgetExceeded) as info:
        bench(model, runs=5, budget_ms=1e-9, remote="loop", devices_file=devices)
    assert info.value.exit_code == 5 and info.value.results["device"]["remote"]


@pytest.mark.remote
def test_remote_ensemble(sshd, devices, tmp_path, data):
    from edgec.bench.ensemble import bench_ensemble
    from edgec.runtime.ensemble import write_manifest

    folder = tmp_path / "ens"
    folder.mkdir()
    for k in range(3):
        w = np.random.default_rng(k).standard_normal((8, 4)).astype(np.float32)
        g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "W")])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                  str(folder / f"member{k}.onnx"))
    write_manifest(folder, [f"member{k}.onnx" for k in range(3)], threshold=0.6)
    x, y = data
    local = bench_ensemble(folder, eval_x=x, eval_y=y, latency_samples=16, rounds=1, warmup=2)
    remote = bench_ensemble(folder, eval_x=x, eval_y=y, latency_samples=16, rounds=1, warmup=2, remote="loop",
                            devices_file=devices)
    assert set(remote) == set(local)
    for key in ("accuracy_dynamic", "accuracy_full", "avg_members", "members_used_histogram", "k"):
        assert remote[key] == local[key], key
    assert remote["device"]["remote"] and remote["target"].startswith("loop (")
    assert remote["latency"]["dynamic"]["p50_ms"] > 0
    assert _work_empty(sshd)
    out = tmp_path / "ens.json"
    res = _cli("bench", folder / "ensemble.json", "--remote", "loop", "--devices", devices, "--runs", "8",
               "--rounds", "1", "--warmup", "1", "--budget-ms", "1e-9", "--json", out)
    assert res.returncode == 5, res.stderr  # the ensemble's budget gate, on the device
    assert "dynamic-ensemble p50 latency" in res.stderr and "on loop (" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["kind"] == "dynamic-ensemble" and doc["device"]["remote"] and "on loop (" in res.stdout


# ------------------------------------------------------------------------------------ bad devices
def _fails(exc_type, match, model, devices, name, **kw):
    with pytest.raises(exc_type, match=match) as info:
        bench(model, runs=5, remote=name, devices_file=devices, **kw)
    assert info.value.exit_code == 2
    return info.value


@pytest.mark.remote
def test_unknown_host_key_refused_with_the_trust_command(sshd, devices, model):
    err = _fails(HostKeyError, "is not in", model, devices, "unknownkey")
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >>" in err.hint and "--accept-new-host-key" in err.hint
    known = Path(load_devices(devices)["unknownkey"].known_hosts)
    assert known.read_text() == ""  # nothing trusted behind the user's back
    res = bench(model, runs=5, remote="unknownkey", devices_file=devices, accept_new_host_key=True)
    assert res["device"]["remote"] and sshd.host_pub.split()[1] in known.read_text()
    known.write_text("")  # unknown again for the other tests (the devices file is shared by the module)


@pytest.mark.remote
def test_changed_host_key_refused_even_with_accept_new(sshd, devices, model):
    err = _fails(HostKeyError, "differs from the one recorded", model, devices, "changedkey")
    assert "ssh-keygen -R" in err.hint
    _fails(HostKeyError, "differs", model, devices, "changedkey", accept_new_host_key=True)


@pytest.mark.remote
def test_refused_authentication(sshd, devices, model):
    err = _fails(DeviceAuthError, "refused key authentication", model, devices, "stranger")
    assert "authorized_keys" in err.hint and "passwords are never used" in err.hint


@pytest.mark.remote
def test_unreachable_host(sshd, devices, model):
    _fails(DeviceUnreachable, "cannot reach down", model, devices, "down")


@pytest.mark.remote
def test_no_python_on_device(sshd, devices, model):
    err = _fails(DeviceSetupError, "no Python at '/nonexistent/python3'", model, devices, "nopython")
    assert "apt-get install python3" in err.hint


@pytest.mark.remote
def test_no_numpy_onnxruntime_on_device(sshd, devices, model):
    err = _fails(DeviceSetupError, "numpy and onnxruntime cannot be imported", model, devices, "nonumpy")
    assert "-m pip install numpy onnxruntime" in err.hint


@pytest.mark.remote
def test_provider_missing_on_device(sshd, devices, model):
    _fails(DeviceSetupError, "CUDAExecutionProvider not available", model, devices, "gpu")


@pytest.mark.remote
def test_device_onnxruntime_cannot_run_model(sshd, devices, tmp_path):
    import onnxruntime as ort

    newer = _graph_model(tmp_path / "opset99.onnx", op="Relu", opset=99)
    err = _fails(DeviceSetupError, f"onnxruntime {ort.__version__} on loop cannot run this model", newer, devices,
                 "loop")
    assert "opset 99" in str(err) and "pip install -U onnxruntime" in err.hint
    custom = _graph_model(tmp_path / "custom.onnx", op="Frobnicate", domain="com.example")
    _fails(DeviceSetupError, "com.example:Frobnicate", custom, devices, "loop")
    assert _work_empty(sshd)  # removed after a failed job too


@pytest.mark.remote
def test_job_limit_stops_on_the_device(sshd, devices, model):
    import time

    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish within timeout_s = 3 s") as info:
        bench(model, runs=10**8, remote="slow", devices_file=devices)
    assert info.value.exit_code == 2 and time.monotonic() - t0 < 60
    assert _work_empty(sshd)  # stopped there, folder removed


@pytest.mark.remote
def test_cli_errors_exit_2_one_message(sshd, devices, model):
    for name, text in (("unknownkey", "is not in"), ("stranger", "refused key authentication"),
                       ("nonumpy", "cannot be imported")):
        res = _cli("bench", model, "--remote", name, "--devices", devices, "--runs", "5")
        assert res.returncode == 2, (name, res.stderr)
        assert res.stderr.startswith("error: ") and text in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------- no server needed: the checks
def test_old_onnxruntime_refused_before_transfer(tmp_path):
    m = _graph_model(tmp_path / "m19.onnx", opset=19, ir=9)
    assert ort_limits("1.14.1") == (18, 8) and ort_limits("1.31.1") is None
    with pytest.raises(DeviceSetupError, match=r"onnxruntime 1.14.1 on pi is too old .* needs opset 19"):
        check_runtime_supports("1.14.1", [m], "pi")
    check_runtime_supports("1.19.2", [m], "pi")  # 1.19 runs opset 21


def test_devices_file_strict(tmp_path, monkeypatch):
    bad = tmp_path / "d.yaml"
    bad.write_text("devices:\n  pi:\n    host: pi.local\n    port: '22'\n    hots: x\n")
    with pytest.raises(InputError) as info:
        load_devices(bad)
    assert "devices.pi.port" in str(info.value) and "devices.pi.hots" in str(info.value)
    bad.write_text("devices:\n  pi:\n    host: -oProxyCommand=x\n")
    with pytest.raises(InputError, match="not a host name"):
        load_devices(bad)
    good = tmp_path / "g.yaml"
    good.write_text("devices:\n  pi:\n    host: pi.local\n    user: pi\n    identity_file: keys/id\n")
    dev = load_devices(good)["pi"]
    assert dev.port == 22 and dev.identity_file == str((tmp_path / "keys" / "id").resolve())
    assert dev.label == "pi" and dev.python == "python3"
    with pytest.raises(DeviceError, match="no device 'pj'"):
        resolve_device("pj", good)
    monkeypatch.delenv("EDGEC_DEVICES", raising=False)
    with pytest.raises(DeviceError, match="no devices file"):
        resolve_device("pi", None)
    monkeypatch.setenv("EDGEC_DEVICES", str(good))
    assert resolve_device("pi").host == "pi.local"  # the file from the environment variable
    url = resolve_device("ssh://me@10.0.0.5:2222")
    assert (url.user, url.host, url.port, url.label) == ("me", "10.0.0.5", 2222, "ssh://me@10.0.0.5:2222")
    with pytest.raises(InputError, match="no path, no password"):
        resolve_device("ssh://me:secret@10.0.0.5")


def test_ssh_command_is_safe_by_default():
    from edgec.bench.remote import SSHDevice
    from edgec.devices import Device

    cmd = SSHDevice(Device(host="h", user="u", identity_file="/k")).ssh_command("true")
    joined = " ".join(cmd)
    for opt in ("BatchMode=yes", "StrictHostKeyChecking=yes", "PasswordAuthentication=no",
                "PreferredAuthentications=publickey", "ConnectTimeout=10", "IdentitiesOnly=yes"):
        assert opt in joined
    assert cmd[-2:] == ["u@h", "true"]
    assert "StrictHostKeyChecking=accept-new" in " ".join(
        SSHDevice(Device(host="h"), accept_new_host_key=True).ssh_command("true"))


# --------------------------------------------------------------------------- compress on a device
TINY_RECIPE = """\
version: 1
name: tiny-remote
stages:
  - method: qat
    epochs: 1
    batch_size: 64
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
bench: {runs: 5, warmup: 1}
export: {parity_samples: 100}
"""


@pytest.mark.remote
def test_compress_benches_on_the_device(sshd, tmp_path):
    """`edgec compress --remote NAME`: the report has the local rows and the same artifacts measured on the
    device, each row labelled with where it was measured."""
    from test_cli_e2e import train_digits

    weights = train_digits(tmp_path / "digits.pt", epochs=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    devs = sshd.devices_yaml(tmp_path / "d.yaml")
    out = tmp_path / "run"
    res = _cli("compress", "--model", "digits_cnn", "--weights", weights, "--data", "digits", "--recipe", recipe,
               "--out", out, "--device", "cpu", "--remote", "loop", "--devices", devs, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert len(rows) == 4 and names[2].endswith("@ loop (x86_64)") and names[3].startswith("tiny-remote @ loop")
    assert rows[0]["device"].startswith("local (") and rows[3]["device"] == "loop (x86_64)"
    assert rows[2]["accuracy"] == rows[0]["accuracy"] and rows[3]["accuracy"] == rows[1]["accuracy"]
    assert rows[3]["device_facts"]["remote"] and rows[3]["latency_p50_ms"] > 0
    md = (out / "report.md").read_text()
    assert "measured on" in md and "| loop (x86_64) |" in md
    assert _work_empty(sshd)
