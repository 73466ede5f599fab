"""Quantization primitives: quantizers, quantized modules, graph preparation."""
