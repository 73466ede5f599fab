"""Knowledge-distillation losses and teacher calibration (docs/methods.md: notation, teacher calibration)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)), teacher side detached, batch mean."""
    t = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
    s = F.log_softmax(student_logits.float() / tau, dim=1)
    return tau * tau * F.kl_div(s, t, log_target=True, reduction="batchmean")


def kd_objective(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, *, tau: float, alpha: float) -> Tensor:
    """(1 - alpha) * CE(y, z_S) + alpha * tau^2 * KL(teacher || student)."""
    ce = F.cross_entropy(student_logits, y)
    return (1 - alpha) * ce + alpha * kd_loss(student_logits, teacher_logits, tau)


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017): T minimising NLL of softmax(z/T) on held-out data."""
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    err = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            err += sel.float().mean() * (conf[sel].mean() - correct[sel].mean()).abs()
    return float(err)


def ace(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Adaptive calibration error (Nixon et al. 2019): class-wise, equal-mass bins."""
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        p = probs[:, c]
        hit = (labels == c).float()
        order = torch.argsort(p)
        for chunk in torch.tensor_split(order, bins):
            if len(chunk):
                total += float((p[chunk].mean() - hit[chunk].mean()).abs())
    return total / (k * bins)


def calibration_metrics(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> dict:
    z = logits.detach().float() / temperature
    probs = z.softmax(1)
    return {"nll": float(F.cross_entropy(z, labels)), "ece": ece(probs, labels), "ace": ace(probs, labels),
            "accuracy": float((probs.argmax(1) == labels).float().mean())}
