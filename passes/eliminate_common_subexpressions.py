"""Common-subexpression elimination: one node per (op, attributes, inputs).

Ops are pure, so two nodes with the same op, attributes and input values
compute the same thing. Value numbering is a forward walk, not a local rule.
"""

from __future__ import annotations

from kiln.ir.graph import Module, Node
from kiln.ir.ops import OPS

from .manager import register_pass


@register_pass("eliminate_common_subexpressions")
def run(module: Module, options) -> bool:
    """rewrites nodes equal to an earlier node (same op, attributes and inputs) into uses of that node."""
    changed = False
    for fn in module.functions.values():
        seen: dict = {}
        for node in list(fn.nodes):
            key = node_key(node)
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for old, new in zip(node.outputs, first.outputs):
                fn.replace_all_uses(old, new)
            fn.erase(node)
            changed = True
    return changed


def node_key(node: Node) -> tuple:
    """What makes two nodes interchangeable: op, attributes and input identities.

    Source nodes (``weight``, ``constant``, ``full``, ``arange``) have no inputs,
    so equal attributes are enough. Commutative ops key on the unordered inputs.
    """
    inputs = list(node.inputs)  # Values hash and compare by identity
    op = OPS.get(node.op)
    if op is not None and "commutative" in op.traits:
        inputs.sort(key=id)
    attrs = tuple((name, _exact(value)) for name, value in sorted(node.attrs.items()))
    return node.op, attrs, tuple(inputs)


def _exact(value):
    """A key that tells apart values Python calls equal: 1 vs 1.0 vs True, 0.0 vs -0.0."""
    if isinstance(value, tuple):
        return tuple(_exact(v) for v in value)
    if isinstance(value, float):
        return float, repr(value)  # repr keeps the sign of zero; nan keys equal to nan, which is right here
    return type(value), value
