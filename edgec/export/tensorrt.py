"""TensorRT engine building from a Q/DQ ONNX model (explicit quantization).

Written to TensorRT 10's documented Python API (``tensorrt.Builder`` / ``OnnxParser`` /
``IBuilderConfig``); NOT verified on this project's machines, where TensorRT cannot be installed
(its libraries come only from NVIDIA's own index). Tests are behind the ``trt`` marker.

A Q/DQ network carries its own scales, so no calibrator is needed: the INT8 flag lets TensorRT
pick int8 kernels where Q/DQ says so. Export such models with ``--target tensorrt`` (symmetric
int8 activations, zero point 0), which TensorRT requires.

Sparse weights: when the file has 2:4-sparse Conv/Gemm weights (edgec's ``prune`` with
``pattern: "2:4"``; :func:`edgec.export.sparsity.sparse_weights_wanted` decides from the file, no
TensorRT needed) the builder gets ``BuilderFlag.SPARSE_WEIGHTS``, which lets it pick sparse tensor
core kernels (Ampere and newer) for the layers whose weights have the pattern.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgec.errors import ExportError, MissingDependency


def build_engine(onnx_path: Path, engine_path: Path, *, int8: bool = True, fp16: bool = True,
                 workspace_mb: int = 1024, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 32,
                 sparse_weights: bool | None = None) -> Path:
    """Parse ``onnx_path`` and serialise an engine to ``engine_path`` (atomically).

    ``sparse_weights``: set BuilderFlag.SPARSE_WEIGHTS; None = when the file's weights are 2:4 sparse."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependency("tensorrt", "trt") from exc
    if sparse_weights is None:
        from edgec.export.sparsity import sparse_weights_wanted

        sparse_weights = sparse_weights_wanted(onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = list(inp.shape)
    profile.set_shape(inp.name, [min_batch, *shape[1:]], [opt_batch, *shape[1:]], [max_batch, *shape[1:]])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path = Path(engine_path)
    fd, tmp = tempfile.mkstemp(dir=engine_path.parent, suffix=".engine")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
    os.replace(tmp, engine_path)
    return engine_path
