"""TVM lowering of ``paged_latent_attention`` (DeepSeek's MLA with absorbed up-projections) on the CPU.

A group's latent pool ``[layers, pages, page_size, L]`` is viewed as ``[layers * pages, 1, page_size, L]``:
one KV head whose keys are the latents. New latents are written in place by a small append kernel, then
kernels.py's paged attention kernels run with that one view as both K and V pages (values = the whole latent)
and the output keeps its first ``value_dim`` columns, so the cache holds each latent once.
"""

from __future__ import annotations

import functools

from tvm import relax, tirx
from tvm.script import tirx as T

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.kv_cache import DECODE_STEP

from . import kernels
from .lower import lowering


@functools.lru_cache(maxsize=None)
def _latent_append_template(width: int, page_size: int) -> tirx.PrimFunc:
    page = page_size

    @T.prim_func(s_tir=True)
    def paged_latent_append(x_h: T.handle, table_h: T.handle, seq_h: T.handle, pos_h: T.handle,
                            pool_h: T.handle, base: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, kernels.CPU_ONLY: True})
        rows = T.int64()
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        x = T.match_buffer(x_h, (rows, width), "float32")
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        pool = T.match_buffer(pool_h, (num_pages, 1, page, width), "float32")
        for r in T.serial(rows):  # one vector per token: cheaper on the calling thread than a pool hand-off
            with T.sblock("paged_latent_append"):
                T.reads(x[0:rows, 0:width], page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(pool[0:num_pages, 0:1, 0:page, 0:width])
                pos: T.let[T.int32] = row_pos[r]
                pid: T.let[T.int64] = T.Cast("int64", page_table[row_seq[r], pos // page])
                for d in T.vectorized(width):
                    pool[pid + base, 0, pos % page, d] = x[r, d]

    return paged_latent_append


def latent_append_func(width: int, page_size: int, base: int) -> tirx.PrimFunc:
    """PrimFunc(latent[s, L], page_table[b, P_max], row_seq[s], row_pos[s], pages[P, 1, page_size, L]): writes
    row r's latent at position row_pos[r] of sequence row_seq[r], in place, into the layer whose pages start at
    ``base`` of the flat pool view."""
    func = _latent_append_template(width, page_size)
    return func.specialize({func.params[-1]: tirx.IntImm("int64", base)})


def _add_func(bb, func, name: str):
    return bb.add_func(func.with_attr("global_symbol", name), name)


@lowering("paged_latent_attention")
def _lower_paged_latent_attention(ctx, node, inputs):
    q, latent, pool, page_table, positions, token_seq = inputs
    q_type, pool_type = ctx.in_type(0), ctx.in_type(2)
    if pool_type.dtype != "f32" or q_type.dtype != "f32":
        raise UnsupportedOpError(f"paged_latent_attention: the TVM backend's latent attention takes f32 q and cache, "
                                 f"found {q_type.dtype} and {pool_type.dtype}; use --kv-cache-dtype f32")
    if not ctx.is_cpu:
        raise UnsupportedOpError(f"paged_latent_attention: kiln has latent (MLA) attention kernels for the cpu only, "
                                 f"found target {ctx.target.kind.name}; use --target cpu")
    layers, num_pages, page, width = pool_type.shape
    heads, tokens = q_type.shape[1], q_type.shape[2]
    value_dim, scale = node.attrs["value_dim"], node.attrs["scale"]
    layer = node.attrs["layer"]
    base = node.attrs["index"] * num_pages  # the layer's pages in the [layers * pages, 1, ...] view of its pool
    bb = ctx.bb
    t = ctx.dim(tokens)
    # Reuse the previous layer's flat view of the pool: a reshape back and forth between layers would be
    # fused into a copy kernel of the whole pool.
    views = ctx.__dict__.setdefault("kiln_flat_latent_views", {})
    flat = views.get(pool)
    if flat is None:
        flat = ctx.emit(relax.op.reshape(pool, [layers * num_pages, 1, page, width]))
    # per step, not per layer (shared with paged_attention's lowering): the positions every attention reads
    shared = ctx.__dict__.setdefault("kiln_step_rows", {})
    if "row_pos" not in shared:
        shared["row_pos"] = ctx.emit(relax.op.reshape(relax.op.astype(positions, "int32"), [t]))
    row_pos = shared["row_pos"]
    rows = ctx.emit(relax.op.reshape(latent, [t, width]))
    append = _add_func(bb, latent_append_func(width, page, base), f"paged_latent_append_l{layer}")
    flat = ctx.emit(relax.call_tir_inplace(append, [rows, page_table, token_seq, row_pos, flat], [4], flat.ty))
    queries = ctx.emit(relax.op.reshape(relax.op.permute_dims(q, [0, 2, 1, 3]), [t, heads, width]))
    out_type = relax.TensorType([t, heads, width], "float32")
    # one KV head of size L; the same pages serve as keys and values (read only: the aliasing is harmless)
    if ctx.function.name == DECODE_STEP:
        if "lengths" not in shared:  # @step_decode: row t's sequence holds pos + 1 tokens
            shared["lengths"] = ctx.emit(relax.op.add(row_pos, relax.const(1, "int32")))
        kernel = kernels.attention_decode_func(heads, 1, width, page, sm_scale=scale, k_base=base, v_base=base)
        gvar = _add_func(bb, kernel, f"paged_latent_attention_decode_l{layer}")
        out = ctx.emit(relax.call_tir(gvar, [queries, flat, flat, page_table, shared["lengths"]], out_type))
    else:
        kernel = kernels.attention_prefill_func(heads, 1, width, page, sm_scale=scale, k_base=base, v_base=base)
        gvar = _add_func(bb, kernel, f"paged_latent_attention_ragged_l{layer}")
        out = ctx.emit(relax.call_tir(gvar, [queries, flat, flat, page_table, token_seq, row_pos], out_type))
    if value_dim != width:  # the rope columns of the latent are keys only
        out = ctx.emit(relax.op.strided_slice(out, axes=[2], begin=[0], end=[value_dim]))
    out = ctx.emit(relax.op.permute_dims(relax.op.reshape(out, [1, t, heads, value_dim]), [0, 2, 1, 3]))
    new_pool = ctx.emit(relax.op.reshape(flat, ctx.shape(pool_type.shape)))
    views[new_pool] = flat
    return [out, new_pool]
