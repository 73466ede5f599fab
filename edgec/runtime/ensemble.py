"""Dynamic ensemble inference (EED, docs/methods.md, EED): K member ONNX graphs + an early-exit rule.

Members run in order on each input; after member k the running average of their probabilities is
the ensemble's answer so far, and the input stops there when a rule fires:

* confidence: ``max(avg_probs) >= threshold``;
* agreement: the first ``agree`` members predict the same class (checked once, after member ``agree``).

An input for which no rule fires runs all K members. The threshold is calibrated on held-out data
(:func:`calibrate_threshold`): the smallest threshold (fewest members on average) whose accuracy
reaches a target, e.g. the accuracy of always running all K.

Deployable artifact: a folder with ``member0.onnx .. member{K-1}.onnx`` and ``ensemble.json``
(``{"format": "edgec-dynamic-ensemble", "members": [...], "sha256": {...}, "threshold": t,
"agree": m or null, ...}``), written by :func:`write_manifest` and loaded by
:meth:`DynamicEnsemble.load`, which checks the manifest and that every member file exists and
matches its recorded sha256 (one clear error otherwise). Like the rest of ``runtime/`` this module
needs numpy, onnxruntime and the standard library only::

    python -m edgec.runtime RUN_DIR/export/ensemble/ensemble.json --input x.npy   # early exit
    python -m edgec.runtime RUN_DIR/export/ensemble --input x.npy --bench          # dynamic vs all K
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence

import numpy as np

from . import ModelNotFoundError, RunnerError, load_session, run_session, softmax

MANIFEST = "ensemble.json"
FORMAT = "edgec-dynamic-ensemble"

__all__ = ["MANIFEST", "FORMAT", "DynamicEnsemble", "early_exit", "calibrate_threshold", "softmax",
           "is_ensemble_path", "manifest_path", "read_manifest", "write_manifest", "file_sha256"]


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


def interleaved_latency(fns: dict, inputs: list, *, rounds: int = 3, warmup: int = 10) -> tuple[dict, dict]:
    """Time each callable of ``fns`` on every input of ``inputs``, back to back, the order rotating
    from input to input and round to round so all see the same machine state.

    Per callable: ``mean_ms`` / ``p50_ms`` over inputs of each input's median over the rounds (robust
    to the odd scheduler spike on a shared CPU) and ``round_mean_ms``. Also returns what each callable
    returned on every input in the first round.
    """
    names = list(fns)
    for i in range(warmup):
        for fn in fns.values():
            fn(inputs[i % len(inputs)])
    times = {n: np.empty((rounds, len(inputs))) for n in names}
    first: dict = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        for j, b in enumerate(inputs):
            k = (r + j) % len(names)
            for n in names[k:] + names[:k]:
                t0 = clock()
                got = fns[n](b)
                times[n][r, j] = clock() - t0
                if r == 0:
                    first[n].append(got)
    out = {}
    for n, t in times.items():
        per = 1000 * np.median(t, axis=0)
        out[n] = {"mean_ms": float(per.mean()), "p50_ms": float(np.median(per)),
                  "round_mean_ms": (1000 * t.mean(axis=1)).tolist()}
    return out, first


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


# ----------------------------------------------------------------------------------------------
# the manifest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_ensemble_path(path: str | os.PathLike) -> bool:
    """True for an ``ensemble.json``-style file (``*.json``) or a folder that holds ``ensemble.json``."""
    path = os.fspath(path)
    return path.lower().endswith(".json") or os.path.isfile(os.path.join(path, MANIFEST))


def manifest_path(path: str | os.PathLike) -> str:
    """The manifest file of an artifact given as the file itself or its folder."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST) if os.path.isdir(path) else path


