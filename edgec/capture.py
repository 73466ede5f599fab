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

import inspect
import linecache
import operator
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from edgec.errors import InputError

__all__ = ["capture", "example_input", "example_from_data", "example_from_shape", "CaptureInfo"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_EDGEC_DIR = os.path.dirname(os.path.abspath(__file__))

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


# --------------------------------------------------------------------------------------------
# 2. concrete-value tracer


class _Refused(BaseException):
    """A construct the concrete tracer cannot resolve (turned into one InputError). A BaseException:
    a user's ``try: ... except Exception:`` around the construct must not swallow it and trace on."""

    def __init__(self, what: str, loc, hint: str = _HINT):
        self.what, self.loc, self.hint = what, loc, hint
        super().__init__(what)


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


class _ConcreteProxy(fx.Proxy):
    """A Proxy that can answer len/int/float/index from its node's concrete value when static."""

    def __len__(self) -> int:
        return self.tracer._resolve(self, "len", len, structural=True)

    def __index__(self) -> int:
        return self.tracer._resolve(self, "a Python index/range() of", operator.index)

    def __int__(self) -> int:
        return self.tracer._resolve(self, "int() of", int)

    def __float__(self) -> float:
        return self.tracer._resolve(self, "float() of", float)


class ConcreteTracer(fx.Tracer):
    def __init__(self, placeholder_values: dict[str, Any]):
        super().__init__()
        self.record_stack_traces = True
        self._ph_values = placeholder_values
        self.values: dict[fx.Node, Any] = {}
        self.static_value: dict[fx.Node, bool] = {}
        self.static_shape: dict[fx.Node, bool] = {}
        self.decisions: list[tuple[str, str, Any]] = []
        self._evaluating = False

    # -- running ops on real values ----------------------------------------------------------
    @contextmanager
    def _eval(self):
        old = self._evaluating
        self._evaluating = True
        try:
            with torch.no_grad():
                yield
        finally:
            self._evaluating = old

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def _fetch_attr(self, target: str):
        obj = self.root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        try:
            self._evaluate(node, kind, target, args, kwargs)
        except _Refused:
            raise
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's op failed on the example input
            loc = _user_frame_from_stack()
            shapes = [tuple(v.shape) for v in self._ph_values.values() if isinstance(v, torch.Tensor)]
            raise _Refused(f"running `{_describe(node)}` on an example input of shape "
                           f"{', '.join(map(str, shapes))} failed: {type(exc).__name__}: {exc}", loc,
                           hint="check that the model takes inputs of the run's shape (the data's sample shape "
                                "with a batch dimension)") from exc
        return node

    def _evaluate(self, node, kind, target, args, kwargs) -> None:
        vals = self.values
        a = fx.node.map_arg(args, lambda n: vals[n])
        kw = fx.node.map_arg(kwargs, lambda n: vals[n])
        inputs = node.all_input_nodes
        shape_ok = all(self._shape_ok(n) for n in inputs)
        values_ok = all(self.static_value[n] for n in inputs)
        sv, ss = values_ok, shape_ok
        with self._eval():
            if kind == "placeholder":
                value = self._ph_values[str(target)]
                sv, ss = not _has_tensor(value), True
            elif kind == "get_attr":
                value = self._fetch_attr(str(target))
                sv, ss = not _has_tensor(value), True
            elif kind == "call_module":
                mod = self.root.get_submodule(str(target))
                was = mod.training
                mod.train(False)  # no running-stat updates, no dropout noise while capturing
                try:
                    value = mod(*a, **kw)
                finally:
                    mod.train(was)
                sv = False
            elif kind == "call_method":
                value = getattr(a[0], target)(*a[1:], **kw)
                src = inputs[0] if inputs else None
                if target in _META_METHODS and src is not None:
                    sv = self._shape_ok(src) and all(self._shape_ok(n) for n in inputs[1:])
                    ss = True
                elif target in _DYN_SHAPE_METHODS:
                    sv = ss = False
                elif target in _RANDOM_METHODS:
                    sv = False
                elif target in ("item", "tolist", "numpy"):
                    sv = False
            else:  # call_function
                value = target(*a, **kw)
                if target is getattr and len(a) > 1 and a[1] in _META_ATTRS:
                    sv, ss = self._shape_ok(inputs[0]), True
                elif target in _META_FUNCS:
                    sv, ss = shape_ok, True
                elif target in _DYN_SHAPE_FUNCS or (target is torch.where and len(a) + len(kw) == 1):
                    sv = ss = False
                elif target in _RANDOM_FUNCS:
                    sv = False
                elif target is operator.getitem and _bool_index(a[1] if len(a) > 1 else None):
                    sv = ss = False
        vals[node] = value
        self.static_value[node] = bool(sv)
        self.static_shape[node] = bool(ss)

    def _shape_ok(self, n: fx.Node) -> bool:
        """Is what this input contributes to a shape static? tensors: their shape; numbers: their value."""
        v = self.values[n]
        if _has_tensor(v):
            return self.static_shape[n]
        return self.static_value[n]

    # -- Python decisions --------------------------------------------------------------------
    def _node_of(self, obj) -> fx.Node:
        return obj.node

    def _resolve(self, proxy, what: str, fn: Callable, structural: bool = False):
        node = self._node_of(proxy)
        loc = _user_frame_from_stack()
        ok = self.static_shape[node] if structural else self.static_value[node]
        if structural and not _has_tensor(self.values[node]) and not isinstance(self.values[node], (list, tuple, dict)):
            ok = self.static_value[node]
        if not ok:
            raise _Refused(f"{what} `{_describe(node)}`, which depends on tensor values", loc)
        result = fn(self.values[node])
        self.decisions.append((what, loc, result))
        return result

    def to_bool(self, obj) -> bool:
        return self._resolve(obj, "a Python branch (if/while/and/or/not/assert) on", bool)

    def iter(self, obj):
        n = self._resolve(obj, "iteration over", len, structural=True)
        return iter([obj[i] for i in range(n)])

    def keys(self, obj):
        node = self._node_of(obj)
        if not isinstance(self.values[node], dict):
            raise _Refused(f"`**`/keys() of `{_describe(node)}`, which is not a dict", _user_frame_from_stack())
        keys = list(self.values[node].keys())
        self.decisions.append(("keys of", _user_frame_from_stack(), tuple(keys)))
        return keys


# tensor factories take sizes as Python ints, which the C++ argument parser does not take as Proxies
# (plain fx fails on ``torch.zeros(x.size(0), 16)``): while capturing, calls with a traced size are
# recorded as graph nodes (the size stays a node: batch-dynamic)
_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "linspace", "tensor")


