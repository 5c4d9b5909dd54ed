"""Fuse quantized gated MLPs: ``linear_q(act(g) * u, Wd)`` over ``[g, u]`` = one wide ``linear_q(x, Wgu)`` ->
``gated_mlp_q`` (``kiln.ir.quant_mlp_ops``).

``quantize_weights`` splits a ``gated_mlp`` into three ``linear_q`` and the activation between them (each
weight gets its own format, and a GGUF file's gate/up and down often differ: Q4_K and Q6_K);
``merge_sibling_linears`` then joins gate and up into one wide ``linear_q``. This pass names the result as
one op again, so the IR (and ``kiln inspect``) shows a model's MLPs after quantization as before it. It
fuses only the exact shape that split and merge leave: a wide matmul read by nothing but the two halves,
gate rows first; anything else (gate and up in different formats, a wide matmul shared with q/k/v in a
parallel-attention block) stays as it is.
"""

from __future__ import annotations

from kiln.ir.graph import Function, Module, Node, Value
from kiln.ir.quant_mlp_ops import ACTIVATION_OPS

from .manager import PassOptions, register_pass
from .patterns import producer, weight_name

_ACTIVATION_OF = {(op, tuple(sorted(attrs.items()))): kind for kind, (op, attrs) in ACTIVATION_OPS.items()}


def _only_use(value: Value, node: Node) -> bool:
    return len(value.uses) == 1 and value.uses[0][0] is node


def _activation(value: Value, user: Node):
    """(kind, input) when ``value`` is silu / gelu / gelu-tanh of something and read only by ``user``."""
    node = producer(value, "silu", "gelu")
    if node is None or not _only_use(value, user):
        return None
    attrs = {"approximate": node.attrs["approximate"]} if node.op == "gelu" else {}
    kind = _ACTIVATION_OF.get((node.op, tuple(sorted(attrs.items()))))
    return None if kind is None else (kind, node)


def _half(value: Value, user: Node):
    """The slice node producing ``value`` (the last axis, step 1), read only by ``user``."""
    node = producer(value, "slice")
    if node is None or not _only_use(value, user) or node.attrs["axis"] != value.type.rank - 1 \
            or node.attrs["step"] != 1:
        return None
    return node


def _quantized(node: Node) -> bool:
    return node.op == "linear_q" and all(weight_name(v) for v in node.inputs[1:])


def _fuse_one(fn: Function, down: Node, erased: set) -> bool:
    mul = producer(down.inputs[0], "mul")
    if mul is None or not _only_use(mul.output, down):
        return False
    for gated, plain in (mul.inputs, mul.inputs[::-1]):
        act = _activation(gated, mul)
        if act is None:
            continue
        kind, act_node = act
        gate, up = _half(act_node.inputs[0], act_node), _half(plain, mul)
        if gate is None or up is None or gate.inputs[0] is not up.inputs[0] or gated.type != plain.type:
            continue
        wide = gate.inputs[0].producer
        rows = wide.output.type.shape[-1]
        half = plain.type.shape[-1]
        if not _quantized(wide) or rows != 2 * half or len(wide.output.uses) != 2 \
                or (gate.attrs["start"], gate.attrs["end"], up.attrs["start"], up.attrs["end"]) != (0, half, half, rows):
            continue
        attrs = {"activation": kind}
        for name, node in (("gate_up", wide), ("down", down)):
            attrs.update({f"{name}_bits": node.attrs["bits"], f"{name}_group_size": node.attrs["group_size"],
                          f"{name}_offset": len(node.inputs) == 4, f"{name}_activations": node.attrs["activations"]})
        fused = fn.add_node("gated_mlp_q", [wide.inputs[0], *wide.inputs[1:], *down.inputs[1:]], attrs,
                            before=down, name="gated_mlp_q", meta=down.meta)
        fn.replace_all_uses(down.output, fused.output)
        for node in (down, mul, act_node, gate, up, wide):
            fn.erase(node)
            erased.add(id(node))
        return True
    return False


@register_pass("fuse_quantized_gated_mlp")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites linear_q(act(slice(W, 0, I)) * slice(W, I, 2I), Wd), W = linear_q(x, Wgu), into
    gated_mlp_q(x, Wgu..., Wd...)."""
    changed = False
    for fn in module.functions.values():
        erased: set = set()
        for node in list(fn.nodes):
            if id(node) not in erased and _quantized(node):
                changed |= _fuse_one(fn, node, erased)
    return changed
