"""TVM lowerings of kiln's fused LLM ops: RMSNorm, RoPE, gated MLP and attention over the paged KV cache.

Registered into ``lower.LOWERINGS`` on import. A group's K (or V) pool
``[layers, pages, kv_heads, page_size, head_dim]`` is viewed as
``[layers * pages, kv_heads, page_size, head_dim]`` (a reshape, no copy); the
layer at index i of its group has its pages from ``i * pages``. New K/V are
written in place (``call_tir_inplace``) before the ragged attention kernel of
kernels.py reads the pools; @step_decode uses the decode kernel (one token per
sequence).
"""

from __future__ import annotations

from tvm import relax, te, tirx

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.kv_cache import DECODE_STEP
from kiln.ir.types import TensorType

from . import cuda_attention, kernels
from .lower import emit_linear, in_f32, lowering, tvm_dtype


@lowering("rms_norm")
def _lower_rms_norm(ctx, node, inputs):
    x, w = inputs
    return ctx.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=node.attrs["eps"]))


@lowering("add_rms_norm")
def _lower_add_rms_norm(ctx, node, inputs):
    x, residual, w = inputs
    total = ctx.emit(relax.op.add(x, residual))
    return [total, ctx.emit(relax.op.nn.rms_norm(total, w, axes=[-1], epsilon=node.attrs["eps"]))]


@lowering("rope")
def _lower_rope(ctx, node, inputs):
    rotary_dim, seq_axis, scaling = node.attrs["rotary_dim"], node.attrs["seq_axis"], node.attrs["scaling"]
    interleaved = node.attrs.get("interleaved", False)
    half = rotary_dim // 2
    per_batch = ctx.in_type(1).shape[0] != 1

    def te_rope(x, positions, inv_freq):
        def body(b, i1, i2, d):
            s = i2 if seq_axis == 2 else i1
            if interleaved:  # pairs (2i, 2i + 1): frequency i, partner d ^ 1, the even one negated
                j = tirx.min(d // 2, half - 1)
                first = d % 2 == 0
                partner = tirx.min(tirx.if_then_else(first, d + 1, d - 1), rotary_dim - 1)
            else:
                j = tirx.min(tirx.if_then_else(d < half, d, d - half), half - 1)
                first = d < half
                partner = tirx.min(tirx.if_then_else(d < half, d + half, d - half), rotary_dim - 1)
            freq = positions[b if per_batch else 0, s].astype("float32") * inv_freq[j]
            cos = tirx.cos(freq) * tirx.const(scaling, "float32")
            sin = tirx.sin(freq) * tirx.const(scaling, "float32")
            other = x[b, i1, i2, partner]
            rotated = tirx.if_then_else(first, -other, other)
            value = x[b, i1, i2, d] * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)
            return tirx.if_then_else(d < rotary_dim, value, x[b, i1, i2, d])

        return te.compute(x.shape, body, name="rope")

    return ctx.emit_te(te_rope, *inputs, name="rope")


