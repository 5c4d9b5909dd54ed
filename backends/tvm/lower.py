"""Lowering of kiln IR functions into TVM Relax functions.

``LOWERINGS`` maps each kiln op name to a function that emits Relax for one node
(relax ops where TVM has them, TE compute otherwise); ``lower_function`` walks a
kiln function and returns an IRModule whose entry takes the inputs, then the weights.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import tvm
import tvm.sym
import tvm_ffi
from tvm import relax, te, tirx

from kiln.ir.errors import ConfigError, UnsupportedOpError
from kiln.ir.graph import Function, Module, Node
from kiln.ir.quant_mlp_ops import decompose as decompose_gated_mlp_q
from kiln.ir.symbolic import SymExpr
from kiln.ir.types import TensorType, is_float, numpy_dtype, promote

try:  # Fast CPU kernels are optional: without them linear uses the generic NT kernel.
    from kiln.backends.tvm import kernels as _kernels
except ImportError:  # pragma: no cover - kernels.py is written by another part of kiln
    _kernels = None

TVM_DTYPES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8",
    "u8": "uint8", "u32": "uint32", "bool": "bool",
}

# PrimFunc attribute that keeps FuseOps from merging a hand-scheduled kernel into
# its neighbours (8 is TVM's kOpaque op pattern).
OPAQUE = {"op_pattern": 8}
# Prefix of the PrimFuncs emitted while lowering, so they never take the name of
# an entry function (the block builder would rename the entry instead).
TE_PREFIX = "te_"
# Function attribute holding the weight names in parameter order (after the inputs).
WEIGHT_NAMES_ATTR = "kiln.weight_names"
# f16 block scales / offsets the CPU kernels take as f32: the executor widens them on load (exact),
# which keeps an f16 -> f32 conversion out of every element of the quantized GEMV's inner loop.
WIDENED_ATTR = "kiln.widened_weights"
# Weights the lowering computes from the module's at compile time (a kernel's own layout, e.g. the VNNI
# kernels' repacked int4 blocks). A provider (fn, module, target) -> {claimed node ids}, {name: array} is
# registered by the lowering that needs them; the weights of claimed nodes that nothing else reads are not
# parameters, the derived arrays are (after the module's weights, in the order given).
DERIVED_WEIGHT_PROVIDERS: list = []


def tvm_dtype(dtype: str) -> str:
    return TVM_DTYPES[dtype]


class LoweringContext:
    """What a lowering rule sees: the block builder, the target, symbols and weights."""

    def __init__(self, bb: relax.BlockBuilder, module: Module, function: Function,
                 target: tvm.target.Target, symbols: dict, weights: dict):
        self.bb = bb
        self.module = module
        self.function = function
        self.target = target
        self.symbols = symbols  # kiln symbol name -> tirx.Var("name", "int64")
        self.weights = weights  # weight name -> relax.Var parameter
        self.node: Node | None = None
        self.values: dict = {}  # id(kiln Value) -> the Relax expression it lowered to
        self.analyzer = tvm.sym.Analyzer()

    @property
    def is_cpu(self) -> bool:
        return self.target.kind.name == "llvm"

    # dims -------------------------------------------------------------------
    def dim(self, d) -> tirx.PrimExpr:
        """A kiln dim (int or SymExpr polynomial) as an int64 TIR expression."""
        if isinstance(d, int):
            return tirx.IntImm("int64", d)
        total = None
        for monomial, coeff in d.terms:
            term = tirx.IntImm("int64", coeff)
            for name in monomial:
                term = term * self.symbols[name]
            total = term if total is None else total + term
        # One spelling per dim (`seq + 1`, never `1 + seq`): FuseTIR matches buffer
        # shapes structurally across the kernels it fuses.
        return self.analyzer.simplify(total)

    def shape(self, dims) -> list:
        return [self.dim(d) for d in dims]

    def out_type(self, index: int = 0) -> TensorType:
        return self.node.outputs[index].type

    def in_type(self, index: int) -> TensorType:
        return self.node.inputs[index].type

    # emission ---------------------------------------------------------------
    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def emit_te(self, fn: Callable, *args, name: str, attrs: dict | None = None) -> relax.Var:
        """bb.emit_te. Pass every symbolic dim `fn` needs as an argument (ctx.dim / ctx.shape),
        never through a closure: emit_te renames the symbols of the PrimFunc it builds."""
        kwargs = {"primfunc_name_hint": TE_PREFIX + name}
        if attrs:
            kwargs["primfunc_attrs"] = attrs
        return self.bb.emit_te(fn, *args, **kwargs)

    def cast(self, expr: relax.Expr, from_dtype: str, to_dtype: str) -> relax.Expr:
        """Convert to `to_dtype`; a constant is converted at lowering time."""
        if from_dtype == to_dtype:
            return expr
        if isinstance(expr, tvm.ir.expr.Constant):
            return relax.const(expr.value.numpy().astype(numpy_dtype(to_dtype)), tvm_dtype(to_dtype))
        return self.emit(relax.op.astype(expr, tvm_dtype(to_dtype)))

    def constant_value(self, index: int):
        """The value of input `index` when it comes from a `constant` node, else None."""
        producer = self.node.inputs[index].producer
        if producer is not None and producer.op == "constant":
            return producer.attrs["value"]
        return None


Lowering = Callable[[LoweringContext, Node, list], "relax.Expr | list"]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*names: str):
    """Register one rule for the given op names (adding an op is one decorated function)."""

    def register(fn: Lowering) -> Lowering:
        for name in names:
            assert name not in LOWERINGS, f"two TVM lowerings for {name}"
            LOWERINGS[name] = fn
        return fn

    return register


# elementwise ------------------------------------------------------------------
_BINARY = {
    "add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply, "div": relax.op.divide,
    "pow": relax.op.power, "maximum": relax.op.maximum, "minimum": relax.op.minimum,
    "eq": relax.op.equal, "ne": relax.op.not_equal, "lt": relax.op.less, "le": relax.op.less_equal,
    "gt": relax.op.greater, "ge": relax.op.greater_equal,
    "and": relax.op.logical_and, "or": relax.op.logical_or,
}


@lowering(*_BINARY)
def _lower_binary(ctx, node, inputs):
    a_type, b_type = ctx.in_type(0), ctx.in_type(1)
    dtype = promote(a_type.dtype, b_type.dtype)
    a = ctx.cast(inputs[0], a_type.dtype, dtype)
    b = ctx.cast(inputs[1], b_type.dtype, dtype)
    if node.op == "pow":
        # x ** 2 is everywhere (RMSNorm, GELU-tanh); a multiply beats a libm pow call.
        exponent = ctx.constant_value(1)
        if exponent == 2 and b_type.shape == () and is_float(dtype):
            return ctx.emit(relax.op.multiply(a, a))
    return ctx.emit(_BINARY[node.op](a, b))


_UNARY = {
    "neg": relax.op.negative, "exp": relax.op.exp, "log": relax.op.log, "sqrt": relax.op.sqrt,
    "rsqrt": relax.op.rsqrt, "sin": relax.op.sin, "cos": relax.op.cos, "tanh": relax.op.tanh,
    "abs": relax.op.abs, "erf": relax.op.erf, "sigmoid": relax.op.sigmoid, "silu": relax.op.nn.silu,
    "relu": relax.op.nn.relu, "not": relax.op.logical_not,
}


# Half-precision operands of these ops are computed in f32 registers and rounded once, as torch's half kernels
# do (its "opmath" type): CUDA's own f16 / bf16 intrinsics (hexp, ...) are less exact, and bf16 has few.
_EXACT_IN_HALF = {"neg", "abs", "relu", "not"}
HALF_DTYPES = ("f16", "bf16")


def in_f32(ctx, op, x, dtype: str) -> relax.Var:
    """op(x) for a float x of kiln dtype ``dtype``: through f32 when ``dtype`` is a half type."""
    if dtype not in HALF_DTYPES:
        return ctx.emit(op(x))
    wide = ctx.emit(op(ctx.emit(relax.op.astype(x, "float32"))))
    return ctx.emit(relax.op.astype(wide, tvm_dtype(dtype)))


@lowering(*_UNARY)
def _lower_unary(ctx, node, inputs):
    if node.op in _EXACT_IN_HALF:
        return ctx.emit(_UNARY[node.op](inputs[0]))
    return in_f32(ctx, _UNARY[node.op], inputs[0], ctx.in_type(0).dtype)


@lowering("reciprocal")
def _lower_reciprocal(ctx, node, inputs):
    one = relax.const(1, tvm_dtype(ctx.in_type(0).dtype))
    return ctx.emit(relax.op.divide(one, inputs[0]))


@lowering("gelu")
def _lower_gelu(ctx, node, inputs):
    op = relax.op.nn.gelu_tanh if node.attrs["approximate"] == "tanh" else relax.op.nn.gelu
    return in_f32(ctx, op, inputs[0], ctx.in_type(0).dtype)


@lowering("cast")
def _lower_cast(ctx, node, inputs):
    return ctx.cast(inputs[0], ctx.in_type(0).dtype, node.attrs["dtype"])


@lowering("where")
def _lower_where(ctx, node, inputs):
    dtype = ctx.out_type().dtype
    a = ctx.cast(inputs[1], ctx.in_type(1).dtype, dtype)
    b = ctx.cast(inputs[2], ctx.in_type(2).dtype, dtype)
    return ctx.emit(relax.op.where(inputs[0], a, b))


# sources ------------------------------------------------------------------------
@lowering("constant")
def _lower_constant(ctx, node, inputs):
    dtype = node.attrs["dtype"]
    return relax.const(np.array(node.attrs["value"], dtype=numpy_dtype(dtype)), tvm_dtype(dtype))


@lowering("full")
def _lower_full(ctx, node, inputs):
    out = ctx.out_type()
    fill = relax.const(np.array(node.attrs["value"], dtype=numpy_dtype(out.dtype)), tvm_dtype(out.dtype))
    if out.shape == ():
        return fill
    return ctx.emit(relax.op.full(ctx.shape(out.shape), fill, tvm_dtype(out.dtype)))


@lowering("arange")
def _lower_arange(ctx, node, inputs):
    dtype = tvm_dtype(node.attrs["dtype"])
    start, end, step = (ctx.dim(node.attrs[k]) for k in ("start", "end", "step"))
    return ctx.emit(relax.op.arange(start, end, step, dtype))


@lowering("weight")
def _lower_weight(ctx, node, inputs):
    return ctx.weights[node.attrs["name"]]


# reductions -------------------------------------------------------------------
_REDUCE = {"sum": relax.op.sum, "mean": relax.op.mean, "max": relax.op.max, "min": relax.op.min}


@lowering(*_REDUCE)
def _lower_reduce(ctx, node, inputs):
    x = ctx.cast(inputs[0], ctx.in_type(0).dtype, ctx.out_type().dtype)
    rank = ctx.in_type(0).rank
    axes = sorted(a % rank for a in node.attrs["axes"])
    if not axes:
        return x
    return ctx.emit(_REDUCE[node.op](x, axes, keepdims=node.attrs["keepdims"]))


@lowering("softmax")
def _lower_softmax(ctx, node, inputs):
    return ctx.emit(relax.op.nn.softmax(inputs[0], node.attrs["axis"]))


@lowering("cumsum")
def _lower_cumsum(ctx, node, inputs):
    dtype = node.attrs["dtype"]
    x = ctx.cast(inputs[0], ctx.in_type(0).dtype, dtype)
    axis = node.attrs["axis"] % ctx.in_type(0).rank
    return ctx.emit(relax.op.cumsum(x, axis, tvm_dtype(dtype)))


# shape ops --------------------------------------------------------------------
@lowering("reshape")
def _lower_reshape(ctx, node, inputs):
    return ctx.emit(relax.op.reshape(inputs[0], ctx.shape(node.attrs["shape"])))


@lowering("permute")
def _lower_permute(ctx, node, inputs):
    perm = list(node.attrs["perm"])
    if perm == sorted(perm):
        return inputs[0]
    return ctx.emit(relax.op.permute_dims(inputs[0], perm))


@lowering("expand")
def _lower_expand(ctx, node, inputs):
    if tuple(node.attrs["shape"]) == tuple(ctx.in_type(0).shape):
        return inputs[0]
    return ctx.emit(relax.op.broadcast_to(inputs[0], ctx.shape(node.attrs["shape"])))


@lowering("slice")
def _lower_slice(ctx, node, inputs):
    # TE rather than strided_slice: the output shape is kiln's own symbolic length,
    # with no clamping expressions for the analyzer to untangle.
    axis = node.attrs["axis"] % ctx.in_type(0).rank
    step = node.attrs["step"]

    def te_slice(x, start, shape):
        def body(*i):
            idx = list(i)
            idx[axis] = start + i[axis] * step
            return x[tuple(idx)]

        return te.compute(shape, body, name="slice")

    return ctx.emit_te(te_slice, inputs[0], ctx.dim(node.attrs["start"]), ctx.shape(ctx.out_type().shape),
                       name="slice")


@lowering("concat")
def _lower_concat(ctx, node, inputs):
    if len(inputs) == 1:
        return inputs[0]
    axis = node.attrs["axis"] % ctx.in_type(0).rank
    return ctx.emit(relax.op.concat(list(inputs), axis))


def _wrap_index(value, extent):
    """numpy's negative-index rule, then a clamp so a bad index cannot read out of bounds."""
    value = value.astype("int64")
    value = tirx.Select(value < 0, value + extent, value)
    return tirx.max(tirx.min(value, extent - 1), tirx.IntImm("int64", 0))


