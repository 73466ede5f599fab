"""Per-layer quantization sensitivity (``edgec analyze``): what each conv/linear layer costs when it
alone is quantized, and what it gives back when it alone is left float.

For every layer i, two variants of the FP32 model are built with the recipe's quantization settings and
``layers:`` overrides (edgec.quant.precision), each calibrated post-training on the same seeded
calibration subset (min-max, or the ptq stage's observer), so each is exactly the model the exporter
would write for that choice:

* *only quantized*: layer i at the recipe's bits, every other layer float;
* *only float*: layer i float, every other layer at the recipe's bits.

Both are compared with the FP32 model on held-out samples (the eval split, capped): top-1 accuracy drop
(FP32 minus variant, as a fraction) and the mean KL(FP32 || variant) of the softmax outputs (nats).
By default they run in the PyTorch simulation (fast; the simulation matches ORT to within an output
step, ``edgec export`` checks that per artifact); ``ort=True`` exports each variant and measures the
ONNX file in ONNX Runtime instead. ``int8_vs_float_time`` is the layer's time in the uniform quantized
artifact over its time in the FP32 export (> 1: the integer kernels are slower), from one interleaved
ONNX Runtime profile of the two (:func:`edgec.bench.profile.profile_models`) when ``ort`` or ``profile``
is given; None otherwise, or where the profile has no time for the layer on one side.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgec.errors import InputError
from edgec.quant.precision import exact_glob

__all__ = ["LayerSensitivity", "SensitivityResult", "analyze_model", "analyze_run", "print_sensitivity",
           "quant_spec_of", "write_sensitivity"]


@dataclass
class LayerSensitivity:
    layer: str
    drop_only_quantized: float | None  # FP32 accuracy minus the accuracy with only this layer quantized
    kl_only_quantized: float | None
    drop_only_float: float | None  # FP32 accuracy minus the accuracy with only this layer float
    kl_only_float: float | None
    weight_bits: int | None = None  # the layer's bits in the recipe (None: the recipe keeps it float)
    int8_vs_float_time: float | None = None  # int8 / float time of this layer in ORT (ort= or profile=)


@dataclass
class SensitivityResult:
    rows: list[LayerSensitivity]
    fp32_accuracy: float
    quantized_accuracy: float  # every layer at the recipe's bits
    quantized_kl: float
    samples: int
    calibration_samples: int
    measured_in: str  # "pytorch simulation" | "onnxruntime"
    spec: dict = field(default_factory=dict)

    def most_sensitive(self) -> list[str]:
        """Layers by accuracy drop when only they are quantized, then by KL (largest first)."""
        rows = [r for r in self.rows if r.kl_only_quantized is not None]
        return [r.layer for r in sorted(rows, key=lambda r: (-(r.drop_only_quantized or 0.0), -r.kl_only_quantized))]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["most_sensitive"] = self.most_sensitive()
        return d


def quant_spec_of(recipe):
    """The QuantSpec of the recipe's last quantizing stage, calibrated post-training (weights min-max;
    activations the ptq stage's observer, else min-max), its ``layers:`` overrides kept."""
    from edgec.stages import quantizing_methods
    from edgec.stages.qat import quant_spec

    stages = [s for s in recipe.stages if s.method in quantizing_methods()]
    if not stages:
        raise InputError(f"recipe {recipe.name!r} has no quantizing stage (qat, ptq, qkd, pqk)",
                         hint="analyze with a quantizing recipe, e.g. --recipe ptq-int8")
    cfg = stages[-1]
    observer = getattr(cfg, "observer", "minmax")
    return quant_spec(cfg, "minmax", observer, getattr(cfg, "percentile", 99.99))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


