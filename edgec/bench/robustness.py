"""Robust accuracy of exported artifacts (adversarially trained and EED runs).

Protocol (:func:`robust_inputs`): PGD (random start, pixel-space eps, seeded) is computed
**white-box on the PyTorch model of the run** -- for an EED run the full ensemble, whose forward is
the log of the averaged member probabilities -- on a seeded subset of the eval data; the adversarial
inputs are then classified by the **exported artifact in ONNX Runtime**: a single graph directly, the
dynamic ensemble through its early-exit controller. The exit rule is not differentiated through: for
the dynamic ensemble this is the full ensemble's attack transferred to the early-exit path (the
exported members equal the PyTorch members to float precision, see ``ensemble.check.json``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["threat_model", "pgd_subset", "robust_inputs", "onnx_accuracy", "pgd_description", "robustness_rows"]




def threat_model(recipe) -> dict | None:
    """The adversarial training config of the run's last stage that has one (the threat model the
    run was made robust for), or None when the recipe trains no stage adversarially."""
    for st in reversed(recipe.stages):
        adv = getattr(st, "adversarial", None)
        if adv is not None:
            return adv.model_dump()
    return None


def pgd_subset(n_total: int, n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` of ``n_total`` samples (all when n >= n_total);
    eval sets are often sorted by class, so never the first n."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng([int(seed), 0x9D6]).choice(n_total, size=n, replace=False))


def robust_inputs(model, x: np.ndarray, y: np.ndarray, *, normalization: dict, eps: float, steps: int,
                  norm: str = "linf", step: float | None = None, seed: int = 0, batch_size: int = 128) -> np.ndarray:
    """PGD adversarial examples of ``x`` (model-space numpy) against the PyTorch ``model``, white-box
    (random start from a seeded generator); returns model-space numpy float32."""
    import torch

    from edgec.attacks import Attack, InputSpace

    space = InputSpace.from_normalization(normalization)
    attack = Attack("pgd", norm=norm, eps=float(eps), step=step, steps=int(steps), random_start=True)
    g = torch.Generator().manual_seed(int(seed))
    model = model.eval().cpu()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32))
        yb = torch.from_numpy(np.asarray(y[i:i + batch_size], dtype=np.int64))
        out.append(attack(model, xb, yb, space, generator=g).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray, *, threads: int = 1) -> float:
    """Top-1 of a single ONNX graph in ORT."""
    from edgec import runtime

    logits = runtime.predict(runtime.load_session(path, threads=threads), x)
    return float((logits.reshape(len(x), -1).argmax(1) == y).mean())


def pgd_description(eps: float, steps: int, norm: str, n: int, step: float | None = None) -> str:
    st = eps / 4 if step is None else step
    e = f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"
    s = f"{st * 255:.3g}/255" if norm == "linf" else f"{st:.3g}"
    return (f"PGD-{steps} {'L-inf' if norm == 'linf' else 'L2'} eps {e} (pixel units), step {s}, random start; "
            f"white-box on the run's PyTorch model (EED: the full ensemble), evaluated on the exported ONNX "
            f"artifact in ORT; {n} seeded eval samples")




def robustness_rows(run: dict, recipe, rows: list[dict], models: dict, ex: np.ndarray, ey: np.ndarray, *,
                    console=None) -> dict | None:
    """For a run with adversarial training (or an eed stage): PGD robust accuracy of the exported input
    and compressed models, added to ``rows[0]``/``rows[1]`` in place; ``models`` holds the PyTorch models
    ``{"input", "final"}`` the attack is computed on. Returns the compressed model's adversarial samples
    ``{"x", "y", "x_clean", "desc"}`` (for the dynamic ensemble's robust accuracy), or None."""
    tm = threat_model(recipe)
    bc = recipe.bench
    if tm is None or bc.pgd_samples == 0:
        return None
    idx = pgd_subset(len(ey), bc.pgd_samples, seed=recipe.seed)
    desc = pgd_description(float(tm["eps"]), bc.pgd_steps, tm.get("norm", "linf"), len(idx))
    adv = None
    for row, which in zip(rows, ("input", "final")):
        xa = robust_inputs(models[which], ex[idx], ey[idx], normalization=run["normalization"], eps=float(tm["eps"]),
                           steps=bc.pgd_steps, norm=tm.get("norm", "linf"), seed=recipe.seed)
        if which == "final":
            adv = {"x": xa, "y": ey[idx], "x_clean": ex[idx], "desc": desc}
        row.update(pgd_accuracy=onnx_accuracy(row["path"], xa, ey[idx]),
                   clean_accuracy_pgd_subset=onnx_accuracy(row["path"], ex[idx], ey[idx]), pgd=desc)
        if console is not None:
            console.print(f"{row['name']}: clean {row['clean_accuracy_pgd_subset']:.2%} -> "
                          f"{row['pgd_accuracy']:.2%} under {desc.split(';')[0]} ({len(idx)} samples)")
    return adv