@lowering("index")
def _lower_index(ctx, node, inputs):
    axis = node.attrs["axis"]
    x_type = ctx.in_type(0)
    index_types = [t.type for t in node.inputs[1:]]
    out_shape = ctx.out_type().shape
    consumed = len(index_types)
    broadcast_rank = len(out_shape) - (x_type.rank - consumed)

    def te_index(x, shape, *indices):
        def body(*i):
            b = i[axis:axis + broadcast_rank]
            picked = []
            for j, (t, t_type) in enumerate(zip(indices, index_types)):
                own = b[broadcast_rank - t_type.rank:]
                # A static 1 in an index tensor broadcasts: read its only element.
                coords = [tirx.IntImm("int64", 0) if d == 1 else c for d, c in zip(t_type.shape, own)]
                picked.append(_wrap_index(t[tuple(coords)], x.shape[axis + j]))
            return x[tuple(i[:axis]) + tuple(picked) + tuple(i[axis + broadcast_rank:])]

        return te.compute(shape, body, name="index")

    return ctx.emit_te(te_index, inputs[0], ctx.shape(out_shape), *inputs[1:], name="index")


@lowering("embedding")
def _lower_embedding(ctx, node, inputs):
    # "clip": an out-of-range token id must not read outside the table.
    return ctx.emit(relax.op.take(inputs[0], inputs[1], axis=0, mode="clip"))


