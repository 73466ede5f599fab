"""edgec: prune, quantize and distil PyTorch models for edge devices; export and measure them.

Importing the package is cheap (no torch, onnxruntime or tensorrt at module load).
"""
__version__ = "0.1.0"
