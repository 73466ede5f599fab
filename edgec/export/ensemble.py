"""EED's deployable dynamic ensemble: export it from a model (member graphs + ``ensemble.json``).

The artifact (``RUN_DIR/export/ensemble/``): ``member0.onnx .. member{K-1}.onnx`` + ``ensemble.json``
(threshold, agree, sha256 of each member, classes, normalization), run by the numpy + ORT controller
:class:`edgec.runtime.ensemble.DynamicEnsemble`; ``ensemble.check.json`` holds the export checks
(per-member parity with PyTorch, and the controller's exit decisions vs PyTorch's member
probabilities).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["ENSEMBLE_DIR", "export_dynamic", "export_ensemble", "export_run_ensemble"]

ENSEMBLE_DIR = "ensemble"  # RUN_DIR/export/ensemble/{ensemble.json, member*.onnx}




def export_dynamic(model, input_shape: tuple[int, ...], out_dir: Path, *, agree: int | None = None,
                   opset: int = 17, meta: dict | None = None, export_member=None) -> Path:
    """Write ``member{k}.onnx`` per member and ``ensemble.json`` (threshold, agree, sha256 of each member)
    to ``out_dir``: the deployable dynamic ensemble for :class:`edgec.runtime.ensemble.DynamicEnsemble`.

    ``export_member(member, path)`` exports one member (default: :func:`edgec.export.onnx_export.export_onnx`;
    :func:`export_ensemble` passes one that also writes metadata and parity checks)."""
    from edgec.export.onnx_export import export_onnx
    from edgec.runtime.ensemble import write_manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k, mem in enumerate(model.members):
        name = f"member{k}.onnx"
        if export_member is None:
            export_onnx(mem, tuple(input_shape), out_dir / name, opset=opset)
        else:
            export_member(mem, out_dir / name)
        names.append(name)
    write_manifest(out_dir, names, threshold=float(model.threshold), agree=agree,
                   input_shape=list(input_shape), **(meta or {}))
    return out_dir


def export_ensemble(model, run: dict, out_dir: Path, *, opset: int, parity_x: np.ndarray, agree: int | None,
                    extra_meta: dict | None = None, console=None) -> dict:
    """Export an :class:`edgec.stages.eed.Ensemble` as the dynamic artifact (member graphs with
    metadata and parity checks, then ``ensemble.json``) and check the ORT controller against
    PyTorch; writes ``ensemble.check.json`` beside the manifest and returns it."""
    import torch
    import torch.nn.functional as F

    from edgec.atomic import atomic_write_text
    from edgec.export.artifact import export_model
    from edgec.runtime.ensemble import MANIFEST, DynamicEnsemble, early_exit

    out_dir = Path(out_dir)
    member_info = []

    def export_member(mem, path):
        member_info.append(export_model(mem, run, path, opset=opset, parity_x=parity_x, console=console))

    meta = {"classes": run.get("classes"), "num_classes": run.get("num_classes"),
            "normalization": run.get("normalization"), **(extra_meta or {})}
    export_dynamic(model, tuple(run["input_shape"]), out_dir, agree=agree, opset=opset, meta=meta,
                   export_member=export_member)
    dyn = DynamicEnsemble.load(out_dir)
    with torch.no_grad():
        ref = F.softmax(model.eval()(torch.from_numpy(parity_x), True).float(), dim=-1).numpy()
    got = dyn.member_probs(parity_x)
    sim_pred, sim_used, _ = early_exit(ref, threshold=dyn.threshold, agree=dyn.agree)
    pred, used = dyn.predict_batched(parity_x)
    check = {"manifest": str(out_dir / MANIFEST), "k": dyn.k, "threshold": dyn.threshold, "agree": dyn.agree,
             "samples": len(parity_x), "member_prob_max_abs_diff": float(np.abs(ref - got).max()),
             "exit_agreement": float((used == sim_used).mean()), "pred_agreement": float((pred == sim_pred).mean()),
             "members": member_info}
    atomic_write_text(out_dir / "ensemble.check.json", json.dumps(check, indent=2))
    if console is not None:
        ok = check["exit_agreement"] >= 0.99 and check["pred_agreement"] >= 0.99
        colour = "green" if ok else "red"
        console.print(f"exported dynamic ensemble {out_dir}/{MANIFEST}: {dyn.k} members, threshold "
                      f"{dyn.threshold if dyn.threshold is None else round(dyn.threshold, 4)}, agree {dyn.agree}; "
                      f"ORT controller vs PyTorch on {len(parity_x)} samples: exits [{colour}]"
                      f"{check['exit_agreement']:.2%}[/] and predictions [{colour}]{check['pred_agreement']:.2%}[/] "
                      f"identical, member probs max |diff| {check['member_prob_max_abs_diff']:.3g}")
    return check




def export_run_ensemble(model, run: dict, recipe, export_dir: Path, *, opset: int, parity_x: np.ndarray,
                        console=None) -> dict:
    """The dynamic artifact of an eed run in ``export_dir/ensemble/`` (settings from the recipe's last eed stage)."""
    eed = next(s for s in reversed(recipe.stages) if s.method == "eed")
    return export_ensemble(model, run, Path(export_dir) / ENSEMBLE_DIR, opset=opset, parity_x=parity_x,
                           agree=eed.agree, console=console,
                           extra_meta={"scores": list(eed.scores), "structure": eed.structure,
                                       **({"target_macs": eed.target_macs} if eed.structure == "channel"
                                          else {"target_sparsity": eed.target_sparsity})})
