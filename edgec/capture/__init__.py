"""Graph capture: a ``torch.fx.GraphModule`` of a user's model for the run's input shape.

``capture(model, example_input)`` is what every quantizing stage (via
:func:`edgec.quant.prepare.trace`) and the size budget (:mod:`edgec.budget`) build their graph from.

1. **Symbolic trace** (``torch.fx.symbolic_trace``), with every non-tensor parameter of ``forward``
   that has a default (``forward(self, x, embed=False)``) made concrete at its default. A model that
   symbolic tracing takes gets exactly the graph it always got.
2. **Concrete-value trace**, only when (1) fails on Python control flow (``if``/``while``/``len``/
   ``int()``/iteration on a traced value): an fx tracer that runs every op on the example input as it
   records it, so each node carries its real value. A Python decision (``bool``, ``len``, ``int``,
   iteration) is answered from that value -- but only when the value is *static*: derived from
   shapes, sizes, dims, dtypes, devices, Python constants or module attributes, never from tensor
   values or from shapes that depend on values (``nonzero``, boolean masks). Shapes stay graph nodes
   (``x.view(x.size(0), -1)`` keeps a dynamic batch); only the branch decisions are fixed, for the
   input shape of the run. The capture is repeated at batch 1: a decision that changes with the
   batch size is refused (the exported model has a dynamic batch).
3. Everything else -- a branch on tensor values (``if x.sum() > 0``), a forward that changes Python
   state of the model, an op that fails on the example input -- stops with one
   :class:`~edgec.errors.InputError` naming the construct and the user's ``file:line``.

Leaf modules (everything in ``torch.nn``) stay ``call_module`` nodes under the user's qualified
names, parameters stay the user's (``get_attr`` / the modules themselves): QAT trains the user's
parameters, state dicts keep their keys, the exporter names ONNX nodes after the modules.
"""
from __future__ import annotations


import torch
from torch import fx, nn

from edgec.capture._core import (CaptureInfo, _as_tuple, _concrete_defaults, _where,
                                 _is_control_flow_error, _symbolic, _user_frame_from_tb, example_from_data,
                                 example_from_shape, example_input)
from edgec.capture.concrete import _concrete
from edgec.errors import InputError

__all__ = ["capture", "example_input", "example_from_data", "example_from_shape", "CaptureInfo"]


# --------------------------------------------------------------------------------------------


def capture(model: nn.Module, example_input=None) -> fx.GraphModule:
    """An fx graph of ``model``: symbolic when fx can trace it, else concrete for ``example_input``'s shape.

    ``example_input``: a tensor (or tuple of tensors) shaped like the run's samples, batch >= 2.
    Raises :class:`InputError` with the construct and the user's file:line when neither works.
    """
    if isinstance(model, fx.GraphModule):
        return model
    concrete = _concrete_defaults(model)
    try:
        gm = _symbolic(model, concrete)
        gm.meta["edgec_capture"] = CaptureInfo("symbolic")
        return gm
    except Exception as exc:  # noqa: BLE001 - tracing errors are arbitrary user-code errors
        sym_exc = exc
    example = _on_model_device(model, _as_tuple(example_input))
    if not example:
        loc = _user_frame_from_tb(sym_exc.__traceback__)
        hint = ("quantization needs a forward() without data-dependent Python control flow; "
                "move such logic out of forward() or wrap it in a leaf module")
        if _is_control_flow_error(sym_exc):
            hint = "pass an example input (quantize_model(..., example_inputs=x)) to capture it for that shape"
        raise InputError(f"cannot trace {type(model).__name__} with torch.fx for quantization: {sym_exc} "
                         f"at {_where(loc)}", hint=hint) from sym_exc
    gm = _concrete(model, example, concrete)
    _check_batch_independent(model, gm, example, concrete)
    return gm


def _on_model_device(model: nn.Module, example: tuple) -> tuple:
    """The example on the model's device (a stage may hold the model on a GPU; examples come on CPU)."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    if t is None:
        return example
    return tuple(e.to(t.device) if isinstance(e, torch.Tensor) else e for e in example)


def _check_batch_independent(model, gm: fx.GraphModule, example: tuple, concrete: dict) -> None:
    """Capture again at batch 1: a decision that changes with the batch size would break the exported
    model (dynamic batch) -- refuse it, naming the line."""
    first = example[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] < 2:
        return
    one = tuple(e[:1] if isinstance(e, torch.Tensor) and e.dim() > 0 else e for e in example)
    try:
        other = _concrete(model, one, concrete)
    except InputError:
        return  # not capturable at batch 1 for another reason: the run's batch is what matters
    a, b = gm.meta["edgec_capture"].decisions, other.meta["edgec_capture"].decisions
    for da, db in zip(a, b):
        if da != db:
            raise InputError(
                f"cannot capture the graph of {type(model).__name__}: {da[0]} a value that depends on the "
                f"batch size, at {_where(da[1])} ({da[2]!r} at batch {first.shape[0]}, {db[2]!r} at batch 1); the exported model "
                "takes any batch size",
                hint="take sizes from the non-batch dimensions (x.shape[1:]), keep x.size(0) as a tensor "
                     "size (x.view(x.size(0), -1)) instead of int()/len(x), or flatten with torch.flatten(x, 1)")
    if len(a) != len(b) or gm.code != other.code:
        raise InputError(f"cannot capture the graph of {type(model).__name__}: the captured graph depends on the "
                         "batch size of the input", hint="keep batch-size arithmetic out of Python control flow")