# linear algebra -------------------------------------------------------------------
@lowering("matmul")
def _lower_matmul(ctx, node, inputs):
    dtype = ctx.out_type().dtype
    a = ctx.cast(inputs[0], ctx.in_type(0).dtype, dtype)
    b = ctx.cast(inputs[1], ctx.in_type(1).dtype, dtype)
    source = node.inputs[1].producer
    if (source is not None and source.op == "permute" and source.inputs[0] is node.inputs[0]
            and dtype == ctx.in_type(0).dtype):
        # x @ x^T: TVM's FuseTransposeMatmul breaks when both operands are one
        # variable, so emit the NT kernel here (same batch dims by construction).
        perm = list(source.attrs["perm"])
        rank = len(perm)
        if perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return nt_matmul(ctx, inputs[0], inputs[0])
    return ctx.emit(relax.op.matmul(a, b))


def nt_matmul(ctx, a, b, name: str = "NT_matmul") -> relax.Var:
    """a[..., M, K] @ b[..., N, K]^T in one reduction kernel (the form dlight's GEMV and
    Matmul rules schedule). b's leading dims, if any, equal a's; a 2-D b is shared.
    Half-precision inputs accumulate in float32, as torch does on CPU; the result takes a's dtype (f32
    activations against half weights: the logits of half compute)."""
    dtype = ctx.out_type().dtype
    accumulate = "float32" if dtype in HALF_DTYPES else tvm_dtype(dtype)

    def te_nt_matmul(x, y):
        k = te.reduce_axis((0, x.shape[-1]), name="k")
        lead = len(y.shape) - 2

        def body(*i):
            xv, yv = x[tuple(i[:-1]) + (k,)], y[tuple(i[:lead]) + (i[-1], k)]
            xv = xv if xv.dtype == accumulate else xv.astype(accumulate)
            yv = yv if yv.dtype == accumulate else yv.astype(accumulate)
            return te.sum(xv * yv, axis=k)

        out = te.compute(list(x.shape[:-1]) + [y.shape[-2]], body, name=name)
        if accumulate == x.dtype:
            return out
        return te.compute(out.shape, lambda *i: out[i].astype(x.dtype), name=name + "_cast")

    # dlight's gpu.Matmul tensorizes fp16 and crashes in s_tir::Tensorize (see the TVM note)
    half = any(isinstance(e.ty, relax.TensorType) and e.ty.dtype in ("float16", "bfloat16") for e in (a, b))
    attrs = {"dlight.do_not_tensorize": True} if not ctx.is_cpu and half else None
    return ctx.emit_te(te_nt_matmul, a, b, name=name, attrs=attrs)


