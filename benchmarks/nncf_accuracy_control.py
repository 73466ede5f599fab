"""NNCF's ``quantize_with_accuracy_control`` on the ONNX backend, as a benchmark peer (issue 14).

The FP32 ONNX export is quantized by NNCF with an absolute top-1 tolerance ``max_drop``: NNCF's
uniform int8 PTQ first, then its accuracy restorer reverts the quantizers that cost the most accuracy
to float until the drop holds. Calibration: seeded training samples; validation: other, held-out
training samples (never the eval split, which only measures), top-1 in ONNX Runtime on 1 thread.
Used by precision_by_measurement.py; a failure is returned as a ``note``, not raised.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from cifar10_int8 import log


def failure_note(e: Exception) -> str:
    """A tool's exception as one line of a results row (what failed, the message's lines joined)."""
    lines = (x.strip(" -") for x in str(e).splitlines())
    return f"failed: {type(e).__name__}: {' | '.join(x for x in lines if x)[:400]}"


def sha(path: Path) -> str:
    """A short content hash (a cached row is reused only for the same input file)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def calib_and_val(train, n_cal: int, n_val: int, seed: int):
    """Seeded calibration samples and disjoint held-out *training* samples for NNCF's validation
    (the test split is never used to choose, as edgec's max_drop does)."""
    import numpy as np
    from torch.utils.data import Subset

    from edgec.data import calibration_subset, to_numpy

    cal, manifest = calibration_subset(train, n_cal, seed=seed)
    rest = np.setdiff1d(np.arange(len(train)), manifest["indices"])
    pick = np.random.default_rng([seed, 0x7A1]).choice(rest, size=min(n_val, len(rest)), replace=False)
    vx, vy = to_numpy(Subset(train, sorted(int(i) for i in pick)))
    return to_numpy(cal)[0], vx, vy


class _Top1:
    """NNCF's validation_fn: top-1 in ORT (1 thread) over (x, y) items of one sample, and the per-item
    hits (NNCF's metric mode); one session per model proto (NNCF calls it once per ranked item)."""

    def __init__(self, input_name: str):
        self.name, self._last = input_name, (None, None)

    def __call__(self, model, items):
        import numpy as np
        import onnxruntime as ort

        if self._last[0] is not model:
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            self._last = (model, ort.InferenceSession(model.SerializeToString(), so,
                                                      providers=["CPUExecutionProvider"]))
        sess = self._last[1]
        hits = [float(sess.run(None, {self.name: x})[0].argmax(1)[0] == y) for x, y in items]
        return (float(np.mean(hits)) if hits else 0.0), hits


def _nncf_quantize(src: Path, cx, vx, vy, max_drop: float, dest: Path) -> None:
    import logging

    import nncf
    import onnx

    nncf.set_log_level(logging.WARNING)
    model = onnx.load(str(src))
    name = model.graph.input[0].name
    calib = nncf.Dataset([cx[i:i + 1] for i in range(len(cx))], lambda x: {name: x})
    val = nncf.Dataset([(vx[i:i + 1], int(vy[i])) for i in range(len(vy))], lambda item: {name: item[0]})
    q = nncf.quantize_with_accuracy_control(model, calib, val, _Top1(name), max_drop=max_drop,
                                            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(cx),
                                            target_device=nncf.TargetDevice.CPU)
    onnx.save(q, str(dest))


def nncf_ac(fp32: Path, cx, vx, vy, max_drop: float, out: Path) -> dict:
    """NNCF ``quantize_with_accuracy_control`` on the ONNX backend (absolute top-1 drop), first on the
    export after ORT's quant_pre_process (shapes inferred, BN folded: what NNCF asks for; ONNX shape
    inference, ORT's symbolic one fails on BC-ResNet's reshapes), then on the export as is if that
    fails. Kept in out/row.json, a failure too (delete the folder to try again)."""
    done = out / "row.json"
    key = {"fp32_sha": sha(fp32), "max_drop": max_drop, "calibration": len(cx), "validation": len(vy)}
    if done.is_file() and all(json.loads(done.read_text()).get(k) == v for k, v in key.items()):
        log(f"{out.name}: reusing")
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t, notes, info = time.perf_counter(), [], {**key}
    for how in ("pre-processed", "as exported"):
        try:
            src = fp32
            if how == "pre-processed":
                from onnxruntime.quantization.shape_inference import quant_pre_process

                src = out / "fp32_pre.onnx"
                quant_pre_process(str(fp32), str(src), skip_symbolic_shape=True)
            _nncf_quantize(src, cx, vx, vy, max_drop, out / "model.onnx")
            info.update(path=str(out / "model.onnx"), nncf_input=how)
            break
        except Exception as e:  # noqa: BLE001 - the peer failing on a model is a result (row note)
            notes.append(f"on the {how} export: {failure_note(e)}")
            log(f"{out.name}: {notes[-1]}")
    if notes:
        info["note"] = "; ".join(notes)
    info["wall_s"] = round(time.perf_counter() - t)
    done.write_text(json.dumps(info, indent=2))
    return info
