"""What a device needs besides the graph, stored in the ONNX file's ``metadata_props``.

Keys (JSON values, read by :func:`edgec.runtime.model_metadata` through ONNX Runtime alone):
``edgec.classes`` (class names in logit order), ``edgec.frontend`` (the audio front end,
:class:`edgec.runtime.audio.LogMelConfig` fields) and ``edgec.normalization`` (mean/std applied to
the log-mel); for a quantized model ``edgec.layer_precision`` (each conv/linear layer: float, or its
weight / input / output bits). ``edgec export`` writes them for every exported model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from edgec.runtime.audio import META_CLASSES, META_FRONTEND, META_NORMALIZATION, LogMelConfig

__all__ = ["read_model_metadata", "write_model_metadata"]


def write_model_metadata(path: str | os.PathLike, *, classes: Sequence[str] | None = None,
                         normalization: dict | None = None, frontend: LogMelConfig | dict | None = None,
                         layer_precision: dict | None = None) -> dict:
    """Store class names and the audio front end in an exported ONNX file's ``metadata_props``.

    Keys (JSON values): ``edgec.classes`` (class names in logit order), ``edgec.frontend``
    (:class:`LogMelConfig` fields) and ``edgec.normalization`` (``{"mean": [...], "std": [...]}``
    applied to the log-mel). ``frontend`` defaults to ``normalization["frontend"]`` (what an audio
    :class:`edgec.data.DataBundle` carries); without a front end only the class names are written.
    Other metadata entries are kept. The file is rewritten atomically; the graph is unchanged.
    Returns the edgec entries written.
    """
    import onnx

    from edgec.atomic import atomic_write

    if frontend is None and normalization and normalization.get("frontend"):
        frontend = normalization["frontend"]
    entries: dict[str, str] = {}
    if classes is not None:
        entries[META_CLASSES] = json.dumps([str(c) for c in classes])
    if frontend is not None:
        cfg = frontend if isinstance(frontend, LogMelConfig) else LogMelConfig.from_dict(dict(frontend))
        entries[META_FRONTEND] = cfg.to_json()
        if normalization and "mean" in normalization:
            entries[META_NORMALIZATION] = json.dumps(
                {"mean": [float(v) for v in normalization["mean"]],
                 "std": [float(v) for v in normalization.get("std", [1.0] * len(normalization["mean"]))]})
    if layer_precision:
        entries["edgec.layer_precision"] = json.dumps(layer_precision, sort_keys=True)
    model = onnx.load(os.fspath(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in [*kept, *sorted(entries.items())]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    atomic_write(path, lambda fh: fh.write(model.SerializeToString()))
    return entries


def read_model_metadata(path: str | os.PathLike) -> dict:
    """The ``edgec.*`` metadata of an ONNX file, JSON-decoded (keys without the prefix)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key.removeprefix("edgec."): json.loads(p.value) for p in model.metadata_props
            if p.key.startswith("edgec.")}
