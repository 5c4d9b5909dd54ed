"""Core tensor ops: elementwise, reductions, shape ops, linear algebra, attention.

Each entry gives its attributes, its type rule and its numpy reference in one
place. Fused LLM ops (attention with a KV cache, RoPE, RMSNorm, gated MLP)
live in ``llm_ops.py``.
"""

from __future__ import annotations

import math

import numpy as np

from .ops import REQUIRED, define_op, fail
from .symbolic import SymExpr, dim_product, is_static, known_ge, symbols_of
from .types import DTYPES, TensorType, is_float, numpy_dtype, promote


# helpers ----------------------------------------------------------------------
def broadcast_shapes(op: str, *shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        chosen = 1
        for d in dims:
            if d == 1:
                continue
            if chosen == 1:
                chosen = d
            elif chosen != d:
                raise fail(op, f"cannot broadcast shapes {' and '.join(_fmt(s) for s in shapes)}: "
                               f"dim {i} is {chosen} vs {d}")
        out.append(chosen)
    return tuple(out)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _ranges(module) -> dict:
    """The declared symbol ranges of the module a node is in (none for a node built outside one)."""
    return module.symbol_ranges if module is not None else {}


def _range_note(ranges: dict, *dims) -> str:
    """What the failed proof assumed about the dims' symbols, e.g. ' (assuming seq in [1, 48], n >= 1)'."""
    names = sorted(set().union(*(symbols_of(d) for d in dims)))
    if not names:
        return ""
    told = [f"{n} in [{ranges[n][0]}, {ranges[n][1]}]" if n in ranges else f"{n} >= 1" for n in names]
    return f" (assuming {', '.join(told)})"


def _axis(op: str, axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise fail(op, f"axis {axis} out of range for rank {rank}")
    return a


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    dt = numpy_dtype(dtype)
    return x if x.dtype == dt else x.astype(dt)


def _dtype_attr(op: str, dtype) -> str:
    if dtype not in DTYPES:
        raise fail(op, f"dtype must be one of {', '.join(DTYPES)}, found {dtype!r}")
    return dtype


def _shape_attr(op: str, shape) -> tuple:
    for d in shape:
        if not (isinstance(d, SymExpr) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)):
            raise fail(op, f"shape {_fmt(shape)} has a bad dim {d!r}; expected ints >= 0 or symbolic dims")
    return tuple(shape)


def _same(types, attrs, module):
    return [types[0]]


# elementwise ------------------------------------------------------------------
def _binary(name, fn, *, compare=False, logical=False, commutative=False):
    def infer(types, attrs, module):
        a, b = types
        shape = broadcast_shapes(name, a.shape, b.shape)
        if logical and (a.dtype != "bool" or b.dtype != "bool"):
            raise fail(name, f"expected bool inputs, found {a.dtype} and {b.dtype}")
        dtype = "bool" if compare or logical else promote(a.dtype, b.dtype)
        if name == "div" and not is_float(dtype):
            # the reference refuses integer division; the frontend casts to the float result dtype first
            raise fail(name, f"expected a float input, found {a.dtype} and {b.dtype}")
        return [TensorType(dtype, shape)]

    def reference(xs, attrs):
        a, b = xs
        dt = promote(_kiln_dtype(a), _kiln_dtype(b))
        out = fn(_cast(a, dt), _cast(b, dt))
        return [np.asarray(out if compare or logical else _cast(np.asarray(out), dt))]

    traits = ["elementwise"] + (["commutative"] if commutative else [])
    define_op(name, infer=infer, reference=reference, inputs=2, traits=traits,
              doc=f"elementwise {name} with numpy broadcasting")


def _kiln_dtype(x: np.ndarray) -> str:
    from .types import dtype_of_numpy

    return dtype_of_numpy(x.dtype)


def _div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        raise ValueError("integer div: cast to float first")
    return a / b


_binary("add", np.add, commutative=True)
_binary("sub", np.subtract)
_binary("mul", np.multiply, commutative=True)
_binary("div", _div)
_binary("pow", np.power)
_binary("maximum", np.maximum, commutative=True)
_binary("minimum", np.minimum, commutative=True)
_binary("eq", np.equal, compare=True, commutative=True)
_binary("ne", np.not_equal, compare=True, commutative=True)
_binary("lt", np.less, compare=True)
_binary("le", np.less_equal, compare=True)
_binary("gt", np.greater, compare=True)
_binary("ge", np.greater_equal, compare=True)
_binary("and", np.logical_and, logical=True, commutative=True)
_binary("or", np.logical_or, logical=True, commutative=True)


_erf_object = np.frompyfunc(math.erf, 1, 1)


def _erf(x64):
    return np.asarray(_erf_object(x64), dtype=np.float64)  # frompyfunc gives a Python float for 0-d input


def _gelu(x, approximate):
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    else:
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    return np.asarray(y).astype(x.dtype)


def _sigmoid(x):
    x64 = x.astype(np.float64)
    return (1.0 / (1.0 + np.exp(-x64))).astype(x.dtype)


_UNARY = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: (1.0 / np.sqrt(x.astype(np.float64))).astype(x.dtype),
    "reciprocal": lambda x: (1.0 / x.astype(np.float64)).astype(x.dtype),
    "sin": np.sin,
    "cos": np.cos,
    "tanh": np.tanh,
    "abs": np.abs,
    "erf": lambda x: _erf(x.astype(np.float64)).astype(x.dtype),
    "sigmoid": _sigmoid,
    "silu": lambda x: (x.astype(np.float64) * _sigmoid(x.astype(np.float64))).astype(x.dtype),
    "relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "not": np.logical_not,
}
_FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "erf", "sigmoid", "silu"}


