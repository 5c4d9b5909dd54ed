"""Lowering of kiln IR functions into ONNX graphs that ONNX Runtime runs.

``LOWERINGS`` maps each kiln op name to a rule that emits ONNX nodes for one kiln
node: ONNX Runtime's contrib ops where they exist (GroupQueryAttention over the KV
cache, RotaryEmbedding, SkipSimplifiedLayerNormalization, MatMulNBits), standard
ONNX (opset 23) elsewhere.

The ragged ``@step`` keeps its flat batch of T new tokens ([1, T, ...]) for every
projection and MLP. Each ``paged_attention`` becomes GroupQueryAttention over one
contiguous ``[batch, kv_heads, max_seq_len, head_dim]`` K and V buffer per layer
(``past_key_<l>`` bound as ``present_key_<l>``): q, k and v are gathered into a
padded ``[batch, seq]`` view with ``pad_index`` and the output gathered back with
``unpad_index``, so only attention sees padding. The pools, the page table and
``token_seq`` are the executor's business (it maps sequences to buffer rows and
builds the padded view), so the ONNX graph never sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.ir.errors import ConfigError, UnsupportedOpError
from kiln.ir.graph import Function, Module, Node
from kiln.ir.kv_cache import KVCacheSpec
from kiln.ir.quant_mlp_ops import decompose as decompose_gated_mlp_q
from kiln.ir.symbolic import SymExpr
from kiln.ir.types import TensorType, numpy_dtype, promote

from .executor import buffer_head_dim

OPSET = 23  # RMSNormalization, Gelu with approximate, Reduce* with axes inputs
MS_DOMAIN = "com.microsoft"
ONNX_DTYPES = {
    "f64": TensorProto.DOUBLE, "f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
    "i64": TensorProto.INT64, "i32": TensorProto.INT32, "i16": TensorProto.INT16, "i8": TensorProto.INT8,
    "u8": TensorProto.UINT8, "u32": TensorProto.UINT32, "bool": TensorProto.BOOL,
}
# The executor feeds these beside the function's own inputs: the padded view GroupQueryAttention runs on.
PAD_INDEX = "pad_index"  # i64[batch, seq]: the flat token at each (row, offset) of the padded batch
UNPAD_INDEX = "unpad_index"  # i64[tokens]: each flat token's index in the padded batch, row * seq + offset
SEQLENS_K = "seqlens_k"  # i32[batch]: each row's total length after this call, minus one
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # i32 scalar: the largest total length in the batch
ATTENTION_INPUTS = (PAD_INDEX, UNPAD_INDEX, SEQLENS_K, TOTAL_SEQUENCE_LENGTH)
LOGITS = "logits"
# The operands of the paged attention ops the executor consumes instead of the graph: the pools, page_table,
# token_seq (op -> input index -> what; lowerings of other paged ops add theirs).
EXECUTOR_OPERANDS = {"paged_attention": {3: "KV pool", 4: "KV pool", 5: "page table", 7: "token_seq"}}


def past_names(layer: int) -> tuple:
    return f"past_key_{layer}", f"past_value_{layer}"


def present_names(layer: int) -> tuple:
    return f"present_key_{layer}", f"present_value_{layer}"


# values that are not (yet) one ONNX tensor -------------------------------------
@dataclass(frozen=True)
class View:
    """``Transpose(Reshape(tensor, shape), perm)`` of a ``tensor`` of kiln shape ``source``, not emitted
    until someone needs it: the head split / merge reshapes and transposes around attention cancel out."""

    tensor: str
    source: tuple
    shape: tuple
    perm: tuple | None = None

    def permuted_shape(self) -> tuple:
        return self.shape if self.perm is None else tuple(self.shape[p] for p in self.perm)


@dataclass(frozen=True)
class WeightRef:
    """A module weight; a linear reads its transposed or quantized form instead of the weight itself."""

    name: str


@dataclass(frozen=True)
class ExecutorOperand:
    """A step input (or an updated pool) that only paged_attention reads: the executor handles it."""

    what: str


class LoweringContext:
    """What a lowering rule sees: the graph under construction, the node, and helpers."""

    def __init__(self, module: Module, function: Function, options: dict):
        self.module = module
        self.function = function
        self.options = options
        self.nodes: list = []
        self.initializers: dict = {}  # name -> np.ndarray
        self.values: dict = {}  # id(kiln Value) -> str | View | WeightRef | ExecutorOperand
        self.node: Node | None = None
        self.layers: dict = {}  # layer -> (num_kv_heads, head_dim, dtype)
        self.attention_tokens = None  # the tokens dim of the paged attentions' q (unpad_index's length)
        self.kv_spec = KVCacheSpec.from_json(module.metadata["kv_cache"]) if "kv_cache" in module.metadata \
            else None
        self._names: set = set()
        self._counter = 0
        self._consts: dict = {}
        self._dims: dict = {}
        self._cached: dict = {}
        self.symbols: dict = {}  # symbol -> (graph input name, axis)

    # names and nodes ----------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._counter += 1
            name = f"{hint}__{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add(self, op: str, inputs: list, outputs: int | list = 1, *, domain: str = "", **attrs):
        """Emit one node; returns its output name (or the list of names when ``outputs`` is a list/count > 1)."""
        names = [self.fresh(op) if o is None else o
                 for o in (outputs if isinstance(outputs, list) else [None] * outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.fresh(f"n_{op}"), domain=domain,
                                           **attrs))
        return names if isinstance(outputs, list) or len(names) > 1 else names[0]

    def const(self, value, dtype: str | None = None) -> str:
        """A small constant tensor (deduplicated)."""
        array = np.asarray(value, dtype=numpy_dtype(dtype) if dtype else None)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(f"{self.function.name}.const")  # functions share the data file: no name clash
            self.initializers[name] = array
            self._consts[key] = name
        return self._consts[key]

    def cached(self, key, build: Callable[[], str]) -> str:
        if key not in self._cached:
            self._cached[key] = build()
        return self._cached[key]

    # inputs of the current node ------------------------------------------------
    def in_type(self, index: int) -> TensorType:
        return self.node.inputs[index].type

    def out_type(self, index: int = 0) -> TensorType:
        return self.node.outputs[index].type

    def raw(self, index: int):
        return self.values[id(self.node.inputs[index])]

    def input(self, index: int) -> str:
        return self.materialize(self.raw(index), self.node.inputs[index].type)

    def materialize(self, entry, kiln_type: TensorType | None = None) -> str:
        if isinstance(entry, str):
            return entry
        if isinstance(entry, View):
            def build():
                tensor = self.reshape(entry.tensor, entry.source, entry.shape)
                return tensor if entry.perm is None else self.add("Transpose", [tensor], perm=list(entry.perm))

            return self.cached(("view", entry), build)
        if isinstance(entry, WeightRef):
            return self.weight(entry.name)
        raise UnsupportedOpError(f"{self.where()}: the {entry.what} is only read by paged_attention in the ONNX "
                                 f"Runtime backend, found {self.node.op}; expected the IR of kiln's pipeline")

    def weight_name(self, index: int) -> str | None:
        entry = self.raw(index)
        return entry.name if isinstance(entry, WeightRef) else None

    def weight(self, name: str) -> str:
        if name not in self.initializers:
            self.initializers[name] = self.module.weight_data[name]
        return name

    def derived(self, name: str, build: Callable[[], np.ndarray]) -> str:
        """An initializer computed from weights at compile time (a transposed or repacked weight)."""
        if name not in self.initializers:
            self.initializers[name] = np.ascontiguousarray(build())
        return name

    def weight_array(self, index: int) -> np.ndarray:
        """The compile-time value of input ``index`` (a weight), or UnsupportedOpError."""
        name = self.weight_name(index)
        if name is None:
            raise UnsupportedOpError(f"{self.where()}: input {index} must be a module weight (known when compiling), "
                                     f"found a computed value; the ONNX Runtime lowering needs it constant")
        return self.module.weight_data[name]

    def where(self) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.node.outputs)
        return f"{self.node.op} ({outs} in @{self.function.name})"

    def cast(self, name: str, from_dtype: str, to_dtype: str) -> str:
        if from_dtype == to_dtype:
            return name
        return self.cached(("cast", name, to_dtype), lambda: self.add("Cast", [name], to=ONNX_DTYPES[to_dtype]))

    # symbolic dims ----------------------------------------------------------------
    def dim(self, d) -> str:
        """An int64 [1] tensor holding dim ``d`` (an int or a polynomial of the function's symbols)."""
        if isinstance(d, int):
            return self.const([d], "i64")
        key = str(d)
        if key in self._dims:
            return self._dims[key]
        total = None
        for monomial, coeff in d.terms:
            term = None if coeff == 1 and monomial else self.const([coeff], "i64")
            for symbol in monomial:
                s = self.symbol(symbol)
                term = s if term is None else self.add("Mul", [term, s])
            total = term if total is None else self.add("Add", [total, term])
        self._dims[key] = total
        return total

    def dim_scalar(self, d) -> str:
        if isinstance(d, int):
            return self.const(d, "i64")
        return self.cached(("scalar", str(d)), lambda: self.add("Squeeze", [self.dim(d), self.const([0], "i64")]))

    def symbol(self, name: str) -> str:
        if name not in self.symbols:
            raise ConfigError(f"@{self.function.name}: symbol {name!r} is not a plain dim of any input; "
                              f"expected every symbol to be one")
        source, axis = self.symbols[name]
        return self.cached(("symbol", name), lambda: self.add("Shape", [source], start=axis, end=axis + 1))

    def shape(self, dims) -> str:
        """An int64 [rank] tensor for a kiln shape (a constant when every dim is static)."""
        dims = tuple(dims)
        if all(isinstance(d, int) for d in dims):
            return self.const(list(dims), "i64")

        def build():
            parts, static = [], []
            for d in dims:
                if isinstance(d, int):
                    static.append(d)
                    continue
                if static:
                    parts.append(self.const(static, "i64"))
                    static = []
                parts.append(self.dim(d))
            if static:
                parts.append(self.const(static, "i64"))
            return self.add("Concat", parts, axis=0)

        return self.cached(("shape", tuple(str(d) for d in dims)), build)

    def view_permute(self, entry, shape, perm) -> "str | View":
        """``entry`` (of kiln shape ``shape``) permuted, lazily; a permutation that only moves size-1 axes
        keeps the element order, so it is a reshape."""
        perm = tuple(perm)
        if isinstance(entry, View):
            inner = entry.perm or tuple(range(len(entry.shape)))
            view = View(entry.tensor, entry.source, entry.shape, tuple(inner[p] for p in perm))
        else:
            view = View(self.materialize(entry), tuple(shape), tuple(shape), perm)
        return self._normalize(view)

    def view_reshape(self, entry, shape, new_shape) -> "str | View":
        new_shape = tuple(new_shape)
        if isinstance(entry, View) and entry.perm is None:
            return self._normalize(View(entry.tensor, entry.source, new_shape))
        return self._normalize(View(self.materialize(entry), tuple(shape), new_shape))

    @staticmethod
    def _normalize(view: View) -> "str | View":
        if view.perm is not None:
            moved = [p for p in view.perm if view.shape[p] != 1]
            if moved == sorted(moved):
                view = View(view.tensor, view.source, view.permuted_shape())
        if view.perm is None and view.shape == view.source:
            return view.tensor
        return view

    def reshape(self, name: str, from_shape, to_shape) -> str:
        """Reshape with a constant target when the symbolic dims can be spelled as 0 (copy) or -1."""
        spec, unknown = [], 0
        for i, d in enumerate(to_shape):
            if isinstance(d, int):
                spec.append(d)
            elif i < len(from_shape) and from_shape[i] == d:
                spec.append(0)
            else:
                spec.append(-1)
                unknown += 1
        if unknown > 1 or (0 in [d for d in to_shape if isinstance(d, int)]):
            return self.add("Reshape", [name, self.shape(to_shape)])
        if tuple(to_shape) == tuple(from_shape):
            return name
        return self.add("Reshape", [name, self.const(spec, "i64")])


Lowering = Callable[[LoweringContext, Node], "str | list"]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*names: str):
    """Register one rule for the given op names (adding an op is one decorated function)."""

    def register(fn: Lowering) -> Lowering:
        for name in names:
            assert name not in LOWERINGS, f"two ONNX lowerings for {name}"
            LOWERINGS[name] = fn
        return fn

    return register


