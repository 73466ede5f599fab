"""One exported artifact: ONNX file + metadata + self-checks + size, written as ``X.onnx`` and ``X.check.json``.

Every export checks itself (docs/design.md, "export is part of correctness"): the ONNX checker, parity
of the file in ONNX Runtime with the PyTorch model on real samples, which Conv/Gemm nodes ORT turned
into integer kernels, and the honest size of the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgec.atomic import atomic_write_text

__all__ = ["export_model"]


def export_model(model, run: dict, out: Path, *, opset: int, parity_x, console=None, nm=None) -> dict:
    """Export one model to ONNX, run the self-checks, print and return them.

    ``run`` is the run's description (``run.json``): ``input_shape``, ``classes``, ``normalization``.
    ``nm`` (an edgec.export.sparsity.NMExpectation): verify that N:M pattern on the exported weights,
    record it as ``nm_sparsity`` in the check JSON, and raise ExportError (exit 4) after writing it when
    a layer that should follow the pattern does not.
    """
    from edgec.export.size import onnx_weight_stats
    from edgec.export.check import check_export
    from edgec.export.metadata import write_model_metadata
    from edgec.export.onnx_export import export_onnx

    out = Path(out)
    from edgec.quant.precision import layer_precision

    res = export_onnx(model, tuple(run["input_shape"]), out, opset=opset)
    precision = layer_precision(model)  # per conv/linear layer: float or its bits ({} for a float model)
    # class names (and an audio model's front end) travel inside the file to the device runner
    write_model_metadata(out, classes=run.get("classes"), normalization=run.get("normalization"),
                         layer_precision=precision)
    parity = check_export(model, out, parity_x)
    stats = onnx_weight_stats(out)
    info = {"path": str(out), "quantized": res.quantized, "opset": opset, "parity": parity.as_dict(),
            "file_bytes": out.stat().st_size, "weight_bytes_deployed": stats["weight_bytes_deployed"],
            "sparse_index_bytes": stats["sparse_index_bytes"], "params_nonzero": stats["params_nonzero"],
            "params_total": stats["params_total"], "weights": res.weight_tensors,
            "layer_precision": precision}
    if nm is not None:
        from edgec.export.sparsity import verify_nm

        info["nm_sparsity"] = verify_nm(out, nm)
    atomic_write_text(out.with_suffix(".check.json"), json.dumps(info, indent=2))
    if console is not None:
        _print_check(console, out, info, parity)
    if nm is not None:
        from edgec.export.sparsity import check_nm

        check_nm(info["nm_sparsity"], out)
    return info


def _print_check(console, out: Path, info: dict, parity) -> None:
    ok = parity.top1_agreement >= 0.99
    colour = "green" if ok else "red"
    console.print(
        f"exported {out.name}: onnx.checker {'ok' if parity.checker_ok else 'FAILED'}; parity on {parity.samples} real samples: "
        f"max |diff| {parity.max_abs_diff:.4g}, top-1 agreement [{colour}]{parity.top1_agreement:.2%}[/]; "
        f"ORT integer kernels: {parity.fused_compute}/{parity.compute_nodes} Conv/Gemm fused "
        f"{dict(parity.integer_ops) or ''}; file {info['file_bytes'] / 1024:.1f} KB, "
        f"deployed weights {info['weight_bytes_deployed'] / 1024:.1f} KB "
        f"(+{info['sparse_index_bytes'] / 1024:.1f} KB sparse bitmask), {info['params_nonzero']:,} non-zero params")
    kept = [n for n, p in (info.get("layer_precision") or {}).items() if p.get("float")]
    if kept:
        console.print(f"layers kept float: {', '.join(kept)}")
    nm = info.get("nm_sparsity")
    if nm is not None:
        console.print(f"{nm['pattern']} sparsity: {'pattern' if nm['ok'] else '[red]pattern broken[/]:'} verified on "
                      f"{nm['verified_layers']}/{nm['expected_layers']} pruned layers of the exported weights")
    if not ok:
        console.print("[red]warning: exported model disagrees with PyTorch on more than 1% of samples[/]")