def _unary(name, fn):
    def infer(types, attrs, module):
        (a,) = types
        if name in _FLOAT_ONLY and not is_float(a.dtype):
            raise fail(name, f"expected a float input, found {a.dtype}")
        if name == "not" and a.dtype != "bool":
            raise fail(name, f"expected a bool input, found {a.dtype}")
        return [a]

    define_op(name, infer=infer, reference=lambda xs, attrs: [np.asarray(fn(xs[0]))], inputs=1,
              traits=["elementwise"], doc=f"elementwise {name}")


for _name, _fn in _UNARY.items():
    _unary(_name, _fn)


def _gelu_infer(types, attrs, module):
    if attrs["approximate"] not in ("none", "tanh"):
        raise fail("gelu", f"approximate must be 'none' or 'tanh', found {attrs['approximate']!r}")
    return [types[0]]


define_op("gelu", infer=_gelu_infer, reference=lambda xs, a: [_gelu(xs[0], a["approximate"])],
          attrs={"approximate": "none"}, inputs=1, traits=["elementwise"],
          doc="GELU, exact (erf) or tanh approximation")


def _cast_infer(types, attrs, module):
    return [types[0].with_dtype(_dtype_attr("cast", attrs["dtype"]))]


define_op("cast", infer=_cast_infer, reference=lambda xs, a: [_cast(xs[0], a["dtype"])],
          attrs={"dtype": REQUIRED}, inputs=1, traits=["elementwise"], doc="convert to another dtype")


def _where_infer(types, attrs, module):
    c, a, b = types
    if c.dtype != "bool":
        raise fail("where", f"condition must be bool, found {c.dtype}")
    return [TensorType(promote(a.dtype, b.dtype), broadcast_shapes("where", c.shape, a.shape, b.shape))]


def _where_ref(xs, attrs):
    c, a, b = xs
    dt = promote(_kiln_dtype(a), _kiln_dtype(b))
    return [np.where(c, _cast(a, dt), _cast(b, dt))]


define_op("where", infer=_where_infer, reference=_where_ref, inputs=3, traits=["elementwise"],
          doc="select a where cond else b")


