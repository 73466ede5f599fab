"""What both capture paths share: the tracing vocabulary (which ops are static, random or
value-shaped), where a construct is in the user's code, example inputs, and the symbolic path
(:func:`_symbolic`). See :mod:`edgec.capture`."""
from __future__ import annotations

import inspect
import linecache
import operator
import os
import sys
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from edgec.errors import InputError



_TORCH_DIR = os.path.dirname(torch.__file__)
_EDGEC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the edgec package folder

# tensor metadata: static whenever the tensor's shape is
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "is_sparse", "is_quantized", "layout",
                         "is_meta", "is_cpu"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
                           "is_complex", "is_contiguous", "get_device", "stride"})
_META_FUNCS = {torch.numel, torch.is_floating_point, torch.is_complex, len}
# ops whose output shape depends on tensor values
_DYN_SHAPE_METHODS = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere",
                                "repeat_interleave", "nonzero_static"})
_DYN_SHAPE_FUNCS = {torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive, torch.argwhere,
                    torch.repeat_interleave, torch.bincount}
_RANDOM_FUNCS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
                 torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
                 torch.nn.functional.dropout, torch.nn.functional.dropout2d, torch.nn.functional.alpha_dropout}
_RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_",
                             "geometric_", "cauchy_", "log_normal_"})

_HINT = ("compute the condition from shapes (x.shape, x.size(), x.ndim) or module attributes, "
         "use torch.where(cond, a, b) for value-dependent choices, or move the construct into a leaf module "
         "(a torch.nn module edgec does not trace into)")


class CaptureInfo:
    """How a graph was captured (``gm.meta["edgec_capture"]``)."""

    def __init__(self, path: str, decisions: list[tuple[str, str, Any]] | None = None):
        self.path = path  # "symbolic" | "concrete"
        self.decisions = decisions or []  # (what, (file, line), value) of every resolved Python decision

    def __repr__(self) -> str:
        return f"CaptureInfo({self.path!r}, {len(self.decisions)} decisions)"


# --------------------------------------------------------------------------------------------
# where in the user's code


def _is_user_file(filename: str) -> bool:
    """Model code: not torch, not edgec's machinery (edgec's own model zoo counts as model code)."""
    if filename.startswith("<"):
        return False
    f = os.path.abspath(filename)
    if f.startswith(os.path.join(_EDGEC_DIR, "models") + os.sep):
        return True
    return not (f.startswith(_TORCH_DIR) or f.startswith(_EDGEC_DIR + os.sep))


def _user_frame_from_stack() -> tuple[str, int] | None:
    frame = sys._getframe(1)
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _user_frame_from_tb(tb) -> tuple[str, int] | None:
    found = None
    while tb is not None:  # innermost user frame
        if _is_user_file(tb.tb_frame.f_code.co_filename):
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _where(loc: tuple[str, int] | None) -> str:
    if loc is None:
        return "an unknown place in forward()"
    line = linecache.getline(loc[0], loc[1]).strip()
    return f"{loc[0]}:{loc[1]}" + (f"  `{line}`" if line else "")


# --------------------------------------------------------------------------------------------
# arguments


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _concrete_defaults(model: nn.Module) -> dict[str, Any]:
    """Every non-tensor parameter of forward after the first that has a default -> that default."""
    out = {}
    for p in _forward_params(model)[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is inspect.Parameter.empty:
            continue
        if not isinstance(p.default, torch.Tensor):
            out[p.name] = p.default
    return out


def _as_tuple(example) -> tuple:
    if example is None:
        return ()
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def example_input(ctx, batch: int = 2) -> torch.Tensor:
    """A batch shaped like the run's samples: real training samples when the stage has its data,
    else (rebuilding a finished run: ``ctx.data`` is None) a seeded random tensor of ``ctx.input_shape``.
    Branches are resolved from static values only, so both give the same graph."""
    data = getattr(ctx, "data", None)
    if data is not None:
        return example_from_data(data, batch)
    shape = tuple(getattr(ctx, "input_shape", None) or ())
    if not shape:
        raise InputError("cannot capture the model graph: the run's input shape is unknown",
                         hint="run.json of the run must hold input_shape")
    return example_from_shape(shape, batch)


def example_from_data(data, batch: int = 2) -> torch.Tensor:
    """The first ``batch`` training samples of a DataBundle."""
    train = data.train
    xs = [torch.as_tensor(train[i][0]) for i in range(min(batch, len(train)))]
    if not xs:
        return example_from_shape(tuple(data.input_shape), batch)
    return torch.stack(xs)


def example_from_shape(shape, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=g)


# --------------------------------------------------------------------------------------------
# 1. symbolic


def _is_control_flow_error(exc: BaseException) -> bool:
    if isinstance(exc, fx.proxy.TraceError):
        return True
    msg = str(exc)
    return ("symbolically traced variables" in msg or "Proxy object cannot be iterated" in msg
            or "'len' is not supported in symbolic tracing" in msg
            or ("Proxy" in msg and isinstance(exc, TypeError)))


def _drop_concrete_placeholders(g: fx.Graph, names: set[str]) -> None:
    """Remove the placeholders fx leaves for concrete_args (and the asserts on them): the value is
    baked into the graph, and a dangling input would get an activation quantizer. A container default
    (``size=(8, 8)``) also made fx generate a pytree-flattening forward; with its placeholders gone the
    plain ``forward(self, x)`` is the right one."""
    phs = [n for n in g.nodes if n.op == "placeholder" and str(n.target).rsplit("_", 1)[0] in names
           and str(n.target) not in names]
    order = {n: i for i, n in enumerate(g.nodes)}
    for ph in phs:
        doomed, frontier, used = [], [ph], False
        while frontier and not used:
            n = frontier.pop()
            for u in n.users:
                if u.op == "call_function" and u.target in (operator.eq, torch._assert, _assert_is_none):
                    if u not in doomed:
                        doomed.append(u)
                        frontier.append(u)
                else:
                    used = True  # really used: keep it (cannot happen for a baked value; never break a graph)
        if used:
            continue
        for n in sorted(doomed, key=lambda n: -order[n]):
            g.erase_node(n)
        g.erase_node(ph)
    left = [n for n in g.nodes if n.op == "placeholder" and str(n.target).rsplit("_", 1)[0] in names]
    if not left and type(g._codegen) is not fx.graph.CodeGen:
        info = getattr(g._codegen, "pytree_info", None)
        out = next(n for n in reversed(g.nodes) if n.op == "output")
        if info is not None and info.out_spec is not None:  # the flattened outputs back in their structure
            out.args = (pytree.tree_unflatten(list(out.args[0]), info.out_spec),)
        g._codegen = fx.graph.CodeGen()
    g.lint()


def _symbolic(model: nn.Module, concrete: dict[str, Any]) -> fx.GraphModule:
    if not concrete:  # exactly what quantization always traced
        return fx.symbolic_trace(model)
    tracer = fx.Tracer()  # fx.symbolic_trace, with the baked placeholders removed before codegen
    graph = tracer.trace(model, concrete_args=concrete)
    _drop_concrete_placeholders(graph, set(concrete))
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


