"""What removing one channel of each Torch-Pruning group saves on the target, measured at the precision
the run deploys: the latency side of the ``prune_channels`` stage's ``cost: latency`` (docs/methods.md,
latency-aware channel selection).

MAC counts say little about time on an edge CPU: on this x86 host a pruned 16->8 int8 conv of ResNet-20's
first stage runs *slower* than the full 16->16 one, while layer2/3 convs get faster with every channel
removed. So the cost of a channel is measured, HALP / NetAdapt style, but from two whole-model profiles
instead of a lookup table per layer shape:

1. the model as it is and a *slimmed* copy (every prunable group cut to ``1 - slim`` of its channels,
   rounded like the stage rounds) are exported at the deployed precision: FP32, or the run's
   quantizing stage's graph calibrated on a few training batches (:func:`deployed_export`);
2. both are profiled in ONNX Runtime in one interleaved run (:func:`edgec.bench.profile.profile_models`,
   the run's providers and threads), every kernel mapped to its source layer;
3. each conv / linear layer's time difference is split between the groups that shrank its output and
   its input channels (by their relative change: time ~ c_in x c_out), and divided by the channels
   each removed: a group's **gain** is the microseconds one of its channels costs, summed over its
   layers (:func:`group_gains`). A gain at or below zero (the layer got slower) is kept as measured.

:class:`LatencyAwareImportance` divides a group's importance (Torch-Pruning's, mean-normalised per
group) by its gain where the gain is beyond its measurement noise, so a global ranking removes first the
channels that give the most time for the least importance, ranks groups whose gains are inside the noise
by importance alone, and prunes last the ones whose removal measurably costs time.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LatencyAwareImportance", "deployed_export", "group_gains", "layer_shapes", "noise_us", "root_names"]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in per group) of every conv / linear weight, by module name."""
    return {n: (int(m.weight.shape[0]), int(m.weight.shape[1])) for n, m in model.named_modules()
            if isinstance(m, _LAYERS)}


def deployed_export(model: nn.Module, shape: tuple[int, ...], out: Path, *, spec=None, target=None,
                    calib: list | None = None) -> Path:
    """``model`` exported to ONNX as the run would deploy it: FP32 when ``spec`` is None, else its
    quantized graph (``spec``, ``target``) calibrated on the ``calib`` batches."""
    from edgec.export.onnx_export import export_onnx

    model = model.cpu().eval()
    if spec is None:
        return export_onnx(model, shape, out).path
    from edgec.quant.prepare import calibrate, quantize_model

    example = calib[0][0][:1] if calib else torch.zeros(1, *shape)
    gm, _ = quantize_model(model, spec, target, example)
    calibrate(gm, [(x.cpu(), y) for x, y in (calib or [])])
    return export_onnx(gm.eval(), shape, out).path


def _slimmed(model: nn.Module, example: torch.Tensor, ignored_names: list[str], *, slim: float,
             round_to: int | None) -> nn.Module:
    """A copy of ``model`` with every prunable group cut by ``slim`` of its channels (L2 magnitude)."""
    import torch_pruning as tp

    from edgec.channels import _eval_mode

    twin = copy.deepcopy(model).cpu()
    mods = dict(twin.named_modules())
    with _eval_mode(twin), torch.enable_grad():
        pruner = tp.pruner.MetaPruner(twin, example[:1].cpu(), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=slim, iterative_steps=1, global_pruning=False,
                                      ignored_layers=[mods[n] for n in ignored_names], round_to=round_to)
        pruner.step()
    return twin


def root_names(pruner, model: nn.Module) -> dict[nn.Module, str]:
    """Root module of every prunable group of ``pruner`` -> its name (what :func:`group_gains` keys by)."""
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        root = g[0].dep.target.module
        out[root] = names.get(root, "?")
    return out


def noise_us(t_us: float) -> float:
    """What a profiled layer time is taken to be uncertain by: the profiler's 1 us resolution, or 3 % of the
    time (the run-to-run spread of a shared CPU) when that is more."""
    return max(1.0, 0.03 * t_us)


def _split(dt: float, full: tuple[int, int], slim: tuple[int, int]) -> tuple[float | None, float | None]:
    """Microseconds per removed output and per removed input channel of one layer."""
    d_out, d_in = full[0] - slim[0], full[1] - slim[1]
    r_out, r_in = d_out / full[0], (d_in / full[1] if full[1] else 0.0)
    if r_out + r_in <= 0:
        return None, None
    per_out = dt * r_out / (r_out + r_in) / d_out if d_out else None
    per_in = dt * r_in / (r_out + r_in) / d_in if d_in else None
    return per_out, per_in


