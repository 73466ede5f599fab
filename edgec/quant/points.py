"""Where activation quantization points go in a BN-folded graph whose conv/linear layers are already
swapped for QConv/QLinear (or kept float by a ``layers:`` override): the placement rules of
:mod:`edgec.quant.prepare`, and around float layers those of :mod:`edgec.quant.precision`.
"""
from __future__ import annotations

from torch import fx

from edgec.quant.graph import (_is_add, _is_avgpool, _is_integer_elementwise, _is_pass, _is_relu, _module,
                               _tensor_inputs)
from edgec.quant.modules import QUANT_MODULES, ActQuant, set_input_quantizer
from edgec.quant.quantizers import make_quantizer


class _Points:
    """Inserts ActQuant nodes; knows which layers are float (``float_nodes``), which values are float
    because of them (``floaty``) and the explicit act bits of overridden layers (``explicit``)."""

    def __init__(self, gm: fx.GraphModule, spec, target, report, float_nodes: set, explicit: dict):
        self.gm, self.spec, self.target, self.report = gm, spec, target, report
        self.float_nodes, self.explicit = float_nodes, explicit
        self.floaty: set = set(float_nodes)
        self.counter = iter(range(10**6))

    def insert_after(self, src: fx.Node, bits: int) -> fx.Node:
        """One quantization point on ``src`` (all its users read it). Its grid -- signedness, range,
        zero point -- is decided by calibration data (ActQuant.set_grid_from_stats), not here; until
        then it holds the target's signed grid."""
        spec, target, gm = self.spec, self.target, self.gm
        qmin, qmax = target.act_range(bits, True)
        aq = ActQuant(make_quantizer(spec.act_quantizer, qmin=qmin, qmax=qmax, per_channel=False,
                                     percentile=spec.percentile, lsq_init=spec.lsq_init),
                      container=target.act_container, zero_point=target.act_zero_point(True),
                      target=target, bits=bits)
        name = f"aq_{next(self.counter)}"
        gm.add_submodule(name, aq)
        with gm.graph.inserting_after(src):
            new = gm.graph.call_module(name, (src,))
        src.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self.report.act_points += 1
        return new

    def quantized_source(self, n) -> fx.Node | None:
        """The ActQuant ``n`` reads through shape-only ops, if any."""
        gm = self.gm
        while isinstance(n, fx.Node) and not isinstance(_module(gm, n), ActQuant) and _is_pass(gm, n):
            n = n.args[0]
        return n if isinstance(n, fx.Node) and isinstance(_module(gm, n), ActQuant) else None

    def consumers(self, n: fx.Node) -> list[fx.Node]:
        """The nodes that read ``n``'s value, through shape-only ops."""
        out = []
        for u in n.users:
            if _is_pass(self.gm, u) and not isinstance(_module(self.gm, u), ActQuant):
                out += self.consumers(u)
            else:
                out.append(u)
        return out

    def only_float_consumers(self, n: fx.Node) -> bool:
        users = self.consumers(n)
        return bool(self.float_nodes) and bool(users) and all(u in self.float_nodes for u in users)

    def bits(self, src: fx.Node, default: int, producer: fx.Node | None = None) -> int:
        """A point's bits: the largest explicit act bits of the layers it connects, else ``default``."""
        found = [self.explicit[u] for u in self.consumers(src) if u in self.explicit]
        if producer in self.explicit:
            found.append(self.explicit[producer])
        return max(found) if found else default

    def any_floaty(self, node: fx.Node) -> bool:
        return any(a in self.floaty for a in node.all_input_nodes)


def place_points(gm: fx.GraphModule, spec, target, report, *, layer_nodes: list, float_nodes: set,
                 explicit: dict, kept_bn: set[str]) -> None:
    """Insert the activation quantization points (steps 1 and 2 of edgec.quant.prepare's rules)."""
    p = _Points(gm, spec, target, report, float_nodes, explicit)
    last = layer_nodes[-1] if layer_nodes else None

    def act_bits_for(src: fx.Node) -> int:
        if src is last and spec.last_layer_bits:
            return spec.last_layer_bits
        return spec.act_bits

    # 1. quantization points on the outputs of what runs as an integer kernel in ORT
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if node.op == "placeholder":
            if not p.only_float_consumers(node):  # an input read only by float layers stays float
                p.insert_after(node, p.bits(node, spec.first_layer_bits or spec.act_bits))
        elif isinstance(mod, QUANT_MODULES) or _is_add(node):
            if not isinstance(mod, QUANT_MODULES) and p.any_floaty(node):
                p.floaty.add(node)  # an add with a float operand runs in float (no QLinearAdd)
                continue
            end = node
            users = list(end.users)
            if len(users) == 1 and str(users[0].target) in kept_bn:
                end = users[0]
                users = list(end.users)
            if len(users) == 1 and _is_relu(gm, users[0]):
                end = users[0]
            if not isinstance(mod, QUANT_MODULES) and p.only_float_consumers(end):
                p.floaty.update((node, end))
                continue
            bits = p.bits(end, act_bits_for(node), producer=node)
            p.insert_after(end, bits)
            if isinstance(mod, QUANT_MODULES):
                mod.output_bits = bits
        elif _is_avgpool(gm, node):
            if p.any_floaty(node) or p.only_float_consumers(node):
                p.floaty.add(node)
                continue
            p.insert_after(node, p.bits(node, spec.act_bits))
        elif _is_integer_elementwise(gm, node):
            # only between integer tensors: concat / SE gating / gates whose every input is already on a
            # grid, so integer kernels are not separated by float islands. Elementwise math inside a
            # float region (a normalization's d*d, d*rsqrt(var)) stays float: quantizing it only adds
            # Q/DQ work and error (BC-ResNet's instance norm: 80.6% -> 63.9%, 3x slower)
            ins = _tensor_inputs(gm, node)
            if ins and all(p.quantized_source(a) is not None for a in ins) and not p.only_float_consumers(node):
                p.insert_after(node, p.bits(node, spec.act_bits))
            elif p.any_floaty(node):
                p.floaty.add(node)
        elif not isinstance(mod, ActQuant) and p.any_floaty(node):
            p.floaty.add(node)  # float values flow on through ReLU, BatchNorm, shape ops, ...

    # 2. every quantized layer reads a quantized tensor (through shape-only ops at most); a source
    #    without a quantization point gets one (the layer's input point), shared by all its users
    for node in list(gm.graph.nodes):
        if not isinstance(_module(gm, node), QUANT_MODULES):
            continue
        if p.quantized_source(node.args[0]) is None:
            p.insert_after(node.args[0], p.bits(node.args[0], spec.act_bits))
        set_input_quantizer(_module(gm, node), _module(gm, p.quantized_source(node.args[0])))
