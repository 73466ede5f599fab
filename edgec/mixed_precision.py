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
2. **An accuracy tolerance** (``max_drop``, top-1 share vs the FP32 model, on ``eval_samples``
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

from edgec.quant.precision import LayerOverride, exact_glob

__all__ = ["DECISION", "apply_decision", "check_exported", "check_trained", "choose", "decision_path", "eval_indices",
           "measurable", "read_decision", "read_overrides", "speed_override"]

DECISION = "stages/stage{index}.precision.json"


def decision_path(ctx) -> Path:
    return Path(ctx.run_dir) / DECISION.format(index=ctx.index)


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


def _with(spec, extra: dict[str, LayerOverride], norms_float: bool = False):
    """``spec`` with exact-name overrides for ``extra`` placed before the user's globs (theirs never
    match those names: :func:`_user_fixed` excludes them); ``norms_float``: unfoldable norms left float
    (no ``norm_bits``)."""
    return replace(spec, layers=tuple(extra.values()) + tuple(spec.layers),
                   norm_bits=None if norms_float else spec.norm_bits)


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


_MIN_EVAL = 10  # samples the max_drop measurement needs at least (Precision.eval_samples' minimum)


def eval_indices(train_len: int, n: int, seed: int, calib_manifest: dict | None) -> list[int]:
    """The training-split indices the max_drop measurement uses: ``n`` seeded ones outside the calibration
    manifest's (its count and sha256 are recorded in the decision, to check against)."""
    g = torch.Generator().manual_seed(seed + 7)
    taken = set((calib_manifest or {}).get("indices", []))
    return [i for i in torch.randperm(train_len, generator=g).tolist() if i not in taken][:n]


def _sample_eval(ctx, n: int, calib_manifest: dict | None, batch: int = 128):
    """``n`` training samples outside the calibration set, as (x, y) batches, and their indices."""
    from edgec.errors import InputError

    order = eval_indices(len(ctx.data.train), n, ctx.seed, calib_manifest)
    if len(order) < _MIN_EVAL:  # an empty set would meet any tolerance
        used = len((calib_manifest or {}).get("indices", []))
        raise InputError(f"stages.{ctx.index}.precision.max_drop needs at least {_MIN_EVAL} training samples outside "
                         f"the calibration set; the training split has {len(ctx.data.train)}, {used} calibrate",
                         hint=f"lower stages.{ctx.index}.calibration_samples, or drop precision.max_drop")
    out = []
    for i in range(0, len(order), batch):
        xs, ys = zip(*(ctx.data.train[j] for j in order[i:i + batch]))
        out.append((torch.stack(xs), torch.as_tensor([int(y) for y in ys])))
    return out, order


def _promotion(spec, name: str, can_float: bool, bits: dict[str, int]) -> LayerOverride | None:
    """8 bits for a layer below 8 (its own bits: first/last_layer_bits count), float for one at 8."""
    if (bits.get(name) or spec.weight_bits) < 8 or spec.act_bits < 8:
        return LayerOverride(exact_glob(name), weight_bits=8, act_bits=8)
    return LayerOverride(exact_glob(name), keep_float=True) if can_float else None


def _meets_drop(measure: Callable, spec, extra, free: list[str], pol, acc_fp32: float, log, can_float: bool,
                bits: dict[str, int]):
    """Promote layers of ``free`` one at a time (the one that recovers most accuracy first) until the
    drop holds or none is left. ``measure(overrides) -> (top-1, agreement)``; ``bits``: each layer's
    weight bits without overrides."""
    acc, agree = measure(extra)
    steps = [{"promoted": None, "accuracy": acc, "agreement": agree}]
    free = [n for n in free if n not in extra and _promotion(spec, n, can_float, bits) is not None]
    while acc_fp32 - acc > pol.max_drop and free:
        trials = []
        for k, n in enumerate(free):  # ties: the earlier layer
            a, _ = measure({**extra, n: _promotion(spec, n, can_float, bits)})
            trials.append((a, -k, n))
        _, _, best = max(trials)
        extra = {**extra, best: _promotion(spec, best, can_float, bits)}
        free.remove(best)
        acc, agree = measure(extra)
        steps.append({"promoted": best, "accuracy": acc, "agreement": agree})
        log(f"precision: {best} -> {'float' if extra[best].keep_float else '8 bit'}: top-1 {acc:.4f} "
            f"(FP32 {acc_fp32:.4f}, tolerance {pol.max_drop})")
    return extra, {"steps": steps, "met": acc_fp32 - acc <= pol.max_drop, "accuracy": acc, "agreement": agree}


def speed_override(name: str, spec, at: dict) -> LayerOverride:
    """What a layer measured slower than float becomes: float in a stage at 8 bits; in a stage below 8 bits
    (there for size) 8 bits, still an integer kernel, unless it is at 8 bits already (first/last_layer_bits),
    then float. ``at``: :func:`edgec.quant.precision.resolve_precision` of the stage."""
    p = at[name]
    if (spec.weight_bits < 8 or spec.act_bits < 8) and not (p.weight_bits >= 8 and (p.act_bits or spec.act_bits) >= 8):
        return LayerOverride(exact_glob(name), weight_bits=8, act_bits=8)
    return LayerOverride(exact_glob(name), keep_float=True)


def _for_speed(bench: _Bench, spec, names: list[str], fixed: set[str], pol, doc: dict, log):
    """Float layers for speed: the measured-slower ones if that beats uniform, then more while the
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
        chosen, _ = bench.export(_with(spec, extra))
        s = bench.speedups({"uniform": uniform, "chosen": chosen})
        doc["uniform_speedup"], speed = s["uniform"], s["chosen"]
        if speed <= doc["uniform_speedup"]:
            what = "float / at 8 bits" if low else "float"
            doc["per_layer_rejected"] = (f"{len(extra)} slower layer(s) {what} measured x{speed:.2f} vs uniform "
                                         f"x{doc['uniform_speedup']:.2f}: kept uniform")
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
        speed = bench.speedups({"chosen": bench.export(_with(spec, extra))[0]})["chosen"]
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
    if extra and all(n in extra or n in fixed for n in names):
        doc["all_float"] = ("every conv/linear layer is faster in float on this target: the artifact is the FP32 "
                            "model (set `precision: {keep_slow_float: false}` to quantize for size anyway)")
        log(f"[yellow]precision: {doc['all_float']}[/]")
    log(f"precision: uniform x{doc['uniform_speedup']:.2f} vs FP32; {len(extra)} layer(s) kept float for speed "
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
        sp = bench.speedups({"chosen": bench.export(_with(spec, ext, norms))[0]})["chosen"]
        tried.append({"float": sorted(ext), "norms_float": norms, "speedup": sp})
        if sp > speed:
            why = f"artifact x{speed:.2f} vs FP32 with the slower layers float"
            speed, extra, doc["norms_float"] = sp, ext, norms
            reasons = {**{n: why for n in ext}, **reasons}
        if speed >= 1.0:
            break
    return speed, extra, {n: reasons[n] for n in extra}


def _probe_search(bench: _Bench, spec, extra: dict, free: list[str], pol, acc_fp32: float, probe: Callable, ctx,
                  can_float: bool, bits: dict[str, int]) -> tuple[dict, dict]:
    """max_drop for a stage that trains: the fewest promotions, in order of sensitivity, whose graph meets
    the tolerance after a short QAT probe. Sensitivity: each layer promoted alone in the calibrated graph;
    then a binary search over the prefix of that order, each candidate built, calibrated, probe-trained
    (``probe``) and measured. Returns (overrides, the decision's accuracy fields)."""
    import time

    free = [n for n in free if n not in extra and _promotion(spec, n, can_float, bits) is not None]
    cold, cold_agree = bench.accuracy(bench.build(_with(spec, extra)))
    if acc_fp32 - cold <= pol.max_drop:  # met before any training: QAT starts from this graph, nothing to probe
        ctx.log(f"precision: the calibrated graph meets max_drop already (top-1 {cold:.4f}, FP32 {acc_fp32:.4f})")
        return extra, {"judged_on": "calibrated", "calibrated_uniform": cold, "probes": [], "probe_share": pol.probe,
                       "met": True, "accuracy": cold, "agreement": cold_agree,
                       "steps": [{"promoted": None, "accuracy": cold, "agreement": cold_agree}]}
    gain = [(bench.accuracy(bench.build(_with(spec, {**extra, n: _promotion(spec, n, can_float, bits)})))[0], -k, n)
            for k, n in enumerate(free)]  # ties: the earlier layer
    order = [n for _, _, n in sorted(gain, reverse=True)]
    tried: dict[int, dict] = {}

    def probed(k: int) -> bool:
        if k not in tried:
            t = time.perf_counter()
            ext = {**extra, **{n: _promotion(spec, n, can_float, bits) for n in order[:k]}}
            gm = bench.build(_with(spec, ext))
            info = probe(gm)
            acc, agree = bench.accuracy(gm.cpu().eval())
            tried[k] = {"promoted": order[:k], "accuracy": acc, "agreement": agree, "met": acc_fp32 - acc <= pol.max_drop,
                        "samples": info["samples"], "seconds": round(time.perf_counter() - t, 1)}
            ctx.log(f"precision: QAT probe with {k} promotion(s): top-1 {acc:.4f} (FP32 {acc_fp32:.4f}, tolerance "
                    f"{pol.max_drop})")
        return tried[k]["met"]

    lo, hi = 0, len(order)
    if not probed(0):
        while lo + 1 < hi:  # invariant: lo fails; hi meets, or is every promotion
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if probed(mid) else (mid, hi)
        probed(hi)
    k = 0 if tried[0]["met"] else hi
    chosen = {**extra, **{n: _promotion(spec, n, can_float, bits) for n in order[:k]}}
    res = tried[k]
    return chosen, {"judged_on": "qat_probe", "calibrated_uniform": cold, "order": order,
                    "sensitivity": {n: a for a, _, n in gain}, "probes": [tried[i] for i in sorted(tried)],
                    "probe_share": pol.probe, "met": res["met"], "accuracy": res["accuracy"], "agreement": res["agreement"],
                    "steps": [{"promoted": n} for n in [None, *order[:k]]]}


def _for_accuracy(bench: _Bench, model, spec, extra: dict, names: list[str], fixed: set[str], pol, ctx,
                  can_float: bool, probe: Callable | None = None) -> tuple[dict, dict]:
    """The max_drop step: promotions in the PyTorch simulation (on the graph after the stage's QAT probe
    when the stage trains), then, for an untrained (PTQ) judgement, the chosen artifact checked in ONNX
    Runtime on the same samples. Returns (overrides, the decision's ``accuracy`` entry)."""
    from edgec.data import indices_sha256
    from edgec.quant.precision import resolve_precision

    bits = {n: p.weight_bits for n, p in resolve_precision(names, replace(spec, layers=())).items()}
    acc_fp32, _ = bench.accuracy(model)
    free = [n for n in names if n not in fixed]
    order = bench.eval_order
    head = {"fp32": acc_fp32, "eval_samples": len(order), "split": "train", "indices_sha256": indices_sha256(order)}
    if probe is not None:
        # the stage then trains its graph from the float model: the trained result is checked in
        # check_trained (after the stage's training), the probes' here
        extra, acc_doc = _probe_search(bench, spec, extra, free, pol, acc_fp32, probe, ctx, can_float, bits)
        return extra, {**head, **acc_doc, "simulation_met": acc_doc["met"],
                       "data": "training samples outside the calibration set (edgec.mixed_precision.eval_indices); "
                               "the probes train on others, measured in the PyTorch simulation"}
    measure = lambda ext: bench.accuracy(bench.build(_with(spec, ext)))  # noqa: E731
    extra, acc_doc = _meets_drop(measure, spec, extra, free, pol, acc_fp32, ctx.log, can_float, bits)
    doc = {**head, **acc_doc, "simulation_met": acc_doc["met"]}
    # the structure the export writes (pqk trains with BatchNorms unfolded and folds them in convert)
    ort_acc = bench.ort_accuracy(replace(_with(spec, extra), fold_bn=True))
    ort = {"accuracy": ort_acc, "drop": acc_fp32 - ort_acc, "met": acc_fp32 - ort_acc <= pol.max_drop}
    if acc_doc["met"] and not ort["met"]:
        ctx.log(f"[yellow]precision: the chosen artifact drops {ort['drop']:.4f} in ONNX Runtime (simulation "
                f"{acc_fp32 - acc_doc['accuracy']:.4f}), above max_drop {pol.max_drop}[/]")
    return extra, {**doc, "judged_on": "calibrated",
                   "data": "training samples outside the calibration set (edgec.mixed_precision.eval_indices), "
                           "promotions measured in the PyTorch simulation, the choice in ONNX Runtime",
                   "met": acc_doc["met"] and ort["met"], "onnxruntime": ort}


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
        extra, doc["accuracy"] = _for_accuracy(bench, model, spec, extra, names, fixed, pol, ctx, can_float, probe)
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
        batches, order = _sample_eval(ctx, pol.eval_samples, calib_manifest) if pol.max_drop is not None else ([], [])
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


def _decision_samples(run_dir, index: int, train, acc_doc: dict, seed: int, log):
    """The max_drop samples of stage ``index`` rebuilt from the run's calibration manifest, checked against the
    decision's sha256; None (and a warning) when they cannot be rebuilt."""
    from types import SimpleNamespace

    from edgec.data import indices_sha256

    manifest_path = Path(run_dir) / "calibration" / f"stage{index}.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    ctx = SimpleNamespace(data=SimpleNamespace(train=train), seed=seed, index=index)
    batches, order = _sample_eval(ctx, acc_doc["eval_samples"], manifest)
    if indices_sha256(order) != acc_doc["indices_sha256"]:
        log("[yellow]precision: the max_drop samples cannot be rebuilt (calibration manifest changed): not checked[/]")
        return None
    return batches, order


def check_exported(run_dir, recipe, data, onnx_path, *, log=print) -> dict | None:
    """The exported artifact measured in ONNX Runtime on the max_drop samples of the recipe's last stage (when
    that stage decided with a ``max_drop``): ``after_export`` in its decision. A max_drop of an earlier stage
    is about a model a later stage changed, and is not checked here."""
    from edgec.atomic import atomic_write_text
    from edgec.runtime import load_session, predict

    index = len(recipe.stages) - 1
    path = Path(run_dir) / DECISION.format(index=index)
    if not path.is_file() or data is None:
        return None
    doc = json.loads(path.read_text())
    acc_doc, pol = doc.get("accuracy"), doc.get("policy") or {}
    if not acc_doc or pol.get("max_drop") is None:
        return None
    got = _decision_samples(run_dir, index, data.train, acc_doc, recipe.seed, log)
    if got is None:
        return None
    batches, order = got
    sess = load_session(onnx_path, threads=1)
    hit = sum(int((predict(sess, x.numpy()).argmax(1) == y.numpy()).sum()) for x, y in batches)
    acc = hit / max(len(order), 1)
    entry = {"accuracy": acc, "drop": acc_doc["fp32"] - acc, "met": acc_doc["fp32"] - acc <= pol["max_drop"],
             "artifact": Path(onnx_path).name, "measured": "ONNX Runtime, the decision's samples"}
    doc["after_export"] = entry
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    colour = "" if entry["met"] else "[yellow]"
    log(f"{colour}precision: {entry['artifact']} in ONNX Runtime: top-1 {acc:.4f} vs FP32 {acc_doc['fp32']:.4f} on "
        f"the max_drop samples, drop {entry['drop']:.4f} {'within' if entry['met'] else 'ABOVE'} max_drop "
        f"{pol['max_drop']}{'' if entry['met'] else '[/]'}")
    return entry


def check_trained(gm, ctx) -> dict | None:
    """After a stage trained with a ``max_drop`` decision: the trained graph's top-1 on the decision's samples
    (PyTorch simulation) vs the FP32 accuracy recorded there, written into the decision as
    ``after_training``. Returns that entry (None when the decision has no accuracy step)."""
    from edgec.atomic import atomic_write_text

    path = decision_path(ctx)
    if ctx.rebuild or ctx.dist.rank != 0 or not path.is_file():
        return None
    doc = json.loads(path.read_text())
    acc_doc, pol = doc.get("accuracy"), doc.get("policy") or {}
    if not acc_doc or pol.get("max_drop") is None:
        return None
    got = _decision_samples(ctx.run_dir, ctx.index, ctx.data.train, acc_doc, ctx.seed, ctx.log)
    if got is None:
        return None
    batches, order = got
    was = gm.training
    dev = next(gm.parameters()).device
    gm.eval().cpu()
    with torch.no_grad():
        hit = sum(int((gm(x).argmax(1) == y).sum()) for x, y in batches)
    gm.to(dev).train(was)
    acc = hit / max(len(order), 1)
    entry = {"accuracy": acc, "drop": acc_doc["fp32"] - acc, "met": acc_doc["fp32"] - acc <= pol["max_drop"],
             "measured": "PyTorch simulation of the trained graph, the decision's samples"}
    doc["after_training"] = entry
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    ctx.record(event="precision_trained", **entry)
    colour = "" if entry["met"] else "[yellow]"
    ctx.log(f"{colour}precision: trained top-1 {acc:.4f} vs FP32 {acc_doc['fp32']:.4f} on the max_drop samples: "
            f"drop {entry['drop']:.4f} {'within' if entry['met'] else 'ABOVE'} max_drop {pol['max_drop']}"
            f"{'' if entry['met'] else '[/]'}")
    return entry