# GEMV (one row per sequence) vs row-tiled GEMM (prefill): rows counted by these
# symbols alone are few; anything with `seq` in it is a prefill.
SMALL_ROW_SYMBOLS = frozenset({"batch", "decode_tokens"})  # @step_decode: one token per sequence
SMALL_ROW_LIMIT = 8


def _use_cpu_kernel(ctx: LoweringContext, x_type: TensorType, w_type: TensorType) -> bool:
    """kernels.linear takes f32 x and f32, f16 or bf16 weights (widened as they are read)."""
    return (_kernels is not None and ctx.is_cpu and x_type.dtype in ("f32",) + HALF_DTYPES
            and w_type.dtype in ("f32",) + HALF_DTYPES and w_type.is_static)


def _linear_row_tile(rows) -> int | None:
    if isinstance(rows, int):
        return None if rows <= SMALL_ROW_LIMIT else _kernels.DEFAULT_ROW_TILE
    return None if rows.symbols <= SMALL_ROW_SYMBOLS else _kernels.DEFAULT_ROW_TILE


def emit_linear(ctx, x, x_type: TensorType, w, w_type: TensorType) -> relax.Var:
    """x[..., K] @ w[N, K]^T: kiln's CPU kernel when it applies, else one NT matmul."""
    if not _use_cpu_kernel(ctx, x_type, w_type):
        return nt_matmul(ctx, x, w)
    # kernels.linear wants x[m, K]: flatten the leading dims, then restore them.
    rows = 1
    for d in x_type.shape[:-1]:
        rows = rows * d
    k = x_type.shape[-1]
    x2 = x if x_type.rank == 2 else ctx.emit(relax.op.reshape(x, [ctx.dim(rows), ctx.dim(k)]))
    if x_type.dtype != "f32":  # half activations (half compute on the CPU): the kernel reads f32 rows
        x2 = ctx.emit(relax.op.astype(x2, "float32"))
    row_tile = _linear_row_tile(rows)
    y = ctx.emit_te(lambda a, b: _kernels.linear(a, b, row_tile=row_tile), x2, w, name="linear", attrs=OPAQUE)
    if x_type.dtype != "f32":
        y = ctx.emit(relax.op.astype(y, tvm_dtype(x_type.dtype)))
    if x_type.rank != 2:
        y = ctx.emit(relax.op.reshape(y, ctx.shape(tuple(x_type.shape[:-1]) + (w_type.shape[0],))))
    return y


