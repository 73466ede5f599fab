"""The accuracy tolerance of precision chosen by measurement (``precision.max_drop``, edgec.mixed_precision).

Which layers to promote (8 bits in a stage below 8 bits, else float) until the stage's top-1 on training
samples outside its calibration set is within ``max_drop`` of the FP32 model: greedy on the calibrated graph
for a stage that does not train (ptq, pqk), the fewest promotions in sensitivity order whose graph meets it
after a short QAT probe for one that does (qat, qkd; docs/methods.md). Then the trained graph
(:func:`check_trained`) and the exported artifact in ONNX Runtime (:func:`check_exported`) are measured on
the same samples and the results written into the stage's decision file.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from edgec.quant.precision import LayerOverride, exact_glob

__all__ = ["DECISION", "check_exported", "check_trained", "decision_path", "eval_indices", "for_accuracy",
           "sample_eval", "with_overrides"]


def with_overrides(spec, extra: dict[str, LayerOverride], norms_float: bool = False):
    """``spec`` with exact-name overrides for ``extra`` placed before the user's globs (theirs never
    match those names: edgec.mixed_precision._user_fixed excludes them); ``norms_float``: unfoldable norms left float
    (no ``norm_bits``)."""
    return replace(spec, layers=tuple(extra.values()) + tuple(spec.layers),
                   norm_bits=None if norms_float else spec.norm_bits)


DECISION = "stages/stage{index}.precision.json"


def decision_path(ctx) -> Path:
    return Path(ctx.run_dir) / DECISION.format(index=ctx.index)


_MIN_EVAL = 10  # samples the max_drop measurement needs at least (Precision.eval_samples' minimum)


def eval_indices(train_len: int, n: int, seed: int, calib_manifest: dict | None) -> list[int]:
    """The training-split indices the max_drop measurement uses: ``n`` seeded ones outside the calibration
    manifest's (its count and sha256 are recorded in the decision, to check against)."""
    g = torch.Generator().manual_seed(seed + 7)
    taken = set((calib_manifest or {}).get("indices", []))
    return [i for i in torch.randperm(train_len, generator=g).tolist() if i not in taken][:n]


def sample_eval(ctx, n: int, calib_manifest: dict | None, batch: int = 128):
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


def _probe_search(bench, spec, extra: dict, free: list[str], pol, acc_fp32: float, probe: Callable, ctx,
                  can_float: bool, bits: dict[str, int]) -> tuple[dict, dict]:
    """max_drop for a stage that trains: the fewest promotions, in order of sensitivity, whose graph meets
    the tolerance after a short QAT probe. Sensitivity: each layer promoted alone in the calibrated graph;
    then a binary search over the prefix of that order, each candidate built, calibrated, probe-trained
    (``probe``) and measured. Returns (overrides, the decision's accuracy fields)."""
    import time

    free = [n for n in free if n not in extra and _promotion(spec, n, can_float, bits) is not None]
    cold, cold_agree = bench.accuracy(bench.build(with_overrides(spec, extra)))
    if acc_fp32 - cold <= pol.max_drop:  # met before any training: QAT starts from this graph, nothing to probe
        ctx.log(f"precision: the calibrated graph meets max_drop already (top-1 {cold:.4f}, FP32 {acc_fp32:.4f})")
        return extra, {"judged_on": "calibrated", "calibrated_uniform": cold, "probes": [], "probe_share": pol.probe,
                       "met": True, "accuracy": cold, "agreement": cold_agree,
                       "steps": [{"promoted": None, "accuracy": cold, "agreement": cold_agree}]}
    gain = [(bench.accuracy(bench.build(with_overrides(spec, {**extra, n: _promotion(spec, n, can_float, bits)})))[0], -k, n)
            for k, n in enumerate(free)]  # ties: the earlier layer
    order = [n for _, _, n in sorted(gain, reverse=True)]
    tried: dict[int, dict] = {}

    def probed(k: int) -> bool:
        if k not in tried:
            t = time.perf_counter()
            ext = {**extra, **{n: _promotion(spec, n, can_float, bits) for n in order[:k]}}
            gm = bench.build(with_overrides(spec, ext))
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