# elementwise ---------------------------------------------------------------------
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
           "minimum": "Min", "eq": "Equal", "ne": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
           "ge": "GreaterOrEqual", "and": "And", "or": "Or"}


@lowering(*_BINARY)
def _lower_binary(ctx, node):
    a_type, b_type = ctx.in_type(0), ctx.in_type(1)
    dtype = promote(a_type.dtype, b_type.dtype)
    a = ctx.cast(ctx.input(0), a_type.dtype, dtype)
    b = ctx.cast(ctx.input(1), b_type.dtype, dtype)
    producer = node.inputs[1].producer
    if node.op == "pow" and producer is not None and producer.op == "constant" and producer.attrs["value"] == 2 \
            and b_type.shape == ():
        return ctx.add("Mul", [a, a])  # x ** 2 (RMSNorm, GELU-tanh): exact, and cheaper than Pow
    out = ctx.add(_BINARY[node.op], [a, b])
    return ctx.add("Not", [out]) if node.op == "ne" else out


_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal", "sin": "Sin",
          "cos": "Cos", "tanh": "Tanh", "abs": "Abs", "erf": "Erf", "sigmoid": "Sigmoid", "relu": "Relu",
          "not": "Not"}


@lowering(*_UNARY)
def _lower_unary(ctx, node):
    return ctx.add(_UNARY[node.op], [ctx.input(0)])


