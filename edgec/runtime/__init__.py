"""Device-side runner: load an ONNX model, predict, measure latency.

This package depends on **numpy, onnxruntime and the standard library only** (never torch, never
other ``edgec`` modules), so the ``runtime/`` folder can be copied alone onto a device and run
there::

    python -m edgec.runtime model.onnx --input x.npy --topk 3
    python -m edgec.runtime model.onnx --bench --batch 1 --runs 100 --json-out bench.json
    python -m edgec.runtime kws.onnx --input clip.wav      # audio: log-mel front end, runtime/audio.py
    python -m edgec.runtime export/ensemble/ensemble.json --input x.npy  # EED dynamic ensemble, ensemble.py

(copied alone as ``runtime/``: ``python -m runtime ...``).

An audio input (.wav/.flac/...) is read, resampled and turned into the model's log-mel input with
the front end stored in the model's ``metadata_props`` (``edgec.frontend``,
``edgec.normalization``; written by ``edgec.export.metadata.write_model_metadata``). Class names in
``edgec.classes`` are printed beside the class indices.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

__all__ = [
    "ModelLoadError",
    "ModelNotFoundError",
    "ProviderUnavailableError",
    "RunnerError",
    "load_session",
    "main",
    "measure_latency",
    "model_metadata",
    "peak_rss_mb",
    "predict",
    "run_session",
    "softmax",
]

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

# ONNX Runtime type strings of float inputs -> numpy dtypes (anything else: float32)
_ORT_FLOAT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class RunnerError(ValueError):
    """A problem with the runner's input; the message says how to fix it."""


class ModelNotFoundError(FileNotFoundError):
    """The model file does not exist."""


class ModelLoadError(RunnerError):
    """onnxruntime refused to load the model file."""


class ProviderUnavailableError(RunnerError):
    """A requested execution provider is not available in this onnxruntime build."""


