"""Target profiles: the hardware-specific quantization choices (docs/design.md principle 4).

A profile decides the integer containers and ranges a compressed model is *trained* for, so the
exported artifact computes what the PyTorch simulation computed.

Activation grids are decided from calibration statistics (:meth:`TargetProfile.act_grid`), never from
the graph: a tensor whose observed minimum is >= 0 gets an unsigned grid with zero point 0; any other
tensor gets, on the ONNX Runtime CPU profiles, an asymmetric uint8 grid with a zero point covering
[min, max] (what ORT's ``quantize_static`` does), and on ``tensorrt`` a symmetric signed int8 grid.

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
    act_symmetric: bool = False  # True: signed activations on a symmetric grid, zero point 0 (TensorRT)

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

    def act_grid(self, bits: int, lo: float, hi: float) -> tuple[int, int, int]:
        """(qmin, qmax, zero point) of an activation of ``bits`` bits observed in [lo, hi].

        [qmin, qmax] is relative to the zero point (the container holds qmin+zp .. qmax+zp).
        """
        levels = 2**bits
        if not lo < 0:  # post-ReLU and other non-negative tensors: unsigned, zero point 0
            qmin, qmax = self.act_range(bits, signed=False)
            return qmin, qmax, 0
        if self.act_symmetric or self.act_container == "int8":
            qmin, qmax = self.act_range(bits, signed=True)
            return qmin, qmax, 0
        hi = max(float(hi), 0.0)
        step = (hi - float(lo)) / (levels - 1)
        zp = int(min(max(round(-float(lo) / step), 0), levels - 1)) if step > 0 else 0
        return -zp, levels - 1 - zp, zp

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
    "int8", 127, ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), act_symmetric=True))


def get_target(name: str) -> TargetProfile:
    return TARGETS.get(name)