@lowering("linear")
def _lower_linear(ctx, node, inputs):
    y = emit_linear(ctx, inputs[0], ctx.in_type(0), inputs[1], ctx.in_type(1))
    if len(inputs) == 3:
        y = ctx.emit(relax.op.add(y, inputs[2]))
    return y


# normalisation and attention ---------------------------------------------------
@lowering("layer_norm")
def _lower_layer_norm(ctx, node, inputs):
    x, w, b = inputs
    dtype = ctx.in_type(0).dtype
    if dtype != "bf16":  # TVM's layer_norm takes f32 and f16 (statistics in f32)
        return ctx.emit(relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=node.attrs["eps"]))
    x, w, b = (ctx.emit(relax.op.astype(v, "float32")) for v in (x, w, b))
    y = ctx.emit(relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=node.attrs["eps"]))
    return ctx.emit(relax.op.astype(y, tvm_dtype(dtype)))


def _causal_mask(ctx, scores):
    """Top-left aligned causal mask (torch's is_causal): key j is visible to query i if j <= i."""
    fill = tirx.const(-math.inf, tvm_dtype(ctx.out_type().dtype))

    def te_causal(s):
        rank = len(s.shape)
        return te.compute(s.shape, lambda *i: tirx.Select(i[rank - 1] <= i[rank - 2], s[i], fill),
                          name="causal_mask")

    return ctx.emit_te(te_causal, scores, name="causal_mask")


@lowering("sdpa")
def _lower_sdpa(ctx, node, inputs):
    q_type, k_type = ctx.in_type(0), ctx.in_type(1)
    q, k, v = inputs[:3]
    dtype = q_type.dtype
    rank = q_type.rank
    k_lead = tuple(k_type.shape[:-2])
    if node.attrs["enable_gqa"] and k_type.shape[-3] != q_type.shape[-3]:
        repeats = q_type.shape[-3] // k_type.shape[-3]
        k = ctx.emit(relax.op.repeat(k, repeats, axis=rank - 3))
        v = ctx.emit(relax.op.repeat(v, repeats, axis=rank - 3))
        k_lead = k_lead[:-1] + (q_type.shape[-3],)
    scale = node.attrs["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(q_type.shape[-1])
    if tuple(q_type.shape[:-2]) == k_lead:
        scores = nt_matmul(ctx, q, k)
    else:  # batch dims that broadcast
        swap = list(range(rank - 2)) + [rank - 1, rank - 2]
        scores = ctx.emit(relax.op.matmul(q, ctx.emit(relax.op.permute_dims(k, swap))))
    scores = ctx.emit(relax.op.multiply(scores, relax.const(scale, tvm_dtype(dtype))))
    if node.attrs["is_causal"]:
        scores = _causal_mask(ctx, scores)
    if len(inputs) == 4:
        mask, mask_type = inputs[3], ctx.in_type(3)
        if mask_type.dtype == "bool":
            ninf = relax.const(-math.inf, tvm_dtype(dtype))
            scores = ctx.emit(relax.op.where(mask, scores, ninf))
        else:
            scores = ctx.emit(relax.op.add(scores, ctx.cast(mask, mask_type.dtype, dtype)))
    probs = ctx.emit(relax.op.nn.softmax(scores, axis=-1))
    return ctx.emit(relax.op.matmul(probs, v))


# the function walk ------------------------------------------------------------
def cpu_target() -> tvm.target.Target:
    """The host CPU with its real mcpu (plain "llvm" has no AVX)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def local_cuda_arch() -> str | None:
    """This machine's GPU as "sm_XY", or None without a GPU (or without libcuda)."""
    device = tvm.cuda(0)
    if not device.exist:
        return None
    return "sm_" + device.compute_version.replace(".", "")


def as_target(target) -> tvm.target.Target:
    """"cpu", "cuda" (this machine's GPU, else sm_80), "cuda:sm_90", a Target or a JSON dict."""
    if isinstance(target, tvm.target.Target):
        return target
    if target in (None, "cpu", "llvm"):
        return cpu_target()
    if isinstance(target, str) and target.split(":")[0] == "cuda":
        arch = target.split(":")[1] if ":" in target else local_cuda_arch() or "sm_80"
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=cpu_target())
    if isinstance(target, dict):
        return tvm.target.Target(target)
    raise ConfigError(f"expected target 'cpu', 'cuda', 'cuda:sm_XX' or a tvm Target, found {target!r}")