@lowering("rsqrt")
def _lower_rsqrt(ctx, node):
    return ctx.add("Reciprocal", [ctx.add("Sqrt", [ctx.input(0)])])


@lowering("silu")
def _lower_silu(ctx, node):
    x = ctx.input(0)
    return ctx.add("Mul", [x, ctx.add("Sigmoid", [x])])


@lowering("gelu")
def _lower_gelu(ctx, node):
    return ctx.add("Gelu", [ctx.input(0)], approximate=node.attrs["approximate"])


@lowering("cast")
def _lower_cast(ctx, node):
    return ctx.add("Cast", [ctx.input(0)], to=ONNX_DTYPES[node.attrs["dtype"]])


@lowering("where")
def _lower_where(ctx, node):
    dtype = ctx.out_type().dtype
    a = ctx.cast(ctx.input(1), ctx.in_type(1).dtype, dtype)
    b = ctx.cast(ctx.input(2), ctx.in_type(2).dtype, dtype)
    return ctx.add("Where", [ctx.input(0), a, b])


# sources -----------------------------------------------------------------------------
@lowering("constant")
def _lower_constant(ctx, node):
    return ctx.const(node.attrs["value"], node.attrs["dtype"])


@lowering("full")
def _lower_full(ctx, node):
    out = ctx.out_type()
    value = numpy_helper.from_array(np.array([node.attrs["value"]], dtype=numpy_dtype(out.dtype)))
    if out.shape == ():
        return ctx.const(node.attrs["value"], out.dtype)
    return ctx.add("ConstantOfShape", [ctx.shape(out.shape)], value=value)


@lowering("arange")
def _lower_arange(ctx, node):
    dtype = node.attrs["dtype"]
    start, end, step = (node.attrs[k] for k in ("start", "end", "step"))
    if all(isinstance(v, int) for v in (start, end, step)):
        return ctx.const(np.arange(start, end, step), dtype)
    out = ctx.add("Range", [ctx.dim_scalar(start), ctx.dim_scalar(end), ctx.dim_scalar(step)])
    return ctx.cast(out, "i64", dtype)


@lowering("weight")
def _lower_weight(ctx, node):
    return WeightRef(node.attrs["name"])


# reductions -----------------------------------------------------------------------
_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}


@lowering(*_REDUCE)
def _lower_reduce(ctx, node):
    x = ctx.cast(ctx.input(0), ctx.in_type(0).dtype, ctx.out_type().dtype)
    rank = ctx.in_type(0).rank
    axes = sorted(a % rank for a in node.attrs["axes"])
    if not axes:
        return x
    return ctx.add(_REDUCE[node.op], [x, ctx.const(axes, "i64")], keepdims=int(node.attrs["keepdims"]))


@lowering("softmax")
def _lower_softmax(ctx, node):
    return ctx.add("Softmax", [ctx.input(0)], axis=node.attrs["axis"])


@lowering("cumsum")
def _lower_cumsum(ctx, node):
    x = ctx.cast(ctx.input(0), ctx.in_type(0).dtype, node.attrs["dtype"])
    return ctx.add("CumSum", [x, ctx.const(node.attrs["axis"] % ctx.in_type(0).rank, "i64")])


# shape ops -----------------------------------------------------------------------
@lowering("reshape")
def _lower_reshape(ctx, node):
    return ctx.view_reshape(ctx.raw(0), ctx.in_type(0).shape, node.attrs["shape"])


