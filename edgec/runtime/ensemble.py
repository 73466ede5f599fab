"""Dynamic ensemble inference (EED, METHODS.md section 5): K member ONNX graphs + an early-exit rule.

Members run in order on each input; after member k the running average of their probabilities is
the ensemble's answer so far, and the input stops there when a rule fires:

* confidence: ``max(avg_probs) >= threshold``;
* agreement: the first ``agree`` members predict the same class (checked once, after member ``agree``).

An input for which no rule fires runs all K members. The threshold is calibrated on held-out data
(:func:`calibrate_threshold`): the smallest threshold (fewest members on average) whose accuracy
reaches a target, e.g. the accuracy of always running all K.

Deployable artifact: a folder with ``member0.onnx .. member{K-1}.onnx`` and ``ensemble.json``
(``{"members": [...], "threshold": t, "agree": m or null, ...}``), loaded by
:meth:`DynamicEnsemble.load`. Like the rest of ``runtime/`` this module needs numpy, onnxruntime
and the standard library only.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

MANIFEST = "ensemble.json"

__all__ = ["MANIFEST", "DynamicEnsemble", "early_exit", "calibrate_threshold", "softmax"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def early_exit(probs: np.ndarray, *, threshold: float | None, agree: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate the controller on all members' probabilities ``probs`` (K, N, C).

    Returns ``(pred (N,), used (N,) members run, avg (N, C) the ensemble probabilities at exit)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, N, C), got shape {probs.shape}")
    k_all, n, _ = probs.shape
    running = np.cumsum(probs, axis=0) / np.arange(1, k_all + 1).reshape(-1, 1, 1)  # (K, N, C)
    stop = np.zeros((k_all, n), dtype=bool)
    stop[-1] = True
    if threshold is not None:
        stop |= running.max(axis=2) >= threshold
    if agree is not None and 2 <= agree <= k_all:
        first = probs[:agree].argmax(axis=2)  # (agree, N)
        stop[agree - 1] |= (first == first[0]).all(axis=0)
    exit_at = stop.argmax(axis=0)  # first True
    avg = running[exit_at, np.arange(n)]
    return avg.argmax(axis=1), exit_at + 1, avg


def calibrate_threshold(probs: np.ndarray, labels: np.ndarray, *, target_accuracy: float | None = None,
                        tolerance: float = 0.0, agree: int | None = None, max_candidates: int = 2000) -> dict:
    """The smallest confidence threshold whose accuracy on (probs, labels) is >= the target.

    ``target_accuracy`` defaults to the full ensemble's accuracy minus ``tolerance``. Lower
    thresholds exit earlier for every input, so the smallest feasible one uses the fewest members.
    Returns ``{"threshold", "accuracy", "avg_members", "full_accuracy", "target_accuracy",
    "reached"}``; when even all K members miss the target the threshold is ``inf`` (always run all).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    k_all = probs.shape[0]
    full = float((probs.mean(axis=0).argmax(axis=1) == labels).mean())
    target = full - tolerance if target_accuracy is None else float(target_accuracy)
    running = np.cumsum(probs, axis=0) / np.arange(1, k_all + 1).reshape(-1, 1, 1)
    cand = np.unique(running[:-1].max(axis=2))
    if cand.size > max_candidates:
        cand = np.unique(np.quantile(cand, np.linspace(0, 1, max_candidates)))
    best = {"threshold": float("inf"), "accuracy": None, "avg_members": float(k_all)}
    pred, used, _ = early_exit(probs, threshold=None, agree=agree)
    best["accuracy"] = float((pred == labels).mean())
    reached = best["accuracy"] >= target
    for t in cand:  # ascending: the first feasible one is the cheapest
        pred, used, _ = early_exit(probs, threshold=float(t), agree=agree)
        acc = float((pred == labels).mean())
        if acc >= target:
            best = {"threshold": float(t), "accuracy": acc, "avg_members": float(used.mean())}
            reached = True
            break
    return {**best, "full_accuracy": full, "target_accuracy": target, "reached": bool(reached)}


class DynamicEnsemble:
    """K ONNX Runtime sessions run in order with per-input early exit."""

    def __init__(self, sessions: Sequence, *, threshold: float | None, agree: int | None = None,
                 meta: dict | None = None):
        if len(sessions) < 1:
            raise ValueError("a dynamic ensemble needs at least one member")
        self.sessions = list(sessions)
        self.threshold = threshold
        self.agree = agree
        self.meta = meta or {}
        self._inputs = [s.get_inputs()[0].name for s in self.sessions]

    @classmethod
    def load(cls, folder: str | os.PathLike, *, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)
             ) -> DynamicEnsemble:
        import onnxruntime as ort

        with open(os.path.join(folder, MANIFEST)) as fh:
            meta = json.load(fh)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions = [ort.InferenceSession(os.path.join(folder, m), opts, providers=list(providers))
                    for m in meta["members"]]
        thr = meta.get("threshold")
        return cls(sessions, threshold=None if thr is None or thr == "inf" else float(thr),
                   agree=meta.get("agree"), meta=meta)

    @property
    def k(self) -> int:
        return len(self.sessions)

    def _member(self, k: int, x: np.ndarray) -> np.ndarray:
        return softmax(self.sessions[k].run(None, {self._inputs[k]: x.astype(np.float32, copy=False)})[0])

    def member_probs(self, x: np.ndarray) -> np.ndarray:
        """All members on all of ``x``: (K, N, C)."""
        return np.stack([self._member(k, x) for k in range(self.k)])

    def predict_full(self, x: np.ndarray) -> np.ndarray:
        """Always all K members (the static ensemble): class per input."""
        return self.member_probs(x).mean(axis=0).argmax(axis=1)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Early exit per input: member k runs only on the inputs still undecided.

        Returns ``(pred (N,), used (N,))``.
        """
        n = x.shape[0]
        total: np.ndarray | None = None
        used = np.zeros(n, dtype=np.int64)
        first = np.zeros(n, dtype=np.int64)
        agree_ok = np.ones(n, dtype=bool)
        out = np.zeros(n, dtype=np.int64)
        active = np.arange(n)
        for k in range(self.k):
            p = self._member(k, x[active])
            if total is None:
                total = np.zeros((n, p.shape[1]))
            total[active] += p
            used[active] += 1
            pk = p.argmax(axis=1)
            if k == 0:
                first[active] = pk
            else:
                agree_ok[active] &= first[active] == pk
            avg = total[active] / (k + 1)
            stop = np.full(len(active), k == self.k - 1)
            if self.threshold is not None:
                stop |= avg.max(axis=1) >= self.threshold
            if self.agree is not None and k == self.agree - 1:
                stop |= agree_ok[active]
            out[active[stop]] = avg[stop].argmax(axis=1)
            active = active[~stop]
            if active.size == 0:
                break
        return out, used

    def latency(self, x: np.ndarray, *, dynamic: bool = True, runs: int = 1, warmup: int = 1) -> dict:
        """Mean latency per input (batch 1, one input at a time) over ``x``, run ``runs`` times."""
        fn = self.predict if dynamic else (lambda b: (self.predict_full(b), np.full(len(b), self.k)))
        for i in range(min(warmup, len(x))):
            fn(x[i:i + 1])
        times, used = [], []
        for _ in range(runs):
            for i in range(len(x)):
                t0 = time.perf_counter()
                _, u = fn(x[i:i + 1])
                times.append(time.perf_counter() - t0)
                used.append(int(u[0]))
        return {"latency_ms": 1000 * float(np.mean(times)), "p50_ms": 1000 * float(np.median(times)),
                "avg_members": float(np.mean(used)), "inputs": len(x) * runs}
