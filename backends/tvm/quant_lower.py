"""TVM lowering of ``linear_q`` (weight-only int8 / int4 linears, the dequantize fused into the kernel)
and ``embedding_q`` (rows of a quantized table, dequantized as they are gathered).

Registered into ``lower.LOWERINGS`` on import. One PrimFunc per layer holds both the
dequantize and the reduction (kernels.linear_int8 / linear_int4), in the GEMV form for
decode and the row-tiled GEMM form for prefill on CPU, so no float copy of a weight exists.
"""

from __future__ import annotations

from tvm import relax

from kiln.ir.errors import UnsupportedOpError

from . import int8_kernels, kernels
from .lower import DERIVED_WEIGHT_PROVIDERS, OPAQUE, _linear_row_tile, lowering

VNNI_SUFFIXES = (".vnni_q", ".vnni_scale", ".vnni_offset")


def _vnni_weight_names(node) -> list | None:
    """The repacked weights a linear_q {activations=int8} reads on a VNNI CPU, or None when its weights are
    not module weights."""
    names = [v.producer.attrs["name"] if v.producer is not None and v.producer.op == "weight" else None
             for v in node.inputs[1:]]
    if None in names:
        return None
    return [names[0] + suffix for suffix in VNNI_SUFFIXES[:len(names)]]


def _takes_vnni(node, target) -> bool:
    if node.op != "linear_q" or node.attrs["activations"] != "int8" or not int8_kernels.has_vnni(target):
        return False
    n, k = node.inputs[1].type.shape[0], node.inputs[0].type.shape[-1]
    return (node.inputs[0].type.dtype == "f32" and int8_kernels.fits(n, k, node.attrs["group_size"])
            and _vnni_weight_names(node) is not None)


def _vnni_weights(fn, module, target):
    """Provider of repacked weights: every linear_q {activations=int8} the VNNI kernels run, and every
    embedding_q over a table one of them reads (a tied embedding), which then reads the repacked copy."""
    claimed, arrays = set(), {}
    for node in fn.nodes:
        if not _takes_vnni(node, target):
            continue
        claimed.add(id(node))
        names = _vnni_weight_names(node)
        if names[0] in arrays:
            continue
        data = [module.weight_data[v.producer.attrs["name"]] for v in node.inputs[1:]]
        packed = int8_kernels.repack(node.attrs["bits"], node.attrs["group_size"], data[0], data[1],
                                     data[2] if len(data) == 3 else None)
        arrays.update(zip(names, packed))
    for node in fn.nodes:
        if node.op == "embedding_q" and (_vnni_weight_names(node) or [None])[0] in arrays:
            claimed.add(id(node))
    return claimed, arrays


DERIVED_WEIGHT_PROVIDERS.append(_vnni_weights)