_ACTIVATIONS = {"silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh}


@lowering("gated_mlp")
def _lower_gated_mlp(ctx, node, inputs):
    x, w_gate, w_up, w_down = inputs
    x_type = ctx.in_type(0)
    gate = emit_linear(ctx, x, x_type, w_gate, ctx.in_type(1))
    up = emit_linear(ctx, x, x_type, w_up, ctx.in_type(2))
    hidden = ctx.emit(relax.op.multiply(in_f32(ctx, _ACTIVATIONS[node.attrs["activation"]], gate, x_type.dtype), up))
    hidden_type = TensorType(x_type.dtype, tuple(x_type.shape[:-1]) + (ctx.in_type(1).shape[0],))
    return emit_linear(ctx, hidden, hidden_type, w_down, ctx.in_type(3))


def _add_func(bb, func, name: str, shared: bool = False):
    """Add a PrimFunc named ``name``: ``shared``, the same function already added is found instead (the CPU's
    kernels of every layer of one shape); else under a symbol of its own (CUDA's, which differ per layer by
    their pool offsets)."""
    # shared: no symbol of its own (the kernel's TVMScript name would repeat for kernels that differ, such as
    # sliding-window and global layers); TVM names it after its unique GlobalVar
    return bb.add_func(func.without_attr("global_symbol") if shared else func.with_attr("global_symbol", name), name)


# The KV-cache dtypes the attention kernels read (and widen to f32) and the K/V append writes (rounding).
CACHE_DTYPES = {"f32": "float32", "f16": "float16"}


# The activation dtypes of q, k, v and the output: the CUDA kernels take each (f32 arithmetic inside); the CPU
# kernels take f32, so half q, k, v are widened before them and the output rounded after.
ATTENTION_DTYPES = ("f32", "f16", "bf16")


@lowering("paged_attention")
def _lower_paged_attention(ctx, node, inputs):
    q, k, v, k_pool, v_pool, page_table, positions, token_seq = inputs
    q_type, k_type, v_type, pool_type = ctx.in_type(0), ctx.in_type(1), ctx.in_type(2), ctx.in_type(3)
    if pool_type.dtype not in CACHE_DTYPES or q_type.dtype not in ATTENTION_DTYPES or \
            not q_type.dtype == k_type.dtype == v_type.dtype:
        raise UnsupportedOpError(f"paged_attention: the TVM backend's attention kernels take q, k, v of one of "
                                 f"{', '.join(ATTENTION_DTYPES)} and an f32 or f16 cache, found {q_type.dtype}, "
                                 f"{k_type.dtype}, {v_type.dtype} and {pool_type.dtype}; use --kv-cache-dtype f32 or f16")
    cache_dtype = CACHE_DTYPES[pool_type.dtype]
    # what the kernels read and write: the activations' own dtype on CUDA, f32 on the CPU
    io_dtype = tvm_dtype(q_type.dtype) if not ctx.is_cpu else "float32"
    if k_type.shape[3] != v_type.shape[3]:
        raise UnsupportedOpError(f"paged_attention: the TVM backend's attention kernels take equal K and V head "
                                 f"sizes, found {k_type.shape[3]} and {v_type.shape[3]}")
    if ctx.target.kind.name not in ("llvm", "cuda"):
        raise UnsupportedOpError(f"paged_attention: kiln has paged attention kernels for cpu and cuda, found "
                                 f"target {ctx.target.kind.name}; use --target cpu or cuda")
    append_func, decode_func, ragged_func = ((kernels.kv_append_func, kernels.attention_decode_func,
                                              kernels.attention_prefill_func) if ctx.is_cpu else
                                             (cuda_attention.kv_append_cuda_func,
                                              cuda_attention.attention_decode_cuda_func,
                                              cuda_attention.attention_prefill_cuda_func))
    layers, num_pages, kv_heads, page, dim = pool_type.shape
    heads, tokens = q_type.shape[1], q_type.shape[2]
    layer, index = node.attrs["layer"], node.attrs["index"]
    bb = ctx.bb
    # On the CPU each layer reads its pages through a view of its pool (no copy), so every layer's kernels are
    # one kernel (pages from offset 0) and launch_fusion merges a layer's launch once for all layers. The CUDA
    # kernels keep the layer's offset into the flat [layers * pages, ...] pool as a constant.
    base = 0 if ctx.is_cpu else index * num_pages
    layer_bytes = num_pages * kv_heads * page * dim * (2 if cache_dtype == "float16" else 4)
    views = ctx.__dict__.setdefault("kiln_flat_pool_views", {})  # CUDA: each pool's flat view, made once

    def pages(pool):
        if ctx.is_cpu:
            return ctx.emit(relax.op.memory.view(pool, relax.ShapeExpr([num_pages, kv_heads, page, dim]),
                                                 relative_byte_offset=relax.prim_value(
                                                     tirx.IntImm("int64", index * layer_bytes))))
        if pool not in views:
            # a reshape back and forth between layers would be fused into a copy kernel of the whole pool
            views[pool] = ctx.emit(relax.op.reshape(pool, [layers * num_pages, kv_heads, page, dim]))
        return views[pool]

    def add_kernel(func, kind):  # a CUDA kernel per layer (its own offsets); the CPU's is shared
        return _add_func(bb, func, kind, shared=True) if ctx.is_cpu else _add_func(bb, func, f"{kind}_l{layer}")

    t = ctx.dim(tokens)

    def token_rows(x, width, operand: int | None = None):  # [1, heads, T, D] -> [T, heads, D] in io_dtype
        # An operand the IR made by permuting [1, T, heads, D] (V, straight from its projection) is that tensor
        # reshaped: a view, where permuting the permute back would copy it in a kernel of its own.
        made = node.inputs[operand].producer if operand is not None else None
        if made is not None and made.op == "permute" and made.attrs["perm"] == (0, 2, 1, 3):
            rows = ctx.emit(relax.op.reshape(ctx.values[id(made.inputs[0])], [t, width, dim]))
        else:
            rows = ctx.emit(relax.op.reshape(relax.op.permute_dims(x, [0, 2, 1, 3]), [t, width, dim]))
        return rows if io_dtype == tvm_dtype(q_type.dtype) else ctx.emit(relax.op.astype(rows, io_dtype))

    # per step, not per layer: every attention of the function reads the same positions (one kernel each)
    shared = ctx.__dict__.setdefault("kiln_step_rows", {})
    if "row_pos" not in shared:
        shared["row_pos"] = ctx.emit(relax.op.reshape(relax.op.astype(positions, "int32"), [t]))
    row_pos = shared["row_pos"]
    kernel_dtype = {} if ctx.is_cpu else {"io_dtype": io_dtype}  # the CPU kernels take f32 only
    append = add_kernel(append_func(kv_heads, dim, page, base, base, cache_dtype, **kernel_dtype), "paged_kv_append")
    k_flat, v_flat = pages(k_pool), pages(v_pool)
    pools = ctx.emit(relax.call_tir_inplace(append, [token_rows(k, kv_heads, 1), token_rows(v, kv_heads, 2), page_table,
                                                     token_seq, row_pos, k_flat, v_flat], [5, 6],
                                            [k_flat.ty, v_flat.ty]))
    k_flat, v_flat = ctx.emit(relax.TupleGetItem(pools, 0)), ctx.emit(relax.TupleGetItem(pools, 1))
    scale, window, softcap = node.attrs["scale"], node.attrs["window"], node.attrs.get("softcap")
    alibi = node.attrs.get("alibi")
    if ctx.function.name == DECODE_STEP:
        # @step_decode: token t is the one new token of page-table row t, so its sequence length is pos + 1
        if "lengths" not in shared:
            shared["lengths"] = ctx.emit(relax.op.add(row_pos, relax.const(1, "int32")))
        lengths = shared["lengths"]
        kernel = decode_func(heads, kv_heads, dim, page, scale, base, base, window, softcap, alibi, cache_dtype,
                             **kernel_dtype)
        gvar = add_kernel(kernel, "paged_attention_decode")
        out = ctx.emit(relax.call_tir(gvar, [token_rows(q, heads), k_flat, v_flat, page_table, lengths],
                                      relax.TensorType([t, heads, dim], io_dtype)))
    else:
        kernel = ragged_func(heads, kv_heads, dim, page, scale, base, base, window, softcap, alibi, cache_dtype,
                             **kernel_dtype)
        gvar = add_kernel(kernel, "paged_attention_ragged")
        out = ctx.emit(relax.call_tir(gvar, [token_rows(q, heads), k_flat, v_flat, page_table, token_seq, row_pos],
                                      relax.TensorType([t, heads, dim], io_dtype)))
    if io_dtype != tvm_dtype(q_type.dtype):
        out = ctx.emit(relax.op.astype(out, tvm_dtype(q_type.dtype)))
    out = ctx.emit(relax.op.permute_dims(relax.op.reshape(out, [1, t, heads, dim]), [0, 2, 1, 3]))
    if ctx.is_cpu:  # the append wrote the pools in place through the views: the pools out are the pools in
        return [out, k_pool, v_pool]
    new_k = ctx.emit(relax.op.reshape(k_flat, ctx.shape(pool_type.shape)))
    new_v = ctx.emit(relax.op.reshape(v_flat, ctx.shape(ctx.in_type(4).shape)))
    views[new_k], views[new_v] = k_flat, v_flat
    return [out, new_k, new_v]


@lowering("select_rows")
def _lower_select_rows(ctx, node, inputs):
    x, rows = inputs
    return ctx.emit(relax.op.take(x, rows, axis=1, mode="clip"))  # the engine checks the rows; clip is cheap


__all__ = ["tvm_dtype"]