@lowering("permute")
def _lower_permute(ctx, node):
    return ctx.view_permute(ctx.raw(0), ctx.in_type(0).shape, node.attrs["perm"])


@lowering("expand")
def _lower_expand(ctx, node):
    in_shape, shape = ctx.in_type(0).shape, tuple(node.attrs["shape"])
    if tuple(in_shape) == shape:
        return ctx.input(0)
    offset = len(shape) - len(in_shape)
    # Expand broadcasts both ways: a 1 keeps the input's dim, so symbolic dims the input already has stay static
    spec = [1 if i >= offset and in_shape[i - offset] == d else d for i, d in enumerate(shape)]
    return ctx.add("Expand", [ctx.input(0), ctx.shape(spec)])


@lowering("slice")
def _lower_slice(ctx, node):
    axis = node.attrs["axis"] % ctx.in_type(0).rank
    start, end, step = node.attrs["start"], node.attrs["end"], node.attrs["step"]
    return ctx.add("Slice", [ctx.input(0), ctx.dim(start), ctx.dim(end), ctx.const([axis], "i64"),
                             ctx.const([step], "i64")])


@lowering("concat")
def _lower_concat(ctx, node):
    if len(node.inputs) == 1:
        return ctx.input(0)
    return ctx.add("Concat", [ctx.input(i) for i in range(len(node.inputs))],
                   axis=node.attrs["axis"] % ctx.in_type(0).rank)


@lowering("index")
def _lower_index(ctx, node):
    axis = node.attrs["axis"]
    x_type = ctx.in_type(0)
    indices = [ctx.cast(ctx.input(i), ctx.in_type(i).dtype, "i64") for i in range(1, len(node.inputs))]
    if len(indices) == 1:
        return ctx.add("Gather", [ctx.input(0), indices[0]], axis=axis)
    # k index tensors on axes [axis, axis + k): bring those axes first, GatherND over the broadcast
    # indices stacked last, then put the broadcast dims back where the indexed axes were.
    k = len(indices)
    out_type = ctx.out_type()
    broadcast_rank = out_type.rank - (x_type.rank - k)
    broadcast = ctx.shape(out_type.shape[axis:axis + broadcast_rank])
    stacked = ctx.add("Concat", [ctx.add("Unsqueeze", [ctx.add("Expand", [i, broadcast]), ctx.const([-1], "i64")])
                                 for i in indices], axis=-1)
    x = ctx.input(0)
    front = list(range(axis, axis + k)) + [a for a in range(x_type.rank) if not axis <= a < axis + k]
    if axis:
        x = ctx.add("Transpose", [x], perm=front)
    gathered = ctx.add("GatherND", [x, stacked])
    if not axis:
        return gathered
    # gathered: [broadcast..., x[:axis]..., rest...] -> [x[:axis]..., broadcast..., rest...]
    perm = list(range(broadcast_rank, broadcast_rank + axis)) + list(range(broadcast_rank)) + \
        list(range(broadcast_rank + axis, out_type.rank))
    return ctx.add("Transpose", [gathered], perm=perm)


@lowering("embedding")
def _lower_embedding(ctx, node):
    return ctx.add("Gather", [ctx.input(0), ctx.input(1)], axis=0)


# linear algebra -------------------------------------------------------------------
@lowering("matmul")
def _lower_matmul(ctx, node):
    dtype = ctx.out_type().dtype
    a = ctx.cast(ctx.input(0), ctx.in_type(0).dtype, dtype)
    b = ctx.cast(ctx.input(1), ctx.in_type(1).dtype, dtype)
    return ctx.add("MatMul", [a, b])


def emit_linear(ctx, x: str, index: int) -> str:
    """x @ w.T for the weight at input ``index``: MatMul with the weight transposed once, at compile time."""
    name = ctx.weight_name(index)
    if name is not None:
        w_t = ctx.derived(f"{name}.T", lambda: ctx.module.weight_data[name].T)
    else:
        w_t = ctx.add("Transpose", [ctx.input(index)], perm=[1, 0])
    return ctx.add("MatMul", [x, w_t])


def _weight_of(ctx, node, index: int) -> str | None:
    producer = node.inputs[index].producer
    return producer.attrs["name"] if producer is not None and producer.op == "weight" else None


@lowering("linear")
def _lower_linear(ctx, node):
    y = emit_linear(ctx, ctx.input(0), 1)
    if len(node.inputs) == 3:
        y = ctx.add("Add", [y, ctx.input(2)])
    return y


# normalisation ----------------------------------------------------------------------
@lowering("layer_norm")
def _lower_layer_norm(ctx, node):
    return ctx.add("LayerNormalization", [ctx.input(0), ctx.input(1), ctx.input(2)], axis=-1,
                   epsilon=float(node.attrs["eps"]))


@lowering("rms_norm")
def _lower_rms_norm(ctx, node):
    return ctx.add("RMSNormalization", [ctx.input(0), ctx.input(1)], axis=-1, epsilon=float(node.attrs["eps"]))


@lowering("add_rms_norm")
def _lower_add_rms_norm(ctx, node):
    x, residual, w = ctx.input(0), ctx.input(1), ctx.input(2)
    if ctx.in_type(0).shape != ctx.in_type(1).shape:  # a broadcast residual: the plain ops
        total = ctx.add("Add", [x, residual])
        return [total, ctx.add("RMSNormalization", [total, w], axis=-1, epsilon=float(node.attrs["eps"]))]
    normed, total = ctx.fresh("normed"), ctx.fresh("total")
    ctx.add("SkipSimplifiedLayerNormalization", [x, residual, w], [normed, "", "", total], domain=MS_DOMAIN,
            epsilon=float(node.attrs["eps"]))
    return [total, normed]


