"""Merge sibling projections: linears (or quantized linears) reading one activation -> one wide linear and slices.

Attention's q/k/v and an MLP's gate/up (once quantization splits it) read the same normalised activation.
One matmul over their weights concatenated by output rows reads the activation once and is one kernel
instead of several: decode is a row of small GEMVs, each paying a launch. Weights merge when they agree in
everything but their output rows: fp32 with or without a bias, or one quantized format (bits, group size,
offsets or not, the dtypes of every tensor). Every backend sees the merged op, and so does ``kiln inspect``.
The merged weights are named after their parts joined by ``|``; parts nothing else reads leave the module.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Function, Module, Node

from .manager import PassOptions, register_pass
from .patterns import weight_name


def _weights(node: Node) -> list | None:
    """The names of the node's weight operands (all but the activation), or None if one is computed."""
    names = [weight_name(v) for v in node.inputs[1:]]
    return None if any(n is None for n in names) else names


def _signature(node: Node):
    """What siblings must share to merge (None: this node does not merge)."""
    if node.op not in ("linear", "linear_q") or _weights(node) is None:
        return None
    types = tuple((str(v.type.dtype), v.type.shape[1:]) for v in node.inputs[1:])
    return node.op, len(node.inputs), types, tuple(sorted(node.attrs.items()))


def _merge(fn: Function, group: list) -> None:
    module = fn.module
    first = group[0]
    names = [_weights(node) for node in group]
    merged = []
    for position in range(len(names[0])):
        parts = [n[position] for n in names]
        name = "|".join(parts)
        if name not in module.weights:
            module.add_weight(name, np.ascontiguousarray(np.concatenate([module.weight_data[p] for p in parts])))
        merged.append(fn.emit("weight", name=name, insert_before=first))
    wide = fn.add_node(first.op, [first.inputs[0]] + merged, first.attrs, before=first, meta=first.meta).output
    start = 0
    for node in group:
        rows = node.output.type.shape[-1]
        part = fn.emit("slice", wide, axis=wide.type.rank - 1, start=start, end=start + rows, insert_before=first)
        start += rows
        fn.replace_all_uses(node.output, part)
    for node in group:
        weights = [v.producer for v in node.inputs[1:]]
        fn.erase(node)
        for weight in weights:
            if not weight.output.uses:
                fn.erase(weight)


def merge_sibling_linears(fn: Function) -> bool:
    changed, merged = False, set()
    for node in list(fn.nodes):
        if id(node) in merged or _signature(node) is None:
            continue
        x, mine = node.inputs[0], _signature(node)
        group = [n for n in x.users if n.inputs[0] is x and _signature(n) == mine]
        if len(group) < 2:
            continue
        order = {id(n): i for i, n in enumerate(fn.nodes)}
        _merge(fn, sorted(group, key=lambda n: order[id(n)]))
        merged |= {id(n) for n in group}
        changed = True
    return changed


def _drop_unread_weights(module: Module) -> None:
    read = {n.attrs["name"] for fn in module.functions.values() for n in fn.nodes if n.op == "weight"}
    for name in [n for n in module.weights if n not in read]:
        module.remove_weight(name)


@register_pass("merge_sibling_linears")
def run(module: Module, options: PassOptions) -> bool:
    """Merges linears / linear_qs that read one activation (q/k/v, gate/up) into one wide op and slices."""
    changed = False
    for fn in module.functions.values():
        changed |= merge_sibling_linears(fn)
    if changed:
        _drop_unread_weights(module)
    return changed