# --------------------------------------------------------------------------------------------- API
def load_session(
    path: str | os.PathLike,
    *,
    threads: int = 1,
    providers: Sequence[str] | None = None,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """Open ``path`` in onnxruntime with a fixed, reproducible thread setup.

    ``threads`` is the intra-op thread count (0 = onnxruntime's default, all cores); inter-op
    parallelism is 1 and all graph optimisations are on. ``providers`` defaults to
    ``["CPUExecutionProvider"]``; a provider that this onnxruntime build does not have is an error
    (onnxruntime itself would silently fall back to CPU). ``profile_prefix``: turn on ORT's profiler,
    its JSON trace written to ``<prefix>_<date>.json`` by ``session.end_profiling()`` (runtime/profile.py).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ModelNotFoundError(
            f"model file {path!r} {what}; pass the path of an exported .onnx file "
            f"(e.g. RUN_DIR/export/model.onnx from `edgec export RUN_DIR`)"
        )
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise RunnerError(f"threads must be an integer >= 0 (0 = all cores), got {threads!r}")
    providers = list(DEFAULT_PROVIDERS if providers is None else providers)
    if not providers:
        raise RunnerError("providers is empty; pass e.g. ['CPUExecutionProvider']")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ProviderUnavailableError(
            f"execution provider(s) {', '.join(missing)} not available in onnxruntime "
            f"{ort.__version__}; available here: {', '.join(available)}. Use one of those, or "
            f"install a build that has it (onnxruntime-gpu for CUDA/TensorRT)."
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.fspath(profile_prefix)
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise ModelLoadError(
            f"onnxruntime {ort.__version__} could not load {path!r}: {e}. Check that the file is "
            f"a complete ONNX model (onnx.checker.check_model) with IR version <= 13 and an "
            f"opset this onnxruntime supports."
        ) from e


def predict(session: ort.InferenceSession, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Logits (the model's first output) for ``x``, run in chunks of ``batch_size`` samples.

    ``x`` is cast to the model's float input type (float32 for ordinary models). A model exported
    with a fixed batch dimension is fed chunks of exactly that size (the last one zero-padded).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RunnerError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    inp = session.get_inputs()[0]
    x = _as_model_input(x, inp)
    n = x.shape[0]
    if n == 0:
        raise RunnerError("x is empty (0 samples); pass at least one sample")
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch_size
    outs = []
    for start in range(0, n, step):
        chunk = x[start : start + step]
        m = chunk.shape[0]
        if fixed and m < fixed:  # pad the last chunk of a fixed-batch model
            pad = np.zeros((fixed - m, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        out = run_session(session, {inp.name: np.ascontiguousarray(chunk)})[0]
        outs.append(out[:m])
    return np.concatenate(outs, axis=0)


def measure_latency(
    session: ort.InferenceSession,
    *,
    batch: int = 1,
    warmup: int = 10,
    runs: int = 100,
    sample: np.ndarray | None = None,
) -> dict:
    """Time ``session.run`` on one fixed input of ``batch`` samples.

    The input is ``sample`` tiled/cut to ``batch`` samples (a single sample without the batch
    axis is accepted), or random normal data of the model's input shape with the batch dimension
    set to ``batch``. Returns milliseconds ``p50, p90, p99, mean, min`` and ``throughput_per_s``
    (samples per second at the mean latency).
    """
    for name, value, low in (("batch", batch, 1), ("warmup", warmup, 0), ("runs", runs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RunnerError(f"{name} must be an integer >= {low}, got {value!r}")
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    if fixed is not None and fixed != batch:
        raise RunnerError(
            f"the model has a fixed batch size of {fixed}; measure with batch={fixed} "
            f"or re-export with a dynamic batch axis"
        )
    if sample is not None:
        x = _as_model_input(sample, inp)
        if x.shape[0] == 0:
            raise RunnerError("the input holds 0 samples; pass at least one (or drop --input to time random data)")
        x = x[np.arange(batch) % x.shape[0]]
    else:
        x = _random_input(inp, batch)
    feed = {inp.name: np.ascontiguousarray(x)}
    run_session(session, feed)  # one checked run first: onnxruntime's own errors become a RunnerError
    run = session.run
    for _ in range(warmup):
        run(None, feed)
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter
    for i in range(runs):
        t0 = clock()
        run(None, feed)
        times[i] = clock() - t0
    times *= 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    mean = float(times.mean())
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": mean,
        "min": float(times.min()),
        "throughput_per_s": batch * 1000.0 / mean if mean > 0 else float("inf"),
    }


def run_session(session: ort.InferenceSession, feed: dict) -> list:
    """``session.run(None, feed)``; onnxruntime's raw errors (``Fail``, ``InvalidArgument``, ...) become a
    :class:`RunnerError` with their first line, e.g. a model whose declared input disagrees with its weights."""
    opts = ort.RunOptions()
    opts.log_severity_level = 4  # fatal only: the failure reaches the user once, as the RunnerError below
    try:
        return session.run(None, feed, opts)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunnerError(
            f"onnxruntime {ort.__version__} could not run the model on an input of shape "
            f"{', '.join(str(tuple(v.shape)) for v in feed.values())}: {type(e).__name__}: {first[:500]}. "
            f"The model's graph is inconsistent with its declared input, or the input does not fit it; "
            f"re-export the model"
        ) from e


def model_metadata(session: ort.InferenceSession) -> dict:
    """The model's ``edgec.*`` metadata_props, JSON-decoded, without the prefix ({} if none)."""
    props = session.get_modelmeta().custom_metadata_map or {}
    out = {}
    for key, value in props.items():
        if key.startswith("edgec."):
            try:
                out[key[len("edgec."):]] = json.loads(value)
            except ValueError as e:
                raise RunnerError(f"model metadata {key!r} is not valid JSON ({e}); re-export the model") from e
    return out


def audio_input(session: ort.InferenceSession, path: str) -> np.ndarray:
    """Model input (1, 1, n_mels, frames) for an audio file, with the model's own front end."""
    from . import audio

    meta = model_metadata(session)
    if "frontend" not in meta:
        raise RunnerError(
            f"the model has no audio front end in its metadata, so {path!r} cannot be turned into "
            f"its input; write it with edgec.export.metadata.write_model_metadata(model.onnx, "
            f"normalization=bundle.normalization, classes=bundle.classes), or pass features as .npy"
        )
    try:
        cfg = audio.LogMelConfig.from_dict(meta["frontend"])
        return audio.features_from_file(path, cfg, meta.get("normalization"))[None]
    except audio.AudioError as e:
        raise RunnerError(str(e)) from e


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (None where unsupported, e.g. Windows).

    On Linux this is VmHWM from /proc: ``ru_maxrss`` survives ``execve`` and would report the
    parent's peak for a freshly spawned runner (e.g. a big torch process that launched it).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


# ----------------------------------------------------------------------------------------- helpers
def _input_dtype(inp) -> type:
    return _ORT_FLOAT_TYPES.get(inp.type, np.float32)


def _as_model_input(x: np.ndarray, inp) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf" or x.dtype.fields is not None:  # strings, structured, objects, complex, dates
        raise RunnerError(
            f"input has dtype {str(x.dtype)[:80]!r}; the model takes numbers: save a numeric array, e.g. "
            f"np.save('x.npy', x.astype(np.float32))"
        )
    rank = len(inp.shape) if inp.shape is not None else None
    if rank is not None and x.ndim == rank - 1:  # one sample without its batch axis
        x = x[None]
    if rank is not None and x.ndim != rank:
        raise RunnerError(
            f"input has shape {tuple(x.shape)} but the model input {inp.name!r} expects rank "
            f"{rank} {_shape_str(inp.shape)}"
        )
    for axis, (want, got) in enumerate(zip(inp.shape or [], x.shape)):
        if axis > 0 and isinstance(want, int) and want > 0 and want != got:
            raise RunnerError(
                f"input has shape {tuple(x.shape)} but the model input {inp.name!r} expects "
                f"{_shape_str(inp.shape)} (axis {axis}: {got} != {want})"
            )
    return x.astype(_input_dtype(inp), copy=False)


def _random_input(inp, batch: int) -> np.ndarray:
    shape = list(inp.shape or [])
    if not shape:
        raise RunnerError(f"model input {inp.name!r} has no known shape; pass a sample input")
    shape[0] = batch
    unknown = [i for i, d in enumerate(shape[1:], 1) if not (isinstance(d, int) and d > 0)]
    if unknown:
        raise RunnerError(
            f"model input {inp.name!r} has dynamic dimensions {_shape_str(inp.shape)} besides "
            f"the batch axis; pass a sample input (--input x.npy) to fix its shape"
        )
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape).astype(_input_dtype(inp))


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in (shape or [])) + "]"


