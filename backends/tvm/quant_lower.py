"""TVM lowering of ``linear_q`` (weight-only int8 / int4 linears, the dequantize fused into the kernel)
and ``embedding_q`` (rows of a quantized table, dequantized as they are gathered).

Registered into ``lower.LOWERINGS`` on import. One PrimFunc per layer holds both the
dequantize and the reduction (kernels.linear_int8 / linear_int4), in the GEMV form for
decode and the row-tiled GEMM form for prefill on CPU, so no float copy of a weight exists.
"""

from __future__ import annotations

from tvm import relax

from kiln.ir.errors import UnsupportedOpError

from . import kernels
from .lower import OPAQUE, _linear_row_tile, lowering


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

    def kernel(i, q, scale, offset=None):
        return kernels.embedding_rows(i, q, scale, offset, bits, group_size)

    rows = ctx.emit_te(kernel, ids, *inputs[1:], name="embedding_q")
    k = ctx.out_type().shape[-1]
    if ids_type.rank != 1:
        rows = ctx.emit(relax.op.reshape(rows, ctx.shape(tuple(ids_type.shape) + (k,))))
    return rows