# gated MLP ---------------------------------------------------------------------------
@lowering("gated_mlp")
def _lower_gated_mlp(ctx, node):
    x = ctx.input(0)
    gate_name, up_name = ctx.weight_name(1), ctx.weight_name(2)
    if gate_name is not None and up_name is not None:  # one matmul for both, then split
        data = ctx.module.weight_data
        w_t = ctx.derived(f"{gate_name}|{up_name}.T",
                          lambda: np.concatenate([data[gate_name].T, data[up_name].T], axis=1))
        size = data[gate_name].shape[0]
        gate, up = ctx.add("Split", [ctx.add("MatMul", [x, w_t]), ctx.const([size, size], "i64")], 2, axis=-1)
    else:
        gate, up = emit_linear(ctx, x, 1), emit_linear(ctx, x, 2)
    activation = node.attrs["activation"]
    if activation == "silu":
        act = ctx.add("Mul", [gate, ctx.add("Sigmoid", [gate])])
    else:
        act = ctx.add("Gelu", [gate], approximate="tanh" if activation == "gelu_tanh" else "none")
    return emit_linear(ctx, ctx.add("Mul", [act, up]), 3)


# RoPE ---------------------------------------------------------------------------------
def _rope_tables(ctx, index: int, rotary_dim: int, scaling: float) -> tuple:
    """cos/sin caches [max_seq_len, rotary_dim / 2] for ORT's RotaryEmbedding, computed as the IR's rope
    computes them (positions in float32 times inv_freq)."""
    inv_freq = ctx.weight_array(index).astype(np.float32)
    length = ctx.kv_spec.max_seq_len if ctx.kv_spec else ctx.module.metadata.get("capture", {}).get("max_seq", 2048)

    def tables():
        freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
        return (np.cos(freqs) * np.float32(scaling)).astype(np.float32), \
            (np.sin(freqs) * np.float32(scaling)).astype(np.float32)

    base = f"{ctx.weight_name(index)}.{'' if scaling == 1.0 else f'x{scaling!r}.'}{length}"
    return ctx.cached(("rope", base), lambda: tuple(ctx.derived(f"{base}.{n}", lambda t=t: t)
                                                    for n, t in zip(("cos", "sin"), tables())))


def _positions(ctx, index: int, batch) -> str:
    """Position ids [batch * seq, 1] for RotaryEmbedding (i64; a shared row broadcast to the batch)."""
    ptype = ctx.in_type(index)
    if ptype.shape[0] == batch and ptype.dtype == "i64":  # a view (the step's positions [T] seen as [1, T])
        return ctx.materialize(ctx.view_reshape(ctx.raw(index), ptype.shape, (ptype.shape[0] * ptype.shape[1], 1)))
    name = ctx.input(index)

    def build():
        ids = ctx.add("Expand", [ctx.cast(name, ptype.dtype, "i64"), ctx.shape((batch, 1))])
        return ctx.add("Reshape", [ids, ctx.const([-1, 1], "i64")])

    return ctx.cached(("positions", name, str(batch)), build)


@lowering("rope")
def _lower_rope(ctx, node):
    x_type = ctx.in_type(0)
    rotary_dim, seq_axis = node.attrs["rotary_dim"], node.attrs["seq_axis"]
    cos, sin = _rope_tables(ctx, 2, rotary_dim, node.attrs["scaling"])
    batch = x_type.shape[0]
    heads = x_type.shape[1] if seq_axis == 2 else x_type.shape[2]
    positions = _positions(ctx, 1, batch)
    # ORT's RotaryEmbedding on the [b, s, H * D] token layout, which is usually what the q/k projection made,
    # seen as [b * s, 1, H * D]: it refuses a seq longer than its cos/sin tables (max_seq_len), and a step's
    # flat batch of tokens may be longer than that.
    flat, tokens = _tokens_flat(ctx, 0, seq_axis)
    width = tokens[2] * tokens[3]
    rows = ctx.add("Reshape", [flat, ctx.const([-1, 1, width], "i64")])
    out = ctx.add("RotaryEmbedding", [rows, positions, cos, sin], domain=MS_DOMAIN,
                  interleaved=int(node.attrs.get("interleaved", False)), num_heads=heads,
                  rotary_embedding_dim=rotary_dim)
    shape = ctx.const([tokens[0], -1, width], "i64") if isinstance(tokens[0], int) else \
        ctx.cached(("shape of", flat), lambda: ctx.add("Shape", [flat]))
    return _from_tokens_flat(ctx, ctx.add("Reshape", [out, shape]), tokens, seq_axis)


@lowering("select_rows")
def _lower_select_rows(ctx, node):
    return ctx.add("Gather", [ctx.input(0), ctx.input(1)], axis=1)


# attention ----------------------------------------------------------------------------
def _tokens_flat(ctx, index: int, seq_axis: int = 2) -> tuple:
    """Input ``index``, an IR [b, H, s, D] (seq_axis 2) or [b, s, H, D] (seq_axis 1), as [b, s, H * D]; usually
    the very tensor a projection produced (the head split folds away). Returns (name, [b, s, H, D])."""
    x_type = ctx.in_type(index)
    entry, shape = ctx.raw(index), tuple(x_type.shape)
    if seq_axis == 2:
        entry = ctx.view_permute(entry, shape, (0, 2, 1, 3))
        shape = (shape[0], shape[2], shape[1], shape[3])
    flat = ctx.materialize(ctx.view_reshape(entry, shape, shape[:2] + (shape[2] * shape[3],)))
    return flat, shape


def _from_tokens_flat(ctx, flat: str, tokens: tuple, seq_axis: int = 2):
    """The inverse of _tokens_flat, lazily: [b, s, H * D] back to the IR layout."""
    entry = ctx.view_reshape(flat, tokens[:2] + (tokens[2] * tokens[3],), tokens)
    return ctx.view_permute(entry, tokens, (0, 2, 1, 3)) if seq_axis == 2 else entry


