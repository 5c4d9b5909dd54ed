"""Constant folding: evaluate at compile time what does not depend on the inputs.

Values come from each op's numpy reference, so folding means exactly what the
interpreter means. Identities that hold for every input (x * 1) are rules too.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Module, Node, Value
from kiln.ir.ops import OPS
from kiln.ir.symbolic import SymExpr
from kiln.ir.types import dtype_of_numpy, is_float

from .manager import register_pass
from .rewrite import ANY_OP, apply_rules, emit_before, emit_weight, fresh_weight_name, producer_op, scalar_value

# Largest tensor folded from constants; bigger ones stay computed at run time so
# a module does not grow by a copy of, say, a full causal mask.
MAX_FOLDED_ELEMENTS = 1 << 16
FOLDED_PREFIX = "const."  # weights this pass made from constants; their data counts as known


@register_pass("fold_constants")
def run(module: Module, options) -> bool:
    """rewrites nodes computable at compile time into constant/full/new weights, and x+0, x*1, ... into x.

    Shape arithmetic on symbolic dims (view sizes, split points) is already
    folded into attributes by capture; nothing here depends on a symbolic size
    (``arange(0, seq)`` stays), only static values are evaluated.
    """
    return apply_rules(module, RULES)


# reading compile-time values ------------------------------------------------------
def _has_symbols(attr) -> bool:
    if isinstance(attr, SymExpr):
        return True
    return isinstance(attr, tuple) and any(_has_symbols(a) for a in attr)


def known_array(value: Value) -> np.ndarray | None:
    """The array of a statically known value: constant, static full/arange, or a folded weight."""
    node = value.producer
    if node is None or not value.type.is_static or int(np.prod(value.type.shape)) > MAX_FOLDED_ELEMENTS:
        return None
    if node.op in ("constant", "full", "arange") and not any(_has_symbols(a) for a in node.attrs.values()):
        return OPS[node.op].reference([], node.attrs)[0]
    if node.op == "weight" and node.attrs["name"].startswith(FOLDED_PREFIX):
        return node.function.module.weight_data.get(node.attrs["name"])
    return None


def _evaluate(node: Node, inputs: list) -> np.ndarray | None:
    if any(_has_symbols(a) for a in node.attrs.values()):
        return None
    try:
        with np.errstate(all="ignore"):
            (out,) = OPS[node.op].reference(inputs, node.attrs)
    except (ValueError, ArithmeticError, TypeError):
        return None  # e.g. integer div: left for the run time to refuse
    out = np.array(out, order="C")  # an owned, contiguous copy (ascontiguousarray would make 0-d 1-d)
    expected = node.output.type
    assert tuple(out.shape) == expected.shape and dtype_of_numpy(out.dtype) == expected.dtype, \
        f"{node.op} reference gave {out.dtype}{list(out.shape)} for {expected}"
    return out


def _materialize(node: Node, array: np.ndarray, weight_base: str | None) -> Value:
    """Emit the cheapest source node for ``array`` in front of ``node``.

    Without ``weight_base`` a rank-0 array becomes ``constant`` and a uniform
    one ``full``; otherwise (and for anything else) it becomes a new weight.
    """
    module = node.function.module
    dtype = node.output.type.dtype
    if weight_base is None:
        if array.ndim == 0:
            return emit_before(node, "constant", value=array.item(), dtype=dtype)
        flat = array.reshape(-1)
        if flat.size and bool(np.all(flat == flat[0])):
            return emit_before(node, "full", shape=array.shape, value=flat[0].item(), dtype=dtype)
        weight_base = _next_folded_name(module)
    name = fresh_weight_name(module, weight_base)
    module.add_weight(name, array)
    return emit_weight(node, name)


def _next_folded_name(module: Module) -> str:
    n = 0
    while f"{FOLDED_PREFIX}{n}" in module.weights:
        n += 1
    return f"{FOLDED_PREFIX}{n}"


# rules -----------------------------------------------------------------------------
def fold_known(node: Node):
    if not node.inputs or not node.output.type.is_static:
        return None
    if int(np.prod(node.output.type.shape)) > MAX_FOLDED_ELEMENTS:
        return None
    inputs = [known_array(v) for v in node.inputs]
    if any(a is None for a in inputs):
        return None
    out = _evaluate(node, inputs)
    return None if out is None else _materialize(node, out, None)


def fold_weight_elementwise(node: Node):
    op = OPS.get(node.op)
    if op is None or "elementwise" not in op.traits or not node.output.type.is_static:
        return None
    module = node.function.module
    weight_names = [v.producer.attrs["name"] for v in node.inputs if producer_op(v) == "weight"]
    if not weight_names or any(name not in module.weight_data for name in weight_names):
        return None
    # Name the result after the model weight it came from, so it stays recognisable.
    model_weights = [name for name in weight_names if not name.startswith(FOLDED_PREFIX)]
    base = f"{model_weights[0]}.{node.op}" if model_weights else _next_folded_name(module)
    inputs = []
    for v in node.inputs:
        if producer_op(v) == "weight":
            inputs.append(module.weight_data[v.producer.attrs["name"]])
        else:
            inputs.append(known_array(v))
            if inputs[-1] is None:
                return None
    # Broadcasting a weight against a bigger constant would store the bigger tensor.
    if int(np.prod(node.output.type.shape)) > max(int(a.size) for a in inputs):
        return None
    out = _evaluate(node, inputs)
    # Always a weight, even when uniform: the graph's shape must not depend on the weights' values.
    return None if out is None else _materialize(node, out, base)


def _identity(neutral, *, commutative: bool, float_only: bool = False):
    """Rule body for ``x op neutral -> x`` (and ``neutral op x`` when commutative)."""

    def rewrite(node: Node):
        a, b = node.inputs
        if float_only and not is_float(node.output.type.dtype):
            return None
        candidates = [(a, b), (b, a)] if commutative else [(a, b)]
        for x, other in candidates:
            value = scalar_value(other)
            # type equality: the neutral element must neither broadcast x bigger nor promote its dtype
            # every dtype holds 0, 1, True and False exactly, so comparing the attribute is enough
            if value is not None and value == neutral and x.type == node.output.type:
                return x
        return None

    return rewrite


def full_rank0_to_constant(node: Node):
    if node.attrs["shape"]:
        return None
    return emit_before(node, "constant", value=node.attrs["value"], dtype=node.attrs["dtype"])


RULES = [
    ("full", full_rank0_to_constant, "full{shape=[]} -> constant: one spelling of a scalar"),
    ("add", _identity(0, commutative=True), "x + 0 -> x, 0 + x -> x (only the sign of -0.0 differs)"),
    ("sub", _identity(0, commutative=False), "x - 0 -> x"),
    ("mul", _identity(1, commutative=True), "x * 1 -> x, 1 * x -> x"),
    ("div", _identity(1, commutative=False, float_only=True), "x / 1 -> x (floats)"),
    ("pow", _identity(1, commutative=False), "x ** 1 -> x (x ** 2 stays for the norm fusions)"),
    ("and", _identity(True, commutative=True), "x and true -> x"),
    ("or", _identity(False, commutative=True), "x or false -> x"),
    (ANY_OP, fold_known, "op(known...) -> constant | full | const.N weight, evaluated by the op's reference"),
    (ANY_OP, fold_weight_elementwise, "elementwise(weight, known...) -> new weight computed once (Gemma's 1 + w)"),
]