@contextmanager
def _traced_factories(tracer: "ConcreteTracer"):
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            found = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
            if found and not tracer._evaluating:
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def _bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _describe(node: fx.Node, depth: int = 0) -> str:
    if depth > 2:
        return "..."

    def arg(a):
        if isinstance(a, fx.Node):
            if a.op in ("placeholder", "get_attr"):
                return str(a.target)
            return _describe(a, depth + 1)
        return repr(a)

    names = {operator.gt: ">", operator.lt: "<", operator.ge: ">=", operator.le: "<=", operator.eq: "==",
             operator.ne: "!=", operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
             operator.floordiv: "//", operator.mod: "%", operator.and_: "&", operator.or_: "|"}
    if node.op == "call_function" and node.target in names and len(node.args) == 2:
        return f"{arg(node.args[0])} {names[node.target]} {arg(node.args[1])}"
    if node.op == "call_function" and node.target is getattr:
        return f"{arg(node.args[0])}.{node.args[1]}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{arg(node.args[0])}[{arg(node.args[1])}]"
    if node.op == "call_method":
        rest = ", ".join(arg(a) for a in node.args[1:])
        return f"{arg(node.args[0])}.{node.target}({rest})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}({', '.join(arg(a) for a in node.args)})"
    if node.op == "call_module":
        return f"self.{node.target}({', '.join(arg(a) for a in node.args)})"
    return str(node.target)