@lowering("paged_attention")
def _lower_paged_attention(ctx, node):
    """GroupQueryAttention on the padded view: q/k/v [1, T, H * D] -> [batch, seq, H * D] through pad_index, the
    layer's K/V buffers as past and present, the output back to [1, T, H * D] through unpad_index."""
    check_executor_operands(ctx, EXECUTOR_OPERANDS[node.op])
    q_type, k_type, v_type = ctx.in_type(0), ctx.in_type(1), ctx.in_type(2)
    kv_heads, dim = node.attrs["num_kv_heads"], q_type.shape[3]
    if v_type.shape[3] != dim:
        raise UnsupportedOpError(f"{ctx.where()}: GroupQueryAttention needs equal K and V head dims, found "
                                 f"{k_type} and {v_type}")
    (q, tokens), (k, _), (v, _) = (_tokens_flat(ctx, i) for i in range(3))
    out = group_query_attention(ctx, node, q, k, v, tokens, q_type.dtype, ctx.in_type(3).dtype, kv_heads, dim, dim)
    # [1, T, H * D] -> the IR's [1, H, T, D], lazily (the head merge before o_proj cancels it)
    return [_from_tokens_flat(ctx, out, tokens), ctx.raw(3), ctx.raw(4)]


def check_executor_operands(ctx, operands: dict) -> None:
    """The step's pools, page table and token_seq (``operands``: input index -> what) are parameters the executor
    consumes, not computed values."""
    for index, what in operands.items():
        if not isinstance(ctx.raw(index), ExecutorOperand):
            raise UnsupportedOpError(f"{ctx.where()}: expected the step's {what} as operand {index}, found a computed "
                                     f"value; expected the IR of kiln's pipeline")


def group_query_attention(ctx, node, q: str, k: str, v: str, tokens: tuple, dtype: str, cache_dtype: str,
                          kv_heads: int, dim: int, out_dim: int) -> str:
    """GroupQueryAttention of ``node``'s layer over its K/V buffers: q [1, T, H * dim], k/v [1, T, kv_heads * dim]
    in the step's flat token layout (``tokens`` = q's [1, T, H, dim]) -> [1, T, H * out_dim] (out_dim <= dim: the
    first columns of each head's output). Heads whose size GroupQueryAttention does not take are zero-padded."""
    heads = node.attrs["num_heads"]
    if cache_dtype not in ("f32", "f16"):
        raise UnsupportedOpError(f"{ctx.where()}: ONNX Runtime's GroupQueryAttention keeps an f32 or f16 cache, not "
                                 f"{cache_dtype}; compile with --kv-cache-dtype f32 or f16")
    layer = node.attrs["layer"]
    if layer in ctx.layers:
        raise UnsupportedOpError(f"{ctx.where()}: layer {layer} of the KV cache is attended twice in one call")
    gqa_dim = buffer_head_dim(dim)
    ctx.layers[layer] = (kv_heads, gqa_dim, cache_dtype)
    ctx.attention_tokens = tokens[1]

    def padded(flat: str, width: int) -> str:
        flat = ctx.cast(flat, dtype, cache_dtype)
        if gqa_dim != dim:  # zero columns at the end of every head: [1, T, H, D] -> [1, T, H * gqa_dim]
            flat = ctx.add("Reshape", [flat, ctx.const([1, -1, width, dim], "i64")])
            flat = ctx.add("Pad", [flat, ctx.const([0, 0, 0, 0, 0, 0, 0, gqa_dim - dim], "i64")])
            flat = ctx.add("Reshape", [flat, ctx.const([1, -1, width * gqa_dim], "i64")])
        rows = ctx.add("Gather", [flat, PAD_INDEX], axis=1)  # [1, batch, seq, H * D]
        return ctx.add("Squeeze", [rows, ctx.const([0], "i64")])

    q, k = padded(q, heads), padded(k, kv_heads)
    v = k if v == "same as k" else padded(v, kv_heads)
    window = node.attrs.get("window")
    extra = []
    if node.attrs.get("alibi") is not None:  # inputs 7-9 (rotary inside GQA) unused, 10 is attention_bias
        extra = ["", "", "", _alibi_bias(ctx, node.attrs["alibi"], cache_dtype)]
    out = ctx.add("GroupQueryAttention",
                  [q, k, v, *past_names(layer), SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *extra],
                  [None, *present_names(layer)], domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
                  scale=float(node.attrs["scale"]), local_window_size=-1 if window is None else int(window),
                  softcap=float(node.attrs.get("softcap") or 0.0))[0]
    if gqa_dim != out_dim:  # drop the padding (and any columns past out_dim): [batch, seq, H, out_dim]
        out = ctx.add("Reshape", [out, ctx.const([0, 0, heads, gqa_dim], "i64")])
        out = ctx.add("Slice", [out, ctx.const([0], "i64"), ctx.const([out_dim], "i64"), ctx.const([3], "i64")])
    out = ctx.add("Reshape", [out, ctx.const([1, -1, heads * out_dim], "i64")])  # [1, batch * seq, H * out_dim]
    return ctx.cast(ctx.add("Gather", [out, UNPAD_INDEX], axis=1), cache_dtype, dtype)


