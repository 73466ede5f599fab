"""The concrete-value fx tracer (:func:`_concrete`): every op runs on the example input as it is
recorded, and Python decisions are answered from static values only. See :mod:`edgec.capture`."""
from __future__ import annotations

import inspect
import operator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from edgec.capture._core import (_DYN_SHAPE_FUNCS, _DYN_SHAPE_METHODS, _HINT, _META_ATTRS, _META_FUNCS,
                                 _META_METHODS, _RANDOM_FUNCS, _RANDOM_METHODS, CaptureInfo,
                                 _drop_concrete_placeholders, _forward_params, _user_frame_from_stack,
                                 _user_frame_from_tb, _where)
from edgec.errors import InputError


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