def group_gains(pruner, model: nn.Module, example: torch.Tensor, ignored_names: list[str], *, export: Callable,
                threads: int = 1, providers: list[str] | None = None, runs: int = 100, slim: float = 0.5,
                round_to: int | None = None) -> dict[str, Any]:
    """Measured microseconds one channel of each group of ``pruner`` costs at batch 1 (module docstring).

    ``export(model, path) -> path`` writes the deployed artifact. Returns ``{"gains": {root name: us},
    "layers": {layer: {"full_us", "slim_us", "full", "slim"}}, "run_us": {"full", "slim"}}``; a group
    none of whose layers was measured gets no entry (it keeps its plain importance)."""
    from edgec.bench.profile import profile_models

    twin = _slimmed(model, example, ignored_names, slim=slim, round_to=round_to)
    full_shapes, slim_shapes = layer_shapes(model), layer_shapes(twin)
    with tempfile.TemporaryDirectory(prefix="edgec-channel-cost-") as tmp:
        paths = [export(model, Path(tmp) / "full.onnx"), export(twin, Path(tmp) / "slim.onnx")]
        prof = profile_models(paths, threads=threads, providers=providers, runs=runs, warmup=10)
    a, b = (p.name for p in prof.artifacts)
    times = {r.layer: (r.us.get(a, 0.0), r.us.get(b, 0.0)) for r in prof.layers if r.kind == "layer"}
    per: dict[str, tuple[float | None, float | None]] = {}
    unsure: dict[str, tuple[float | None, float | None]] = {}  # the same split of the layer's noise
    layers = {}
    for name, (t_full, t_slim) in times.items():
        if name in full_shapes and name in slim_shapes and t_full > 0:
            per[name] = _split(t_full - t_slim, full_shapes[name], slim_shapes[name])
            unsure[name] = _split(noise_us(t_full), full_shapes[name], slim_shapes[name])
            layers[name] = {"full_us": t_full, "slim_us": t_slim, "full": full_shapes[name], "slim": slim_shapes[name]}

    names = {m: n for n, m in model.named_modules()}
    gains: dict[str, float] = {}
    noise: dict[str, float] = {}
    for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        total, sigma, seen = 0.0, 0.0, False
        counted: set[tuple[str, str]] = set()
        for dep, _ in g:
            name = names.get(dep.target.module)
            kind = dep.handler.__name__
            if name not in per or (name, kind) in counted:
                continue
            counted.add((name, kind))
            side = 0 if kind == "prune_out_channels" else 1 if kind == "prune_in_channels" else None
            if side is not None and per[name][side] is not None:
                total, sigma, seen = total + per[name][side], sigma + unsure[name][side], True
        if seen:
            gains[names.get(g[0].dep.target.module, "?")] = total
            noise[names.get(g[0].dep.target.module, "?")] = sigma
    return {"gains": gains, "noise": noise, "layers": layers,
            "run_us": {"full": prof.artifacts[0].run_us, "slim": prof.artifacts[1].run_us}}


class LatencyAwareImportance:
    """Torch-Pruning importance ``inner`` divided by each group's measured cost (us per channel).

    Every cost g comes with its noise n (:func:`noise_us` of its layers, split the same way); c is the
    median noise over the groups. The divisor is g (at least c) where g > 2n -- removing those channels
    measurably saves time, and they are ranked by importance per microsecond --, c where |g| <= 2n (the
    cost is inside the noise: plain importance order among them, so a model whose latency does not
    depend on its channels is pruned as by importance alone), and c / 4 where g < -2n (removing them
    measurably costs time: they go last). Without costs (before :meth:`set_gains`) it is ``inner``."""

    def __init__(self, inner):
        self.inner = inner
        self.divisors: dict[nn.Module, float] = {}

    def set_gains(self, gains: dict[nn.Module, float], noise: dict[nn.Module, float] | None = None) -> None:
        noise = {m: max((noise or {}).get(m, 0.0), 0.0) for m in gains}
        levels = sorted(noise.values())
        c = max(levels[len(levels) // 2] if levels else 0.0, 1e-9)
        self.divisors = {}
        for mod, g in gains.items():
            n = noise[mod]
            self.divisors[mod] = max(g, c) if g > 2 * n else c / 4 if g < -2 * n else c

    @torch.no_grad()
    def __call__(self, group):
        imp = self.inner(group)
        d = self.divisors.get(group[0].dep.target.module)
        if imp is None or d is None:
            return imp
        return imp / d
