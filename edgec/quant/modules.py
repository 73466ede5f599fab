"""Quantized drop-in modules: weights fake-quantized per output channel, activations per tensor."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgec.quant.quantizers import Quantizer


def _quantized_bias(mod: nn.Module) -> Tensor | None:
    """Bias on the int32 grid of the integer kernel: step = input scale x weight scale (per channel).

    ONNX Runtime's QLinearConv/QGemm add an int32 bias to the int32 accumulator, so the bias is
    rounded to that grid; simulating it keeps PyTorch and the exported model in step.
    """
    in_q = getattr(mod, "_input_quant", None)
    if mod.bias is None or in_q is None or in_q.q.calibrating or not in_q.q.enabled:
        return mod.bias
    from edgec.quant.quantizers import fake_quant

    bscale = (in_q.q.scale().reshape(()) * mod.wq.scale()).detach()
    return fake_quant(mod.bias, bscale, -(2**31), 2**31 - 1)


def set_input_quantizer(mod: nn.Module, act: "ActQuant") -> None:
    """Link a quantized layer to the activation quantizer feeding it (not a submodule)."""
    object.__setattr__(mod, "_input_quant", act)


def _masked_weight(mod: nn.Module) -> Tensor:
    mask = getattr(mod, "weight_mask", None)
    return mod.weight if mask is None else mod.weight * mask


class _QConv:
    """The weight-quantized conv: the float conv's hyper-parameters and weights, its (masked) weight
    through a per-channel quantizer ``wq``, the bias on the input x weight grid."""

    wq: Quantizer

    @classmethod
    def from_float(cls, conv, wq: Quantizer):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict({k: v for k, v in conv.state_dict().items() if k in ("weight", "bias")})
        if getattr(conv, "weight_mask", None) is not None:
            q.register_buffer("weight_mask", conv.weight_mask.clone())
        q.wq = wq
        return q

    def quantized_weight(self) -> Tensor:
        return self.wq(_masked_weight(self))

    def quantized_bias(self) -> Tensor | None:
        return _quantized_bias(self)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), _quantized_bias(self))


class QConv2d(_QConv, nn.Conv2d):
    """nn.Conv2d whose (masked) weight passes through a per-channel quantizer ``wq``."""


class QConv1d(_QConv, nn.Conv1d):
    """nn.Conv1d whose (masked) weight passes through a per-channel quantizer ``wq``."""


class QLinear(nn.Linear):
    """nn.Linear whose (masked) weight passes through a per-channel quantizer ``wq``."""

    wq: Quantizer

    @classmethod
    def from_float(cls, lin: nn.Linear, wq: Quantizer) -> "QLinear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype)
        q.load_state_dict({k: v for k, v in lin.state_dict().items() if k in ("weight", "bias")})
        if getattr(lin, "weight_mask", None) is not None:
            q.register_buffer("weight_mask", lin.weight_mask.clone())
        q.wq = wq
        return q

    def quantized_weight(self) -> Tensor:
        return self.wq(_masked_weight(self))

    def quantized_bias(self) -> Tensor | None:
        return _quantized_bias(self)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), _quantized_bias(self))


def _apply_loaded_range(mod: "ActQuant", _keys) -> None:
    mod._apply_range()  # a module-level function, not a lambda: the module stays picklable


class ActQuant(nn.Module):
    """A per-tensor activation quantization point (becomes a QuantizeLinear/DequantizeLinear pair).

    ``container`` is the ONNX integer type ("uint8" or "int8") and ``zero_point`` the zero point
    used in it; the quantizer's own range [qmin, qmax] is relative to that zero point.

    With a ``target``, the grid comes from data: during calibration the observed minimum and maximum
    are recorded (``lo``/``hi``) and :meth:`set_grid_from_stats` asks the target profile for
    signedness, range and zero point (:meth:`edgec.targets.TargetProfile.act_grid`). The zero point
    is then fixed (buffers ``zp`` and ``qrange`` travel in the state dict); QAT trains the step only
    (LSQ) or follows the range with a fixed zero point (EMA), so simulation and the exported
    QuantizeLinear/DequantizeLinear compute the same thing.
    """

    def __init__(self, quantizer: Quantizer, *, container: str, zero_point: int, target=None,
                 bits: int | None = None):
        super().__init__()
        self.q = quantizer
        self.container = container
        self.target = target
        self.bits = bits
        self.export_mode = False
        if target is not None and not target.act_symmetric:
            quantizer.symmetric = False
        self.register_buffer("zp", torch.tensor(int(zero_point), dtype=torch.long))
        self.register_buffer("qrange", torch.tensor([quantizer.qmin, quantizer.qmax], dtype=torch.long))
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_load_state_dict_post_hook(_apply_loaded_range)

    @property
    def zero_point(self) -> int:
        return int(self.zp)

    def _apply_range(self) -> None:
        self.q.qmin, self.q.qmax = int(self.qrange[0]), int(self.qrange[1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.target is not None and any(k.startswith(prefix) for k in state_dict) \
                and prefix + "zp" not in state_dict:
            # saved before grids came from data: its unsigned/signed choice came from the graph walk and
            # is not in the file, so rebuilding would silently put another grid under the trained step
            from edgec.errors import RunDirError

            raise RunDirError(f"activation quantizer {prefix.rstrip('.')!r} was saved without its zero point "
                              "(a run made by an edgec before activation grids were decided by calibration data)",
                              hint="re-run `edgec compress` with this edgec")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))

    @torch.no_grad()
    def set_grid_from_stats(self) -> None:
        """Range and zero point from the calibration statistics (no-op without a target or data)."""
        if self.target is None or not bool(torch.isfinite(self.lo)):
            return
        from edgec.quant.quantizers import LSQQuantizer, RangeQuantizer, range_scale

        q = self.q
        levels = q.qmax - q.qmin + 1
        bits = self.bits or int(round(math.log2(levels)))
        lo, hi = float(self.lo), float(self.hi)
        if isinstance(q, RangeQuantizer) and not q.symmetric:
            lo, hi = float(q.lo), float(q.hi)  # the method's extremes (min-max, EMA, percentile) set the grid
        qmin, qmax, zp = self.target.act_grid(bits, lo, hi)
        old_qmax = q.qmax
        self.qrange.copy_(torch.tensor([qmin, qmax]))
        self.zp.fill_(zp)
        self._apply_range()
        if isinstance(q, LSQQuantizer):
            lo_t = torch.tensor([min(float(self.lo), 0.0)])
            hi_t = torch.tensor([max(float(self.hi), 0.0)])
            if q.init == "minmax":
                q.init_step(range_scale(lo_t, hi_t, qmin, qmax))
            elif qmax != old_qmax and qmax > 0:  # paper rule 2*mean|x|/sqrt(Qp) for the new Qp
                q.init_step(q.step.detach().abs() * math.sqrt(old_qmax / qmax))

    def forward(self, x: Tensor) -> Tensor:
        if self.q.calibrating:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.detach().amin().to(self.lo)))
                self.hi.copy_(torch.maximum(self.hi, x.detach().amax().to(self.hi)))
        if not self.export_mode:
            return self.q(x)
        scale = float(self.q.scale().reshape(()))
        zp = self.zero_point
        cmin, cmax = (0, 255) if self.container == "uint8" else (-128, 127)
        y = torch.fake_quantize_per_tensor_affine(x, scale, zp, cmin, cmax)
        lo, hi = self.q.qmin + zp, self.q.qmax + zp
        if lo > cmin or hi < cmax:
            # fewer bits than the container: clip to the trained range, then quantize again on the same
            # grid (exact: the clipped values are grid points). The second QuantizeLinear/DequantizeLinear
            # keeps ORT's QDQ patterns whole -- the producer ends in a QuantizeLinear (DQ->Conv->Q fuses)
            # and the consumer starts from a DequantizeLinear -- so only DQ->Clip->Q runs in float.
            # A bare Clip between DequantizeLinear and Conv left every such conv in float (1/22 fused,
            # 0.37x the FP32 speed for a W4A4 ResNet-20).
            y = torch.clamp(y, self.q.qmin * scale, self.q.qmax * scale)
            y = torch.fake_quantize_per_tensor_affine(y, scale, zp, cmin, cmax)
        return y

    def extra_repr(self) -> str:
        return f"container={self.container}, zero_point={self.zero_point}"


class QChannelAffine(nn.Module):
    """A BatchNorm that cannot be folded into a conv (SubSpectralNorm's, which normalises a reshaped
    tensor), in its inference form ``y = a * x + b`` per channel, with ``a`` and ``b`` each
    fake-quantized on one symmetric grid per tensor (``aq``, ``bq``).

    ``a = gamma / sqrt(running_var + eps)`` and ``b = beta - running_mean * a`` are taken from the
    BatchNorm once (like the conv folds: what is trained is what is exported) and trained directly.
    Exported as ``DequantizeLinear(int8) -> Mul`` and ``DequantizeLinear(int8) -> Add``: the file
    stores ``a`` and ``b`` as integers, so they count at their bit width. The runtime computes the
    affine in float (ONNX Runtime has no integer kernel for it).
    """

    def __init__(self, a: Tensor, b: Tensor, aq: Quantizer, bq: Quantizer):
        super().__init__()
        if a.dim() != 1 or a.shape != b.shape:
            raise ValueError(f"a and b must be 1-D and alike, got {tuple(a.shape)} and {tuple(b.shape)}")
        self.num_features = a.numel()
        self.a = nn.Parameter(a.detach().clone().reshape(1, -1))  # (1, C): one quantizer "channel"
        self.b = nn.Parameter(b.detach().clone().reshape(1, -1))
        self.aq, self.bq = aq, bq

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, aq: Quantizer, bq: Quantizer) -> "QChannelAffine":
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("a BatchNorm without running statistics cannot be turned into an affine")
        inv = torch.rsqrt(bn.running_var.float() + bn.eps)
        a = inv * (bn.weight.float() if bn.weight is not None else 1.0)
        b = (bn.bias.float() if bn.bias is not None else 0.0) - bn.running_mean.float() * a
        return cls(a.to(bn.running_mean.dtype), b.to(bn.running_mean.dtype), aq, bq)

    @torch.no_grad()
    def observe(self) -> None:
        """(Re)initialise the grids of ``a`` and ``b`` from their current values."""
        for q, t in ((self.aq, self.a), (self.bq, self.b)):
            q.reset()
            q.observe(t)

    @torch.no_grad()
    def fold_constant_channels(self, lo: Tensor, hi: Tensor) -> int:
        """Channels whose input was one constant ``c`` (``lo == hi``) become ``0 * x + (a*c + b)``.

        Exact for such inputs. It matters after pruning: a channel whose conv kernel was pruned away
        has zero input and running variance ~0, so its ``a = gamma / sqrt(var + eps)`` is ~300x the
        live channels' and would set the one per-tensor grid of ``a`` for all of them. Returns how
        many channels were folded.
        """
        const = (lo == hi).reshape(self.a.shape)
        if not bool(const.any()):
            return 0
        c = lo.reshape(self.a.shape).to(self.a)
        self.b.copy_(torch.where(const, self.a * c + self.b, self.b))
        self.a.copy_(torch.where(const, torch.zeros_like(self.a), self.a))
        return int(const.sum())

    def quantized_scale(self) -> Tensor:
        return self.aq(self.a).reshape(-1)

    def quantized_shift(self) -> Tensor:
        return self.bq(self.b).reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        return x * self.quantized_scale().view(shape) + self.quantized_shift().view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


QUANT_MODULES = (QConv2d, QConv1d, QLinear)
