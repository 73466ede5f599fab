"""Audio end to end through the CLI: BC-ResNet-1 on real Speech Commands -> int8 ONNX -> the device
runner classifies a real .flac; the bcresnet-asc recipe on a generated TAU 2020 Mobile folder ->
accuracy per device and seen vs unseen device in the report; per-group accuracy itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf

from cli_util import run_cli, subprocess_env
from edgec.data.speechcommands import SPEECHCOMMANDS_CLASSES
from edgec.groups import group_accuracy
from edgec.report import render_markdown



pytestmark = pytest.mark.usefixtures("private_cache")




# ------------------------------------------------------------------------------- group accuracy
def test_group_accuracy_breaks_down_usable_keys_only():
    y = np.array([0, 1, 1, 0, 2, 2])
    pred = np.array([0, 1, 0, 0, 2, 1])
    groups = {"device": np.array(["a", "a", "b", "b", "s4", "s4"]),
              "device_seen": np.array(["seen"] * 4 + ["unseen"] * 2),
              "file": np.array([f"f{i}.wav" for i in range(6)]),  # 6 values > max_values: not a breakdown
              "city": np.array(["x"] * 6)}  # one value: not a breakdown
    got = group_accuracy(pred, y, groups, max_values=4)
    assert set(got) == {"device", "device_seen"}
    assert got["device"] == {"a": {"accuracy": 1.0, "samples": 2}, "b": {"accuracy": 0.5, "samples": 2},
                             "s4": {"accuracy": 0.5, "samples": 2}}
    assert got["device_seen"]["unseen"] == {"accuracy": 0.5, "samples": 2}
    with pytest.raises(ValueError, match="3 entries for 6"):
        group_accuracy(pred, y, {"device": np.array(["a", "b", "c"])})
    md = render_markdown([{"name": "fp32 input", "accuracy": 0.5, "accuracy_by_group": got},
                          {"name": "small", "accuracy": 0.6}], title="t", created="now")
    assert "### device_seen" in md and "| s4 | 2 | 50.00 |" in md and "| a | 2 | 100.00 |" in md


# ------------------------------------------------------------------- real Speech Commands -> runner
KWS_RECIPE = """\
version: 1
name: kws-tiny
stages:
  - method: train
    epochs: 2
    max_train_samples: 1280
    batch_size: 64
    lr: 0.05
    weight_decay: 0.001
    warmup_epochs: 0.5
  - method: prune
    target_bytes: 8000
    epochs: 1
    max_train_samples: 640
    batch_size: 64
    lr: 0.01
    weight_decay: 0.001
    update_every: 2
  - method: qat
    epochs: 1
    max_train_samples: 640
    batch_size: 64
    lr: 0.002
    weight_decay: 0.0001
    norm_bits: 8
    calibration_samples: 256
    kd: {teacher: input, temperature: 2.0, alpha: 0.5}
    precision: {keep_slow_float: false}   # the int8 pipeline end to end (on this CPU BC-ResNet-1 runs faster float)