def for_accuracy(bench, model, spec, extra: dict, names: list[str], fixed: set[str], pol, ctx,
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
    measure = lambda ext: bench.accuracy(bench.build(with_overrides(spec, ext)))  # noqa: E731
    extra, acc_doc = _meets_drop(measure, spec, extra, free, pol, acc_fp32, ctx.log, can_float, bits)
    doc = {**head, **acc_doc, "simulation_met": acc_doc["met"]}
    # the structure the export writes (pqk trains with BatchNorms unfolded and folds them in convert)
    ort_acc = bench.ort_accuracy(replace(with_overrides(spec, extra), fold_bn=True))
    ort = {"accuracy": ort_acc, "drop": acc_fp32 - ort_acc, "met": acc_fp32 - ort_acc <= pol.max_drop}
    if acc_doc["met"] and not ort["met"]:
        ctx.log(f"[yellow]precision: the chosen artifact drops {ort['drop']:.4f} in ONNX Runtime (simulation "
                f"{acc_fp32 - acc_doc['accuracy']:.4f}), above max_drop {pol.max_drop}[/]")
    return extra, {**doc, "judged_on": "calibrated",
                   "data": "training samples outside the calibration set (edgec.mixed_precision.eval_indices), "
                           "promotions measured in the PyTorch simulation, the choice in ONNX Runtime",
                   "met": acc_doc["met"] and ort["met"], "onnxruntime": ort}


def _decision_samples(run_dir, index: int, train, acc_doc: dict, seed: int, log):
    """The max_drop samples of stage ``index`` rebuilt from the run's calibration manifest, checked against the
    decision's sha256; None (and a warning) when they cannot be rebuilt."""
    from types import SimpleNamespace

    from edgec.data import indices_sha256

    manifest_path = Path(run_dir) / "calibration" / f"stage{index}.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    ctx = SimpleNamespace(data=SimpleNamespace(train=train), seed=seed, index=index)
    batches, order = sample_eval(ctx, acc_doc["eval_samples"], manifest)
    if indices_sha256(order) != acc_doc["indices_sha256"]:
        log("[yellow]precision: the max_drop samples cannot be rebuilt (calibration manifest changed): not checked[/]")
        return None
    return batches, order


def _check(path: Path, run_dir, index: int, train, seed: int, log, *, key: str, predict: Callable,
           what: str, **fields) -> dict | None:
    """The shared after-the-fact check: ``predict(x) -> labels`` on the decision's max_drop samples, the entry
    (top-1, drop vs the recorded FP32, met) written into the decision under ``key``. None when the decision
    has no max_drop step or its samples cannot be rebuilt."""
    from edgec.atomic import atomic_write_text

    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    acc_doc, pol = doc.get("accuracy"), doc.get("policy") or {}
    if not acc_doc or pol.get("max_drop") is None:
        return None
    got = _decision_samples(run_dir, index, train, acc_doc, seed, log)
    if got is None:
        return None
    batches, order = got
    acc = sum(int((predict(x) == y).sum()) for x, y in batches) / max(len(order), 1)
    drop = acc_doc["fp32"] - acc
    entry = {"accuracy": acc, "drop": drop, "met": drop <= pol["max_drop"], **fields}
    doc[key] = entry
    atomic_write_text(path, json.dumps(doc, indent=2, default=float) + "\n")
    colour, end = ("", "") if entry["met"] else ("[yellow]", "[/]")
    log(f"{colour}precision: {what}: top-1 {acc:.4f} vs FP32 {acc_doc['fp32']:.4f} on the max_drop samples, drop "
        f"{drop:.4f} {'within' if entry['met'] else 'ABOVE'} max_drop {pol['max_drop']}{end}")
    return entry


def check_exported(run_dir, recipe, data, onnx_path, *, log=print) -> dict | None:
    """The exported artifact measured in ONNX Runtime on the max_drop samples of the recipe's last stage (when
    that stage decided with a ``max_drop``): ``after_export`` in its decision. A max_drop of an earlier stage
    is about a model a later stage changed, and is not checked here."""
    from edgec.runtime import load_session, predict

    if data is None:
        return None
    index = len(recipe.stages) - 1
    sess = None

    def run(x):
        nonlocal sess
        sess = sess or load_session(onnx_path, threads=1)
        return torch.from_numpy(predict(sess, x.numpy()).argmax(1))

    name = Path(onnx_path).name
    return _check(Path(run_dir) / DECISION.format(index=index), run_dir, index, data.train, recipe.seed, log,
                  key="after_export", predict=run, what=f"{name} in ONNX Runtime", artifact=name,
                  measured="ONNX Runtime, the decision's samples")


def check_trained(gm, ctx) -> dict | None:
    """After a stage trained with a ``max_drop`` decision: the trained graph's top-1 on the decision's samples
    (PyTorch simulation) vs the FP32 accuracy recorded there, written into the decision as
    ``after_training``. Returns that entry (None when the decision has no accuracy step)."""
    if ctx.rebuild or ctx.dist.rank != 0:
        return None
    was = gm.training
    dev = next(gm.parameters()).device
    gm.eval().cpu()
    try:
        with torch.no_grad():
            entry = _check(decision_path(ctx), ctx.run_dir, ctx.index, ctx.data.train, ctx.seed, ctx.log,
                           key="after_training", predict=lambda x: gm(x).argmax(1), what="trained graph",
                           measured="PyTorch simulation of the trained graph, the decision's samples")
    finally:
        gm.to(dev).train(was)
    if entry is not None:
        ctx.record(event="precision_trained", **entry)
    return entry
