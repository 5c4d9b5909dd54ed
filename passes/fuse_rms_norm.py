"""Fuse RMSNorm: ``w * (x * rsqrt(mean(x^2, -1) + eps))`` -> ``rms_norm``; with the residual add before it -> ``add_rms_norm``."""

from __future__ import annotations

from kiln.ir.graph import Function, Module, Node

from .manager import PassOptions, register_pass
from .patterns import operands, producer, scalar_value, skip


def _match_normalised(value):
    """x * rsqrt(mean(x^2) + eps) -> (x, eps) or None."""
    mul = producer(skip(value, "cast"), "mul")
    if mul is None:
        return None
    for x, r in (mul.inputs, mul.inputs[::-1]):
        rsqrt = producer(r, "rsqrt")
        add = rsqrt and producer(rsqrt.inputs[0], "add")
        pair = add and operands(add, lambda v: scalar_value(v) is not None)
        if not pair:
            continue
        eps_value, mean_value = pair
        mean = producer(mean_value, "mean")
        if mean is None or not mean.attrs["keepdims"] or list(mean.attrs["axes"]) != [x.type.rank - 1]:
            continue
        square = producer(mean.inputs[0], "pow")
        if square is None or scalar_value(square.inputs[1]) != 2 or skip(square.inputs[0], "cast") is not skip(x, "cast"):
            continue
        return x, float(scalar_value(eps_value))
    return None


def _fuse_one(fn: Function, node: Node) -> bool:
    width = node.output.type.shape[-1]
    pair = operands(node, lambda v: skip(v, "cast").type.shape == (width,) and
                    producer(skip(v, "cast"), "weight") is not None)
    if pair is None:
        return False
    weight, normalised = pair
    match = _match_normalised(normalised)
    if match is None:
        return False
    x, eps = match
    if x.type != node.output.type:
        return False
    weight = skip(weight, "cast") if skip(weight, "cast").type.dtype == x.type.dtype else weight
    if weight.type.dtype != x.type.dtype:
        return False
    add = producer(x, "add")
    if add is not None and add.inputs[0].type == x.type:
        fused = fn.add_node("add_rms_norm", [add.inputs[0], add.inputs[1], weight], {"eps": eps}, before=node,
                            name="add_rms_norm", meta=node.meta)
        # Uses before the fused node belong to the unfused norm, now dead; later ones read the sum.
        order = {id(n): i for i, n in enumerate(fn.nodes)}
        for user, pos in list(add.output.uses):
            if order[id(user)] > order[id(fused)]:
                user.set_input(pos, fused.outputs[0])
        if fn.is_result(add.output):
            fn.results = [fused.outputs[0] if r is add.output else r for r in fn.results]
        fn.replace_all_uses(node.output, fused.outputs[1])
    else:
        fused = fn.add_node("rms_norm", [x, weight], {"eps": eps}, before=node, name="rms_norm", meta=node.meta)
        fn.replace_all_uses(node.output, fused.output)
    return True


@register_pass("fuse_rms_norm")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites w * (x * rsqrt(mean(x^2) + eps)) into rms_norm(x, w), and add + rms_norm into add_rms_norm."""
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op == "mul":
                changed |= _fuse_one(fn, node)
    return changed