def _alibi_bias(ctx, slopes, dtype: str) -> str:
    """GroupQueryAttention's attention_bias [batch, H, seq, total] for ALiBi on the padded view: slope_h * (key
    position - the query's position), the query positions gathered from the step's positions like q. Built once per
    call and shared by every layer with the same slopes."""
    def build():
        positions = ctx.add("Squeeze", [ctx.add("Gather", [ctx.input(6), PAD_INDEX], axis=1),
                                        ctx.const([0], "i64")])  # [batch, seq]
        total = ctx.add("Cast", [TOTAL_SEQUENCE_LENGTH], to=TensorProto.INT64)
        keys = ctx.add("Range", [ctx.const(0, "i64"), total, ctx.const(1, "i64")])  # [total]
        distance = ctx.add("Sub", [keys, ctx.add("Unsqueeze", [positions, ctx.const([2], "i64")])])
        distance = ctx.add("Unsqueeze", [ctx.add("Cast", [distance], to=TensorProto.FLOAT), ctx.const([1], "i64")])
        bias = ctx.add("Mul", [distance, ctx.const(np.asarray(slopes, np.float32).reshape(1, -1, 1, 1), "f32")])
        return ctx.cast(bias, "f32", dtype)
    return ctx.cached(("alibi", tuple(slopes), dtype), build)


def _attention_mask(ctx, sq, sk, window) -> str:
    """bool [sq, sk]: key j visible to query i when j <= i (and i - j < window): top-left causal."""
    i = ctx.add("Unsqueeze", [ctx.add("Range", [ctx.const(0, "i64"), ctx.dim_scalar(sq), ctx.const(1, "i64")]),
                              ctx.const([1], "i64")])
    j = ctx.add("Range", [ctx.const(0, "i64"), ctx.dim_scalar(sk), ctx.const(1, "i64")])
    diff = ctx.add("Sub", [i, j])
    mask = ctx.add("GreaterOrEqual", [diff, ctx.const(0, "i64")])
    if window is not None:
        mask = ctx.add("And", [mask, ctx.add("Less", [diff, ctx.const(int(window), "i64")])])
    return mask


def _plain_attention(ctx, q, k, v, q_type, k_type, scale, causal, window, mask=None, mask_type=None, softcap=None,
                     alibi=None):
    rank = q_type.rank
    dtype = q_type.dtype
    heads, kv_heads = q_type.shape[-3], k_type.shape[-3]
    if kv_heads != heads and kv_heads != 1:
        repeats = heads // kv_heads  # query head h reads KV head h // repeats
        k = _repeat_heads(ctx, k, k_type, repeats)
        v = _repeat_heads(ctx, v, k_type, repeats)
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = ctx.add("MatMul", [q, ctx.add("Transpose", [k], perm=swap)])
    scores = ctx.add("Mul", [scores, ctx.const(scale, dtype)])
    if softcap is not None:
        scores = ctx.add("Mul", [ctx.add("Tanh", [ctx.add("Div", [scores, ctx.const(softcap, dtype)])]),
                                 ctx.const(softcap, dtype)])
    if alibi is not None:  # slope_h * (key - query) for the top-left aligned positions the causal mask uses
        sq, sk = q_type.shape[-2], k_type.shape[-2]
        query = ctx.add("Range", [ctx.const(0, "i64"), ctx.dim_scalar(sq), ctx.const(1, "i64")])
        key = ctx.add("Range", [ctx.const(0, "i64"), ctx.dim_scalar(sk), ctx.const(1, "i64")])
        distance = ctx.add("Sub", [key, ctx.add("Unsqueeze", [query, ctx.const([1], "i64")])])
        distance = ctx.cast(distance, "i64", dtype)
        slopes = ctx.const(np.asarray(alibi, numpy_dtype(dtype)).reshape(-1, 1, 1), dtype)
        scores = ctx.add("Add", [scores, ctx.add("Mul", [distance, slopes])])
    ninf = ctx.const(-math.inf, dtype)
    if causal:
        scores = ctx.add("Where", [_attention_mask(ctx, q_type.shape[-2], k_type.shape[-2], window), scores, ninf])
    if mask is not None:
        if mask_type.dtype == "bool":
            scores = ctx.add("Where", [mask, scores, ninf])
        else:
            scores = ctx.add("Add", [scores, ctx.cast(mask, mask_type.dtype, dtype)])
    return ctx.add("MatMul", [ctx.add("Softmax", [scores], axis=-1), v])


def _repeat_heads(ctx, x, x_type, repeats):
    rank = x_type.rank
    shape = list(x_type.shape)
    # [..., Hkv, S, D] -> [..., Hkv, 1, S, D] -> expand [..., Hkv, r, S, D] -> [..., Hkv * r, S, D]
    x = ctx.add("Unsqueeze", [x, ctx.const([rank - 2], "i64")])
    expanded = shape[:-2] + [repeats] + shape[-2:]
    x = ctx.add("Expand", [x, ctx.shape(expanded)])
    return ctx.add("Reshape", [x, ctx.shape(shape[:-3] + [shape[-3] * repeats] + shape[-2:])])


@lowering("sdpa")
def _lower_sdpa(ctx, node):
    q_type, k_type = ctx.in_type(0), ctx.in_type(1)
    scale = node.attrs["scale"]
    scale = 1.0 / math.sqrt(q_type.shape[-1]) if scale is None else scale
    if not node.attrs["enable_gqa"] and k_type.shape[-3] != q_type.shape[-3] and k_type.shape[-3] != 1:
        raise UnsupportedOpError(f"{ctx.where()}: q and k head counts differ without enable_gqa")
    mask = ctx.input(3) if len(node.inputs) == 4 else None
    return _plain_attention(ctx, ctx.input(0), ctx.input(1), ctx.input(2), q_type, k_type, scale,
                            node.attrs["is_causal"], None, mask, ctx.in_type(3) if mask else None)


@lowering("attention")
def _lower_attention(ctx, node):
    return _plain_attention(ctx, ctx.input(0), ctx.input(1), ctx.input(2), ctx.in_type(0), ctx.in_type(1),
                            node.attrs["scale"], True, node.attrs["window"], softcap=node.attrs.get("softcap"),
                            alibi=node.attrs.get("alibi"))


