"""edgec: prune, quantize and distil PyTorch models for edge devices; export and measure them.

Importing the package is cheap (no torch, onnxruntime or tensorrt at module load); the Python API
(:func:`edgec.compress`, :func:`edgec.export_run`, see :mod:`edgec.api`) loads them when called.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "compress", "export_run"]


def __getattr__(name: str):
    if name in ("compress", "export_run"):
        from edgec import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgec' has no attribute {name!r}")