# sources ----------------------------------------------------------------------
def _constant_infer(types, attrs, module):
    value = attrs["value"]
    if not isinstance(value, (bool, int, float)):
        raise fail("constant", f"value must be a number or bool, found {value!r}")
    return [TensorType(_dtype_attr("constant", attrs["dtype"]), ())]


define_op("constant", infer=_constant_infer,
          reference=lambda xs, a: [np.array(a["value"], dtype=numpy_dtype(a["dtype"]))],
          attrs={"value": REQUIRED, "dtype": REQUIRED}, inputs=0, traits=["source"],
          doc="a scalar (rank-0) constant")


def _full_infer(types, attrs, module):
    return [TensorType(_dtype_attr("full", attrs["dtype"]), _shape_attr("full", attrs["shape"]))]


define_op("full", infer=_full_infer,
          reference=lambda xs, a: [np.full(a["shape"], a["value"], dtype=numpy_dtype(a["dtype"]))],
          attrs={"shape": REQUIRED, "value": REQUIRED, "dtype": REQUIRED}, inputs=0, traits=["source"],
          doc="a tensor filled with one value")


def _arange_infer(types, attrs, module):
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    _dtype_attr("arange", attrs["dtype"])
    if step == 0:
        raise fail("arange", "step must not be 0")
    if step == 1:
        length = end - start
    elif is_static(start) and is_static(end):
        length = max(0, -(-(end - start) // step))
    else:
        raise fail("arange", f"symbolic bounds need step 1, found step {step}")
    if not known_ge(length, 0, _ranges(module)):
        raise fail("arange", f"length {length} may be negative")
    return [TensorType(attrs["dtype"], (length,))]


define_op("arange", infer=_arange_infer,
          reference=lambda xs, a: [np.arange(a["start"], a["end"], a["step"], dtype=numpy_dtype(a["dtype"]))],
          attrs={"start": 0, "end": REQUIRED, "step": 1, "dtype": "i64"}, inputs=0, traits=["source"],
          doc="start, start+step, ... below end (bounds may be symbolic)")


def _weight_infer(types, attrs, module):
    name = attrs["name"]
    if module is None:
        raise fail("weight", f"weight {name!r} needs a module to find its type")
    if name not in module.weights:
        raise fail("weight", f"no weight named {name!r} in the module")
    return [module.weights[name]]


def _weight_ref(xs, attrs):
    raise AssertionError("weights are bound by the interpreter")


define_op("weight", infer=_weight_infer, reference=_weight_ref, attrs={"name": REQUIRED}, inputs=0,
          traits=["source"], doc="a named module weight")


# reductions -------------------------------------------------------------------
def _reduce(name, fn):
    def infer(types, attrs, module):
        (a,) = types
        axes = sorted(_axis(name, ax, a.rank) for ax in attrs["axes"])
        shape = [1 if i in axes else d for i, d in enumerate(a.shape)] if attrs["keepdims"] else \
            [d for i, d in enumerate(a.shape) if i not in axes]
        dtype = "i64" if a.dtype == "bool" and name == "sum" else a.dtype
        if name == "mean" and not is_float(a.dtype):
            raise fail(name, f"expected a float input, found {a.dtype}")
        return [TensorType(dtype, tuple(shape))]

    def reference(xs, attrs):
        (x,) = xs
        axes = tuple(attrs["axes"])
        if name == "mean":
            out = np.mean(x.astype(np.float64), axis=axes, keepdims=attrs["keepdims"]).astype(x.dtype)
        elif name == "sum" and x.dtype == np.bool_:
            out = np.sum(x, axis=axes, keepdims=attrs["keepdims"], dtype=np.int64)
        else:
            out = fn(x, axis=axes, keepdims=attrs["keepdims"]).astype(x.dtype)
        return [np.asarray(out)]

    define_op(name, infer=infer, reference=reference, attrs={"axes": REQUIRED, "keepdims": False}, inputs=1,
              doc=f"{name} over axes")


_reduce("sum", np.sum)
_reduce("mean", np.mean)
_reduce("max", np.max)
_reduce("min", np.min)


def _softmax_infer(types, attrs, module):
    _axis("softmax", attrs["axis"], types[0].rank)
    if not is_float(types[0].dtype):
        raise fail("softmax", f"expected a float input, found {types[0].dtype}")
    return [types[0]]


def _softmax_ref(xs, attrs):
    x = xs[0].astype(np.float64)
    x = x - np.max(x, axis=attrs["axis"], keepdims=True)
    e = np.exp(x)
    return [(e / np.sum(e, axis=attrs["axis"], keepdims=True)).astype(xs[0].dtype)]


define_op("softmax", infer=_softmax_infer, reference=_softmax_ref, attrs={"axis": -1}, inputs=1,
          doc="softmax along one axis")


def _cumsum_infer(types, attrs, module):
    _axis("cumsum", attrs["axis"], types[0].rank)
    return [types[0].with_dtype(_dtype_attr("cumsum", attrs["dtype"]))]


define_op("cumsum", infer=_cumsum_infer,
          reference=lambda xs, a: [np.cumsum(_cast(xs[0], a["dtype"]), axis=a["axis"])
                                   .astype(numpy_dtype(a["dtype"]))],
          attrs={"axis": REQUIRED, "dtype": REQUIRED}, inputs=1,
          doc="running sum along one axis, accumulated in dtype (as torch.cumsum(dtype=...))")


# shape ops --------------------------------------------------------------------
def _reshape_infer(types, attrs, module):
    (a,) = types
    shape = _shape_attr("reshape", attrs["shape"])
    if dim_product(a.shape) != dim_product(shape):
        raise fail("reshape", f"cannot reshape {_fmt(a.shape)} into {_fmt(shape)}: element counts "
                              f"{dim_product(a.shape)} and {dim_product(shape)} differ")
    return [a.with_shape(shape)]


define_op("reshape", infer=_reshape_infer, reference=lambda xs, a: [np.reshape(xs[0], a["shape"])],
          attrs={"shape": REQUIRED}, inputs=1, traits=["view"], doc="same elements, new shape")


def _permute_infer(types, attrs, module):
    (a,) = types
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(a.rank)):
        raise fail("permute", f"perm {perm} is not a permutation of {a.rank} axes")
    return [a.with_shape(tuple(a.shape[p] for p in perm))]


define_op("permute", infer=_permute_infer,
          reference=lambda xs, a: [np.array(np.transpose(xs[0], a["perm"]), order="C")],
          attrs={"perm": REQUIRED}, inputs=1, traits=["view"], doc="reorder axes")


def _expand_infer(types, attrs, module):
    (a,) = types
    shape = _shape_attr("expand", attrs["shape"])
    if len(shape) < a.rank:
        raise fail("expand", f"cannot expand rank {a.rank} to rank {len(shape)}")
    for d_in, d_out in zip(a.shape, shape[len(shape) - a.rank:]):
        if d_in != d_out and d_in != 1:
            raise fail("expand", f"cannot expand {_fmt(a.shape)} to {_fmt(shape)}")
    return [a.with_shape(shape)]


define_op("expand", infer=_expand_infer,
          reference=lambda xs, a: [np.array(np.broadcast_to(xs[0], a["shape"]), order="C")],
          attrs={"shape": REQUIRED}, inputs=1, traits=["view"], doc="broadcast size-1 or new leading dims")


def _slice_infer(types, attrs, module):
    (a,) = types
    axis = _axis("slice", attrs["axis"], a.rank)
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if step < 1:
        raise fail("slice", f"step must be >= 1, found {step}")
    ranges = _ranges(module)
    if not (known_ge(start, 0, ranges) and known_ge(end, start, ranges) and known_ge(a.shape[axis], end, ranges)):
        raise fail("slice", f"need 0 <= start <= end <= dim, found start={start} end={end} "
                            f"dim={a.shape[axis]}" + _range_note(ranges, start, end, a.shape[axis]))
    if step == 1:
        length = end - start
    elif is_static(start) and is_static(end):
        length = -(-(end - start) // step)
    else:
        raise fail("slice", f"symbolic bounds need step 1, found step {step}")
    shape = list(a.shape)
    shape[axis] = length
    return [a.with_shape(tuple(shape))]


def _slice_ref(xs, attrs):
    (x,) = xs
    idx = [slice(None)] * x.ndim
    idx[attrs["axis"]] = slice(attrs["start"], attrs["end"], attrs["step"])
    return [np.array(x[tuple(idx)], order="C")]


define_op("slice", infer=_slice_infer, reference=_slice_ref,
          attrs={"axis": REQUIRED, "start": 0, "end": REQUIRED, "step": 1}, inputs=1, traits=["view"],
          doc="x[start:end:step] along axis (bounds already clamped)")


def _concat_infer(types, attrs, module):
    axis = _axis("concat", attrs["axis"], types[0].rank)
    total = 0
    dtype = types[0].dtype
    for t in types:
        if t.rank != types[0].rank or t.dtype != dtype:
            raise fail("concat", f"inputs must share rank and dtype, found {types[0]} and {t}")
        for i, (d0, d) in enumerate(zip(types[0].shape, t.shape)):
            if i != axis and d0 != d:
                raise fail("concat", f"inputs differ outside axis {axis}: {types[0]} vs {t}")
        total = total + t.shape[axis]
    shape = list(types[0].shape)
    shape[axis] = total
    return [TensorType(dtype, tuple(shape))]


define_op("concat", infer=_concat_infer, reference=lambda xs, a: [np.concatenate(xs, axis=a["axis"])],
          attrs={"axis": REQUIRED}, inputs=(1, None), doc="join tensors along an axis")


def _index_infer(types, attrs, module):
    x, idx = types[0], types[1:]
    axis = attrs["axis"]
    if axis < 0 or axis + len(idx) > x.rank:
        raise fail("index", f"{len(idx)} index tensors from axis {axis} for rank {x.rank}")
    for t in idx:
        if t.dtype not in ("i64", "i32"):
            raise fail("index", f"index tensors must be integer, found {t.dtype}")
    shape = tuple(x.shape[:axis]) + broadcast_shapes("index", *[t.shape for t in idx]) + \
        tuple(x.shape[axis + len(idx):])
    return [TensorType(x.dtype, shape)]


define_op("index", infer=_index_infer,
          reference=lambda xs, a: [np.asarray(xs[0][(slice(None),) * a["axis"] + tuple(xs[1:])])],
          attrs={"axis": 0}, inputs=(2, None),
          doc="x[:, ..., i0, i1, ...]: broadcast integer index tensors on consecutive axes from `axis`")


def _embedding_infer(types, attrs, module):
    w, ids = types
    if ids.dtype not in ("i64", "i32"):
        raise fail("embedding", f"ids must be integer, found {ids.dtype}")
    return [TensorType(w.dtype, tuple(ids.shape) + tuple(w.shape[1:]))]


define_op("embedding", infer=_embedding_infer, reference=lambda xs, a: [np.take(xs[0], xs[1], axis=0)],
          inputs=2, doc="rows of a table: table[ids]")


# linear algebra ---------------------------------------------------------------
def _matmul_infer(types, attrs, module):
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise fail("matmul", f"inputs must have rank >= 2, found {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise fail("matmul", f"contraction dims differ: {a} @ {b}")
    batch = broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    return [TensorType(promote(a.dtype, b.dtype), batch + (a.shape[-2], b.shape[-1]))]


def _matmul_ref(xs, attrs):
    a, b = xs
    dt = numpy_dtype(promote(_kiln_dtype(a), _kiln_dtype(b)))
    return [np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(dt)]


define_op("matmul", infer=_matmul_infer, reference=_matmul_ref, inputs=2, doc="batched a @ b")


def _linear_infer(types, attrs, module):
    x, w = types[0], types[1]
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        raise fail("linear", f"expected x[..., K] and w[N, K], found {x} and {w}")
    if len(types) == 3 and types[2].shape != (w.shape[0],):
        raise fail("linear", f"bias must be [{w.shape[0]}], found {types[2]}")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (w.shape[0],))]


def _linear_ref(xs, attrs):
    x, w = xs[0], xs[1]
    y = np.matmul(x.astype(np.float64), w.astype(np.float64).T)
    if len(xs) == 3:
        y = y + xs[2]
    return [y.astype(x.dtype)]


define_op("linear", infer=_linear_infer, reference=_linear_ref, inputs=(2, 3),
          doc="x @ w.T (+ bias): the one normal form of a dense layer")


# normalisation and attention ---------------------------------------------------
def _layer_norm_infer(types, attrs, module):
    x, w, b = types
    if x.rank < 1:
        raise fail("layer_norm", f"expected x of rank >= 1, found {x}")
    if w.shape != (x.shape[-1],) or b.shape != (x.shape[-1],):
        raise fail("layer_norm", f"weight and bias must be [{x.shape[-1]}], found {w} and {b}")
    return [x]


def _layer_norm_ref(xs, attrs):
    x, w, b = xs
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    return [((x64 - mean) / np.sqrt(var + attrs["eps"]) * w + b).astype(x.dtype)]


define_op("layer_norm", infer=_layer_norm_infer, reference=_layer_norm_ref, attrs={"eps": REQUIRED},
          inputs=3, doc="LayerNorm over the last axis")


def _sdpa_infer(types, attrs, module):
    q, k, v = types[:3]
    if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
        raise fail("sdpa", f"expected q, k, v of equal rank >= 3, found {q}, {k}, {v}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise fail("sdpa", f"head dims or key lengths differ: {q}, {k}, {v}")
    # the output takes q's leading dims: k and v must match them, broadcast from 1 (torch's matmul
    # broadcasting, e.g. Falcon's single K/V head), or group heads under enable_gqa
    heads, kv_heads = q.shape[-3], k.shape[-3]
    grouped = attrs["enable_gqa"] and kv_heads != heads
    leading_ok = all(kd == qd or kd == 1 for kd, qd in zip(k.shape[:-3], q.shape[:-3]))
    if k.shape[:-2] != v.shape[:-2] or not leading_ok or (kv_heads not in (heads, 1) and not grouped):
        raise fail("sdpa", f"leading dims of q, k, v differ: {q}, {k}, {v}")
    if grouped and not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
        raise fail("sdpa", f"enable_gqa needs q heads {heads} to be a multiple of kv heads {kv_heads}")
    if len(types) == 4:
        mask = types[3]
        scores = tuple(q.shape[:-1]) + (k.shape[-2],)
        broadcast_shapes("sdpa", mask.shape, scores)
    return [TensorType(q.dtype, tuple(q.shape[:-1]) + (v.shape[-1],))]


def sdpa_reference(q, k, v, mask=None, *, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as torch defines it (top-left causal alignment)."""
    q64, k64, v64 = (t.astype(np.float64) for t in (q, k, v))
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k64 = np.repeat(k64, rep, axis=-3)
        v64 = np.repeat(v64, rep, axis=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(q64, np.swapaxes(k64, -1, -2)) * scale
    sq, sk = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = np.tril(np.ones((sq, sk), dtype=bool))
        scores = np.where(keep, scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / np.sum(p, axis=-1, keepdims=True)
    return np.matmul(p, v64).astype(q.dtype)


define_op("sdpa", infer=_sdpa_infer,
          reference=lambda xs, a: [sdpa_reference(*xs, is_causal=a["is_causal"], scale=a["scale"],
                                                  enable_gqa=a["enable_gqa"])],
          attrs={"is_causal": False, "scale": None, "enable_gqa": False}, inputs=(3, 4),
          doc="softmax(q @ k^T * scale + mask) @ v, as torch's scaled_dot_product_attention")


__all__ = ["broadcast_shapes", "sdpa_reference", "SymExpr"]
