"""Canonicalization: drop no-op shape ops and give dense layers one normal form.

Later passes (fusions, lowering) then match one spelling: ``linear(x, w[N, K]
(, b))`` for every dense layer, whatever transpose or flattening capture saw.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Module, Node, Value
from kiln.ir.types import FLOAT_DTYPES, INT_DTYPES, numpy_dtype

from .manager import register_pass
from .rewrite import apply_rules, emit_before, emit_weight, fresh_weight_name, only_use, producer_op


@register_pass("canonicalize")
def run(module: Module, options) -> bool:
    """rewrites no-op reshape/permute/cast/expand/slice/concat away, and matmul-with-weight into linear."""
    return apply_rules(module, RULES)


# no-op shape and dtype ops -----------------------------------------------------------
def same_type_noop(node: Node):
    (x,) = node.inputs
    return x if x.type == node.output.type else None


def reshape_of_reshape(node: Node):
    (inner,) = node.inputs
    if producer_op(inner) != "reshape":
        return None
    return emit_before(node, "reshape", inner.producer.inputs[0], shape=node.attrs["shape"])


def identity_permute(node: Node):
    return node.inputs[0] if tuple(node.attrs["perm"]) == tuple(range(len(node.attrs["perm"]))) else None


def permute_of_permute(node: Node):
    (inner,) = node.inputs
    if producer_op(inner) != "permute":
        return None
    inner_perm, outer_perm = inner.producer.attrs["perm"], node.attrs["perm"]
    # output axis i reads inner axis outer[i], which reads x axis inner[outer[i]]
    composed = tuple(inner_perm[p] for p in outer_perm)
    return emit_before(node, "permute", inner.producer.inputs[0], perm=composed)


def permute_of_unit_axes(node: Node):
    """A permute that moves only axes of extent 1 keeps every element where it is: a reshape.
    (Decode's [b, 1, H, D] -> [b, H, 1, D] head split, for one.)"""
    (x,) = node.inputs
    perm = node.attrs["perm"]
    moved = [p for p in perm if x.type.shape[p] != 1]
    if moved != sorted(moved):
        return None
    return emit_before(node, "reshape", x, shape=tuple(node.output.type.shape))


def full_slice(node: Node):
    (x,) = node.inputs
    axis = node.attrs["axis"] % x.type.rank
    whole = node.attrs["start"] == 0 and node.attrs["end"] == x.type.shape[axis] and node.attrs["step"] == 1
    return x if whole else None


def single_concat(node: Node):
    return node.inputs[0] if len(node.inputs) == 1 else None


def _exact_in(src: str, dst: str) -> bool:
    """Whether every value of dtype ``src`` is exactly representable in ``dst``."""
    if src == dst or src == "bool":
        return True
    if dst == "bool":
        return False
    if src in FLOAT_DTYPES:
        if dst not in FLOAT_DTYPES:
            return False
        s, d = _float_info(src), _float_info(dst)
        return d.nmant >= s.nmant and d.maxexp >= s.maxexp and d.minexp <= s.minexp
    info = np.iinfo(numpy_dtype(src))
    if dst in INT_DTYPES:
        out = np.iinfo(numpy_dtype(dst))
        return out.min <= info.min and info.max <= out.max
    # an integer of b magnitude bits fits a float with at least b significand bits
    return info.max.bit_length() <= _float_info(dst).nmant + 1


def _float_info(dtype: str):
    import ml_dtypes

    return ml_dtypes.finfo(numpy_dtype(dtype))


def cast_of_exact_cast(node: Node):
    (inner,) = node.inputs
    if producer_op(inner) != "cast":
        return None
    x = inner.producer.inputs[0]
    if not _exact_in(x.type.dtype, inner.type.dtype):
        return None
    return emit_before(node, "cast", x, dtype=node.attrs["dtype"])


# dense layers -----------------------------------------------------------------------
def _weight_name(value: Value) -> str | None:
    return value.producer.attrs["name"] if producer_op(value) == "weight" else None


def matmul_transposed_weight(node: Node):
    x, rhs = node.inputs
    if producer_op(rhs) != "permute" or tuple(rhs.producer.attrs["perm"]) != (1, 0):
        return None
    weight = rhs.producer.inputs[0]
    if _weight_name(weight) is None or x.type.dtype != weight.type.dtype:
        return None
    return emit_before(node, "linear", x, weight)


def matmul_weight(node: Node):
    x, weight = node.inputs
    name = _weight_name(weight)
    if name is None or weight.type.rank != 2 or x.type.dtype != weight.type.dtype:
        return None
    w_t = emit_weight(node, _transposed_weight(node.function.module, name))
    return emit_before(node, "linear", x, w_t)


def _transposed_weight(module: Module, name: str) -> str:
    """Name of a module weight holding ``name`` transposed, added unless an equal one exists."""
    data = module.weight_data.get(name)
    src = module.weights[name]
    t_type = src.with_shape((src.shape[1], src.shape[0]))
    t_data = None if data is None else np.ascontiguousarray(data.T)
    candidate = f"{name}.T"
    # Another function (prefill and decode share weights) may have made this copy already.
    if module.weights.get(candidate) == t_type:
        have = module.weight_data.get(candidate)
        if (have is None and t_data is None) or (have is not None and t_data is not None
                                                 and np.array_equal(have, t_data)):
            return candidate
    candidate = fresh_weight_name(module, candidate)
    module.add_weight(candidate, t_data, type=t_type)
    return candidate


def linear_plus_bias(node: Node):
    a, b = node.inputs
    for lin, bias in ((a, b), (b, a)):
        if producer_op(lin) != "linear" or len(lin.producer.inputs) != 2 or not only_use(lin):
            continue
        if _weight_name(bias) is None or lin.type != node.output.type:
            continue
        n = lin.type.shape[-1]
        if bias.type.shape != (n,) or bias.type.dtype != lin.type.dtype:
            continue
        x, w = lin.producer.inputs
        return emit_before(node, "linear", x, w, bias)
    return None


def unflatten_linear(node: Node):
    (lin,) = node.inputs
    if producer_op(lin) != "linear" or not only_use(lin):
        return None
    flat, *weights = lin.producer.inputs
    shape = tuple(node.attrs["shape"])
    if producer_op(flat) != "reshape" or shape[-1:] != lin.type.shape[-1:]:
        return None
    # Both reshapes keep rows (the last dim) in row-major order, so reshaping the input straight to
    # the output's leading dims gives the same rows: the linear then sees the tokens unflattened.
    rows = emit_before(node, "reshape", flat.producer.inputs[0], shape=shape[:-1] + flat.type.shape[-1:])
    return emit_before(node, "linear", rows, *weights)


RULES = [
    ("reshape", same_type_noop, "reshape to the same shape -> x"),
    ("reshape", unflatten_linear, "reshape(linear(reshape(x, [b*s, K])), [b, s, N]) -> linear(reshape(x, [b, s, K]))"),
    ("reshape", reshape_of_reshape, "reshape(reshape(x)) -> reshape(x)"),
    ("permute", identity_permute, "permute with the identity perm -> x"),
    ("permute", permute_of_permute, "permute(permute(x, p), q) -> permute(x, p[q])"),
    ("permute", permute_of_unit_axes, "permute moving only extent-1 axes -> reshape"),
    ("cast", same_type_noop, "cast to the same dtype -> x"),
    ("cast", cast_of_exact_cast, "cast(cast(x, B), C) -> cast(x, C) when every x fits B exactly"),
    ("expand", same_type_noop, "expand to the same shape -> x"),
    ("slice", full_slice, "slice of a whole axis with step 1 -> x"),
    ("concat", single_concat, "concat of one input -> x"),
    ("matmul", matmul_transposed_weight, "matmul(x, permute(w, [1, 0])) -> linear(x, w) (Falcon's x @ w.T)"),
    ("matmul", matmul_weight, "matmul(x, w[K, N]) -> linear(x, w.T[N, K]) (GPT-2's Conv1D)"),
    ("add", linear_plus_bias, "linear(x, w) + b -> linear(x, w, b) for a weight b[N]"),
]