def check_lowerable(fn: Function) -> None:
    """Raise UnsupportedOpError for the first op with no TVM lowering (before any emission)."""
    for node in fn.nodes:
        if node.op not in LOWERINGS:
            where = ", ".join(f"%{v.name}" for v in node.outputs)
            raise UnsupportedOpError(
                f"op {node.op!r} ({where} in @{fn.name}) has no TVM lowering; expected one of "
                f"{len(LOWERINGS)} lowered ops; add an entry to LOWERINGS in kiln/backends/tvm/lower.py "
                "or use another backend")


def _function_symbols(fn: Function) -> dict:
    """One int64 tirx.Var per symbol; each must be a plain dim of some input to be bound at run time."""
    bound: dict = {}
    for p in fn.params:
        for d in p.type.shape:
            if isinstance(d, SymExpr) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
                name = d.terms[0][0][0]
                bound.setdefault(name, tirx.Var(name, "int64"))
    used = set()
    for v in fn.values():
        used |= v.type.symbols
    for n in fn.nodes:
        for value in n.attrs.values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, SymExpr):
                    used |= item.symbols
    missing = sorted(used - set(bound))
    if missing:
        raise ConfigError(f"@{fn.name}: expected every symbol to be a plain dim of some input, found "
                          f"{', '.join(missing)} only inside expressions; add an input with that dim")
    return bound


def _weight_order(fn: Function) -> list:
    order: list = []
    for n in fn.nodes:
        if n.op == "weight" and n.attrs["name"] not in order:
            order.append(n.attrs["name"])
    return order


def widened_weights(fn: Function, target: tvm.target.Target) -> list:
    """f16 weights read only as quantized ops' scales / offsets (inputs 2 and 3), widened to f32 on CPU."""
    if target.kind.name != "llvm":
        return []
    widened = []
    for n in fn.nodes:
        if n.op == "weight" and n.output.type.dtype == "f16" and n.attrs["name"] not in widened and n.output.uses \
                and all(user.op in ("linear_q", "embedding_q") and pos >= 2 for user, pos in n.output.uses):
            widened.append(n.attrs["name"])
    return widened


def _relax_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "v"


def _ensure_type(ctx: LoweringContext, expr: relax.Expr, expected: TensorType) -> relax.Expr:
    """Make the Relax value carry kiln's shape, spelled as ctx.dim spells it.

    Relax may derive an equal shape written differently (concat gives `1 + seq`);
    a kernel reading it would then disagree structurally with the one writing it,
    which FuseTIR refuses. A match_cast to the canonical spelling fixes that (and
    checks the shape at run time).
    """
    ty = expr.ty
    want = ctx.shape(expected.shape)
    if isinstance(ty, relax.TensorType) and ty.shape is not None and ty.dtype == tvm_dtype(expected.dtype):
        got = list(ty.shape.values) if isinstance(ty.shape, relax.ShapeExpr) else None
        if got is not None and len(got) == len(want) and all(
                tvm_ffi.structural_equal(g, w) for g, w in zip(got, want)):
            return expr
    if isinstance(ty, relax.TensorType) and ty.dtype != tvm_dtype(expected.dtype) and ty.dtype != "":
        raise AssertionError(f"lowering of {ctx.node.op} gave {ty.dtype}, kiln says {expected}")
    return ctx.bb.match_cast(expr, relax.TensorType(want, tvm_dtype(expected.dtype)))


