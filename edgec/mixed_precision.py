"""Precision chosen by measurement: which conv/linear layers of a quantizing stage stay float (or go to
8 bits), decided from the exported artifacts on the target (docs/methods.md, mixed precision).

Every quantizing stage (qat, ptq, qkd, pqk) calls :func:`choose` before it builds its quantized graph.
With the stage's ``precision:`` block (:class:`edgec.stages.config.Precision`):

1. **Slow integer kernels stay float** (``keep_slow_float``, on by default; in a stage below 8
   bits, which is there for size, a slower layer goes to 8 bits instead: :func:`speed_override`).
   The stage's uniform quantized graph is calibrated and exported next to the FP32 model, both are profiled in ONNX
   Runtime in one interleaved run (:func:`edgec.bench.profile.profile_models`), and every layer whose
   quantized kernels took longer than its float kernel in at least ``slower_share`` of the calls (and
   by more than ``min_us``) is kept float. Then the whole artifact is timed against FP32
   (:func:`edgec.bench.compare.compare_latency`): while it is slower, the layers with the largest
   measured int8 - float difference go float too, so the exported model is not slower than FP32
   there. Of the candidates measured (uniform among them) the fastest is kept, so the chosen artifact
   is never measured slower than the uniform one. Measured only where the target runs: an x86 target
   on an x86-64 host, arm64 on aarch64 (otherwise the step is skipped and the decision says so).
2. **An accuracy tolerance** (``max_drop``, :mod:`edgec.max_drop`; top-1 share vs the FP32 model, on ``eval_samples``
   training samples disjoint from the calibration set; the test split is never used to choose).
   While the drop is above it, the layer whose own float (or 8-bit) version recovers the most
   accuracy is promoted: to 8 bits in a layer below 8 bits, to float at 8 bits (never float where the
   stage cannot keep layers float: pqk). Promotions are measured in the PyTorch simulation; the chosen
   artifact is then exported and measured in ONNX Runtime on the same samples (``accuracy.met`` needs
   both; the samples are recorded by count and the sha256 of their indices, :func:`eval_indices`).
   A stage that trains (qat, qkd) judges the tolerance after short **QAT probes** instead: an
   untrained calibrated W4A4 graph is far below what QAT reaches and would promote nearly every
   layer. The layers are ranked by the accuracy each recovers when promoted alone (calibrated), and
   a binary search over that order finds the fewest promotions whose graph, trained for ``probe`` of
   the stage's training samples (on samples outside the max_drop set), meets the tolerance (no probe
   when the calibrated uniform graph meets it already). (Promoting
   layers inside an already trained low-bit graph was tried as the cheaper measure and rejected: the
   trained layers are adapted to their grid, and moving them to 8 bits lowered the accuracy.) The
   stage then trains from the float model with that precision, and :func:`check_trained` measures
   the trained graph on the same samples (``after_training``; the exporter's parity check ties it
   to ONNX Runtime).

Layers the recipe's ``layers:`` overrides name are the user's choice and are never changed. The
decision (every layer's precision, the reason, uniform vs chosen latency and accuracy) is written to
``stages/stageN.precision.json``; a rebuild (``edgec export``, ``--resume``) reads it back instead of
measuring again, so the structure is the one that was trained.
"""
from __future__ import annotations

import fnmatch
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from edgec.max_drop import (DECISION, check_exported, check_trained, decision_path, eval_indices,  # noqa: F401
                            for_accuracy, sample_eval, with_overrides)
from edgec.quant.precision import LayerOverride, exact_glob

__all__ = ["DECISION", "apply_decision", "check_exported", "check_trained", "choose", "decision_path", "eval_indices",
           "measurable", "read_decision", "read_overrides", "speed_override"]

def read_decision(path: Path) -> tuple[LayerOverride, ...]:
    return read_overrides(json.loads(Path(path).read_text()))


def read_overrides(doc: dict) -> tuple[LayerOverride, ...]:
    return tuple(LayerOverride(o["match"], keep_float=bool(o.get("keep_float")), weight_bits=o.get("weight_bits"),
                               act_bits=o.get("act_bits")) for o in doc["chosen_overrides"])


