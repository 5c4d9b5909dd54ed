"""Fuse gated MLPs: ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU; also one fused gate_up projection) -> ``gated_mlp``."""

from __future__ import annotations

from kiln.ir.graph import Function, Module, Node, Value

from .manager import PassOptions, register_pass
from .patterns import producer, weight_name



def _activation(value: Value):
    """act(h) -> (kind, h) for silu / gelu / gelu-tanh, else None."""
    node = producer(value, "silu", "gelu")
    if node is None:
        return None
    if node.op == "silu":
        return "silu", node.inputs[0]
    return ("gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu"), node.inputs[0]


def _projection(value: Value):
    """A bias-free dense layer: linear(x, weight) -> (x, weight value), or a row slice of one -> (x, w, start, end)."""
    node = producer(value, "linear")
    if node is not None and len(node.inputs) == 2 and weight_name(node.inputs[1]):
        return node.inputs[0], node.inputs[1], None
    piece = producer(value, "slice")
    if piece is not None and piece.attrs["axis"] == value.type.rank - 1 and piece.attrs["step"] == 1:
        inner = producer(piece.inputs[0], "linear")
        if inner is not None and len(inner.inputs) == 2 and weight_name(inner.inputs[1]):
            return inner.inputs[0], inner.inputs[1], (piece.attrs["start"], piece.attrs["end"])
    return None


def _weight_rows(module: Module, fn: Function, weight: Value, rows, before: Node) -> Value:
    if rows is None:
        return weight
    name = f"{weight_name(weight)}[{rows[0]}:{rows[1]}]"
    if name not in module.weights:
        module.add_weight(name, module.weight_data[weight_name(weight)][rows[0]:rows[1]].copy())
    return fn.emit("weight", name=name, insert_before=before)


def _fuse_one(module: Module, fn: Function, node: Node) -> bool:
    if len(node.inputs) != 2 or not weight_name(node.inputs[1]):
        return False
    mul = producer(node.inputs[0], "mul")
    if mul is None:
        return False
    for gated, plain in (mul.inputs, mul.inputs[::-1]):
        act = _activation(gated)
        if act is None:
            continue
        gate, up = _projection(act[1]), _projection(plain)
        # the mul must not broadcast one side (then W_gate and W_up differ in shape: not a gated MLP)
        if gate is None or up is None or gate[0] is not up[0] or act[1].type != plain.type:
            continue
        x = gate[0]
        w_gate = _weight_rows(module, fn, gate[1], gate[2], node)
        w_up = _weight_rows(module, fn, up[1], up[2], node)
        fused = fn.add_node("gated_mlp", [x, w_gate, w_up, node.inputs[1]], {"activation": act[0]},
                            before=node, name="gated_mlp", meta=node.meta)
        fn.replace_all_uses(node.output, fused.output)
        return True
    return False


@register_pass("fuse_gated_mlp")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites linear(act(linear(x, Wg)) * linear(x, Wu), Wd) into gated_mlp(x, Wg, Wu, Wd)."""
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op == "linear":
                changed |= _fuse_one(module, fn, node)
    return changed