def _emit_function(bb: relax.BlockBuilder, module: Module, fn: Function, target: tvm.target.Target,
                   entry_name: str, derived: dict | None = None) -> None:
    check_lowerable(fn)
    symbols = _function_symbols(fn)
    weight_names = _weight_order(fn)
    params = []
    ctx = LoweringContext(bb, module, fn, target, symbols, {})
    values = ctx.values

    def param(name: str, t: TensorType) -> relax.Var:
        return relax.Var(_relax_name(name), relax.TensorType(ctx.shape(t.shape), tvm_dtype(t.dtype)))

    for p in fn.params:
        params.append(param(p.name, p.type))
        values[id(p)] = params[-1]
    claimed: set = set()
    arrays: dict = {}
    for provider in DERIVED_WEIGHT_PROVIDERS:
        nodes, made = provider(fn, module, target)
        claimed |= nodes
        arrays.update(made)
    if claimed:  # a weight stays a parameter while some node the providers did not claim reads it
        read = {n.attrs["name"] for n in fn.nodes if n.op == "weight"
                and any(id(user) not in claimed for user, _ in n.output.uses)}
        weight_names = [n for n in weight_names if n in read]
    if derived is not None:
        derived.update(arrays)
    widened = widened_weights(fn, target)
    for name in weight_names:
        t = module.weights[name]
        ctx.weights[name] = param(name, TensorType("f32", t.shape) if name in widened else t)
    for name, array in arrays.items():
        ctx.weights[name] = param(name, TensorType(_KILN_DTYPES[array.dtype.str.lstrip("<=|")], array.shape))
    weight_names = weight_names + list(arrays)
    weights = ctx.weights
    attrs = {"num_input": len(params), WEIGHT_NAMES_ATTR: weight_names, WIDENED_ATTR: widened}
    with bb.function(entry_name, params + [weights[n] for n in weight_names], attrs=attrs):
        with bb.dataflow():
            for node in fn.nodes:
                ctx.node = node
                if node.op == "weight" and node.attrs["name"] not in weights:  # read only by claimed nodes
                    values[id(node.output)] = None
                    continue
                out = LOWERINGS[node.op](ctx, node, [values[id(v)] for v in node.inputs])
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
                if len(outs) != len(node.outputs):
                    raise AssertionError(f"lowering of {node.op} gave {len(outs)} values for "
                                         f"{len(node.outputs)} outputs")
                if node.op == "weight" and node.attrs["name"] in widened:  # f32 by design
                    values[id(node.output)] = outs[0]
                    continue
                for value, expr in zip(node.outputs, outs):
                    values[id(value)] = _ensure_type(ctx, expr, value.type)
            results = [values[id(r)] for r in fn.results]
            out = bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
        bb.emit_func_output(out)


_KILN_DTYPES = {"u4": "u32", "f4": "f32", "f2": "f16", "i1": "i8", "u1": "u8", "i4": "i32"}


def lower_functions(module: Module, function_names: Sequence[str], target="cpu",
                    derived: dict | None = None) -> tvm.IRModule:
    """Lower several kiln functions into one IRModule (each keeps its name). ``derived`` (a dict) receives
    the weights the lowering computed (name -> array): they are parameters like the module's weights."""
    target = as_target(target)
    bb = relax.BlockBuilder()
    for name in function_names:
        if name not in module.functions:
            raise ConfigError(f"expected a function @{name} in the module, found "
                              f"{', '.join('@' + f for f in module.functions) or 'none'}")
        # ops lowered as their subgraphs (gated_mlp_q), rewritten in place: the VNNI repacking and launch fusion
        # then see its linear_q as any other
        decompose_gated_mlp_q(module.functions[name])
        if name.startswith(TE_PREFIX):
            raise ConfigError(f"expected function names not starting with {TE_PREFIX!r} (kiln's kernel "
                              f"prefix), found @{name}; rename the function")
        _emit_function(bb, module, module.functions[name], target, name, derived)
    return bb.get()


def lower_function(module: Module, function_name: str, target="cpu", derived: dict | None = None) -> tvm.IRModule:
    """Lower ``@function_name`` to a Relax function of the same name.

    Parameters are the function's inputs, then its weights in the order
    ``weight_names(irmodule, function_name)``; attribute ``num_input`` counts the inputs.
    """
    return lower_functions(module, [function_name], target, derived)


def weight_names(irmodule: tvm.IRModule, function_name: str) -> list:
    """The weight names of a lowered function, in parameter order."""
    func = irmodule[function_name]
    return [str(n) for n in func.attrs[WEIGHT_NAMES_ATTR]]


def widened_weight_names(irmodule: tvm.IRModule, function_name: str) -> list:
    """The f16 weights the lowered function takes as f32 (the loader widens them)."""
    return [str(n) for n in irmodule[function_name].attrs[WIDENED_ATTR]]