class _Variants:
    """Builds, calibrates and measures one quantized variant of the FP32 model at a time."""

    def __init__(self, model, spec, target, calib, x, example, ort: bool):
        self.model, self.spec, self.target, self.calib, self.x = model, spec, target, calib, x
        self.example, self.ort = example, ort
        self.fp32 = self._logits(model)

    def _logits(self, m) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.concatenate([m(torch.from_numpy(self.x[i:i + 256])).numpy() for i in range(0, len(self.x), 256)])

    def build(self, overrides: tuple):
        from edgec.quant.prepare import calibrate, quantize_model

        spec = dataclasses.replace(self.spec, layers=tuple(overrides) + tuple(self.spec.layers))
        gm, rep = quantize_model(self.model, spec, self.target, self.example)
        calibrate(gm, self.calib)
        return gm.eval(), rep

    def logits(self, overrides: tuple) -> np.ndarray:
        gm, _ = self.build(overrides)
        if not self.ort:
            return self._logits(gm)
        from edgec.export.onnx_export import export_onnx
        from edgec.runtime import load_session, predict

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(gm, tuple(self.x.shape[1:]), Path(tmp) / "variant.onnx").path
            return predict(load_session(path, threads=1), self.x)

    def measure(self, overrides: tuple, y: np.ndarray) -> tuple[float, float]:
        z = self.logits(overrides)
        acc0 = float((self.fp32.argmax(1) == y).mean())
        return acc0 - float((z.argmax(1) == y).mean()), _kl(self.fp32, z)


def _layer_times(model, quantized, shape: tuple, runs: int = 50) -> dict[str, float]:
    """Per layer: int8_us / fp32_us from one interleaved ORT profile of the FP32 and the quantized export."""
    from edgec.bench.profile import profile_models
    from edgec.export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, shape, Path(tmp) / "fp32.onnx").path
        uniform = export_onnx(quantized, shape, Path(tmp) / "uniform.onnx").path
        prof = profile_models([fp32, uniform], runs=runs)
    return {r.layer: r.ratio for r in prof.layers if r.ratio is not None}


def analyze_model(model, data, *, recipe="ptq-int8", samples: int = 1000, calibration_samples: int = 256,
                  layers: str | None = None, ort: bool = False, profile: bool = False, seed: int = 0,
                  progress=None) -> SensitivityResult:
    """Per-layer sensitivity of ``model`` (FP32, eval mode) on ``data`` (a DataBundle) under ``recipe``
    (a Recipe, a shipped name or a YAML path). ``layers``: a glob restricting which layers are analysed;
    ``ort`` or ``profile``: each layer's int8-vs-float time from an ORT profile."""
    import torch

    from edgec.capture import example_from_data
    from edgec.data import calibration_subset, to_numpy
    from edgec.quant.precision import LayerOverride, check_overrides, resolve_precision
    from edgec.recipe import Recipe, load_recipe
    from edgec.targets import get_target

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    spec, target = quant_spec_of(recipe), get_target(recipe.target)
    model = model.eval().cpu()
    x, y = to_numpy(data.eval, limit=samples)
    calib, _ = calibration_subset(data.train, min(calibration_samples, len(data.train)), seed=seed)
    loader = torch.utils.data.DataLoader(calib, batch_size=min(128, calibration_samples))
    v = _Variants(model, spec, target, loader, x, example_from_data(data), ort)
    full, rep = v.build(())
    names = [str(n.target) for n in full.graph.nodes if n.op == "call_module" and str(n.target) in rep.precision]
    precision = resolve_precision(names, spec)
    chosen = names
    if layers is not None:
        check_overrides([LayerOverride(layers)], names, where="--layers")
        chosen = [n for n in names if fnmatch.fnmatchcase(n, layers)]
    z = v._logits(full) if not ort else v.logits(())
    acc0 = float((v.fp32.argmax(1) == y).mean())
    rows = []
    for i, name in enumerate(chosen):
        if progress is not None:
            progress(i, len(chosen), name)
        p = precision[name]
        only_q = (None, None)
        if not p.keep_float:
            only_q = v.measure((LayerOverride(exact_glob(name), weight_bits=p.weight_bits, act_bits=p.act_bits),
                                LayerOverride("*", keep_float=True)), y)
        only_f = v.measure((LayerOverride(exact_glob(name), keep_float=True),), y)
        rows.append(LayerSensitivity(name, *only_q, *only_f, weight_bits=p.weight_bits))
    if ort or profile:
        times = _layer_times(model, full, tuple(x.shape[1:]))
        for r in rows:
            r.int8_vs_float_time = times.get(r.layer) if r.weight_bits is not None else None
    return SensitivityResult(rows=rows, fp32_accuracy=acc0, quantized_accuracy=float((z.argmax(1) == y).mean()),
                             quantized_kl=_kl(v.fp32, z), samples=len(x), calibration_samples=len(calib),
                             measured_in="onnxruntime" if ort else "pytorch simulation",
                             spec={"recipe": recipe.name, "target": recipe.target, "weight_bits": spec.weight_bits,
                                   "act_bits": spec.act_bits, "first_layer_bits": spec.first_layer_bits,
                                   "last_layer_bits": spec.last_layer_bits, "act_observer": spec.act_quantizer})


