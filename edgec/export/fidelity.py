"""Fidelity of an exported artifact to the user's FP32 model, on real samples.

Parity (:mod:`edgec.export.check`) compares the artifact with edgec's own PyTorch simulation, so a
simulation that is itself wrong passes it at 100 %. Fidelity compares the artifact with the FP32
model the user gave:

* output level (artifact in ONNX Runtime vs the FP32 model): top-1 agreement, output SQNR (dB) and
  the mean KL divergence KL(softmax(fp32) || softmax(artifact));
* per layer (to find the layer that breaks): both PyTorch graphs are run node by node
  (``torch.fx`` keeps the user's node names in the quantized graph; a conv with a folded BatchNorm
  is compared with that BatchNorm's output) and every tensor of the quantized graph is compared
  with the same tensor of the FP32 graph: SQNR in dB and its drop against the node's inputs. A
  quantization point (``aq_N``) is reported as "<its source> [quantized]": there the grid itself
  (range, clipping, zero point) is measured.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

_CAP_DB = 60.0  # SQNR of an exact tensor (inputs): drops are measured against this at most


@dataclass
class FidelityReport:
    samples: int
    top1_agreement: float
    sqnr_db: float
    kl: float
    layers: list[dict] = field(default_factory=list)  # {"name", "sqnr_db", "drop_db"} in graph order
    layer_samples: int = 0
    layer_note: str | None = None

    def worst_layers(self, k: int = 3) -> list[dict]:
        """The layers whose SQNR falls most below that of their inputs (where the damage is done)."""
        return sorted(self.layers, key=lambda r: -r["drop_db"])[:k]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["worst_layers"] = self.worst_layers()
        return d

    def describe_worst(self, k: int = 3) -> str:
        if not self.layers:
            return "per-layer comparison unavailable" + (f" ({self.layer_note})" if self.layer_note else "")
        return ", ".join(f"{r['name']} ({r['sqnr_db']:.1f} dB, -{r['drop_db']:.1f} dB vs its inputs)"
                         for r in self.worst_layers(k))


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.mean((ref - np.asarray(got, dtype=np.float64)) ** 2))
    signal = float(np.mean(ref ** 2))
    if noise <= 1e-30:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def mean_kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    from edgec.runtime import softmax

    p, q = softmax(ref_logits.astype(np.float64), 1), softmax(got_logits.astype(np.float64), 1)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


@torch.no_grad()
def _outputs(model_or_onnx, x: np.ndarray, batch_size: int) -> np.ndarray:
    if isinstance(model_or_onnx, nn.Module):
        m = model_or_onnx.eval().cpu()
        return np.concatenate([m(torch.from_numpy(x[i:i + batch_size])).float().numpy()
                               for i in range(0, len(x), batch_size)])
    from edgec.runtime import load_session, predict

    return predict(load_session(Path(model_or_onnx), threads=1), x, batch_size=batch_size)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.values[n.name] = out.detach()
        return out


@torch.no_grad()
def layer_sqnr(fp32_model: nn.Module, quant_model: nn.Module, x: torch.Tensor) -> list[dict]:
    """SQNR of every tensor of ``quant_model`` (an fx graph from :func:`edgec.quant.prepare.quantize_model`)
    against the same-named tensor of the traced ``fp32_model``, in graph order."""
    from edgec.quant.modules import ActQuant
    from edgec.quant.prepare import trace

    if not isinstance(quant_model, torch.fx.GraphModule):
        raise TypeError("the compressed model is not a torch.fx graph")
    import copy

    ref_gm = trace(copy.deepcopy(fp32_model).eval().cpu())
    ref = _Recorder(ref_gm)
    ref.run(x)
    got = _Recorder(quant_model.eval().cpu())
    got.run(x)
    folded = dict(quant_model.meta.get("edgec_ref_names", {}))  # folded conv -> its BN, rewritten ops
    rows: dict[str, dict] = {}
    out = []

    def label(n) -> str:
        if n.op == "call_module":
            return str(n.target)
        return n.name

    eff: dict[str, float] = {}  # SQNR reaching each node (unmatched nodes inherit their inputs')
    for n in quant_model.graph.nodes:
        base = min([eff[a.name] for a in n.all_input_nodes if a.name in eff], default=_CAP_DB)
        eff[n.name] = base
        if n.op in ("placeholder", "output", "get_attr") or n.name not in got.values:
            continue
        mod = quant_model.get_submodule(str(n.target)) if n.op == "call_module" else None
        src = n.args[0] if isinstance(mod, ActQuant) and n.args else n
        ref_name = folded.get(src.name, src.name) if isinstance(src, torch.fx.Node) else None
        ref_val = ref.values.get(ref_name) if ref_name else None
        val = got.values[n.name]
        if ref_val is None or ref_val.shape != val.shape:
            continue
        s = sqnr_db(ref_val.numpy(), val.numpy())
        eff[n.name] = min(s, _CAP_DB)
        name = (f"{label(src)} [quantized]" if src is not n and src.op != "placeholder"
                else "input [quantized]" if src is not n else label(n))
        row = {"name": name, "sqnr_db": round(min(s, 999.0), 2), "drop_db": round(max(0.0, base - min(s, _CAP_DB)), 2)}
        rows[n.name] = row
        out.append(row)
    return out


def check_fidelity(fp32_model_or_onnx, artifact_onnx, x: np.ndarray, *, quant_model: nn.Module | None = None,
                   fp32_torch: nn.Module | None = None, layer_samples: int = 64,
                   batch_size: int = 256) -> FidelityReport:
    """Compare the exported ``artifact_onnx`` (in ONNX Runtime) with the FP32 model on real samples ``x``.

    ``fp32_model_or_onnx``: the user's FP32 model (an ``nn.Module``) or its FP32 ONNX export.
    ``quant_model`` (the quantization-simulating fx graph the artifact was exported from) together
    with the FP32 ``nn.Module`` (``fp32_model_or_onnx`` itself or ``fp32_torch``) adds per-layer SQNR.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    ref = _outputs(fp32_model_or_onnx, x, batch_size)
    got = _outputs(artifact_onnx, x, batch_size)
    rep = FidelityReport(samples=len(x), top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()),
                         sqnr_db=sqnr_db(ref, got), kl=mean_kl(ref, got))
    fp32_torch = fp32_model_or_onnx if isinstance(fp32_model_or_onnx, nn.Module) else fp32_torch
    if quant_model is not None and fp32_torch is not None:
        n = min(layer_samples, len(x))
        try:
            rep.layers = layer_sqnr(fp32_torch, quant_model, torch.from_numpy(x[:: max(1, len(x) // n)][:n]))
            rep.layer_samples = n
        except Exception as exc:  # noqa: BLE001 - diagnosis only: never fail the check over it
            rep.layer_note = f"{type(exc).__name__}: {exc}"[:300]
    elif quant_model is None:
        rep.layer_note = "no quantized PyTorch graph given"
    return rep


def fidelity_error(rep: FidelityReport, threshold: float):
    """The :class:`edgec.errors.FidelityError` for a report below ``threshold`` (top-1 agreement)."""
    from edgec.errors import FidelityError

    return FidelityError(
        f"the compressed artifact agrees with the FP32 input model on only {rep.top1_agreement:.2%} of "
        f"{rep.samples} real samples (threshold export.min_fidelity = {threshold:.2%}; output SQNR "
        f"{rep.sqnr_db:.1f} dB, KL {rep.kl:.3g}); worst layers: {rep.describe_worst()}",
        hint="look at the quantization of those layers (calibration samples, observer "
             "`--set stages.0.observer=percentile`, leave them in float, or QAT); to keep this artifact anyway "
             "pass --allow-low-fidelity or lower `--set export.min_fidelity=...`")