# greedy decoding: each logits row's argmax on the GPU -----------------------------------------------------------
ARGMAX_ROWS = "argmax_rows"  # the entry: logits [rows, vocab] -> (token ids int32 [rows], their logits [rows])
ARGMAX_THREADS = 256  # threads per row
_INT32_MAX = 2**31 - 1
# (integer type, magnitude mask, the bits of +inf): a float is NaN when its magnitude bits exceed +inf's
_NAN_BITS = {"float32": ("int32", 0x7FFFFFFF, 0x7F800000), "float16": ("int16", 0x7FFF, 0x7C00),
             "bfloat16": ("int16", 0x7FFF, 0x7F80)}


def _is_nan(value, dtype: str):
    # on the bits: TVM's simplifier folds x != x to false
    int_type, magnitude, infinity = _NAN_BITS[dtype]
    bits = tirx.bitwise_and(tirx.reinterpret(int_type, value), tirx.const(magnitude, int_type))
    return bits > tirx.const(infinity, int_type)


def _argmax_te(logits, vocab: int, dtype: str):
    """numpy's argmax of each row of logits[rows, vocab] and the value there: (ids int32 [rows], values [rows]).

    Two passes with a plain max and a plain min reduction (the ones TVM's cross-thread reduction knows): the
    row's largest key, then the first index whose key is that. The key is the logit with NaN raised to +inf
    and -inf to the lowest finite value (max's identity). So ties go to the lowest index, and a row whose
    maximum is not finite answers a value that is not finite, as numpy's does; the index then differs from
    numpy's only when a NaN comes after a +inf (numpy answers the NaN) or the maximum is -inf beside -FLT_MAX."""
    rows = logits.shape[0]
    infinity, lowest = tirx.const(math.inf, dtype), tirx.min_value(dtype)

    def key(value):
        return tirx.Select(_is_nan(value, dtype), infinity, tirx.max(value, lowest))

    k = te.reduce_axis((0, vocab), name="k")
    row_max = te.compute((rows,), lambda i: te.max(key(logits[i, k]), axis=k), name="argmax_row_max")
    k2 = te.reduce_axis((0, vocab), name="k")
    ids = te.compute((rows,), lambda i: te.min(tirx.Select(key(logits[i, k2]) == row_max[i], k2.var.astype("int32"),
                                                           tirx.const(_INT32_MAX, "int32")), axis=k2),
                     name="argmax_ids")
    # every row has an index whose key is the maximum; the clamp keeps a broken kernel from reading outside it
    values = te.compute((rows,), lambda i: logits[i, tirx.min(ids[i], vocab - 1)], name="argmax_values")
    return ids, values


def _schedule_argmax_cuda(func):
    """A thread block per row for each pass (its threads stride over the row, then reduce across each other);
    the values are gathered in a third kernel."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("argmax_row_max", "argmax_ids"):
        block = sch.get_sblock(name)
        row, column = sch.get_loops(block)
        _, thread = sch.split(column, [None, ARGMAX_THREADS])
        sch.bind(row, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
    block_of_rows, row = sch.split(sch.get_loops(sch.get_sblock("argmax_values"))[0], [None, 32])
    sch.bind(block_of_rows, "blockIdx.x")
    sch.bind(row, "threadIdx.x")
    return sch.mod["main"]


def add_argmax_rows(irmodule: tvm.IRModule, vocab: int, dtype: str, target) -> tvm.IRModule:
    """``irmodule`` with @argmax_rows: logits [rows, vocab] of kiln dtype ``dtype`` -> (each row's argmax as
    numpy takes it, int32; the logit there), so a greedy step copies two numbers per row from the GPU instead
    of the row. Scheduled for CUDA (a thread block per row); for the CPU the same loops run unscheduled, which
    only tests use: there the executor's logits are a view of TVM's memory and numpy's argmax over it is faster
    (SmolLM2's row: 4.3 us, against 11.6 us for a vectorized two-pass kernel called through the VM)."""
    target = as_target(target)
    value_type = tvm_dtype(dtype)
    if value_type not in _NAN_BITS:
        raise ConfigError(f"@{ARGMAX_ROWS} takes float logits (f32, f16 or bf16), found {dtype}")
    rows = tirx.Var("rows", "int64")
    placeholder = te.placeholder((rows, vocab), value_type, name="logits")
    kernel = te.create_prim_func([placeholder, *_argmax_te(placeholder, vocab, value_type)])
    if target.kind.name == "cuda":
        kernel = _schedule_argmax_cuda(kernel)
    kernel = kernel.with_attr("tirx.is_scheduled", True)
    bb = relax.BlockBuilder(irmodule)
    kernel_var = bb.add_func(kernel, TE_PREFIX + ARGMAX_ROWS)
    logits = relax.Var("logits", relax.TensorType([rows, vocab], value_type))
    with bb.function(ARGMAX_ROWS, [logits], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit(relax.call_tir(kernel_var, [logits], [relax.TensorType([rows], "int32"),
                                                                relax.TensorType([rows], value_type)]))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()
