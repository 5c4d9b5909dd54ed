"""Tests for every op in the registry: type rule vs numpy reference, reference vs torch.

Each op has a table of cases (broadcasting, rank 0, size-1 dims, symbolic shapes
evaluated at several symbol values; f32, f16, i64, bool where valid). The torch
functions here are the independent reference; bad inputs must raise VerificationError.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.ir.errors import VerificationError
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.ops import OPS, complete_attrs, concrete_attrs, get_op, infer_types
from kiln.ir.symbolic import SymExpr, sym
from kiln.ir.types import (DTYPES, TensorType, dtype_of_numpy, numpy_dtype, parse_type, promote)

b, s = sym("b"), sym("s")
ENVS = [{"b": 1, "s": 1}, {"b": 2, "s": 3}, {"b": 3, "s": 5}]
TORCH_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8,
                "u8": torch.uint8, "bool": torch.bool}
TOLERANCE = {"f64": 1e-12, "f32": 1e-6, "f16": 2e-3}


# input generators ----------------------------------------------------------------
def default_values(rng, shape, dtype):
    if dtype in TOLERANCE:
        return rng.standard_normal(shape).astype(numpy_dtype(dtype))
    if dtype == "bool":
        return rng.random(shape) < 0.5
    return rng.integers(-5, 6, shape).astype(numpy_dtype(dtype))


def positive(rng, shape, dtype):
    return (np.abs(rng.standard_normal(shape)) + 0.2).astype(numpy_dtype(dtype))


def nonzero(rng, shape, dtype):
    x = rng.standard_normal(shape)
    return (np.sign(x) * (np.abs(x) + 0.3) + (x == 0)).astype(numpy_dtype(dtype))


def ints(lo, hi):
    return lambda rng, shape, dtype: rng.integers(lo, hi, shape).astype(numpy_dtype(dtype))


def scaled(scale):
    return lambda rng, shape, dtype: (rng.standard_normal(shape) * scale).astype(numpy_dtype(dtype))


def with_zeros(rng, shape, dtype):
    return rng.choice(np.array([0.0, 1.5, -2.0, 0.25, -0.0, 7.75]), shape).astype(numpy_dtype(dtype))


def bool_mask(rng, shape, dtype):
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True  # every query row keeps at least one key, so no row is all -inf
    return mask


@dataclass
class Case:
    op: str
    inputs: list  # (dtype, shape) or (dtype, shape, generator)
    attrs: dict = field(default_factory=dict)
    torch_fn: Callable | None = None  # (torch inputs, concrete attrs) -> tensor; None: the op's default
    symbolic: bool = False

    @property
    def name(self) -> str:
        ins = ",".join(f"{i[0]}[{','.join(map(str, i[1]))}]" for i in self.inputs)
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.op}({ins}){{{attrs}}}".replace(" ", "")


# torch references ---------------------------------------------------------------
def _index_torch(t, a):
    return t[0][(slice(None),) * a["axis"] + tuple(t[1:])]


def _slice_torch(t, a):
    return t[0][(slice(None),) * (a["axis"] % t[0].dim()) + (slice(a["start"], a["end"], a["step"]),)]


def _sdpa_torch(t, a):
    mask = t[3] if len(t) == 4 else None
    return F.scaled_dot_product_attention(t[0], t[1], t[2], attn_mask=mask, is_causal=a["is_causal"],
                                          scale=a["scale"], enable_gqa=a["enable_gqa"])


def _promoted(fn):
    """Torch lets a 0-d tensor lose to a dimensioned one in promotion; kiln's rule ignores rank,
    so mixed-dtype operands are first brought to torch.promote_types of the two."""

    def call(t, a):
        dtype = torch.promote_types(t[0].dtype, t[1].dtype)
        return fn(t[0].to(dtype), t[1].to(dtype))

    return call


TORCH = {
    "add": _promoted(torch.add),
    "sub": _promoted(torch.sub),
    "mul": _promoted(torch.mul),
    "div": _promoted(torch.div),
    "pow": _promoted(torch.pow),
    "maximum": _promoted(torch.maximum),
    "minimum": _promoted(torch.minimum),
    "eq": _promoted(torch.eq),
    "ne": _promoted(torch.ne),
    "lt": _promoted(torch.lt),
    "le": _promoted(torch.le),
    "gt": _promoted(torch.gt),
    "ge": _promoted(torch.ge),
    "and": lambda t, a: torch.logical_and(t[0], t[1]),
    "or": lambda t, a: torch.logical_or(t[0], t[1]),
    "neg": lambda t, a: torch.neg(t[0]),
    "exp": lambda t, a: torch.exp(t[0]),
    "log": lambda t, a: torch.log(t[0]),
    "sqrt": lambda t, a: torch.sqrt(t[0]),
    "rsqrt": lambda t, a: torch.rsqrt(t[0]),
    "reciprocal": lambda t, a: torch.reciprocal(t[0]),
    "sin": lambda t, a: torch.sin(t[0]),
    "cos": lambda t, a: torch.cos(t[0]),
    "tanh": lambda t, a: torch.tanh(t[0]),
    "abs": lambda t, a: torch.abs(t[0]),
    "erf": lambda t, a: torch.erf(t[0]),
    "sigmoid": lambda t, a: torch.sigmoid(t[0]),
    "silu": lambda t, a: F.silu(t[0]),
    "relu": lambda t, a: F.relu(t[0]),
    "not": lambda t, a: torch.logical_not(t[0]),
    "gelu": lambda t, a: F.gelu(t[0], approximate=a["approximate"]),
    "cast": lambda t, a: t[0].to(TORCH_DTYPES[a["dtype"]]),
    "where": lambda t, a: torch.where(t[0], *[x.to(torch.promote_types(t[1].dtype, t[2].dtype)) for x in t[1:]]),
    "constant": lambda t, a: torch.tensor(a["value"], dtype=TORCH_DTYPES[a["dtype"]]),
    "full": lambda t, a: torch.full(tuple(a["shape"]), a["value"], dtype=TORCH_DTYPES[a["dtype"]]),
    "arange": lambda t, a: torch.arange(a["start"], a["end"], a["step"], dtype=TORCH_DTYPES[a["dtype"]]),
    "sum": lambda t, a: torch.sum(t[0], dim=a["axes"], keepdim=a["keepdims"]),
    "mean": lambda t, a: torch.mean(t[0], dim=a["axes"], keepdim=a["keepdims"]),
    "max": lambda t, a: torch.amax(t[0], dim=a["axes"], keepdim=a["keepdims"]),
    "min": lambda t, a: torch.amin(t[0], dim=a["axes"], keepdim=a["keepdims"]),
    "softmax": lambda t, a: torch.softmax(t[0], dim=a["axis"]),
    "cumsum": lambda t, a: torch.cumsum(t[0], dim=a["axis"], dtype=TORCH_DTYPES[a["dtype"]]),
    "reshape": lambda t, a: torch.reshape(t[0], a["shape"]),
    "permute": lambda t, a: torch.permute(t[0], a["perm"]),
    "expand": lambda t, a: t[0].expand(a["shape"]),
    "slice": _slice_torch,
    "concat": lambda t, a: torch.cat(t, dim=a["axis"]),
    "index": _index_torch,
    "select_rows": lambda t, a: torch.index_select(t[0], 1, t[1]),
    "embedding": lambda t, a: F.embedding(t[1], t[0]),
    "matmul": lambda t, a: torch.matmul(t[0], t[1]),
    "linear": lambda t, a: F.linear(*t),
    "layer_norm": lambda t, a: F.layer_norm(t[0], (t[0].shape[-1],), t[1], t[2], eps=a["eps"]),
    "sdpa": _sdpa_torch,
}


# the case table ---------------------------------------------------------------------
CASES: list[Case] = []


def add(op, inputs, attrs=None, torch_fn=None):
    symbolic = any(isinstance(d, SymExpr) for spec in inputs for d in spec[1]) or \
        any(_has_sym(v) for v in (attrs or {}).values())
    CASES.append(Case(op, inputs, dict(attrs or {}), torch_fn, symbolic))


def _has_sym(v):
    return isinstance(v, SymExpr) or (isinstance(v, (tuple, list)) and any(_has_sym(x) for x in v))


SHAPE_PAIRS = [((2, 3), (2, 3)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((4, 1), ()), ((), ()),
               ((1,), (5,)), ((1, 1), (1, 1)), ((b, s, 4), (s, 1)), ((b, 1), (1, s))]
FEW_PAIRS = [((2, 3), (2, 3)), ((3, 1), (1, 4)), ((), (2,))]

BINARY_DTYPES = {
    "add": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("f32", "i64"), ("bool", "bool"), ("bool", "f32")],
    "sub": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("i64", "f32")],
    "mul": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("f32", "i64"), ("bool", "bool")],
    "div": [("f32", "f32"), ("f16", "f16"), ("f32", "f16")],
    "pow": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("f32", "i64")],
    "maximum": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("f32", "i64"), ("bool", "bool")],
    "minimum": [("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("i64", "f32"), ("bool", "bool")],
}
for _op, _pairs in BINARY_DTYPES.items():
    for _i, (_da, _db) in enumerate(_pairs):
        for _sa, _sb in SHAPE_PAIRS if _i == 0 else FEW_PAIRS:
            ga = gb = None
            if _op == "div":
                gb = nonzero
            if _op == "pow":
                ga = positive if _da != "i64" else ints(-3, 4)
                gb = ints(0, 4) if _db == "i64" else None
            add(_op, [(_da, _sa, ga), (_db, _sb, gb)])

for _op in ["eq", "ne", "lt", "le", "gt", "ge"]:
    for _i, (_da, _db) in enumerate([("f32", "f32"), ("f16", "f16"), ("i64", "i64"), ("bool", "bool"),
                                     ("f32", "i64")]):
        for _sa, _sb in SHAPE_PAIRS if _i == 0 else FEW_PAIRS:
            # few distinct values, so equal pairs occur
            gens = [with_zeros if dt in ("f16", "f32") else ints(-2, 3) if dt == "i64" else None for dt in (_da, _db)]
            add(_op, [(_da, _sa, gens[0]), (_db, _sb, gens[1])])

for _op in ["and", "or"]:
    for _sa, _sb in SHAPE_PAIRS:
        add(_op, [("bool", _sa), ("bool", _sb)])

UNARY_SHAPES = [(2, 3), (), (1, 4, 1), (s, 3), (b, 1, s)]
UNARY_GEN = {"log": positive, "sqrt": positive, "rsqrt": positive, "reciprocal": nonzero, "exp": scaled(2.0),
             "erf": scaled(1.5)}
for _op in ["neg", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "abs", "erf",
            "sigmoid", "silu", "relu"]:
    for _shape in UNARY_SHAPES:
        add(_op, [("f32", _shape, UNARY_GEN.get(_op))])
    add(_op, [("f16", (2, 3), UNARY_GEN.get(_op))])
    add(_op, [("f16", (), UNARY_GEN.get(_op))])
for _op in ["neg", "abs", "relu"]:
    for _shape in [(2, 3), ()]:
        add(_op, [("i64", _shape)])
for _shape in UNARY_SHAPES:
    add("not", [("bool", _shape)])

for _approx in ["none", "tanh"]:
    for _shape in [(2, 3), (), (1, 5), (b, s)]:
        add("gelu", [("f32", _shape, scaled(3.0))], {"approximate": _approx})
    add("gelu", [("f16", (4, 3), scaled(3.0))], {"approximate": _approx})
add("gelu", [("f32", (7,), scaled(3.0))])  # default approximate="none"

for _src, _dst, _gen in [("f32", "i64", scaled(10.0)), ("f32", "f16", None), ("f32", "bool", with_zeros),
                         ("f16", "f32", None), ("f16", "i64", scaled(10.0)), ("i64", "f32", None),
                         ("i64", "f16", None), ("i64", "bool", ints(-1, 2)), ("bool", "i64", None),
                         ("bool", "f32", None), ("f32", "f32", None), ("f32", "f64", None), ("i64", "i32", None)]:
    for _shape in [(2, 3), ()]:
        add("cast", [(_src, _shape, _gen)], {"dtype": _dst})
add("cast", [("f32", (b, s))], {"dtype": "f16"})

WHERE_SHAPES = [((2, 3), (2, 3), (2, 3)), ((2, 1), (3,), ()), ((), (2, 2), (1,)), ((), (), ()),
                ((b, s), (s,), (b, 1))]
for _i, (_da, _db) in enumerate([("f32", "f32"), ("f32", "i64"), ("i64", "i64"), ("f16", "f16"), ("bool", "bool")]):
    for _shapes in WHERE_SHAPES if _i == 0 else WHERE_SHAPES[:2]:
        add("where", [("bool", _shapes[0]), (_da, _shapes[1]), (_db, _shapes[2])])

for _value, _dtype in [(1.5, "f32"), (-7, "i64"), (True, "bool"), (0.1 + 0.2, "f32"), (1e-06, "f16"),
                       (-math.inf, "f32"), (3, "f32"), (2**40, "i64")]:
    add("constant", [], {"value": _value, "dtype": _dtype})

for _shape, _value, _dtype in [((2, 3), 0.5, "f32"), ((), 4, "i64"), ((1, 4, 1), False, "bool"),
                               ((b, 4), -1.25, "f16"), ((s, b, 1), -math.inf, "f32"), ((0, 3), 1.0, "f32")]:
    add("full", [], {"shape": _shape, "value": _value, "dtype": _dtype})

for _attrs in [{"end": 5}, {"start": 2, "end": 11, "step": 3}, {"start": 5, "end": 0, "step": -2},
               {"start": -3, "end": 4, "dtype": "f32"}, {"start": 1, "end": s + 1}, {"end": s, "dtype": "i32"},
               {"start": s, "end": 2 * s}, {"start": 4, "end": 4}, {"start": 0, "end": 10, "step": 4}]:
    add("arange", [], _attrs)

for _op, _dtypes in [("sum", ["f32", "f16", "i64", "bool"]), ("mean", ["f32", "f16"]),
                     ("max", ["f32", "f16", "i64", "bool"]), ("min", ["f32", "i64", "bool"])]:
    for _i, _dtype in enumerate(_dtypes):
        shapes_axes = [((2, 3, 4), (0,)), ((2, 3, 4), (-1,)), ((2, 3, 4), (0, 2)), ((2, 3, 4), (1, -1)),
                       ((5,), (0,)), ((1, 3), (0,)), ((b, s, 4), (1,)), ((b, s), (0, 1))]
        for _shape, _axes in shapes_axes if _i == 0 else shapes_axes[:3]:
            for _keep in [False, True]:
                add(_op, [(_dtype, _shape)], {"axes": _axes, "keepdims": _keep})

for _shape, _axis in [((2, 3, 4), -1), ((2, 3, 4), 0), ((2, 3, 4), 1), ((5,), 0), ((1, 1), -1), ((b, s, 3), 1)]:
    add("softmax", [("f32", _shape, scaled(3.0))], {"axis": _axis})
add("softmax", [("f16", (3, 7), scaled(3.0))], {"axis": -1})
add("softmax", [("f32", (2, 6))])  # default axis=-1

for _src, _dst, _shape, _axis in [("f32", "f32", (2, 3, 4), 1), ("f32", "f32", (5,), 0), ("f32", "f32", (b, s), -1),
                                  ("i64", "i64", (3, 4), 0), ("bool", "i64", (2, 5), 1), ("f32", "f64", (4, 3), 0),
                                  ("f16", "f16", (2, 4), 1), ("i64", "f32", (6,), 0)]:
    add("cumsum", [(_src, _shape)], {"axis": _axis, "dtype": _dst})

for _shape, _new in [((2, 3, 4), (6, 4)), ((2, 3, 4), (24,)), ((), (1, 1)), ((1,), ()), ((4, 6), (2, 2, 3, 2)),
                     ((b, s, 4), (b * s, 4)), ((b * s, 4), (b, s, 2, 2)), ((b, s), (s, b)), ((0, 3), (3, 0))]:
    add("reshape", [("f32", _shape)], {"shape": _new})
add("reshape", [("i64", (2, 3))], {"shape": (3, 2)})
add("reshape", [("bool", (2, 3))], {"shape": (6,)})

for _shape, _perm in [((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (0, 1, 2)), ((5,), (0,)), ((), ()), ((1, 3), (1, 0)),
                      ((b, s, 2, 4), (0, 2, 1, 3))]:
    add("permute", [("f32", _shape)], {"perm": _perm})
add("permute", [("i64", (2, 3))], {"perm": (1, 0)})

for _shape, _new in [((3, 1), (2, 3, 4)), ((), (2, 2)), ((1,), (5,)), ((2, 3), (2, 3)), ((1, s), (b, 4, s)),
                     ((b, 1, 4), (b, s, 4)), ((), ())]:
    add("expand", [("f32", _shape)], {"shape": _new})
add("expand", [("bool", (1, 3))], {"shape": (2, 3)})

for _shape, _attrs in [((5, 6), {"axis": 1, "start": 1, "end": 4}), ((5, 6), {"axis": 0, "end": 5, "step": 2}),
                       ((5, 6), {"axis": -1, "start": 2, "end": 2}),
                       ((7,), {"axis": 0, "start": 1, "end": 7, "step": 3}),
                       ((1, 4), {"axis": 0, "end": 1}), ((b, s), {"axis": 1, "end": s}),
                       ((b, s, 3), {"axis": 1, "start": 1, "end": s}), ((s, 4), {"axis": 0, "end": s - 1}),
                       ((b, 2 * s), {"axis": 1, "start": s, "end": 2 * s})]:
    add("slice", [("f32", _shape)], _attrs)
add("slice", [("i64", (4, 3))], {"axis": 0, "start": 1, "end": 3})

for _inputs, _axis in [([(2, 3), (2, 4)], 1), ([(2, 3), (1, 3), (4, 3)], 0), ([(3,)], 0), ([(2, 3), (2, 3)], -1),
                       ([(b, s, 4), (b, 3, 4)], 1), ([(s, 2), (s, 2)], 0)]:
    add("concat", [("f32", shape) for shape in _inputs], {"axis": _axis})
add("concat", [("i64", (2,)), ("i64", (3,))], {"axis": 0})
add("concat", [("bool", (1, 2)), ("bool", (1, 2))], {"axis": 0})

for _x, _idx, _axis in [((5, 4), [("i64", (3,))], 0), ((5, 4), [("i64", ())], 0), ((5, 4), [("i32", (2, 3))], 0),
                        ((4, 5, 6), [("i64", (2, 1)), ("i64", (3,))], 1), ((4, 5, 6), [("i64", (2,))], 2),
                        ((5, 5), [("i64", (4,)), ("i64", (4,))], 0), ((b, 5, 4), [("i64", (s,))], 1)]:
    add("index", [("f32", _x)] + [(dt, shape, ints(-4, 4)) for dt, shape in _idx], {"axis": _axis})
add("index", [("i64", (6,)), ("i64", (2, 2), ints(0, 6))])  # default axis=0


def fixed(values):
    """A generator that ignores the rng: these exact values (an index list, a page table)."""
    return lambda rng, shape, dtype: np.asarray(values, dtype=numpy_dtype(dtype)).reshape(shape)


# select_rows: the step's logit rows (the last token of each sequence, every token for perplexity, repeats, none)
for _x, _rows, _dtype in [((1, 6, 5), [5, 2], "f32"), ((1, 4, 3), [3, 3, 0, 1], "f32"), ((1, 4, 3), [], "f32"),
                          ((1, 5, 2, 3), [4], "f32"), ((1, 3, 8), [2, 0], "f16"), ((1, 4, 3), [1, 2], "i64")]:
    add("select_rows", [(_dtype, _x), ("i64", (len(_rows),), fixed(_rows))])
add("select_rows", [("f32", (1, s, 7)), ("i64", (s,), lambda rng, shape, dtype: np.arange(shape[0])[::-1].copy())])

for _table, _ids, _dtype in [((10, 4), (2, 3), "i64"), ((10, 4), (), "i64"), ((7, 3), (5,), "i32"),
                             ((10, 4), (b, s), "i64")]:
    add("embedding", [("f32", _table), (_dtype, _ids, ints(0, _table[0]))])
# F.embedding wants a 2-D table; row gathering from a rank-3 table is plain indexing
add("embedding", [("f32", (6, 2, 3)), ("i64", (4,), ints(0, 6))], torch_fn=lambda t, a: t[0][t[1]])
add("embedding", [("f16", (8, 4)), ("i64", (3,), ints(0, 8))])

for _sa, _sb, _da, _db in [((2, 3), (3, 4), "f32", "f32"), ((2, 1, 3, 4), (5, 4, 2), "f32", "f32"),
                           ((1, 5), (5, 1), "f32", "f32"), ((b, s, 8), (8, 3), "f32", "f32"),
                           ((b, 2, s, 4), (b, 2, 4, s), "f32", "f32"), ((3, 4), (4, 2), "f16", "f16"),
                           ((3, 4), (4, 2), "i64", "i64")]:
    add("matmul", [(_da, _sa), (_db, _sb)])
# torch refuses mixed dtypes; the reference promotes, so compare with promoted torch inputs
add("matmul", [("f16", (2, 3)), ("f32", (3, 2))], torch_fn=lambda t, a: torch.matmul(t[0].float(), t[1]))

for _x, _n, _bias in [((2, 3, 4), 5, True), ((2, 3, 4), 5, False), ((4,), 3, True), ((b, s, 8), 6, True),
                      ((1, 1, 1), 2, False)]:
    k_dim = _x[-1]
    add("linear", [("f32", _x), ("f32", (_n, k_dim))] + ([("f32", (_n,))] if _bias else []))
add("linear", [("f16", (3, 8)), ("f16", (4, 8)), ("f16", (4,))])

for _x, _eps in [((2, 3, 8), 1e-5), ((5,), 1e-6), ((b, s, 4), 1e-5), ((1, 16), 0.1)]:
    add("layer_norm", [("f32", _x, scaled(2.0)), ("f32", (_x[-1],)), ("f32", (_x[-1],))], {"eps": _eps})
add("layer_norm", [("f16", (3, 8)), ("f16", (8,)), ("f16", (8,))], {"eps": 1e-5})

QKV = [("f32", (2, 4, 5, 8)), ("f32", (2, 4, 5, 8)), ("f32", (2, 4, 5, 8))]
add("sdpa", QKV)
add("sdpa", QKV, {"is_causal": True})
add("sdpa", QKV, {"scale": 0.3})
add("sdpa", [("f32", (2, 4, 3, 8)), ("f32", (2, 4, 6, 8)), ("f32", (2, 4, 6, 8))], {"is_causal": True})
add("sdpa", [("f32", (2, 4, 3, 8)), ("f32", (2, 4, 6, 8)), ("f32", (2, 4, 6, 5))])
add("sdpa", [("f32", (4, 5, 8)), ("f32", (4, 5, 8)), ("f32", (4, 5, 8))], {"is_causal": True})
add("sdpa", QKV + [("bool", (5, 5), bool_mask)])
add("sdpa", QKV + [("bool", (2, 1, 5, 5), bool_mask)])
add("sdpa", QKV + [("f32", (2, 4, 5, 5))])
add("sdpa", QKV + [("f32", (1, 5))])
add("sdpa", [("f32", (1, 8, 5, 16)), ("f32", (1, 2, 5, 16)), ("f32", (1, 2, 5, 16))], {"enable_gqa": True})
add("sdpa", [("f32", (2, 6, 4, 8)), ("f32", (2, 3, 7, 8)), ("f32", (2, 3, 7, 8))],
    {"enable_gqa": True, "is_causal": True})
add("sdpa", [("f32", (1, 4, 5, 8)), ("f32", (1, 2, 5, 8)), ("f32", (1, 2, 5, 8)), ("bool", (5, 5), bool_mask)],
    {"enable_gqa": True})
add("sdpa", [("f32", (b, 2, s, 8)), ("f32", (b, 2, s, 8)), ("f32", (b, 2, s, 8))], {"is_causal": True})
add("sdpa", [("f32", (b, 4, s, 8)), ("f32", (b, 2, s, 8)), ("f32", (b, 2, s, 8)), ("f32", (b, 1, s, s))],
    {"enable_gqa": True, "scale": 0.125})
add("sdpa", [("f32", (2, 4, 5, 8)), ("f32", (2, 1, 5, 8)), ("f32", (2, 1, 5, 8))], {"is_causal": True})
add("sdpa", [("f32", (2, 4, 5, 8)), ("f32", (1, 4, 5, 8)), ("f32", (1, 4, 5, 8))])
add("sdpa", [("f16", (1, 2, 4, 8)), ("f16", (1, 2, 4, 8)), ("f16", (1, 2, 4, 8))], {"is_causal": True})

# fused LLM ops -------------------------------------------------------------------------
def _rms_norm_torch(x, w, eps):
    # Llama's RMSNorm: float32 statistics, normalised value cast back before the weight
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * normed.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope_torch(t, a):
    x, positions, inv_freq = t
    rd = a["rotary_dim"]
    freqs = positions.float()[..., None] * inv_freq.float()[None, None, :]
    if a.get("interleaved"):  # GPT-J / Cohere: tables repeat_interleave'd, pairs (2i, 2i + 1) rotated
        emb = torch.repeat_interleave(freqs, 2, dim=-1)
        cos = (emb.cos() * a["scaling"]).to(x.dtype).unsqueeze(1 if a["seq_axis"] == 2 else 2)
        sin = (emb.sin() * a["scaling"]).to(x.dtype).unsqueeze(1 if a["seq_axis"] == 2 else 2)
        rot, rest = x[..., :rd], x[..., rd:]
        every_two = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
        return torch.cat([rot * cos + every_two * sin, rest], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * a["scaling"]).to(x.dtype).unsqueeze(1 if a["seq_axis"] == 2 else 2)
    sin = (emb.sin() * a["scaling"]).to(x.dtype).unsqueeze(1 if a["seq_axis"] == 2 else 2)
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)


def _gated_mlp_torch(t, a):
    x, wg, wu, wd = t
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[a["activation"]]
    return F.linear(act(F.linear(x, wg)) * F.linear(x, wu), wd)


def _window_mask(query_pos, key_pos, window):
    visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] >= 0)
    if window is not None:
        visible &= (query_pos[:, None] - key_pos[None, :]) < window
    return visible


def _attention_torch(t, a):
    q, k, v = t
    pos = torch.arange(q.shape[2])
    mask = _window_mask(pos, pos, a["window"])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a["scale"], enable_gqa=True)


def _paged_attention_torch(t, a):
    """Scatter every token's K/V into its sequence's page, then per sequence gather its history 0..max position
    from the pools and attend with torch SDPA under a causal (windowed) mask built from the positions."""
    q, k, v, k_pool, v_pool, page_table, positions, token_seq = t
    index, page_size = a["index"], k_pool.shape[3]
    k_pool, v_pool = k_pool.clone(), v_pool.clone()
    pos, seqs = positions[0].long(), token_seq.long()
    pages = page_table.long()[seqs, pos // page_size]
    k_pool[index, pages, :, pos % page_size, :] = k[0].transpose(0, 1)  # [T, Hkv, D] at [pages, :, offsets]
    v_pool[index, pages, :, pos % page_size, :] = v[0].transpose(0, 1)
    out = torch.zeros((1, q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype)
    for seq in torch.unique(seqs).tolist():
        rows = torch.nonzero(seqs == seq).flatten()
        history = torch.arange(int(pos[rows].max()) + 1)
        hist_pages = page_table.long()[seq, history // page_size]
        keys = k_pool[index, hist_pages, :, history % page_size, :].transpose(0, 1)  # [Hkv, L, D]
        values = v_pool[index, hist_pages, :, history % page_size, :].transpose(0, 1)
        mask = _window_mask(pos[rows], history, a["window"])
        attended = F.scaled_dot_product_attention(q[0][:, rows][None], keys[None], values[None],
                                                  attn_mask=mask[None, None], scale=a["scale"], enable_gqa=True)
        out[0][:, rows] = attended[0]
    return [out, k_pool, v_pool]


def inv_freq_values(rng, shape, dtype):
    return (10000.0 ** (-np.arange(shape[0]) * 2.0 / (2 * shape[0]))).astype(numpy_dtype(dtype))


for _x, _dtype in [((2, 3, 8), "f32"), ((5,), "f32"), ((b, s, 16), "f32"), ((1, 1, 4), "f32"), ((3, 8), "f16")]:
    add("rms_norm", [(_dtype, _x, scaled(3.0)), (_dtype, (_x[-1],))], {"eps": 1e-6},
        torch_fn=lambda t, a: _rms_norm_torch(t[0], t[1], a["eps"]))
for _x, _r, _dtype in [((2, 3, 8), (2, 3, 8), "f32"), ((2, 3, 8), (3, 8), "f32"), ((b, s, 8), (b, s, 8), "f32"),
                       ((4, 8), (4, 8), "f16")]:
    add("add_rms_norm", [(_dtype, _x), (_dtype, _r), (_dtype, (_x[-1],))], {"eps": 1e-5},
        torch_fn=lambda t, a: [t[0] + t[1], _rms_norm_torch(t[0] + t[1], t[2], a["eps"])])

for _x, _pos, _attrs, _dtype in [
        ((2, 4, 5, 16), (2, 5), {"rotary_dim": 16}, "f32"),
        ((2, 4, 5, 16), (1, 5), {"rotary_dim": 8}, "f32"),
        ((2, 5, 4, 16), (2, 5), {"rotary_dim": 16, "seq_axis": 1}, "f32"),
        ((1, 2, 3, 8), (1, 3), {"rotary_dim": 8, "scaling": 0.75}, "f32"),
        ((b, 2, s, 8), (b, s), {"rotary_dim": 4}, "f32"),
        ((b, s, 2, 8), (1, s), {"rotary_dim": 8, "seq_axis": 1}, "f32"),
        ((1, 2, 4, 8), (1, 4), {"rotary_dim": 8}, "f16"),
        ((2, 4, 5, 16), (2, 5), {"rotary_dim": 16, "interleaved": True}, "f32"),
        ((2, 5, 4, 16), (1, 5), {"rotary_dim": 8, "seq_axis": 1, "interleaved": True}, "f32")]:
    add("rope", [(_dtype, _x), ("i64", _pos, ints(0, 2000)), ("f32", (_attrs["rotary_dim"] // 2,), inv_freq_values)],
        _attrs, torch_fn=_rope_torch)
add("rope", [("f32", (1, 2, 3, 8)), ("i32", (1, 3), ints(0, 50)), ("f32", (4,), inv_freq_values)],
    {"rotary_dim": 8}, torch_fn=_rope_torch)

for _x, _inter, _out, _act, _dtype in [((2, 3, 8), 12, 8, "silu", "f32"), ((4, 8), 6, 5, "gelu", "f32"),
                                       ((b, s, 8), 10, 8, "gelu_tanh", "f32"), ((8,), 4, 3, "silu", "f32"),
                                       ((3, 8), 12, 8, "silu", "f16")]:
    _hidden = _x[-1]
    add("gated_mlp", [(_dtype, _x), (_dtype, (_inter, _hidden), scaled(0.5)),
                      (_dtype, (_inter, _hidden), scaled(0.5)), (_dtype, (_out, _inter), scaled(0.5))],
        {"activation": _act}, torch_fn=_gated_mlp_torch)

for _q, _kv, _window, _dtype in [((2, 4, 5, 8), (2, 2, 5, 8), None, "f32"), ((1, 4, 6, 8), (1, 4, 6, 8), None, "f32"),
                                 ((2, 6, 7, 8), (2, 2, 7, 8), 3, "f32"), ((1, 2, 4, 8), (1, 1, 4, 8), 1, "f32"),
                                 ((b, 4, s, 8), (b, 2, s, 8), None, "f32"), ((b, 2, s, 8), (b, 1, s, 8), 2, "f32"),
                                 ((1, 4, 5, 8), (1, 2, 5, 8), None, "f16")]:
    add("attention", [(_dtype, _q), (_dtype, _kv), (_dtype, _kv)],
        {"num_heads": _q[1], "num_kv_heads": _kv[1], "scale": 1 / math.sqrt(_q[3]), "window": _window},
        torch_fn=_attention_torch)


# One ragged step: (heads, kv heads, head dim, v head dim, pool layers, pages, page size, page table
# [seqs, pages_per_seq], token_seq [T], positions [T], index, window, dtype). The pools start random, so a
# sequence whose first new position is p > 0 attends over p cached tokens it did not write in this step.
PAGED = [
    # GQA prefill of one sequence from 0, crossing pages out of order
    (4, 2, 8, 8, 2, 6, 4, [[3, 0, 5]], [0] * 6, [0, 1, 2, 3, 4, 5], 1, None, "f32"),
    # MQA decode of three sequences, with 9, 0 and 5 cached tokens; the page table's rows not in page order
    (4, 1, 8, 8, 1, 10, 4, [[6, 1, 3], [0, 7, 4], [2, 8, 9]], [0, 1, 2], [9, 0, 5], 0, None, "f32"),
    # a chunk continuing a cached prefix (positions 5..7) beside a decode, under a sliding window of 3
    (2, 2, 8, 8, 3, 8, 4, [[5, 2, 0], [1, 4, 3]], [0, 0, 0, 1], [5, 6, 7, 9], 2, 3, "f32"),
    # interleaved sequences in one flat batch: 1 continues after 4 cached tokens, 0 prefills, 2 decodes,
    # row 3 of the page table is unused; V's head size differs from K's
    (6, 2, 8, 4, 2, 12, 2, [[4, 9, 0, 2], [7, 1, 11, 5], [3, 8, 6, 10], [0, 1, 2, 3]], [1, 0, 1, 0, 2, 1],
     [4, 0, 5, 1, 7, 6], 0, None, "f32"),
    # a window of 1: each token sees only itself
    (2, 1, 8, 8, 1, 4, 4, [[2, 0], [3, 1]], [1, 0, 1], [3, 6, 4], 0, 1, "f32"),
    # one token that starts a page of its own (position 4 of page size 4)
    (4, 2, 8, 8, 1, 4, 4, [[1, 3]], [0], [4], 0, None, "f32"),
    (4, 2, 8, 8, 2, 6, 4, [[5, 1], [0, 3]], [0, 1, 1, 0], [2, 0, 1, 3], 1, 2, "f16"),
]
for (_h, _hkv, _d, _dv, _layers, _pages, _ps, _table, _seq, _pos, _index, _window, _dtype) in PAGED:
    _t = len(_seq)
    add("paged_attention",
        [(_dtype, (1, _h, _t, _d)), (_dtype, (1, _hkv, _t, _d)), (_dtype, (1, _hkv, _t, _dv)),
         (_dtype, (_layers, _pages, _hkv, _ps, _d)), (_dtype, (_layers, _pages, _hkv, _ps, _dv)),
         ("i32", (len(_table), len(_table[0])), fixed(_table)), ("i64", (1, _t), fixed(_pos)),
         ("i32", (_t,), fixed(_seq))],
        {"num_heads": _h, "num_kv_heads": _hkv, "scale": 1 / math.sqrt(_d), "window": _window, "layer": 5 + _index,
         "index": _index},
        torch_fn=_paged_attention_torch)
# symbolic: s tokens of sequence 0 after 2 cached ones, b rows in the page table (distinct pages per row)
add("paged_attention",
    [("f32", (1, 4, s, 8)), ("f32", (1, 2, s, 8)), ("f32", (1, 2, s, 8)), ("f32", (2, 8, 2, 4, 8)),
     ("f32", (2, 8, 2, 4, 8)),
     ("i32", (b, 2), lambda rng, shape, dtype: rng.permutation(8)[:shape[0] * shape[1]].reshape(shape)),
     ("i64", (1, s), lambda rng, shape, dtype: (2 + np.arange(shape[1]))[None]),
     ("i32", (s,), lambda rng, shape, dtype: np.zeros(shape, np.int32))],
    {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3, "layer": 1, "index": 1}, torch_fn=_paged_attention_torch)

# ops exercised by dedicated tests below rather than by the table (linear_q and embedding_q: in
# tests/test_quantize.py, references vs a torch dequantize over int8 / int4 / group / offset / f16 cases;
# moe_route and moe_experts: in tests/test_moe.py, references vs transformers' routers and experts; moe_experts_q:
# in tests/test_moe_quant.py, vs a torch dequantize-then-experts over int8 / int4 / GGUF block / mixed cases;
# latent_attention and paged_latent_attention: in tests/test_mla.py, references vs torch's attention over the
# expanded per-head K/V of DeepSeek's up-projections; gated_mlp_q: in tests/test_quantized_gated_mlp.py, its reference
# vs numpy from the formats' definitions, float and int8 activations)
SPECIAL = {"weight", "linear_q", "embedding_q", "moe_route", "moe_experts", "moe_experts_q", "latent_attention",
           "paged_latent_attention", "gated_mlp_q"}


def test_table_covers_every_op():
    covered = {c.op for c in CASES} | SPECIAL
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops without a test case in tests/test_ops.py: {missing}"
    assert not covered - set(OPS)


def _compare(ours: np.ndarray, expected: torch.Tensor, dtype: str):
    theirs = expected.detach().numpy() if expected.dtype != torch.bfloat16 else expected.float().numpy()
    assert tuple(theirs.shape) == tuple(ours.shape)
    assert theirs.dtype == ours.dtype, f"torch gave {theirs.dtype}, reference {ours.dtype}"
    if dtype in TOLERANCE:
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(ours.astype(np.float64), theirs.astype(np.float64), rtol=tol, atol=tol)
    else:
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_op(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    in_types = [TensorType(spec[0], spec[1]) for spec in case.inputs]
    out_types = infer_types(case.op, in_types, case.attrs)
    full_attrs = complete_attrs(get_op(case.op), case.attrs)
    for env in ENVS if case.symbolic else [{}]:
        arrays = []
        for spec, ty in zip(case.inputs, in_types):
            gen = spec[2] if len(spec) > 2 and spec[2] is not None else default_values
            # numpy arithmetic turns 0-d arrays into scalars; the interpreter passes arrays
            arrays.append(np.asarray(gen(rng, ty.concrete(env), spec[0]), dtype=numpy_dtype(spec[0])))
        attrs = concrete_attrs(full_attrs, env)
        outs = OPS[case.op].reference(arrays, attrs)
        # (a) the type rule predicts the reference's output
        assert len(outs) == len(out_types)
        for out, ty in zip(outs, out_types):
            assert isinstance(out, np.ndarray)
            assert tuple(out.shape) == ty.concrete(env), f"rule {ty} at {env}, reference {out.shape}"
            assert dtype_of_numpy(out.dtype) == ty.dtype
        # (b) the reference agrees with torch
        torch_fn = case.torch_fn or TORCH[case.op]
        expected = torch_fn([torch.from_numpy(np.array(a)) for a in arrays], attrs)
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        assert len(expected) == len(outs)
        for out, theirs, ty in zip(outs, expected, out_types):
            _compare(out, theirs, ty.dtype)


def test_weight_op():
    module = Module()
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    module.add_weight("layers.0.w", data)
    module.add_weight("scale", type=TensorType("f16", (4,)))
    assert infer_types("weight", [], {"name": "layers.0.w"}, module) == [TensorType("f32", (3, 4))]
    assert infer_types("weight", [], {"name": "scale"}, module) == [TensorType("f16", (4,))]
    fn = module.add_function("main")
    x = fn.add_param("x", TensorType("f32", (4,)))
    w = fn.emit("weight", name="layers.0.w")
    fn.set_results([fn.emit("add", w, x)])
    xs = np.ones(4, np.float32)
    (out,) = run_function(module, "main", [xs])
    np.testing.assert_array_equal(out, data + xs)
    with pytest.raises(VerificationError, match="op weight: no weight named 'missing'"):
        infer_types("weight", [], {"name": "missing"}, module)
    with pytest.raises(VerificationError, match="op weight: .*needs a module"):
        infer_types("weight", [], {"name": "scale"})


# errors ---------------------------------------------------------------------------
def T(dtype, *shape):
    return TensorType(dtype, shape)


REMOVE = object()  # in the paged_attention error cases: leave this input or attribute out
_PAGED_BASE = dict(q=T("f32", 1, 4, 3, 8), k=T("f32", 1, 2, 3, 8), v=T("f32", 1, 2, 3, 8),
                   k_pool=T("f32", 2, 6, 2, 4, 8), v_pool=T("f32", 2, 6, 2, 4, 8), page_table=T("i32", 2, 3),
                   positions=T("i64", 1, 3), token_seq=T("i32", 3))
_PAGED_ATTRS = {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3, "layer": 0, "index": 0}


def _paged_error(types, attrs):
    types = [t for t in {**_PAGED_BASE, **types}.values() if t is not REMOVE]
    attrs = {k: v for k, v in {**_PAGED_ATTRS, **attrs}.items() if v is not REMOVE}
    return types, attrs


ERROR_CASES = [
    ("add", [T("f32", 2, 3), T("f32", 4)], {}, "cannot broadcast"),
    ("mul", [T("f32", b, 3), T("f32", s, 3)], {}, "cannot broadcast"),
    ("where", [T("bool", 2), T("f32", 3), T("f32", 2)], {}, "cannot broadcast"),
    ("where", [T("f32", 2), T("f32", 2), T("f32", 2)], {}, "condition must be bool"),
    ("add", [T("f32", 2)], {}, "expected 2 inputs, found 1"),
    ("neg", [T("f32", 2), T("f32", 2)], {}, "expected 1 inputs, found 2"),
    ("sdpa", [T("f32", 1, 2, 3, 4)] * 5, {}, "expected 3..4 inputs, found 5"),
    ("concat", [], {"axis": 0}, "expected 1..n inputs, found 0"),
    ("constant", [T("f32", 2)], {"value": 1, "dtype": "f32"}, "expected 0 inputs"),
    ("add", [T("f32", 2), T("f32", 2)], {"alpha": 2}, "unknown attribute"),
    ("reshape", [T("f32", 6)], {}, "missing attribute 'shape'"),
    ("cast", [T("f32", 6)], {}, "missing attribute 'dtype'"),
    ("slice", [T("f32", 6)], {"axis": 0, "end": 2, "stride": 1}, "unknown attribute"),
    ("permute", [T("f32", 2, 3, 4)], {"perm": (0, 0, 1)}, "not a permutation"),
    ("permute", [T("f32", 2, 3, 4)], {"perm": (1, 0)}, "not a permutation"),
    ("permute", [T("f32", 2, 3)], {"perm": (1, 2)}, "not a permutation"),
    ("reshape", [T("f32", 2, 3)], {"shape": (5,)}, "element counts"),
    ("reshape", [T("f32", s, 4)], {"shape": (s, 3)}, "element counts"),
    ("reshape", [T("f32", b, s)], {"shape": (s, s)}, "element counts"),
    ("slice", [T("f32", 5, 6)], {"axis": 1, "start": 2, "end": 7}, "start <= end <= dim"),
    ("slice", [T("f32", 5, 6)], {"axis": 1, "start": 4, "end": 2}, "start <= end <= dim"),
    ("slice", [T("f32", 5, 6)], {"axis": 1, "start": -1, "end": 2}, "start <= end <= dim"),
    ("slice", [T("f32", s)], {"axis": 0, "end": s + 1}, "start <= end <= dim"),
    ("slice", [T("f32", s)], {"axis": 0, "end": 2}, "start <= end <= dim"),
    ("slice", [T("f32", 5)], {"axis": 0, "end": 4, "step": 0}, "step must be >= 1"),
    ("slice", [T("f32", 5)], {"axis": 2, "end": 4}, "axis 2 out of range"),
    ("slice", [T("f32", s)], {"axis": 0, "end": s, "step": 2}, "symbolic bounds need step 1"),
    ("softmax", [T("f32", 2, 3)], {"axis": 2}, "out of range"),
    ("softmax", [T("i64", 2, 3)], {}, "expected a float input"),
    ("sum", [T("f32", 2, 3)], {"axes": (0, 2)}, "out of range"),
    ("mean", [T("i64", 2, 3)], {"axes": (0,)}, "expected a float input"),
    ("cumsum", [T("f32", 2, 3)], {"axis": -3, "dtype": "f32"}, "out of range"),
    ("exp", [T("i64", 2)], {}, "expected a float input"),
    ("sqrt", [T("bool", 2)], {}, "expected a float input"),
    ("not", [T("f32", 2)], {}, "expected a bool input"),
    ("and", [T("f32", 2), T("bool", 2)], {}, "expected bool inputs"),
    ("gelu", [T("f32", 2)], {"approximate": "fast"}, "approximate must be"),
    ("constant", [], {"value": "one", "dtype": "f32"}, "value must be a number"),
    ("arange", [], {"start": 0, "end": s, "step": 2}, "symbolic bounds need step 1"),
    ("arange", [], {"start": 5, "end": 2}, "may be negative"),
    ("arange", [], {"start": s, "end": 3}, "may be negative"),
    ("expand", [T("f32", 2, 3)], {"shape": (3,)}, "cannot expand rank"),
    ("expand", [T("f32", 2, 3)], {"shape": (4, 3)}, "cannot expand"),
    ("expand", [T("f32", s)], {"shape": (b,)}, "cannot expand"),
    ("concat", [T("f32", 2, 3), T("f32", 2, 4)], {"axis": 0}, "differ outside axis"),
    ("concat", [T("f32", 2, 3), T("i64", 2, 3)], {"axis": 0}, "share rank and dtype"),
    ("concat", [T("f32", 2, 3), T("f32", 6)], {"axis": 0}, "share rank and dtype"),
    ("index", [T("f32", 5, 4), T("bool", 5)], {}, "index tensors must be integer"),
    ("index", [T("f32", 5, 4), T("i64", 2), T("i64", 2)], {"axis": 1}, "index tensors from axis 1"),
    ("index", [T("f32", 5, 4), T("i64", 2)], {"axis": -1}, "index tensors from axis -1"),
    ("index", [T("f32", 5, 4, 3), T("i64", 2), T("i64", 3)], {}, "cannot broadcast"),
    ("embedding", [T("f32", 10, 4), T("f32", 3)], {}, "ids must be integer"),
    ("matmul", [T("f32", 3), T("f32", 3, 4)], {}, "rank >= 2"),
    ("matmul", [T("f32", 2, 3), T("f32", 4, 5)], {}, "contraction dims differ"),
    ("matmul", [T("f32", 2, 2, 3), T("f32", 3, 3, 5)], {}, "cannot broadcast"),
    ("matmul", [T("f32", 2, s), T("f32", b, 5)], {}, "contraction dims differ"),
    ("linear", [T("f32", 2, 3), T("f32", 4, 5)], {}, "expected x"),
    ("linear", [T("f32", 2, 3), T("f32", 4, 3), T("f32", 3)], {}, "bias must be"),
    ("linear", [T("f32", 2, 3), T("f32", 2, 4, 3)], {}, "expected x"),
    ("layer_norm", [T("f32", 2, 8), T("f32", 4), T("f32", 8)], {"eps": 1e-5}, "weight and bias"),
    ("layer_norm", [T("f32", 2, 8), T("f32", 8), T("f32", 8)], {}, "missing attribute 'eps'"),
    ("sdpa", [T("f32", 4, 8)] * 3, {}, "rank >= 3"),
    ("sdpa", [T("f32", 1, 2, 4, 8), T("f32", 1, 2, 4, 6), T("f32", 1, 2, 4, 8)], {}, "head dims"),
    ("sdpa", [T("f32", 1, 2, 4, 8), T("f32", 1, 2, 5, 8), T("f32", 1, 2, 6, 8)], {}, "key lengths"),
    ("sdpa", [T("f32", 1, 2, 4, 8)] * 3 + [T("bool", 4, 3)], {}, "cannot broadcast"),
    ("sdpa", [T("f32", 1, 4, 4, 8), T("f32", 1, 2, 4, 8), T("f32", 1, 2, 4, 8)], {}, "leading dims"),
    ("sdpa", [T("f32", 2, 2, 4, 8), T("f32", 3, 2, 4, 8), T("f32", 3, 2, 4, 8)], {}, "leading dims"),
    ("sdpa", [T("f32", 1, 2, 4, 8), T("f32", 1, 2, 4, 8), T("f32", 1, 1, 4, 8)], {}, "leading dims"),
    ("sdpa", [T("f32", 1, 6, 4, 8), T("f32", 1, 4, 4, 8), T("f32", 1, 4, 4, 8)], {"enable_gqa": True},
     "multiple of kv heads"),
    ("div", [T("i64", 2), T("i64", 2)], {}, "expected a float input"),
    ("cast", [T("f32", 2)], {"dtype": "float32"}, "dtype must be one of"),
    ("constant", [], {"value": 1, "dtype": "f99"}, "dtype must be one of"),
    ("full", [], {"shape": (2,), "value": 1, "dtype": "int"}, "dtype must be one of"),
    ("full", [], {"shape": (2, -1), "value": 1, "dtype": "f32"}, "bad dim -1"),
    ("arange", [], {"end": 4, "dtype": "x"}, "dtype must be one of"),
    ("arange", [], {"end": 4, "step": 0}, "step must not be 0"),
    ("cumsum", [T("f32", 2)], {"axis": 0, "dtype": None}, "dtype must be one of"),
    ("reshape", [T("f32", 6)], {"shape": (-2, -3)}, "bad dim -2"),
    ("reshape", [T("f32", 6)], {"shape": (2.0, 3)}, "bad dim 2.0"),
    ("expand", [T("f32", 1)], {"shape": (-1,)}, "bad dim -1"),
    ("linear", [T("f32"), T("f32", 2, 2)], {}, "expected x"),
    ("layer_norm", [T("f32"), T("f32", 1), T("f32", 1)], {"eps": 1e-5}, "rank >= 1"),
    ("rms_norm", [T("f32", 2, 8), T("f32", 4)], {"eps": 1e-6}, "weight must be [8]"),
    ("rms_norm", [T("i64", 2, 8), T("i64", 8)], {"eps": 1e-6}, "expected a float input"),
    ("rms_norm", [T("f32", 2, 8), T("f32", 8)], {}, "missing attribute 'eps'"),
    ("add_rms_norm", [T("f32", 8), T("f32", 2, 8), T("f32", 8)], {"eps": 1e-6}, "must broadcast to x"),
    ("rope", [T("f32", 1, 2, 3, 8), T("i64", 1, 3), T("f32", 3)], {"rotary_dim": 7}, "rotary_dim must be even"),
    ("rope", [T("f32", 1, 2, 3, 8), T("i64", 1, 3), T("f32", 5)], {"rotary_dim": 10}, "rotary_dim must be even"),
    ("rope", [T("f32", 2, 3, 8), T("i64", 1, 3), T("f32", 4)], {"rotary_dim": 8}, "rank 4"),
    ("rope", [T("f32", 1, 2, 3, 8), T("i64", 1, 3), T("f32", 4)], {"rotary_dim": 8, "seq_axis": 3}, "seq_axis"),
    ("rope", [T("f32", 1, 2, 3, 8), T("i64", 1, 3), T("f32", 3)], {"rotary_dim": 8}, "inv_freq must be [4]"),
    ("rope", [T("f32", 1, 2, 3, 8), T("f32", 1, 3), T("f32", 4)], {"rotary_dim": 8}, "positions must be integer"),
    ("rope", [T("f32", 1, 2, 3, 8), T("i64", 1, 4), T("f32", 4)], {"rotary_dim": 8}, "do not match"),
    ("rope", [T("f32", 2, 2, 3, 8), T("i64", 3, 3), T("f32", 4)], {"rotary_dim": 8}, "do not match"),
    ("gated_mlp", [T("f32", 2, 8), T("f32", 4, 8), T("f32", 4, 8), T("f32", 8, 4)], {"activation": "relu"},
     "activation must be"),
    ("gated_mlp", [T("f32", 2, 8), T("f32", 4, 8), T("f32", 5, 8), T("f32", 8, 4)], {"activation": "silu"},
     "expected w_gate/w_up"),
    ("gated_mlp", [T("f32", 2, 8), T("f32", 4, 8), T("f32", 4, 8), T("f32", 8, 5)], {"activation": "silu"},
     "expected w_gate/w_up"),
    ("attention", [T("f32", 1, 4, 3, 8), T("f32", 1, 2, 3, 8), T("f32", 1, 2, 3, 8)],
     {"num_heads": 4, "num_kv_heads": 4, "scale": 0.3}, "head counts"),
    ("attention", [T("f32", 1, 6, 3, 8), T("f32", 1, 4, 3, 8), T("f32", 1, 4, 3, 8)],
     {"num_heads": 6, "num_kv_heads": 4, "scale": 0.3}, "must be a multiple"),
    ("attention", [T("f32", 1, 4, 3, 8), T("f32", 1, 2, 3, 8), T("f32", 1, 2, 3, 8)],
     {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3, "window": 0}, "window must be"),
    ("attention", [T("f32", 1, 4, 3, 8), T("f32", 1, 2, 4, 8), T("f32", 1, 2, 4, 8)],
     {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3}, "share batch and seq"),
    ("attention", [T("f32", 1, 4, 3, 8), T("f32", 1, 2, 3, 6), T("f32", 1, 2, 3, 8)],
     {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3}, "head dims differ"),
    ("attention", [T("f32", 4, 3, 8), T("f32", 2, 3, 8), T("f32", 2, 3, 8)],
     {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3}, "rank-4"),
] + [("paged_attention", *_paged_error(types, attrs), message) for types, attrs, message in [
    # each from a valid step (3 tokens, 2 sequences, pools of 2 layers x 6 pages x page size 4) with one thing wrong
    (dict(q=T("f32", 2, 4, 3, 8), k=T("f32", 2, 2, 3, 8), v=T("f32", 2, 2, 3, 8)), {}, "one flat row"),
    (dict(k=T("f32", 1, 2, 4, 8)), {}, "q, k, v must share tokens"),
    (dict(v=T("f32", 1, 2, 2, 8)), {}, "q, k, v must share tokens"),
    (dict(k=T("f32", 1, 2, 3, 6)), {}, "q and k head dims differ"),
    (dict(q=T("f32", 4, 3, 8)), {}, "rank-4"),
    (dict(k_pool=T("f32", 2, 2, 6, 2, 4, 8)), {}, "k_pool must be [layers, pages, 2, page_size, 8]"),  # format 2's
    (dict(k_pool=T("f32", 2, 6, 1, 4, 8)), {}, "k_pool must be [layers, pages, 2, page_size, 8]"),
    (dict(v_pool=T("f32", 2, 6, 2, 4, 4)), {}, "v_pool must be [layers, pages, 2, page_size, 8]"),
    (dict(k_pool=T("i64", 2, 6, 2, 4, 8), v_pool=T("i64", 2, 6, 2, 4, 8)), {}, "k_pool dtype must be a float type"),
    (dict(v_pool=T("bool", 2, 6, 2, 4, 8)), {}, "v_pool dtype must be a float type"),
    (dict(v_pool=T("f32", 2, 5, 2, 4, 8)), {}, "k_pool and v_pool differ in layers, pages, page size or dtype"),
    (dict(v_pool=T("f32", 3, 6, 2, 4, 8)), {}, "k_pool and v_pool differ"),
    (dict(v_pool=T("f32", 2, 6, 2, 8, 8)), {}, "k_pool and v_pool differ"),
    (dict(v_pool=T("f16", 2, 6, 2, 4, 8)), {}, "k_pool and v_pool differ"),
    ({}, {"index": 2}, "index 2 outside the pools' 2 layers"),
    ({}, {"index": -1}, "index -1 outside the pools' 2 layers"),
    ({}, {"index": None}, "index None outside"),
    ({}, {"layer": -1}, "layer must be a non-negative integer, found -1"),
    ({}, {"layer": 1.0}, "layer must be a non-negative integer, found 1.0"),
    ({}, {"index": REMOVE}, "missing attribute 'index'"),
    ({}, {"layer": REMOVE}, "missing attribute 'layer'"),
    ({}, {"num_kv_heads": 4}, "head counts"),
    ({}, {"window": 0}, "window must be"),
    (dict(page_table=T("i64", 2, 3)), {}, "page_table must be i32[seqs, pages_per_seq], found i64[2, 3]"),
    (dict(page_table=T("i32", 3)), {}, "page_table must be i32[seqs, pages_per_seq]"),
    (dict(positions=T("i64", 3)), {}, "positions must be i64[1, 3], found i64[3]"),
    (dict(positions=T("i32", 1, 3)), {}, "positions must be i64[1, 3]"),
    (dict(positions=T("i64", 1, 4)), {}, "positions must be i64[1, 3]"),
    (dict(positions=T("i64", 2, 3)), {}, "positions must be i64[1, 3]"),
    (dict(token_seq=T("i64", 3)), {}, "token_seq must be i32[3], found i64[3]"),
    (dict(token_seq=T("i32", 4)), {}, "token_seq must be i32[3]"),
    (dict(token_seq=T("i32", 1, 3)), {}, "token_seq must be i32[3]"),
    (dict(token_seq=REMOVE), {}, "expected 8 inputs, found 7"),
]] + [
    # format 2's six-input form (one kv_cache [layers, 2, pages, kv_heads, page, head_dim]) is refused
    ("paged_attention", [T("f32", 1, 4, 2, 8), T("f32", 1, 2, 2, 8), T("f32", 1, 2, 2, 8),
                         T("f32", 2, 2, 4, 2, 4, 8), T("i32", 1, 2), T("i64", 1, 2)],
     {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3, "layer": 0, "index": 0}, "expected 8 inputs, found 6"),
    ("select_rows", [T("f32", 5), T("i64", 2)], {}, "expected x[1, tokens, ...] and rows i64[n], found f32[5]"),
    ("select_rows", [T("f32", 2, 4, 8), T("i64", 2)], {}, "expected x[1, tokens, ...]"),
    ("select_rows", [T("f32", 1, 4, 8), T("i32", 2)], {}, "and rows i64[n], found f32[1, 4, 8] and i32[2]"),
    ("select_rows", [T("f32", 1, 4, 8), T("i64", 1, 2)], {}, "and rows i64[n]"),
    ("select_rows", [T("f32", 1, 4, 8)], {}, "expected 2 inputs, found 1"),
    ("select_rows", [T("f32", 1, 4, 8), T("i64", 2)], {"axis": 1}, "unknown attribute"),
]


@pytest.mark.parametrize("op,types,attrs,message", ERROR_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in ERROR_CASES])
def test_bad_inputs_raise(op, types, attrs, message):
    with pytest.raises(VerificationError) as info:
        infer_types(op, types, attrs)
    text = str(info.value)
    assert text.startswith(f"op {op}:"), text
    assert message in text, text
    assert "\n" not in text


def test_unknown_op():
    with pytest.raises(VerificationError, match="unknown op 'conv7d'"):
        infer_types("conv7d", [], {})


# dtype rules ------------------------------------------------------------------------
def test_promote_matches_torch():
    names = [d for d in DTYPES if d != "u32"]  # torch has no promotion rules for uint32
    for a in names:
        for c in names:
            expected = torch.promote_types(TORCH_DTYPES[a], TORCH_DTYPES[c])
            assert TORCH_DTYPES[promote(a, c)] == expected, (a, c, promote(a, c), expected)


def test_dtype_names_round_trip():
    import ml_dtypes

    for name in DTYPES:
        assert dtype_of_numpy(numpy_dtype(name)) == name
    assert numpy_dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype("f16") == np.float16 and numpy_dtype("u32") == np.uint32
    with pytest.raises(TypeError):
        dtype_of_numpy(np.complex64)


def test_tensor_type_values():
    t = TensorType("f32", [b, s * 2, 576])
    assert t.shape == (b, 2 * s, 576) and t.rank == 3 and not t.is_static
    assert t.symbols == {"b", "s"}
    assert t.numel() == 1152 * b * s
    assert t.nbytes() == 4608 * b * s
    assert t.concrete({"b": 2, "s": 3}) == (2, 6, 576)
    assert str(t) == "f32[b, 2*s, 576]"
    assert str(TensorType("bool", ())) == "bool[]"
    assert TensorType("bf16", (2,)).nbytes() == 4
    for text in ["f32[b, 2*s, 576]", "bool[]", "i64[b*s - 1, 1]", "bf16[7]"]:
        assert str(parse_type(text)) == text
    assert parse_type(" f16[ 2 , s ] ") == TensorType("f16", (2, s))
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorType("float", (2,))
    with pytest.raises(TypeError):
        TensorType("f32", (True,))
    with pytest.raises(TypeError):
        TensorType("f32", (2.0,))
    with pytest.raises(ValueError):
        TensorType("f32", (-1,))


@pytest.mark.parametrize("module", ["kiln.ir.core_ops", "kiln.ir.llm_ops", "kiln.ir.quant_ops", "kiln.ir.moe_ops",
                                    "kiln.ir.mla_ops"])
def test_each_op_module_imports_first(module):
    """A fresh process importing one op module before anything else (kiln.driver imports kiln.ir.mla_ops) gets
    the whole registry, not a circular import of half-initialized modules."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