def _host() -> str:
    """This machine as a target name ("x86", "arm64"; else the machine string)."""
    machine = platform.machine().lower()
    return "x86" if machine in ("x86_64", "amd64") else "arm64" if machine in ("aarch64", "arm64") else machine


def measurable(target) -> tuple[bool, str]:
    """Whether latency on ``target`` can be measured on this host (and why not)."""
    machine = platform.machine().lower()
    if target.name == _host():
        return True, f"measured on this host ({machine})"
    return False, f"target {target.name} is not this host ({machine}): latency not measured, no layer kept float for speed"


def _user_fixed(spec, names: list[str]) -> set[str]:
    return {n for n in names for o in spec.layers if fnmatch.fnmatchcase(n, o.match)}




def apply_decision(spec, doc: dict):
    """``spec`` as the recorded decision ``doc`` chose it (its overrides, and its norms float if it said so)."""
    return replace(spec, layers=read_overrides(doc) + tuple(spec.layers),
                   norm_bits=None if doc.get("norms_float") else spec.norm_bits)


class _Bench:
    """Builds, exports and measures candidate precisions of one stage's model (all in a temp folder)."""

    def __init__(self, model, spec, ctx, build: Callable, *, eval_batches, eval_order=(), runs: int):
        from edgec.capture import example_input

        self.model, self.spec, self.ctx, self.build = model.cpu(), spec, ctx, build  # eval batches are CPU
        self.shape = tuple(example_input(ctx, 1).shape[1:])
        self.tmp = Path(tempfile.mkdtemp(prefix="edgec-precision-"))
        self.runs = runs
        bench_cfg = getattr(getattr(ctx, "recipe", None), "bench", None)  # measured as the run's report measures
        self.batch = int(getattr(bench_cfg, "batch", 1))
        self.threads = int(getattr(bench_cfg, "threads", 1))
        self.eval_batches, self.eval_order = eval_batches, list(eval_order)
        self._k = 0
        self._fp32_pred = None

    @property
    def fp32(self) -> Path:
        """The FP32 model's export (made when a measurement first needs it)."""
        from edgec.export.onnx_export import export_onnx

        path = self.tmp / "fp32.onnx"
        if not path.is_file():
            export_onnx(self.model.eval(), self.shape, path)
        return path

    def export(self, spec) -> tuple[Path, Any]:
        from edgec.export.onnx_export import export_onnx

        gm = self.build(spec)
        self._k += 1
        path = self.tmp / f"candidate{self._k}.onnx"
        export_onnx(gm.eval(), self.shape, path)
        return path, gm

    def speedups(self, paths: dict[str, Path]) -> dict[str, float]:
        """Median speed-up vs FP32 of each artifact, all timed in one interleaved run (the recipe's bench
        batch and threads)."""
        from edgec.bench.compare import compare_latency

        cmp = compare_latency({"fp32": self.fp32, **paths}, threads=self.threads, batch=self.batch, warmup=10,
                             runs=self.runs, rounds=3)
        return {k: float(cmp["speedup_vs_first"][k]["median"]) for k in paths}

    @torch.no_grad()
    def accuracy(self, model) -> tuple[float, float]:
        """(top-1 on the labels, top-1 agreement with the FP32 model) in PyTorch simulation."""
        model.eval()
        if self._fp32_pred is None:
            self.model.eval()
            self._fp32_pred = [self.model(x).argmax(1) for x, _ in self.eval_batches]
        hit = agree = n = 0
        for (x, y), ref in zip(self.eval_batches, self._fp32_pred):
            p = model(x).argmax(1)
            hit += int((p == y).sum())
            agree += int((p == ref).sum())
            n += len(y)
        return hit / max(n, 1), agree / max(n, 1)

    def ort_accuracy(self, spec) -> float:
        """Top-1 on the labels of ``spec``'s exported artifact in ONNX Runtime (the recipe's bench threads)."""
        from edgec.runtime import load_session, predict

        path, _ = self.export(spec)
        sess = load_session(path, threads=self.threads)
        hit = sum(int((predict(sess, x.numpy()).argmax(1) == y.numpy()).sum()) for x, y in self.eval_batches)
        return hit / max(sum(len(y) for _, y in self.eval_batches), 1)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _slow_layers(bench: _Bench, path: Path, names: list[str], pol) -> tuple[list[dict], dict[str, float]]:
    """Layers whose quantized kernels are measured slower than their float kernels (and every layer's
    int8 - float difference in us, for the whole-model step)."""
    from edgec.bench.profile import profile_models

    prof = profile_models([bench.fp32, path], runs=bench.runs, warmup=10, batch=bench.batch, threads=bench.threads)
    rows, delta = [], {}
    for r in prof.layers:
        if r.layer not in names or r.fp32_us is None or r.int8_us is None:
            continue
        delta[r.layer] = r.int8_us - r.fp32_us
        if (r.int8_slower and (r.int8_slower_share or 0) >= pol.slower_share and r.int8_us - r.fp32_us >= pol.min_us):
            rows.append({"layer": r.layer, "fp32_us": round(r.fp32_us, 2), "int8_us": round(r.int8_us, 2),
                         "slower_share": r.int8_slower_share})
    return rows, delta