# the function walk ------------------------------------------------------------------------
def check_lowerable(fn: Function) -> None:
    """Raise UnsupportedOpError for the first op with no ONNX lowering (before any emission)."""
    for node in fn.nodes:
        if node.op not in LOWERINGS:
            where = ", ".join(f"%{v.name}" for v in node.outputs)
            raise UnsupportedOpError(
                f"op {node.op!r} ({where} in @{fn.name}) has no ONNX Runtime lowering; expected one of "
                f"{len(LOWERINGS)} lowered ops; add an entry to LOWERINGS in kiln/backends/onnxruntime/lower.py "
                "or use another backend")


def _value_info(name: str, t: TensorType):
    dims = []
    for d in t.shape:
        if isinstance(d, int):
            dims.append(d)
        elif len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
            dims.append(d.terms[0][0][0])
        else:
            dims.append(None)
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], dims)


@dataclass
class LoweredFunction:
    graph: onnx.GraphProto  # initializers not attached: ``initializers`` holds them
    initializers: dict
    inputs: list  # graph input names in order (the function's own, then the padded view, then past K/V)
    layers: dict  # layer -> (num_kv_heads, head_dim, cache dtype)


# the padded view's dims in the graph (names no step input uses)
_BATCH, _SEQ = "attention_batch", "attention_seq"


def lower_function(module: Module, name: str, options: dict | None = None) -> LoweredFunction:
    """Lower ``@name`` (the ragged step, or any function without a KV cache) to an ONNX graph.

    Graph inputs: the function's inputs except those only paged_attention reads (the pools, ``page_table``,
    ``token_seq``), then, when it attends over the cache, ``pad_index``, ``unpad_index``, ``seqlens_k``,
    ``total_sequence_length`` and ``past_key_<l>`` / ``past_value_<l>``; outputs: ``logits`` and
    ``present_key_<l>`` / ``present_value_<l>`` (the same buffers as the pasts, bound by the executor).
    """
    if name not in module.functions:
        raise ConfigError(f"expected a function @{name} in the module, found "
                          f"{', '.join('@' + f for f in module.functions) or 'none'}")
    fn = module.functions[name]
    decompose_gated_mlp_q(fn)  # ops lowered as their subgraphs, rewritten in place
    check_lowerable(fn)
    ctx = LoweringContext(module, fn, options or {})
    executor_operands = _executor_operands(fn)
    graph_inputs = []
    for p in fn.params:
        if id(p) in executor_operands:
            ctx.values[id(p)] = ExecutorOperand(executor_operands[id(p)])
            continue
        ctx.values[id(p)] = p.name
        ctx._names.add(p.name)
        graph_inputs.append(_value_info(p.name, p.type))
        for axis, d in enumerate(p.type.shape):
            if isinstance(d, SymExpr) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
                ctx.symbols.setdefault(d.terms[0][0][0], (p.name, axis))
    ctx._names.update(ATTENTION_INPUTS)
    for node in fn.nodes:
        ctx.node = node
        out = LOWERINGS[node.op](ctx, node)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(outs) != len(node.outputs):
            raise AssertionError(f"lowering of {node.op} gave {len(outs)} values for {len(node.outputs)} outputs")
        for value, entry in zip(node.outputs, outs):
            ctx.values[id(value)] = entry
    results = [ctx.values[id(r)] for r in fn.results]
    plain = [(r, e) for r, e in zip(fn.results, results) if not isinstance(e, ExecutorOperand)]
    if len(plain) != 1:
        raise UnsupportedOpError(f"@{name}: expected one result besides the KV cache (the logits), found {len(plain)}")
    value, entry = plain[0]
    ctx.node = None
    logits = ctx.materialize(entry, value.type)
    ctx.nodes.append(helper.make_node("Identity", [logits], [LOGITS], name="logits"))
    graph_outputs = [_value_info(LOGITS, value.type)]
    if sorted(ctx.layers) != list(range(len(ctx.layers))):
        raise UnsupportedOpError(f"@{name}: expected paged_attention layers 0..{len(ctx.layers) - 1}, found "
                                 f"{sorted(ctx.layers)}")
    view, past, present = [], [], []
    if ctx.layers:
        view = [helper.make_tensor_value_info(PAD_INDEX, TensorProto.INT64, [_BATCH, _SEQ]),
                _value_info(UNPAD_INDEX, TensorType("i64", (ctx.attention_tokens,))),
                helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [_BATCH]),
                helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [])]
    for layer in sorted(ctx.layers):
        kv_heads, dim, dtype = ctx.layers[layer]
        shape = [_BATCH, kv_heads, ctx.kv_spec.max_seq_len, dim]
        past += [helper.make_tensor_value_info(n, ONNX_DTYPES[dtype], shape) for n in past_names(layer)]
        present += [helper.make_tensor_value_info(n, ONNX_DTYPES[dtype], shape) for n in present_names(layer)]
    inputs = graph_inputs + view + past
    graph = helper.make_graph(ctx.nodes, name, inputs, graph_outputs + present)
    return LoweredFunction(graph, ctx.initializers, [i.name for i in inputs], dict(ctx.layers))


def _executor_operands(fn: Function) -> dict:
    """id(parameter) -> what it is, for the parameters paged_attention reads as its pools, page table and
    token_seq: the executor's business. (A pool after the first layer is the previous attention's output.)"""
    params = {id(p) for p in fn.params}
    roles = {}
    for node in fn.nodes:
        if node.op in EXECUTOR_OPERANDS:
            for index, what in EXECUTOR_OPERANDS[node.op].items():
                if id(node.inputs[index]) in params:
                    roles[id(node.inputs[index])] = what
    return roles


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="kiln")
    model.ir_version = 10
    return model


__all__ = ["LOWERINGS", "lower_function", "make_model", "UnsupportedOpError"]
