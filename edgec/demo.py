"""``edgec demo``: the whole pipeline on a dataset that ships inside scikit-learn (8x8 digits).

1. train a small FP32 CNN baseline (seconds),
2. compress it with the shipped ``demo`` recipe (50% pruning, then int8 QAT + KD from the baseline),
3. export both to ONNX (FP32, and Q/DQ int8), check parity, bench them in ONNX Runtime,
4. print the comparison and write report.json / report.md / pareto.png.
"""
from __future__ import annotations

import time
from pathlib import Path

BASELINE_EPOCHS = 30


def train_baseline(out: Path, *, console=None, seed: int = 0) -> tuple[Path, float]:
    import torch

    from edgec.data import load_data
    from edgec.distributed import DistContext
    from edgec.engine import TrainConfig, fit
    from edgec.models import create_model, save_weights

    torch.manual_seed(seed)
    data = load_data("digits", seed=seed)
    model = create_model("digits_cnn", num_classes=data.num_classes)
    cfg = TrainConfig(epochs=BASELINE_EPOCHS, batch_size=32, lr=0.003, optimizer="adam", weight_decay=0.0,
                      schedule="cosine", seed=seed)
    metrics = fit(model, loss_fn=lambda m, x, y: (torch.nn.functional.cross_entropy(z := m(x), y), z),
                  train_set=data.train, eval_set=data.eval, cfg=cfg, ckpt_path=None, desc="fp32 baseline",
                  dist=DistContext.single("cpu"))
    path = save_weights(model, out / "baseline.pt")
    return path, float(metrics.get("eval_acc", float("nan")))


def run_demo(out: Path, *, force: bool = True, console=None) -> Path:
    from edgec.pipeline import CompressRequest, compress

    out = Path(out)
    t0 = time.perf_counter()
    base_dir = out.parent / (out.name + "-baseline")
    base_dir.mkdir(parents=True, exist_ok=True)
    if console:
        console.print(f"[bold]1/2 training the FP32 baseline (digits_cnn on sklearn digits, {BASELINE_EPOCHS} epochs)[/]")
    weights, acc = train_baseline(base_dir, console=console)
    if console:
        console.print(f"baseline PyTorch eval accuracy {acc:.2%} ({time.perf_counter() - t0:.0f} s) -> {weights}")
        console.print("[bold]2/2 edgec compress --model digits_cnn --data digits --recipe demo[/]")
    compress(CompressRequest(model="digits_cnn", data="digits", recipe="demo", weights=str(weights), out=out,
                             device="cpu", force=force), console=console)
    if console:
        console.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return out