def speed_override(name: str, spec, at: dict) -> LayerOverride:
    """What a layer measured slower than float becomes: float in a stage at 8 bits; in a stage below 8 bits
    (there for size) 8 bits, still an integer kernel, unless it is at 8 bits already (first/last_layer_bits),
    then float. ``at``: :func:`edgec.quant.precision.resolve_precision` of the stage."""
    p = at[name]
    if (spec.weight_bits < 8 or spec.act_bits < 8) and not (p.weight_bits >= 8 and (p.act_bits or spec.act_bits) >= 8):
        return LayerOverride(exact_glob(name), weight_bits=8, act_bits=8)
    return LayerOverride(exact_glob(name), keep_float=True)


def _for_speed(bench: _Bench, spec, names: list[str], fixed: set[str], pol, doc: dict, log):
    """Float layers for speed: the measured-slower ones if that beats uniform by ``min_gain``, then more while the
    artifact is slower than FP32; the fastest candidate measured wins (uniform among them, so the chosen
    artifact is never measured slower than uniform). Returns ({name: override}, {name: reason})."""
    from edgec.quant.precision import resolve_precision

    uniform, _ = bench.export(spec)
    slow, delta = _slow_layers(bench, uniform, names, pol)
    doc["slow_layers"] = slow
    doc["int8_minus_float_us"] = {n: round(d, 2) for n, d in delta.items()}
    low = spec.weight_bits < 8 or spec.act_bits < 8
    at = resolve_precision(names, spec)
    extra = {r["layer"]: speed_override(r["layer"], spec, at) for r in slow if r["layer"] not in fixed}
    reasons = {r["layer"]: f"int{at[r['layer']].weight_bits} {r['int8_us']} us > float {r['fp32_us']} us"
                           + ("" if extra[r["layer"]].keep_float else ": at 8 bits") for r in slow if r["layer"] in extra}
    if extra:
        chosen, _ = bench.export(with_overrides(spec, extra))
        s = bench.speedups({"uniform": uniform, "chosen": chosen})
        doc["uniform_speedup"], speed = s["uniform"], s["chosen"]
        gain = pol.min_gain
        if speed <= doc["uniform_speedup"] * (1.0 + gain):
            what = "float / at 8 bits" if low else "float"
            doc["per_layer_rejected"] = (f"{len(extra)} slower layer(s) {what} measured x{speed:.2f} vs uniform "
                                         f"x{doc['uniform_speedup']:.2f}"
                                         + (f" (less than {100 * gain:.0f} % faster)" if speed > doc["uniform_speedup"]
                                            else "") + ": kept uniform")
            log(f"precision: {doc['per_layer_rejected']}")
            extra, reasons, speed = {}, {}, doc["uniform_speedup"]
    else:
        doc["uniform_speedup"] = speed = bench.speedups({"uniform": uniform})["uniform"]
    best = (speed, dict(extra), dict(reasons))
    rest = sorted((n for n in names if n not in extra and n not in fixed and delta.get(n, 0) > 0),
                  key=lambda n: -delta[n])
    tried = []
    if spec.weight_bits < 8 and speed < 1.0 and rest:
        # below 8 bits the stage is there for size: floating whole layers to win speed would undo it
        doc["more_float_skipped"] = (f"x{speed:.2f} vs FP32, but a W{spec.weight_bits} stage is for size: no further "
                                     "layer floated for speed (set `layers:` to choose)")
        log(f"[yellow]precision: {doc['more_float_skipped']}[/]")
        rest = []
    while speed < 1.0 and rest:  # the whole artifact still slower than FP32: the next slowest layers float
        step = max(1, len(rest) // 4)
        for n in rest[:step]:
            extra[n] = LayerOverride(exact_glob(n), keep_float=True)
            reasons[n] = f"artifact x{speed:.2f} vs FP32; int8 {delta[n]:+.1f} us"
        rest = rest[step:]
        speed = bench.speedups({"chosen": bench.export(with_overrides(spec, extra))[0]})["chosen"]
        tried.append({"float": sorted(extra), "speedup": speed})
        if speed > best[0]:
            best = (speed, dict(extra), dict(reasons))
    speed, extra, reasons = best
    if spec.weight_bits >= 8 and speed < 1.0:
        # still slower than FP32 with every slower conv/linear float: what is left is not a conv kernel
        # (int8 norms: norm_bits; the Q/DQ around the last integer layers); try those too
        speed, extra, reasons = _last_resort(bench, spec, names, fixed, doc, tried, (speed, extra, reasons))
    if tried:
        doc["more_float_tried"] = tried
    doc["chosen_speedup"] = speed
    if extra and all((n in extra and extra[n].keep_float) or n in fixed for n in names):
        doc["all_float"] = ("every conv/linear layer is faster in float on this target: the artifact is the FP32 "
                            "model (set `precision: {keep_slow_float: false}` to quantize for size anyway)")
        log(f"[yellow]precision: {doc['all_float']}[/]")
    n_float = sum(o.keep_float for o in extra.values())
    what = f"{n_float} float, {len(extra) - n_float} at 8 bits" if len(extra) > n_float else "kept float"
    log(f"precision: uniform x{doc['uniform_speedup']:.2f} vs FP32; {len(extra)} layer(s) {what} for speed "
        f"-> x{speed:.2f}")
    return extra, reasons


def _last_resort(bench: _Bench, spec, names, fixed, doc: dict, tried: list, best: tuple) -> tuple:
    """Candidates past the per-layer rule: norms float (a stage with ``norm_bits``), then every layer float;
    the fastest measured wins (``doc["norms_float"]`` records the first)."""
    speed, extra, reasons = best
    every = {**extra, **{n: LayerOverride(exact_glob(n), keep_float=True) for n in names if n not in fixed}}
    cands = ([(dict(extra), True)] if spec.norm_bits is not None else []) + [(every, spec.norm_bits is not None)]
    for ext, norms in cands:
        if ext == extra and not norms:
            continue
        sp = bench.speedups({"chosen": bench.export(with_overrides(spec, ext, norms))[0]})["chosen"]
        tried.append({"float": sorted(ext), "norms_float": norms, "speedup": sp})
        if sp > speed:
            why = f"artifact x{speed:.2f} vs FP32 with the slower layers float"
            speed, extra, doc["norms_float"] = sp, ext, norms
            reasons = {**{n: why for n in ext}, **reasons}
        if speed >= 1.0:
            break
    return speed, extra, {n: reasons[n] for n in extra}


def _decide(model, spec, ctx, pol, bench: _Bench, can_float: bool, probe: Callable | None) -> dict:
    from edgec.quant.precision import conv_linear_names

    names = conv_linear_names(model)
    fixed = _user_fixed(spec, names)
    doc: dict[str, Any] = {"schema": "edgec.precision/1", "policy": pol.model_dump(), "user_fixed": sorted(fixed)}
    extra: dict[str, LayerOverride] = {}
    reasons: dict[str, str] = {}
    ok, why = measurable(ctx.target)
    budgets = [s.method for s in getattr(getattr(ctx, "recipe", None), "stages", ()) if getattr(s, "target_bytes", None)]
    if budgets:  # edgec.budget turned the size budget into a sparsity at the deployed bits: float layers would break it
        ok, why = False, f"a size budget (target_bytes in {', '.join(budgets)}) fixes every layer at its deployed bits"
    doc["latency"] = why
    doc["bench"] = {"batch": bench.batch, "threads": bench.threads}  # where the speed-ups were timed
    if pol.keep_slow_float and ok and can_float:
        extra, reasons = _for_speed(bench, spec, names, fixed, pol, doc, ctx.log)
        if doc.get("norms_float"):
            ctx.log("precision: unfoldable norms left float (norm_bits off): int8 norms were slower than FP32")
            spec = replace(spec, norm_bits=None)
    elif pol.keep_slow_float:
        doc["latency"] = why if not ok else "this stage cannot keep layers float (pqk): not measured"
        ctx.log(f"[yellow]precision: {doc['latency']}[/]")
    if pol.max_drop is not None:
        before = set(extra)
        extra, doc["accuracy"] = for_accuracy(bench, model, spec, extra, names, fixed, pol, ctx, can_float, probe)
        reasons.update({n: "accuracy tolerance" for n in extra if n not in before})
    doc["chosen_overrides"] = [{"match": o.match, "keep_float": o.keep_float, "weight_bits": o.weight_bits,
                                "act_bits": o.act_bits, "reason": reasons.get(n, "")} for n, o in extra.items()]
    doc["layers"] = {n: ("user" if n in fixed else "float" if n in extra and extra[n].keep_float
                         else f"{extra[n].weight_bits} bit" if n in extra else "uniform") for n in names}
    return doc


def choose(model, spec, ctx, *, pol, build: Callable, can_float: bool = True, calib_manifest: dict | None = None,
           probe: Callable | None = None):
    """The stage's QuantSpec with the measured per-layer choice added (see the module docstring).

    ``probe(gm) -> {"samples": n, ...}``: trains a quantized graph in place for the stage's short QAT
    probe (stages that train; None: max_drop is judged on the calibrated graph)."""
    from edgec.atomic import atomic_write_text
    from edgec.distributed import broadcast_object

    path = decision_path(ctx)
    recorded = path.is_file()
    if ctx.dist.world_size > 1:  # rank 0's view: another rank must not see the file rank 0 is about to write
        recorded = broadcast_object(recorded)
    if recorded:  # a rebuild, a resumed run, or the stage's second prepare (pqk): the recorded choice
        return apply_decision(spec, json.loads(path.read_text()))
    if ctx.rebuild or pol is None or (not pol.keep_slow_float and pol.max_drop is None):
        return spec
    doc = None
    if ctx.dist.rank == 0:
        batches, order = sample_eval(ctx, pol.eval_samples, calib_manifest) if pol.max_drop is not None else ([], [])
        bench = _Bench(model, spec, ctx, build, eval_batches=batches, eval_order=order, runs=pol.profile_runs)
        try:
            doc = _decide(model, spec, ctx, pol, bench, can_float, probe if pol.probe > 0 else None)
        finally:
            bench.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    if ctx.dist.world_size > 1:
        doc = broadcast_object(doc)
    chosen = read_overrides(doc)
    ctx.record(event="precision", kept_float=[o.match for o in chosen if o.keep_float],
               promoted=[o.match for o in chosen if not o.keep_float], norms_float=bool(doc.get("norms_float")),
               uniform_speedup=doc.get("uniform_speedup"), chosen_speedup=doc.get("chosen_speedup"))
    return apply_decision(spec, doc)