def write_manifest(folder: str | os.PathLike, members: Sequence[str], *, threshold: float | None,
                   agree: int | None = None, **meta) -> str:
    """Write ``folder/ensemble.json`` for the member files ``members`` (names relative to ``folder``,
    already written), with their sha256, atomically. ``threshold`` None or inf = always run all K."""
    folder = os.fspath(folder)
    names = [str(m) for m in members]
    if threshold is not None and not math.isfinite(float(threshold)):
        threshold = None
    doc = {"format": FORMAT, "version": 1, "members": names,
           "sha256": {m: file_sha256(os.path.join(folder, m)) for m in names},
           "threshold": None if threshold is None else float(threshold), "agree": agree, **meta}
    out = os.path.join(folder, MANIFEST)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(doc, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def read_manifest(path: str | os.PathLike, *, verify: bool = True) -> tuple[str, dict]:
    """Read and check a manifest: ``(folder, manifest)``. Every problem is a :class:`RunnerError`
    (a missing file a :class:`ModelNotFoundError`) whose message says what to fix."""
    mpath = manifest_path(path)
    if not os.path.isfile(mpath):
        where = f"{os.fspath(path)!r} holds no {MANIFEST}" if os.path.isdir(os.fspath(path)) \
            else f"ensemble manifest {mpath!r} does not exist"
        raise ModelNotFoundError(f"{where}; pass the ensemble.json written by `edgec compress`/`edgec export` "
                                 f"for an eed run (RUN_DIR/export/ensemble/ensemble.json) or its folder")
    try:
        with open(mpath) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise RunnerError(f"could not read {mpath!r} as JSON ({e}); re-export the ensemble") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunnerError(f"{mpath!r} is not an edgec dynamic-ensemble manifest (format must be {FORMAT!r}, "
                          f"got {meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r})")
    members = meta.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise RunnerError(f"{mpath!r}: 'members' must be a non-empty list of ONNX file names "
                          f"(relative to the manifest's folder), got {members!r}")
    thr = meta.get("threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1):
        raise RunnerError(f"{mpath!r}: 'threshold' must be a probability in [0, 1] or null "
                          f"(null = always run all members), got {thr!r}")
    agree = meta.get("agree")
    if agree is not None and (isinstance(agree, bool) or not isinstance(agree, int) or not 2 <= agree <= len(members)):
        raise RunnerError(f"{mpath!r}: 'agree' must be null or an integer in [2, {len(members)}], got {agree!r}")
    folder = os.path.dirname(os.path.abspath(mpath))
    _check_members_inside(mpath, folder, members)
    missing = [m for m in members if not os.path.isfile(os.path.join(folder, m))]
    if missing:
        raise ModelNotFoundError(
            f"{mpath!r} lists member model(s) that do not exist: "
            + ", ".join(f"{m!r} (looked for {os.path.join(folder, m)})" for m in missing)
            + "; copy the whole folder (manifest + all member*.onnx) together, or re-export with "
              "`edgec export RUN_DIR`")
    sums = meta.get("sha256")
    unsummed = [m for m in members if not (isinstance(sums, dict) and isinstance(sums.get(m), str)
                                           and len(sums[m]) == 64 and all(c in "0123456789abcdef" for c in sums[m]))]
    if unsummed:  # a member without its hash could be any file: never run unverified
        raise RunnerError(f"{mpath!r}: every member needs its sha256 in 'sha256' (a 64-digit hex string); "
                          f"missing or malformed for {', '.join(map(repr, unsummed))}; re-export the ensemble "
                          f"with `edgec export RUN_DIR`")
    if verify:
        bad = [m for m in members if file_sha256(os.path.join(folder, m)) != sums[m]]
        if bad:
            raise RunnerError(f"{mpath!r}: member file(s) {', '.join(map(repr, bad))} do not match the sha256 "
                              f"recorded in the manifest (changed or mixed up after export); re-export the "
                              f"ensemble with `edgec export RUN_DIR`")
    return folder, meta


def _check_members_inside(mpath: str, folder: str, members: list[str]) -> None:
    """Member paths are names inside the manifest's folder: no absolute paths, no ``..``, no link out."""
    root = os.path.realpath(folder)
    outside = [m for m in members if os.path.isabs(m) or os.path.normpath(m).split(os.sep)[0] == os.pardir
               or os.path.commonpath([root, os.path.realpath(os.path.join(folder, m))]) != root]
    if outside:
        raise RunnerError(f"{mpath!r}: member path(s) {', '.join(map(repr, outside))} point outside the ensemble's "
                          f"folder {folder!r}; members must be files in that folder (as `edgec export` writes them)")


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
    def load(cls, path: str | os.PathLike, *, threads: int = 1, providers: Sequence[str] | None = None,
             verify: bool = True) -> DynamicEnsemble:
        """From ``ensemble.json`` or its folder; checks the manifest, the member files (and their
        sha256 when ``verify``) and that all members take the same input and give the same classes."""
        folder, meta = read_manifest(path, verify=verify)
        sessions = [load_session(os.path.join(folder, m), threads=threads, providers=providers)
                    for m in meta["members"]]
        ins = [tuple(s.get_inputs()[0].shape) for s in sessions]
        outs = [s.get_outputs()[0].shape[-1] for s in sessions]
        if len(set(ins)) > 1 or len(set(outs)) > 1:
            raise RunnerError(f"the members of {manifest_path(path)!r} do not fit together: input shapes {ins}, "
                              f"classes {outs}; all members must take the same input and give the same classes")
        thr = meta.get("threshold")
        return cls(sessions, threshold=None if thr is None else float(thr), agree=meta.get("agree"), meta=meta)

    @property
    def k(self) -> int:
        return len(self.sessions)

    def _member(self, k: int, x: np.ndarray) -> np.ndarray:
        return softmax(run_session(self.sessions[k], {self._inputs[k]: x.astype(np.float32, copy=False)})[0])

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
        pred, used, _ = self._early_exit(x)
        return pred, used

    def _early_exit(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = x.shape[0]
        total: np.ndarray | None = None
        used = np.zeros(n, dtype=np.int64)
        first = np.zeros(n, dtype=np.int64)
        agree_ok = np.ones(n, dtype=bool)
        out = np.zeros(n, dtype=np.int64)
        probs: np.ndarray | None = None
        active = np.arange(n)
        for k in range(self.k):
            p = self._member(k, x[active] if len(active) < n else x)
            if total is None:
                total = np.zeros((n, p.shape[1]))
                probs = np.zeros((n, p.shape[1]))
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
            probs[active[stop]] = avg[stop]
            active = active[~stop]
            if active.size == 0:
                break
        return out, used, probs

    def predict_proba(self, x: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Early exit over ``x`` in chunks: ``(pred (N,), used (N,), probs (N, C))``, where ``probs`` is the
        running average of the members' probabilities at each input's exit."""
        parts = [self._early_exit(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return tuple(np.concatenate(a) for a in zip(*parts))

    def predict_batched(self, x: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` over ``x`` in chunks: ``(pred, used)``."""
        pred, used, _ = self.predict_proba(x, batch_size=batch_size)
        return pred, used

    def compare_latency(self, x: np.ndarray, *, rounds: int = 3, batch: int = 1, warmup: int = 10) -> dict:
        """Dynamic (early exit) vs always-all-K latency on the inputs ``x``, interleaved in one run.

        Every call (``batch`` inputs) is timed in both modes back to back, the order alternating from
        call to call and round to round, so both modes see the same machine state; ``rounds`` passes
        over ``x``. A call's latency is its median over the rounds (robust to the odd scheduler
        spike on a shared CPU); per mode ``mean_ms`` is the mean of those over the calls (the
        average cost per call, which is what early exit lowers) and ``p50_ms`` their median.
        ``ratio`` = mean_ms(dynamic) / mean_ms(full) (< 1: dynamic is faster); ``round_ratios`` the
        same ratio from each round's plain means.
        """
        if rounds < 1 or batch < 1 or warmup < 0:
            raise RunnerError(f"rounds and batch must be >= 1 and warmup >= 0 (got {rounds}, {batch}, {warmup})")
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            raise RunnerError("no inputs to time; pass at least one sample")
        chunks = [x[i:i + batch] for i in range(0, len(x), batch)]

        def full(b):
            self.predict_full(b)
            return np.full(len(b), self.k)

        fns = {"dynamic": lambda b: self.predict(b)[1], "full": full}
        out, first = interleaved_latency(fns, chunks, rounds=rounds, warmup=warmup)
        for m in out:
            out[m]["avg_members"] = int(sum(np.sum(u) for u in first[m])) / len(x)
        ratios = [d / f for d, f in zip(out["dynamic"]["round_mean_ms"], out["full"]["round_mean_ms"])]
        return {**out, "ratio": out["dynamic"]["mean_ms"] / out["full"]["mean_ms"], "round_ratios": ratios,
                "rounds": rounds, "batch": batch, "inputs": len(x), "k": self.k}
