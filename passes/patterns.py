"""Small matchers shared by the fusion passes: who produced a value, and what constant it holds."""

from __future__ import annotations

from kiln.ir.graph import Node, Value


def producer(value: Value, *ops: str) -> Node | None:
    """The node that produced ``value`` if its op is one of ``ops`` (any op when none given)."""
    node = value.producer
    if node is None or (ops and node.op not in ops):
        return None
    return node


def skip(value: Value, *ops: str) -> Value:
    """Walk up through single-input ops in ``ops`` (casts, views) to the value they came from."""
    while True:
        node = producer(value, *ops)
        if node is None or not node.inputs:
            return value
        value = node.inputs[0]


def scalar_value(value: Value):
    """The number a value holds when it is a `constant` or a uniform `full`, else None."""
    node = producer(value, "constant", "full")
    return None if node is None else node.attrs["value"]


def weight_name(value: Value) -> str | None:
    node = producer(value, "weight")
    return None if node is None else node.attrs["name"]


def operands(node: Node, predicate) -> tuple | None:
    """For a two-input node, (a, b) ordered so that ``predicate(a)`` holds; None if neither side does."""
    a, b = node.inputs[0], node.inputs[1]
    if predicate(a):
        return a, b
    if predicate(b):
        return b, a
    return None