# --------------------------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgec.runtime",
        description="Run or benchmark an ONNX model with onnxruntime (numpy + onnxruntime only).",
    )
    p.add_argument("model", help="path of the .onnx model, or of a dynamic ensemble (ensemble.json or its "
                   "folder: members run in order with early exit; --bench times dynamic vs all members)")
    p.add_argument("--input", help=".npy file of inputs, shape (N, ...) or a single sample; or an "
                   "audio file (.wav/.flac) for a model with an audio front end in its metadata")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0 = all cores)")
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated execution providers (default: CPUExecutionProvider)",
    )
    p.add_argument("--topk", type=int, default=1, help="classes to print per sample")
    p.add_argument("--batch-size", type=int, default=256, help="chunk size for prediction")
    p.add_argument("--bench", action="store_true", help="measure latency instead of predicting")
    p.add_argument("--batch", type=int, default=1, help="bench: samples per run")
    p.add_argument("--warmup", type=int, default=10, help="bench: untimed runs first")
    p.add_argument("--runs", type=int, default=100, help="bench: timed runs")
    p.add_argument("--json-out", help="bench: write the results to this JSON file (else stdout)")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks on errors")
    return p


def _load_input(path: str, session: ort.InferenceSession | None = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"input file {path!r} does not exist; pass a .npy file (np.save)")
    from .audio import AUDIO_EXTENSIONS  # numpy only

    if session is not None and path.lower().endswith(AUDIO_EXTENSIONS):
        return audio_input(session, path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise RunnerError(f"could not read {path!r} as a .npy array: {e}") from e


def _write_json(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    else:
        print(text)


def _main_ensemble(args, providers) -> int:
    """A dynamic ensemble (ensemble.json or its folder): predict with early exit, or time it."""
    from .ensemble import DynamicEnsemble

    ens = DynamicEnsemble.load(args.model, threads=args.threads, providers=providers)
    x = _load_input(args.input, ens.sessions[0]) if args.input else None
    if args.bench:
        if x is None:
            x = _random_input(ens.sessions[0].get_inputs()[0], max(1, args.runs))
        x = _as_model_input(x, ens.sessions[0].get_inputs()[0])
        result = ens.compare_latency(x[: max(1, args.runs)], rounds=3, batch=args.batch, warmup=args.warmup)
        result.update(provider=ens.sessions[0].get_providers()[0], threads=args.threads,
                      onnxruntime=ort.__version__, torch_imported="torch" in sys.modules)
        _write_json(result, args.json_out)
        return 0
    if x is None:
        raise RunnerError("pass --input x.npy to predict, or --bench to time dynamic vs all members")
    x = _as_model_input(x, ens.sessions[0].get_inputs()[0])
    pred, used, probs = ens.predict_proba(x, batch_size=args.batch_size)
    labels = ens.meta.get("classes")
    if not (isinstance(labels, list) and len(labels) == probs.shape[1]):
        labels = None
    lines = [f"# dynamic ensemble: {ens.k} members, threshold {ens.threshold}, agree {ens.agree}; "
             f"{float(used.mean()):.2f} members per input on average",
             "# sample\tclass\t" + ("label\t" if labels else "") + "prob\tmembers_used"]
    for i, (c, u) in enumerate(zip(pred.tolist(), used.tolist())):
        lines.append(f"{i}\t{c}\t" + (f"{labels[c]}\t" if labels else "") + f"{probs[i, c]:.6f}\t{u}")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        from .ensemble import is_ensemble_path

        if is_ensemble_path(args.model):
            return _main_ensemble(args, providers)
        session = load_session(args.model, threads=args.threads, providers=providers)
        x = _load_input(args.input, session) if args.input else None
        if args.bench:
            result = measure_latency(
                session, batch=args.batch, warmup=args.warmup, runs=args.runs, sample=x
            )
            result.update(
                peak_rss_mb=peak_rss_mb(),
                provider=session.get_providers()[0],
                threads=args.threads,
                batch=args.batch,
                warmup=args.warmup,
                runs=args.runs,
                onnxruntime=ort.__version__,
                torch_imported="torch" in sys.modules,
            )
            _write_json(result, args.json_out)
            return 0
        if x is None:
            raise RunnerError("pass --input x.npy to predict, or --bench to measure latency")
        if args.topk < 1:
            raise RunnerError(f"--topk must be >= 1, got {args.topk}")
        probs = softmax(predict(session, x, batch_size=args.batch_size).astype(np.float64))
        probs = probs.reshape(probs.shape[0], -1)
        k = min(args.topk, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = model_metadata(session).get("classes")
        if not (isinstance(labels, list) and len(labels) == probs.shape[1]):
            labels = None  # no names: class indices only
        cols = "\t".join(f"class{j + 1}\t" + (f"label{j + 1}\t" if labels else "") + f"prob{j + 1}"
                         for j in range(k))
        lines = [f"# sample\t{cols}"]
        for i, row in enumerate(order):
            lines.append(f"{i}\t" + "\t".join(f"{c}\t" + (f"{labels[c]}\t" if labels else "")
                                               + f"{probs[i, c]:.6f}" for c in row))
        print("\n".join(lines))
        return 0
    except (RunnerError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --json-out in a folder that cannot be written
        if args.verbose:
            raise
        print(f"error: cannot access {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one message, no traceback (unless --verbose)
        if args.verbose:
            raise
        print(f"error: unexpected {type(e).__name__}: {str(e)[:500]}\n  (run with --verbose for the traceback)",
              file=sys.stderr)
        return 1
