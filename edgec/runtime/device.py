"""The measurement a bench runs on a target device (numpy + onnxruntime + stdlib, like all of ``runtime/``).

``edgec bench --remote`` copies the ``runtime/`` folder, the artifact and the eval arrays (.npy) to the
device and runs :func:`main` there with the device's own Python and onnxruntime; a local bench runs the
same functions. One process: the device facts, then latency and peak memory (as ``--bench`` does in a
fresh runner), then accuracy on the eval arrays. The result is one JSON object on stdout between
marker lines (anything else a wrapper prints is ignored)::

    python -c "import runtime.device as d; d.main(['job.json'])"

``job.json``: ``{"kind": "model" | "ensemble" | "profile", "model": "model.onnx" (a list for "profile"), "threads": 1, "batch": 1,
"warmup": 10, "runs": 100, "providers": [...], "inputs": "x.npy" | null, "labels": "y.npy" | null,
"rounds": 3, "adv": {"x": ..., "y": ..., "x_clean": ...} | null, "outputs": false}`` (paths relative to the job file).
"""
from __future__ import annotations

import json
import os
import platform
import sys

BEGIN = "----- edgec-device-result-begin -----"
END = "----- edgec-device-result-end -----"

__all__ = ["BEGIN", "END", "device_facts", "main", "measure_ensemble", "measure_model"]


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, ARM boards included), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        info = ""
    keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
    found = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in keys and value and key not in found:
            found[key] = value
    for key in keys:
        if key in found:
            return found[key]
    parts = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("CPU part")]
    if parts:  # ARM without a model name: the implementer/part ids
        return "ARM CPU part " + parts[0]
    return platform.processor() or platform.machine()


def device_facts() -> dict:
    """Machine, CPU, OS, Python, numpy, onnxruntime and its providers of this process's machine."""
    import numpy as np
    import onnxruntime as ort

    return {"machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__,
            "providers": list(ort.get_available_providers())}


def _accuracy(pred, labels) -> float:
    import numpy as np

    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def measure_model(model: str, *, threads: int = 1, batch: int = 1, warmup: int = 10, runs: int = 100,
                  providers=None, inputs=None, labels=None, outputs: bool = False) -> dict:
    """Latency on random input of the model's shape (as ``python -m edgec.runtime --bench``), the peak
    RSS after it, then predictions and accuracy on ``inputs``/``labels`` when given (``outputs``: and
    the logits themselves, as nested lists: float32 values survive JSON exactly)."""
    from . import load_session, measure_latency, peak_rss_mb, predict

    session = load_session(model, threads=threads, providers=providers)
    lat = measure_latency(session, batch=batch, warmup=warmup, runs=runs)
    out = {**lat, "peak_rss_mb": peak_rss_mb(), "provider": session.get_providers()[0],
           "torch_imported": "torch" in sys.modules}
    if inputs is not None:
        logits = predict(session, inputs)
        pred = logits.reshape(logits.shape[0], -1).argmax(axis=1)
        out["predictions"] = pred.tolist()
        out["accuracy"] = _accuracy(pred, labels) if labels is not None else None
        out["samples"] = int(len(pred))
        if outputs:
            out["logits"] = logits.astype("float32").tolist()
    return out


def measure_ensemble(path: str, *, threads: int = 1, batch: int = 1, warmup: int = 10, runs: int = 100,
                     rounds: int = 3, providers=None, inputs=None, labels=None, adv=None) -> dict:
    """A dynamic ensemble: dynamic vs all-K latency (interleaved) on the first ``runs`` inputs (random
    normal ones without eval data), clean accuracy of both modes, and both on ``adv`` when given."""
    import numpy as np

    from . import _random_input
    from .ensemble import DynamicEnsemble

    dyn = DynamicEnsemble.load(path, threads=threads, providers=providers)
    if inputs is not None:
        timed = np.asarray(inputs[:runs], dtype=np.float32)
        timed_on = f"first {len(timed)} eval inputs"
    else:
        timed = _random_input(dyn.sessions[0].get_inputs()[0], runs)
        timed_on = f"{runs} random normal inputs"
    lat = dyn.compare_latency(timed, rounds=rounds, batch=batch, warmup=warmup)

    def both(x):
        x = np.asarray(x, dtype=np.float32)
        pred, used = dyn.predict_batched(x)
        full = np.concatenate([dyn.predict_full(x[i:i + 256]) for i in range(0, len(x), 256)])
        return pred, used, full

    out = {"latency": lat, "latency_inputs": timed_on, "provider": dyn.sessions[0].get_providers()[0],
           "k": dyn.k, "threshold": dyn.threshold, "agree": dyn.agree, "samples": 0,
           "torch_imported": "torch" in sys.modules}
    if inputs is not None:
        pred, used, full = both(inputs)
        out.update(samples=int(len(pred)), accuracy_dynamic=_accuracy(pred, labels),
                   accuracy_full=_accuracy(full, labels), avg_members=float(used.mean()),
                   members_used_histogram=np.bincount(used, minlength=dyn.k + 1)[1:].tolist())
    if adv is not None:
        ya = adv["y"]
        pa, ua, fa = both(adv["x"])
        pc, _, fc = both(adv["x_clean"])
        out["robust"] = {"samples": int(len(ya)), "clean_accuracy_dynamic": _accuracy(pc, ya),
                         "clean_accuracy_full": _accuracy(fc, ya), "robust_accuracy_dynamic": _accuracy(pa, ya),
                         "robust_accuracy_full": _accuracy(fa, ya), "avg_members_adversarial": float(ua.mean())}
    return out


def _run_job(job_path: str) -> dict:
    import numpy as np

    base = os.path.dirname(os.path.abspath(job_path))
    with open(job_path) as fh:
        job = json.load(fh)

    def arr(name):
        return None if name is None else np.load(os.path.join(base, name), allow_pickle=False)

    common = {k: job[k] for k in ("threads", "batch", "warmup", "runs") if k in job}
    common.update(providers=job.get("providers"), inputs=arr(job.get("inputs")), labels=arr(job.get("labels")))
    if job.get("kind") == "profile":  # edgec profile --remote: job["model"] is a list of files
        from .profile import profile_job

        return profile_job({**job, "models": job["model"]}, base)
    model = os.path.join(base, job["model"])
    if job.get("kind") == "ensemble":
        adv = job.get("adv")
        adv = None if adv is None else {k: arr(v) for k, v in adv.items()}
        return measure_ensemble(model, rounds=job.get("rounds", 3), adv=adv, **common)
    return measure_model(model, outputs=bool(job.get("outputs")), **common)


def main(argv=None) -> int:
    """Run ``job.json`` (``argv[0]``); print ``{"facts": ..., "result": ...}`` or ``{"facts", "error"}``."""
    from . import ModelLoadError, ModelNotFoundError, RunnerError

    argv = list(sys.argv[1:] if argv is None else argv)
    out: dict = {"facts": device_facts()}
    code = 0
    try:
        out["result"] = _run_job(argv[0])
    except ModelLoadError as e:
        out["error"], code = {"kind": "model_load", "message": str(e)}, 3
    except (RunnerError, ModelNotFoundError) as e:
        out["error"], code = {"kind": "runner", "message": str(e)}, 3
    sys.stdout.write("\n" + BEGIN + "\n" + json.dumps(out) + "\n" + END + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
