"""The target profiles on ARM kernels: an emulated aarch64 device (tools/arm64-device.sh: qemu-user + Debian's
arm64 Python + onnxruntime 1.19.2 aarch64) behind a real sshd on 127.0.0.1, benched through the SSH path.

A digits CNN is compressed with int8 QAT for each target profile and exported; on the ARM device its
logits must equal x86 onnxruntime's and its top-1 agree >= 99 % with the PyTorch simulation, on real data.
Latency there is labelled emulated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sshd_util import start_sshd

REPO = Path(__file__).resolve().parents[1]
ARM_PYTHON = Path(os.environ.get("EDGEC_ARM_DEVICE", REPO / ".cache" / "arm64-device" / "python"))

pytestmark = [
    pytest.mark.remote,
    pytest.mark.skipif(not ARM_PYTHON.is_file(), reason=f"no emulated ARM device at {ARM_PYTHON}: build it with "
                       "tools/arm64-device.sh (Debian, root once: qemu-user-static + arm64 packages)"),
]

RECIPE = """\
version: 1
name: int8-{target}
target: {target}
stages:
  - method: qat
    epochs: 1
    batch_size: 64
    optimizer: adam
    lr: 0.0005
    weight_decay: 0.0
    precision: {{keep_slow_float: false}}   # integer kernels only: float ones differ by ISA in the last bits
bench: {{enabled: false}}
export: {{parity_samples: 100}}
"""


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd-arm"))
    devices = server.devices_yaml(server.root / "devices.yaml",
                                  arm64={"python": str(ARM_PYTHON), "emulated": True, "timeout_s": 1800})
    yield server, devices
    server.stop()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from test_cli_e2e import train_digits

    return train_digits(tmp_path_factory.mktemp("w") / "digits.pt", epochs=2)


@pytest.mark.parametrize("target", ["arm64", "x86"])
def test_profile_on_arm_kernels(arm, weights, tmp_path, target):
    import torch

    from edgec import runtime
    from edgec.bench import bench
    from edgec.bench.remote import measure_on_device
    from edgec.data import load_data, to_numpy
    from edgec.pipeline import CompressRequest, compress
    from edgec.runs import rebuild_model

    server, devices = arm
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(target=target))
    run = tmp_path / "run"
    compress(CompressRequest(model="digits_cnn", data="digits", recipe=str(recipe), weights=str(weights), out=run,
                             device="cpu"))
    model = run / "export" / "model_compressed.onnx"
    x, y = to_numpy(load_data("digits").eval)

    measured, device = measure_on_device(model, "arm64", inputs=x, labels=y, runs=5, warmup=1, devices_file=devices,
                                         outputs=True)
    assert device["machine"] == "aarch64" and device["emulated"] is True
    arm_logits = np.asarray(measured["logits"], dtype=np.float32)
    x86_logits = runtime.predict(runtime.load_session(model), x)
    with torch.no_grad():
        sim = rebuild_model(run, "final").eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(arm_logits - x86_logits).max())
    agree_sim = float((arm_logits.argmax(1) == sim.argmax(1)).mean())
    print(json.dumps({"target": target, "samples": len(y), "max_abs_arm_vs_x86": diff, "top1_arm_vs_sim": agree_sim,
                      "accuracy_arm": measured["accuracy"]}))
    assert diff == 0.0  # the same integer kernels' results on ARM and x86
    assert agree_sim >= 0.99
    assert measured["accuracy"] == pytest.approx(float((x86_logits.argmax(1) == y).mean()))

    res = bench(model, runs=5, warmup=1, remote="arm64", devices_file=devices)  # the bench JSON says emulated
    assert res["emulated"] is True and res["target"] == "arm64 (aarch64, emulated)"
    assert res["runtime"] == "onnxruntime " + device["onnxruntime"]
    assert list((server.root / "work").iterdir()) == []


def test_old_onnxruntime_on_the_device_refused(arm, tmp_path):
    """onnxruntime 1.19.2 on the ARM device runs up to opset 21: an opset-22 model is refused before any copy."""
    from onnx import TensorProto, helper, save

    from edgec.bench import bench
    from edgec.errors import DeviceSetupError

    server, devices = arm
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "opset22.onnx"
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)], ir_version=10), str(path))
    with pytest.raises(DeviceSetupError, match=r"onnxruntime 1\.19\.2 on arm64 is too old for this model: it needs "
                                               r"opset 22") as info:
        bench(path, runs=5, remote="arm64", devices_file=devices)
    assert info.value.exit_code == 2 and "--opset 21" in info.value.hint
    assert list((server.root / "work").iterdir()) == []