bench: {runs: 5, warmup: 1}
export: {parity_samples: 200}
"""


@pytest.mark.integration
@pytest.mark.slow
def test_bcresnet1_speech_commands_cli_to_runner_on_a_real_flac(edgec_data, tmp_path, capsys):
    """~250 training steps in all (train 40 + prune 10 + qat 10, batch 64): the pipeline, not accuracy."""
    root = edgec_data / "speech_commands_v2_test"
    recipe = tmp_path / "kws.yaml"
    recipe.write_text(KWS_RECIPE)
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", "bcresnet1", "--data", f"speechcommands:{root}",
                  "--recipe", recipe, "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    rows = json.loads((out / "report.json").read_text())["rows"]
    comp = rows[1]
    assert comp["format"] == "onnx-int8" and comp["parity_top1"] >= 0.97
    assert 0.97 * 8000 <= comp["weight_bytes_deployed"] <= 8000
    assert comp["samples"] == 602  # the speaker-disjoint test split
    # 69 test speakers: too many for a per-speaker table; all unseen (speaker-disjoint): no split either
    assert "accuracy_by_group" not in comp

    model = out / "export" / "model_compressed.onnx"
    assert not [n for n in onnx.load(str(model)).graph.node if n.op_type == "BatchNormalization"]
    from edgec import runtime
    from edgec.data import load_data, to_numpy

    data = load_data(f"speechcommands:{root}", seed=0)
    ex, _ = to_numpy(data.eval)
    files = data.groups["file"]
    pick = [i for i, f in enumerate(files) if f.endswith(".flac") and not f.startswith("_")][:3]
    preds = runtime.predict(runtime.load_session(model), ex[pick]).argmax(1)
    for i, pred in zip(pick, preds):
        proc = subprocess.run([sys.executable, "-m", "edgec.runtime", str(model), "--input", str(root / files[i])],
                              capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr
        header, row = proc.stdout.strip().splitlines()
        cells = row.split("\t")
        assert header.startswith("# sample\tclass1\tlabel1\tprob1")
        assert cells[2] in SPEECHCOMMANDS_CLASSES and 0.0 < float(cells[3]) <= 1.0
        # the runner's numpy front end + metadata standardisation = the features the run evaluated on
        assert int(cells[1]) == int(pred) and cells[2] == SPEECHCOMMANDS_CLASSES[int(pred)]


# ------------------------------------------------------------------------- TAU 2020 Mobile fixture
# scene = a carrier (Hz) amplitude-modulated at a rate (Hz): a time pattern, which frequency-wise instance
# normalisation (ResNorm) keeps, unlike a stationary spectrum (removed like a device response)
SCENES = {"airport": (440.0, 2.0), "bus": (1200.0, 6.0), "park": (3000.0, 12.0)}
TRAIN = {"a": 8, "b": 2, "c": 2, "s1": 2}  # clips per scene: device a dominates, as in TAU 2020
EVAL = ("a", "b", "c", "s1", "s4", "s5")  # s4, s5: unseen devices
SR = 16000


def _clip(scene: str, device: str, k: int) -> np.ndarray:
    rng = np.random.default_rng([list(SCENES).index(scene), EVAL.index(device), k])  # stable across processes
    t = np.arange(SR) / SR
    carrier, rate = SCENES[scene]
    f = carrier * (1 + 0.05 * rng.standard_normal())
    am = 0.5 * (1 + np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    x = 0.3 * am * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(SR)
    tilt = {"a": 0.0, "b": 0.5, "c": -0.5, "s1": 0.8, "s4": -0.8, "s5": 0.3}[device]  # a crude "microphone"
    x = x + tilt * np.concatenate([[0.0], x[:-1]])
    return (x / np.abs(x).max() * 0.5).astype(np.float32)


def write_tau_fixture(root: Path) -> None:
    """The exact TAU Urban Acoustic Scenes 2020 Mobile development layout, with generated 1 s clips."""
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    folds = {"train": ["filename\tscene_label"], "evaluate": ["filename\tscene_label"]}
    cities = ("barcelona", "helsinki", "lisbon", "london")
    for split, devices in (("train", TRAIN), ("evaluate", {d: 2 for d in EVAL})):
        for scene in SCENES:
            for dev, n in devices.items():
                for k in range(n):
                    city = cities[(k + (2 if split == "evaluate" else 0)) % 4]
                    loc = 100 + k + (50 if split == "evaluate" else 0)
                    name = f"audio/{scene}-{city}-{loc}-{k}-{dev}.wav"
                    sf.write(root / name, _clip(scene, dev, k + (100 if split == "evaluate" else 0)), SR,
                             subtype="PCM_16")
                    meta.append(f"{name}\t{scene}\t{city}-{loc}\t{dev if dev in 'abc' else 's'}")
                    folds[split].append(f"{name}\t{scene}")
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    for split, lines in folds.items():
        (root / "evaluation_setup" / f"fold1_{split}.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.integration
def test_bcresnet_asc_recipe_on_a_tau2020_fixture_reports_per_device(tmp_path, capsys):
    import torch

    from edgec.budget import plan_bytes

    root = tmp_path / "TAU-urban-acoustic-scenes-2020-mobile-development"
    write_tau_fixture(root)
    factory = tmp_path / "asc.py"  # BC-ResNet-ASC at a fifth of the zoo's width (c=16), ResNorm
    factory.write_text("from edgec.models.bcresnet import BCResNetASC\n"
                       "def build(num_classes=10, in_channels=1):\n"
                       "    return BCResNetASC(16, num_classes=num_classes, in_channels=in_channels, norm='resnorm')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import asc  # noqa: PLC0415
    finally:
        sys.path.remove(str(tmp_path))
    probe = plan_bytes(asc.build(3), target_bytes=10**9, deployed_bits=8, norm_bits=8)
    target = sum(probe.fixed_bytes.values()) + int(0.4 * probe.prunable_weights)  # 60 % sparse
    spec = (f"tau2020mobile:{root}?sample_rate=16000&clip_seconds=1&n_fft=512&win_length=480&hop_length=160"
            "&n_mels=40")
    # the student trained in FP32 first (it is also the KD teacher: kd.teacher=input)
    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import save_weights

    torch.manual_seed(0)
    data = load_data(spec)
    student = asc.build(3)
    fit(student, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z), train_set=data.train,
        eval_set=None, cfg=TrainConfig(epochs=40, batch_size=16, lr=0.05, weight_decay=1e-3), ckpt_path=None,
        augment=data.augment, dist=DistContext.single("cpu"))
    weights = save_weights(student, tmp_path / "asc_fp32.pt")
    out = tmp_path / "run"
    res = run_cli(capsys, "compress", "--model", f"{factory}:build", "--weights", weights, "--data", spec,
                  "--recipe", "bcresnet-asc", "--out", out, "--device", "cpu",
                  "--set", f"stages.0.target_bytes={target}", "--set", "stages.0.epochs=6", "--set", "stages.0.update_every=2",
                  "--set", "stages.0.batch_size=16", "--set", "stages.0.kd.calibrate=true",
                  "--set", "stages.1.epochs=1", "--set", "stages.1.batch_size=16",
                  "--set", "stages.1.calibration_samples=48", "--set", "bench.runs=3", "--set", "bench.warmup=1",
                  "--set", "export.parity_samples=36")
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    fp32, comp = report["rows"]
    assert 0.97 * target <= comp["weight_bytes_deployed"] <= target
    for row in (fp32, comp):
        by = row["accuracy_by_group"]
        assert set(by["device"]) == set(EVAL) and all(v["samples"] == 6 for v in by["device"].values())
        assert {k: v["samples"] for k, v in by["device_seen"].items()} == {"seen": 24, "unseen": 12}
        # per-group accuracies are the overall accuracy, split: their sample-weighted mean is it exactly
        for key in ("device", "device_seen", "city"):
            mean = sum(v["accuracy"] * v["samples"] for v in by[key].values()) / row["samples"]
            assert mean == pytest.approx(row["accuracy"], abs=1e-12)
    md = (out / "report.md").read_text()
    assert "## Accuracy per group" in md and "### device" in md and "### device_seen" in md
    assert "| s4 | 6 |" in md
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "teacher_calibration" for e in events)
    assert any(e.get("event") == "byte_budget" and e["target_bytes"] == target for e in events)
    quant = next(e for e in events if e.get("event") == "quantize")
    assert len(quant["quantized_norms"]) == 9 and quant["float_layers"] == []