def _emit_vnni(ctx, node, x2, rows, k, n):
    """int8 rows of x2 [rows, K], then the VNNI dot-product kernel over the repacked weight."""
    small = _linear_row_tile(rows) is None  # a decode step's rows: quantized on the calling thread
    blocks = k // int8_kernels.ACTIVATION_BLOCK
    # a group of 8 or 16 takes each row's integer sums per 8 elements, a larger one its scaled block sums
    quarters = 0 < node.attrs["group_size"] < int8_kernels.ACTIVATION_BLOCK
    sums = (relax.TensorType([ctx.dim(rows), ctx.dim(k // int8_kernels.QUARTER)], "int32") if quarters else
            relax.TensorType([ctx.dim(rows), ctx.dim(blocks)], "float32"))
    quantize = ctx.bb.add_func(int8_kernels.quantize_rows_func(k, parallel=not small, quarter_sums=quarters),
                               "quantize_rows")
    parts = ctx.emit(relax.call_tir(quantize, [x2], [relax.TensorType([ctx.dim(rows), ctx.dim(k)], "int8"),
                                                     relax.TensorType([ctx.dim(rows), ctx.dim(blocks)], "float32"),
                                                     sums]))
    xq, sx, xs = (ctx.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    names = _vnni_weight_names(node)
    weights = [ctx.weights[name] for name in names]
    if len(weights) == 2:
        weights.append(weights[1])  # no offset: the kernel takes the scale in its place
    row_tile = 1 if small else int8_kernels.PREFILL_ROW_TILE
    func = int8_kernels.matmul_func(n, k, node.attrs["bits"], node.attrs["group_size"], node.inputs[2].type.dtype,
                                    len(node.inputs) == 4, row_tile)
    gvar = ctx.bb.add_func(func, f"linear_q_vnni_int{node.attrs['bits']}")
    return ctx.emit(relax.call_tir(gvar, [xq, sx, xs] + weights,
                                   relax.TensorType([ctx.dim(rows), ctx.dim(n)], "float32")))


@lowering("linear_q")
def _lower_linear_q(ctx, node, inputs):
    x_type = ctx.in_type(0)
    if x_type.dtype != "f32":
        raise UnsupportedOpError(f"linear_q: the TVM quantized kernels take f32 activations, found {x_type} "
                                 f"at %{node.output.name}; compile the model in f32")
    bits, group_size = node.attrs["bits"], node.attrs["group_size"]
    x = inputs[0]
    n = ctx.in_type(1).shape[0]
    rows = 1
    for d in x_type.shape[:-1]:
        rows = rows * d
    k = x_type.shape[-1]
    x2 = x if x_type.rank == 2 else ctx.emit(relax.op.reshape(x, [ctx.dim(rows), ctx.dim(k)]))
    if _takes_vnni(node, ctx.target):
        y = _emit_vnni(ctx, node, x2, rows, k, n)
        if x_type.rank != 2:
            y = ctx.emit(relax.op.reshape(y, ctx.shape(tuple(x_type.shape[:-1]) + (n,))))
        return y
    if node.attrs["activations"] == "int8":  # no VNNI here: the same int8 rows, multiplied in f32
        x2 = ctx.emit_te(int8_kernels.dequantize_rows, x2, name="int8_rows")
    # CPU: GEMV for a few rows, row-tiled GEMM for prefill. GPU: the plain form with the
    # dequantize as its own block, which dlight's rules schedule (and inline) for any m.
    row_tile = _linear_row_tile(rows) if ctx.is_cpu else None
    dequant_stage = not ctx.is_cpu
    if bits == 8:
        def kernel(a, q, scale):
            return kernels.linear_int8(a, q, scale, row_tile=row_tile, dequant_stage=dequant_stage,
                                       group_size=group_size)
        name = "linear_int8"
    else:
        def kernel(a, q, scale, offset=None):
            return kernels.linear_int4(a, q, scale, offset=offset, group_size=group_size, row_tile=row_tile,
                                       dequant_stage=dequant_stage)
        name = "linear_int4"
    y = ctx.emit_te(kernel, x2, *inputs[1:], name=name, attrs=OPAQUE)
    if x_type.rank != 2:
        y = ctx.emit(relax.op.reshape(y, ctx.shape(tuple(x_type.shape[:-1]) + (n,))))
    return y


@lowering("embedding_q")
def _lower_embedding_q(ctx, node, inputs):
    ids_type = ctx.in_type(0)
    bits, group_size = node.attrs["bits"], node.attrs["group_size"]
    count = 1
    for d in ids_type.shape:
        count = count * d
    ids = inputs[0] if ids_type.rank == 1 else ctx.emit(relax.op.reshape(inputs[0], [ctx.dim(count)]))
    if ids_type.dtype != "i64":
        ids = ctx.emit(relax.op.astype(ids, "int64"))

    k = ctx.out_type().shape[-1]
    repacked = _vnni_weight_names(node)
    if repacked is not None and all(name in ctx.weights for name in repacked):  # the tied logits table's copy
        n = ctx.in_type(1).shape[0]

        def kernel(i, q, scale, offset=None):
            return int8_kernels.embedding_rows(i, q, scale, offset, bits, group_size, n, k)

        rows = ctx.emit_te(kernel, ids, *(ctx.weights[name] for name in repacked), name="embedding_q")
    else:
        def kernel(i, q, scale, offset=None):
            return kernels.embedding_rows(i, q, scale, offset, bits, group_size)

        rows = ctx.emit_te(kernel, ids, *inputs[1:], name="embedding_q")
    if ids_type.rank != 1:
        rows = ctx.emit(relax.op.reshape(rows, ctx.shape(tuple(ids_type.shape) + (k,))))
    return rows
