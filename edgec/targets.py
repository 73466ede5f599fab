"""Target profiles: the hardware-specific quantization choices (docs/design.md principle 4).

A profile decides the integer containers and ranges a compressed model is *trained* for, so the
exported artifact computes what the PyTorch simulation computed.

* ``x86``: ONNX Runtime u8s8 kernels (uint8 activations, int8 weights). Without AVX-VNNI the AVX2
  path multiplies pairs of u8*s8 into a saturating int16 (``vpmaddubsw``): 2*255*127 overflows, so
  weights use a 7-bit range [-63, 63] ("reduce_range"), which never saturates.
* ``arm64``: the same containers with the full int8 weight range (``sdot``/``smmla`` accumulate in
  int32, no saturation).
* ``tensorrt``: int8 symmetric activations and weights (zero point 0), as TensorRT's explicit
  quantization requires; an unsigned (post-ReLU) activation therefore uses [0, 127].
"""
from __future__ import annotations

from dataclasses import dataclass

from edgec.registry import Registry


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    act_container: str  # "uint8" or "int8"
    weight_qmax_cap: int  # largest |q| a weight may take in the int8 container
    ort_providers: tuple[str, ...]

    def weight_range(self, bits: int) -> tuple[int, int]:
        """Symmetric, narrow signed range for a weight of ``bits`` bits."""
        qmax = min(2 ** (bits - 1) - 1, self.weight_qmax_cap)
        return -qmax, qmax

    def act_range(self, bits: int, signed: bool) -> tuple[int, int]:
        """Integer range (relative to zero point) of an activation of ``bits`` bits."""
        if signed:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if self.act_container == "int8":
            return 0, min(2**bits - 1, 127)
        return 0, 2**bits - 1

    def act_zero_point(self, signed: bool) -> int:
        """Zero point in the container for a symmetric signed/unsigned quantizer."""
        if self.act_container == "uint8" and signed:
            return 128
        return 0


TARGETS: Registry[TargetProfile] = Registry("target")
TARGETS.add("x86", TargetProfile(
    "x86", "ONNX Runtime CPU on x86-64 without VNNI: u8 activations, 7-bit weights (no vpmaddubsw saturation)",
    "uint8", 63, ("CPUExecutionProvider",)))
TARGETS.add("arm64", TargetProfile(
    "arm64", "ONNX Runtime CPU on arm64: u8 activations, full int8 weights",
    "uint8", 127, ("CPUExecutionProvider",)))
TARGETS.add("tensorrt", TargetProfile(
    "tensorrt", "TensorRT explicit quantization: symmetric int8 activations and weights",
    "int8", 127, ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")))


def get_target(name: str) -> TargetProfile:
    return TARGETS.get(name)