def analyze_run(run_dir, *, samples: int = 1000, calibration_samples: int = 256, layers: str | None = None,
                ort: bool = False, profile: bool = False, trust_model_file: bool = False,
                progress=None) -> SensitivityResult:
    """:func:`analyze_model` on a run directory: its FP32 input model, data SPEC and recipe."""
    from edgec.data import load_data
    from edgec.errors import RunDirError
    from edgec.runs import IN_MEMORY, read_run, rebuild_model, run_recipe

    run = read_run(Path(run_dir))
    if run["identity"]["data"].startswith(IN_MEMORY):
        raise RunDirError(f"{run_dir} was compressed on an in-memory dataset; analyze cannot reload it",
                          hint="call edgec.sensitivity.analyze_model(model, data) in Python")
    recipe = run_recipe(run)
    model = rebuild_model(Path(run_dir), "input", trust_model_file=trust_model_file)
    data = load_data(run["identity"]["data"], seed=recipe.seed, max_eval=samples)
    return analyze_model(model, data, recipe=recipe, samples=samples, calibration_samples=calibration_samples,
                         layers=layers, ort=ort, profile=profile, seed=recipe.seed, progress=progress)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.2f}"


def print_sensitivity(res: SensitivityResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"per-layer sensitivity ({res.spec.get('recipe')}, w{res.spec.get('weight_bits')}"
                        f"a{res.spec.get('act_bits')}, {res.samples} samples, measured in {res.measured_in})")
    for col in ("layer", "bits", "drop only quantized (pt)", "KL only quantized", "drop only float (pt)",
                "KL only float", "int8/float time"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in res.rows:
        table.add_row(r.layer, "float" if r.weight_bits is None else str(r.weight_bits), _pct(r.drop_only_quantized),
                      "-" if r.kl_only_quantized is None else f"{r.kl_only_quantized:.4f}", _pct(r.drop_only_float),
                      f"{r.kl_only_float:.4f}", "-" if r.int8_vs_float_time is None else f"{r.int8_vs_float_time:.2f}")
    console.print(table)
    console.print(f"FP32 accuracy {res.fp32_accuracy:.2%}; all layers quantized {res.quantized_accuracy:.2%} "
                  f"(KL {res.quantized_kl:.4f}); most sensitive: {', '.join(res.most_sensitive()[:3]) or '-'}")


def write_sensitivity(res: SensitivityResult, out_dir) -> dict[str, Path]:
    """``sensitivity.json`` and ``sensitivity.png`` (bars per layer) in ``out_dir``, written atomically."""
    from edgec.atomic import atomic_write, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sensitivity.json", "png": out / "sensitivity.png"}
    atomic_write_text(paths["json"], json.dumps(res.as_dict(), indent=2))
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.layer for r in res.rows]
    idx = np.arange(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 6.5), sharex=True)
    for ax, key, label in ((axes[0], "drop", "accuracy drop vs FP32 (pt)"), (axes[1], "kl", "KL(FP32 || variant)")):
        a = [getattr(r, f"{key}_only_quantized") or 0.0 for r in res.rows]
        b = [getattr(r, f"{key}_only_float") or 0.0 for r in res.rows]
        scale = 100.0 if key == "drop" else 1.0
        ax.bar(idx - 0.2, np.array(a) * scale, 0.4, label="only this layer quantized")
        ax.bar(idx + 0.2, np.array(b) * scale, 0.4, label="only this layer float")
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"per-layer sensitivity ({res.spec.get('recipe')}, {res.measured_in})")
    axes[1].set_xticks(idx, names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(paths["png"], lambda fh: fh.write(buf.getvalue()))
    return paths