def _python_state(model: nn.Module) -> dict:
    """Non-tensor, non-module attributes of every module (what forward must not change)."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training" or isinstance(v, (torch.Tensor, nn.Module)):
                continue
            try:
                out[(name, k)] = (id(v), repr(v)[:200])
            except Exception:  # noqa: BLE001 - an odd repr
                out[(name, k)] = (id(v), None)
    return out


def _state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict(keep_vars=True).items():
        if k in snap and v.shape == snap[k].shape:
            v.copy_(snap[k])


def _eliminate_dead(gm: fx.GraphModule) -> int:
    """Remove nodes whose results nothing uses (the arithmetic of resolved conditions). Module calls,
    in-place methods and side-effecting functions stay."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op not in ("call_function", "call_method", "get_attr"):
                continue
            if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
                continue
            if node.op == "call_function" and node.is_impure():
                continue
            if node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_") and \
                    not getattr(node.target, "__name__", "").startswith("__"):
                continue  # torch.relu_ and friends
            gm.graph.erase_node(node)
            removed += 1
            changed = True
    return removed


def _concrete(model: nn.Module, example: tuple, concrete: dict[str, Any]) -> fx.GraphModule:
    params = _forward_params(model)
    tensor_params = [p for p in params if p.name not in concrete]
    if len(tensor_params) != len(example):
        names = ", ".join(p.name for p in tensor_params)
        raise InputError(f"cannot capture {type(model).__name__}: forward takes ({names}) without defaults "
                         f"but the run gives {len(example)} input(s)",
                         hint="give the other arguments of forward() defaults")
    ph_values = {p.name: v for p, v in zip(tensor_params, example)}
    for name, v in concrete.items():  # fx names the placeholders of a concrete arg's leaves "<name>_1", "_2", ...
        for i, leaf in enumerate(pytree.tree_leaves(v), 1):
            ph_values[f"{name}_{i}"] = leaf
    tracer = ConcreteTracer(ph_values)
    snap = _state_snapshot(model)
    before = _python_state(model)
    try:
        with _traced_factories(tracer):
            graph = tracer.trace(model, concrete_args=concrete or None)
    except _Refused as r:
        raise _capture_error(model, r.what, r.loc, hint=r.hint) from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        loc = _user_frame_from_tb(exc.__traceback__)
        raise _capture_error(model, f"an unsupported construct ({type(exc).__name__}: {exc})", loc) from exc
    finally:
        _restore(model, snap)
    after = _python_state(model)
    changed = [k for k in before if after.get(k) != before[k]] + [k for k in after if k not in before]
    if changed:
        mod, attr = changed[0]
        m = model.get_submodule(mod) if mod else model
        try:
            src = inspect.getsourcefile(type(m).forward)
            line = inspect.getsourcelines(type(m).forward)[1]
            loc = (src, line)
        except (TypeError, OSError):
            loc = None
        what = f"forward() changes Python state: `self.{attr}` of {type(m).__name__}" + (f" ('{mod}')" if mod else "")
        raise _capture_error(model, what, loc, hint="keep Python-side state out of forward(): make it a "
                                                    "buffer (register_buffer) updated with tensor ops, or set "
                                                    "it outside forward()")
    if concrete:
        _drop_concrete_placeholders(graph, set(concrete))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _eliminate_dead(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta["edgec_capture"] = CaptureInfo("concrete", tracer.decisions)
    return gm


def _capture_error(model, what: str, loc, hint: str = _HINT) -> InputError:
    return InputError(f"cannot capture the graph of {type(model).__name__} for the run's input: {what} "
                      f"at {_where(loc)}", hint=hint)


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
