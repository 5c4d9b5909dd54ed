"""TVM lowerings of kiln's fused LLM ops: RMSNorm, RoPE, gated MLP and attention over the paged KV cache.

Registered into ``lower.LOWERINGS`` on import. The paged cache
``[layers, 2, pages, kv_heads, page_size, head_dim]`` is viewed as
``[layers * 2 * pages, kv_heads, page_size, head_dim]`` (a reshape, no copy);
layer l's K pages start at ``2 l pages`` and its V pages at ``(2 l + 1) pages``.
New K/V are written in place (``call_tir_inplace``) before the attention
kernels of kernels.py read the cache.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.script import tirx as T

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.types import TensorType

from . import cuda_attention, kernels
from .lower import emit_linear, lowering, tvm_dtype


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
    half = rotary_dim // 2
    per_batch = ctx.in_type(1).shape[0] != 1

    def te_rope(x, positions, inv_freq):
        def body(b, i1, i2, d):
            s = i2 if seq_axis == 2 else i1
            j = tirx.min(tirx.if_then_else(d < half, d, d - half), half - 1)
            freq = positions[b if per_batch else 0, s].astype("float32") * inv_freq[j]
            cos = tirx.cos(freq) * tirx.const(scaling, "float32")
            sin = tirx.sin(freq) * tirx.const(scaling, "float32")
            other = x[b, i1, i2, tirx.min(tirx.if_then_else(d < half, d + half, d - half), rotary_dim - 1)]
            rotated = tirx.if_then_else(d < half, -other, other)
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
    hidden = ctx.emit(relax.op.multiply(ctx.emit(_ACTIVATIONS[node.attrs["activation"]](gate)), up))
    hidden_type = TensorType(x_type.dtype, tuple(x_type.shape[:-1]) + (ctx.in_type(1).shape[0],))
    return emit_linear(ctx, hidden, hidden_type, w_down, ctx.in_type(3))


def kv_append_func(num_kv_heads: int, head_dim: int, page_size: int, k_base: int, v_base: int):
    """PrimFunc(k[r, Hkv, D], v[r, Hkv, D], page_table[b, P], row_seq[r], row_pos[r], cache[n, Hkv, P, D]):
    writes row i's K at page ``k_base + page_table[row_seq[i], pos // P]`` (V at ``v_base + ...``), in place."""
    kv_heads, dim, page = num_kv_heads, head_dim, page_size

    @T.prim_func(s_tir=True)
    def paged_kv_append_unified(k_h: T.handle, v_h: T.handle, table_h: T.handle, seq_h: T.handle,
                                pos_h: T.handle, cache_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, kernels.CPU_ONLY: True})
        rows = T.int64()
        batch = T.int64()
        max_pages = T.int64()
        num_pages = T.int64()
        k = T.match_buffer(k_h, (rows, kv_heads, dim), "float32")
        v = T.match_buffer(v_h, (rows, kv_heads, dim), "float32")
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        cache = T.match_buffer(cache_h, (num_pages, kv_heads, page, dim), "float32")
        for r in T.parallel(rows):
            with T.sblock("paged_kv_append_unified"):
                T.reads(k[0:rows, 0:kv_heads, 0:dim], v[0:rows, 0:kv_heads, 0:dim],
                        page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(cache[0:num_pages, 0:kv_heads, 0:page, 0:dim])
                pos: T.let[T.int32] = row_pos[r]
                if pos >= 0:
                    pid: T.let[T.int64] = T.Cast("int64", page_table[row_seq[r], pos // page])
                    for h in T.serial(kv_heads):
                        for d in T.vectorized(dim):
                            cache[pid + k_base, h, pos % page, d] = k[r, h, d]
                            cache[pid + v_base, h, pos % page, d] = v[r, h, d]

    return paged_kv_append_unified


def _add_func(bb, func, name: str):
    """Add a PrimFunc under a unique symbol (one kernel per layer: each has its own cache offsets)."""
    return bb.add_func(func.with_attr("global_symbol", name), name)


@lowering("paged_attention")
def _lower_paged_attention(ctx, node, inputs):
    q, k, v, cache, page_table, positions = inputs
    q_type, cache_type = ctx.in_type(0), ctx.in_type(3)
    if cache_type.dtype != "f32" or q_type.dtype != "f32":
        raise UnsupportedOpError(f"paged_attention: the TVM backend's attention kernels take f32 q and cache, "
                                 f"found {q_type.dtype} and {cache_type.dtype}; use --kv-cache-dtype f32")
    if ctx.target.kind.name not in ("llvm", "cuda"):
        raise UnsupportedOpError(f"paged_attention: kiln has paged attention kernels for cpu and cuda, found "
                                 f"target {ctx.target.kind.name}; use --target cpu or cuda")
    append_func, decode_func, prefill_func = ((kv_append_func, kernels.attention_decode_func,
                                               kernels.attention_prefill_func) if ctx.is_cpu else
                                              (cuda_attention.kv_append_cuda_func,
                                               cuda_attention.attention_decode_cuda_func,
                                               cuda_attention.attention_prefill_cuda_func))
    layers, _, num_pages, kv_heads, page, dim = cache_type.shape
    heads = q_type.shape[1]
    batch, seq = q_type.shape[0], q_type.shape[2]
    layer = node.attrs["layer"]
    k_base, v_base = 2 * layer * num_pages, (2 * layer + 1) * num_pages
    bb = ctx.bb
    # Reuse the previous layer's flat view: a reshape back and forth between layers would be fused
    # into a copy kernel of the whole cache.
    views = ctx.__dict__.setdefault("kiln_flat_cache_views", {})
    flat = views.get(cache)
    if flat is None:
        flat = ctx.emit(relax.op.reshape(cache, [layers * 2 * num_pages, kv_heads, page, dim]))
    rows = ctx.dim(batch * seq)
    b, s = ctx.dim(batch), ctx.dim(seq)

    def token_rows(x, width):  # [b, heads, s, D] -> [b * s, heads, D]
        if seq == 1:
            return ctx.emit(relax.op.reshape(x, [b, width, dim]))
        return ctx.emit(relax.op.reshape(relax.op.permute_dims(x, [0, 2, 1, 3]), [rows, width, dim]))

    row_pos = ctx.emit(relax.op.reshape(relax.op.astype(positions, "int32"), [rows]))
    sequence = ctx.emit(relax.op.arange(tirx.IntImm("int64", 0), b, tirx.IntImm("int64", 1), "int32"))
    row_seq = sequence if seq == 1 else ctx.emit(relax.op.reshape(
        relax.op.broadcast_to(relax.op.reshape(sequence, [b, 1]), [b, s]), [rows]))
    append = _add_func(bb, append_func(kv_heads, dim, page, k_base, v_base), f"paged_kv_append_l{layer}")
    flat = ctx.emit(relax.call_tir_inplace(append, [token_rows(k, kv_heads), token_rows(v, kv_heads), page_table,
                                                    row_seq, row_pos, flat], [5], [flat.ty]))
    scale, window = node.attrs["scale"], node.attrs["window"]
    if seq == 1:
        lengths = ctx.emit(relax.op.add(row_pos, relax.const(1, "int32")))
        func = decode_func(heads, kv_heads, dim, page, scale, k_base, v_base, window)
        gvar = _add_func(bb, func, f"paged_attention_decode_l{layer}")
        out = ctx.emit(relax.call_tir(gvar, [token_rows(q, heads), flat, flat, page_table, lengths],
                                      relax.TensorType([b, heads, dim], "float32")))
        out = ctx.emit(relax.op.reshape(out, [b, heads, 1, dim]))
    else:
        func = prefill_func(heads, kv_heads, dim, page, scale, k_base, v_base, window)
        gvar = _add_func(bb, func, f"paged_attention_prefill_l{layer}")
        out = ctx.emit(relax.call_tir(gvar, [token_rows(q, heads), flat, flat, page_table, row_seq, row_pos],
                                      relax.TensorType([rows, heads, dim], "float32")))
        out = ctx.emit(relax.op.permute_dims(relax.op.reshape(out, [b, s, heads, dim]), [0, 2, 1, 3]))
    new_cache = ctx.emit(relax.op.reshape(flat, ctx.shape(cache_type.shape)))
    views[new_cache] = flat
    return [out, new_cache]


__all__ = ["kv_append_func", "tvm_dtype"]


@lowering("last_token")
def _lower_last_token(ctx, node, inputs):
    x, positions = inputs

    def gather(data, pos):
        seq = pos.shape[1]
        s = te.reduce_axis((0, seq), name="s")
        last = te.compute((pos.shape[0],), lambda b: te.max(
            te.if_then_else(pos[b, s] >= 0, s.var.astype("int64"), tirx.const(0, "int64")), axis=s), name="last")
        return te.compute((data.shape[0], 1) + tuple(data.shape[2:]),
                          lambda b, _, *rest: data[(b, last[b]) + tuple(rest)], name="last_token")

    return ctx.emit_te(gather, x, positions, name="last_token")
