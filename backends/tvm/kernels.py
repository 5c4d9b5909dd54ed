"""TE compute definitions for the matmuls and attention of an LLM decoder.

Each function takes and returns `te` tensors, so `relax.BlockBuilder.emit_te` can
call it; `schedules.py` turns the resulting PrimFuncs into fast CPU or GPU code.
"""

from __future__ import annotations

import functools
import math

from tvm import relax, te, tirx
from tvm.script import tirx as T

from kiln.ir.errors import ConfigError

# Block names are the contract with schedules.py: it finds a kernel's reduction by
# these names, so a PrimFunc emitted from here is recognised without extra attributes.
LINEAR_BLOCKS = ("linear", "linear_int4", "linear_int8")
PARTIAL_SUFFIX = "_partial"
DEQUANT_SUFFIX = "_dequantize"
ATTENTION_DECODE = "paged_attention_decode"
ATTENTION_PREFILL = "paged_attention_prefill"
KV_APPEND = "paged_kv_append"
# Attribute of PrimFuncs written (and scheduled) for CPUs only: the paged attention.
CPU_ONLY = "kiln.cpu_only"

# Row tile of the prefill (GEMM) form: 4 rows x 4 columns of 16-lane accumulators
# fill 16 of the 32 AVX-512 registers and leave room for the operands.
DEFAULT_ROW_TILE = 4
# K is reduced in chunks of this many lanes (one AVX-512 register of fp32).
REDUCE_LANES = 16
INT4_PER_WORD = 8


def symbolic_dim(name: str = "m") -> tirx.Var:
    """An int64 symbolic dimension, the kind Relax uses for a dynamic length."""
    return tirx.Var(name, "int64")


def prim_func(*tensors: te.Tensor) -> tirx.PrimFunc:
    """The PrimFunc of te tensors (inputs then outputs), as emit_te makes it: int64 indices.

    dlight's GPU Matmul rule fails on int32 constant indices mixed with an int64 m.
    """
    return te.create_prim_func(list(tensors), "int64")


def _reduce_lanes(k: int) -> int:
    lanes = REDUCE_LANES
    while lanes > 1 and k % lanes:
        lanes //= 2
    return lanes


def _int_dim(extent, what: str) -> int:
    if not isinstance(extent, int | tirx.IntImm):
        raise ConfigError(f"{what} must be a constant, found symbolic {extent}; "
                         "weights need fixed shapes")
    return int(extent)


def _matmul(x: te.Tensor, n: int, k: int, weight, name: str, row_tile: int | None,
            dequant_stage: bool = False) -> te.Tensor:
    """y[i, j] = sum_k x[i, k] * weight(j, k), in the plain or the row-tiled form.

    The plain form is one reduction block: what dlight's GPU rules and the GEMV
    schedule expect. The row-tiled form (prefill on CPU) computes rows in tiles of
    `row_tile`, reading row min(i, m - 1) for the padding rows of the last tile, so
    the hot loop has no bounds check; the padding results are never stored. It also
    splits K into `REDUCE_LANES` partial sums so the inner loop is a vector FMA.
    `dequant_stage` materialises weight(j, k) as its own block first (plain form
    only): dlight gpu.Matmul schedules that for a symbolic m, not the fused reduction;
    the CPU schedules inline it back.
    """
    m = x.shape[0]
    if row_tile is None:
        if dequant_stage:
            w = te.compute((n, k), weight, name=name + DEQUANT_SUFFIX)
            weight = lambda j, c: w[j, c]  # noqa: E731
        kk = te.reduce_axis((0, k), name="k")
        return te.compute((m, n), lambda i, j: te.sum(x[i, kk] * weight(j, kk), axis=kk), name=name)
    if dequant_stage:
        raise ConfigError("expected dequant_stage only with the plain form (row_tile=None), "
                          f"found row_tile={row_tile}")
    lanes = _reduce_lanes(k)
    ko = te.reduce_axis((0, k // lanes), name="ko")
    row_tiles = (m + row_tile - 1) // row_tile
    last = m - 1

    def partial(io, ii, j, kl):
        row = te.min(io * row_tile + ii, last)
        col = ko * lanes + kl
        return te.sum(x[row, col] * weight(j, col), axis=ko)

    part = te.compute((row_tiles, row_tile, n, lanes), partial, name=name + PARTIAL_SUFFIX)
    kl = te.reduce_axis((0, lanes), name="kl")
    return te.compute(
        (m, n), lambda i, j: te.sum(part[i // row_tile, i % row_tile, j, kl], axis=kl), name=name)


def linear(x: te.Tensor, w: te.Tensor, row_tile: int | None = None) -> te.Tensor:
    """y[m, N] = x[m, K] @ w[N, K]^T in fp32 (f16 / bf16 weights widened as they are read). `row_tile` selects
    the prefill form."""
    n, k = (_int_dim(d, "linear weight dim") for d in w.shape)
    return _matmul(x, n, k, lambda j, c: _f32(w[j, c]), "linear", row_tile)


def _f32(value):
    """A scale / offset element in f32 (they may be stored in f16, as GGUF blocks are)."""
    return value if value.dtype == "float32" else value.astype("float32")


def _group_value(table: te.Tensor, j, c, group_size: int):
    """table[j] (one per row) or table[j, c // group_size], in f32."""
    return _f32(table[j] if len(table.shape) == 1 else table[j, c // group_size])


def int8_weight(q: te.Tensor, scale: te.Tensor, group_size: int = 0):
    """(j, c) -> q[j, c] * scale, scale per row (group_size 0) or per group of the row."""
    return lambda j, c: q[j, c].astype("float32") * _group_value(scale, j, c, group_size)


def int4_nibble(q: te.Tensor, j, c):
    """Element c of row j of a weight packed 8 nibbles per uint32, lowest nibble first."""
    shift = (c % INT4_PER_WORD * 4).astype("uint32")
    return ((q[j, c // INT4_PER_WORD] >> shift) & tirx.const(15, "uint32")).astype("float32")


def int4_weight(q: te.Tensor, scale: te.Tensor, group_size: int, zero: te.Tensor | None = None,
                offset: te.Tensor | None = None):
    """(j, c) -> the dequantized int4 element: nibble * scale + offset, (nibble - zero) * scale,
    or (nibble - 8) * scale."""
    if zero is not None and offset is not None:
        raise ConfigError("expected at most one of zero and offset for an int4 weight, found both")

    def weight(j, c):
        nibble, s = int4_nibble(q, j, c), _group_value(scale, j, c, group_size)
        if offset is not None:
            return nibble * s + _group_value(offset, j, c, group_size)
        shift = _group_value(zero, j, c, group_size) if zero is not None else tirx.const(8.0, "float32")
        return (nibble - shift) * s

    return weight


def linear_int8(x: te.Tensor, q: te.Tensor, scale: te.Tensor, row_tile: int | None = None,
                dequant_stage: bool = False, group_size: int = 0) -> te.Tensor:
    """y = x @ (q * scale)^T with q[N, K] int8 and scale[N] (one per output row) or
    scale[N, K / group_size] (GGUF Q8_0: groups of 32), f32 or f16."""
    n, k = (_int_dim(d, "int8 weight dim") for d in q.shape)
    return _matmul(x, n, k, int8_weight(q, scale, group_size), "linear_int8", row_tile, dequant_stage)


def linear_int4(x: te.Tensor, q: te.Tensor, scale: te.Tensor, zero: te.Tensor | None = None,
                group_size: int = 32, row_tile: int | None = None, offset: te.Tensor | None = None,
                dequant_stage: bool = False) -> te.Tensor:
    """Weight-only int4 linear with the dequantize in the same PrimFunc as the reduction.

    q[N, K / 8] uint32 holds 8 nibbles per word along K (element k in bits 4*(k % 8));
    scale[N, K / group_size] f32 or f16. The weight is nibble * scale + offset with
    offset[N, K / group_size] when given (GGUF Q4_1: scale d, offset m, exact),
    (nibble - zero) * scale with zero[N, K / group_size] when given instead,
    and (nibble - 8) * scale (symmetric, GGUF Q4_0) when neither is.
    """
    n, words = (_int_dim(d, "int4 weight dim") for d in q.shape)
    k = words * INT4_PER_WORD
    if k % group_size or _int_dim(scale.shape[1], "int4 scale dim") != k // group_size:
        raise ConfigError(f"expected int4 scales with K / group_size = {k / group_size:g} columns "
                          f"(K={k}, group_size={group_size}), found {scale.shape[1]}; "
                          "K must be a multiple of the group size")
    return _matmul(x, n, k, int4_weight(q, scale, group_size, zero, offset), "linear_int4", row_tile,
                   dequant_stage)


def embedding_rows(ids: te.Tensor, q: te.Tensor, scale: te.Tensor, offset: te.Tensor | None, bits: int,
                   group_size: int) -> te.Tensor:
    """out[i, c] = W[clip(ids[i]), c] for a quantized W (linear_q's formats); ids[m] int64."""
    rows = _int_dim(q.shape[0], "quantized table rows")
    k = _int_dim(q.shape[1], "quantized table columns") * (INT4_PER_WORD if bits == 4 else 1)
    weight = int8_weight(q, scale, group_size) if bits == 8 else int4_weight(q, scale, group_size, offset=offset)

    def row(i):
        return te.max(te.min(ids[i], tirx.const(rows - 1, ids.dtype)), tirx.const(0, ids.dtype)).astype("int32")

    return te.compute((ids.shape[0], k), lambda i, c: weight(row(i), c), name="embedding_q")


# ---------------------------------------------------------------------------------
# Paged KV cache attention (GQA).
#
# Layout: k_pages and v_pages are [num_pages, num_kv_heads, page_size, head_dim], at any element offset (on the
# CPU each layer reads its pages through a view of the pool);
# page_table[b, max_pages] int32 lists the pages of sequence b in order and
# lengths[b] int32 is its number of cached tokens, the new ones included (append
# first, then attend). Query head h reads KV head h // (num_heads / num_kv_heads).
# Softmax is online over pages: one page of scores at a time, so scratch stays in
# registers/L1 whatever the context length.
# ---------------------------------------------------------------------------------

def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int):
    if num_heads % num_kv_heads:
        raise ConfigError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if head_dim < 1:
        raise ConfigError(f"expected head_dim >= 1, found {head_dim}")


_LOG2E = math.log2(math.e)


def exp2(x):
    """2**x for fp32 as vectorizable arithmetic (LLVM scalarizes exp2 into libm calls).

    2**x = 2**n * 2**f with n = floor(x + 1/2), |f| <= 1/2; 2**f by its degree-6
    Taylor polynomial in f*ln2 (relative error < 2e-7). x is clamped to [-126, 127],
    so a masked score of -3e38 yields 2**-126, which is 0 for any softmax sum >= 1.
    """
    x = tirx.max(tirx.min(x, tirx.const(127.0, "float32")), tirx.const(-126.0, "float32"))
    n = tirx.floor(x + tirx.const(0.5, "float32"))
    f = x - n
    poly = tirx.const(math.log(2) ** 6 / math.factorial(6), "float32")
    for power in range(5, -1, -1):
        poly = poly * f + tirx.const(math.log(2) ** power / math.factorial(power), "float32")
    bits = tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32"))
    return poly * tirx.reinterpret("float32", bits)


def score_constants(head_dim: int, sm_scale: float | None, softcap: float | None, alibi):
    """(q scale, capped, cap, biased, per-head slopes) of the attention kernels, which keep scores in log2 units
    so the softmax is exp2: soft-capped scores c * tanh(s / c) scale q by 1 / c for the tanh and take the log2
    units after it (times ``cap``); ALiBi adds slope_h * (key_pos - query_pos) in log2 units like the rest."""
    capped = softcap is not None
    sm = head_dim ** -0.5 if sm_scale is None else sm_scale
    scale = float(sm / softcap) if capped else float(sm * _LOG2E)
    cap = float(softcap * _LOG2E) if capped else 1.0
    biased = alibi is not None
    slopes = [float(x * _LOG2E) for x in alibi] if biased else []
    return scale, capped, cap, biased, slopes


def head_slope(head, slopes: list):
    """slopes[head] for a loop variable ``head``: a chain of selects over the constant per-head slopes (0 when
    there are none), bound once per (row, head) outside the key loop."""
    value = tirx.const(0.0, "float32")
    for index in range(len(slopes) - 1, -1, -1):
        value = tirx.Select(head == index, tirx.const(slopes[index], "float32"), value)
    return value


def _specialize_bases(func: tirx.PrimFunc, k_base: int, v_base: int) -> tirx.PrimFunc:
    """A kernel parsed once with its pool offsets as its last two scalar parameters, those fixed: each layer's
    kernel reads its pages at constant offsets without parsing its TVMScript again (a parse costs ~0.1 s)."""
    kb, vb = func.params[-2], func.params[-1]
    return func.specialize({kb: tirx.IntImm("int64", k_base), vb: tirx.IntImm("int64", v_base)})


def _attention_func(kind: str, num_heads: int, num_kv_heads: int, head_dim: int,
                    page_size: int, sm_scale: float | None, k_base: int = 0, v_base: int = 0,
                    window: int | None = None, softcap: float | None = None,
                    alibi: tuple | None = None, cache_dtype: str = "float32") -> tirx.PrimFunc:
    return _specialize_bases(_attention_template(kind, num_heads, num_kv_heads, head_dim, page_size, sm_scale,
                                                 window, softcap, None if alibi is None else tuple(alibi),
                                                 cache_dtype), k_base, v_base)


@functools.lru_cache(maxsize=None)
def _attention_template(kind: str, num_heads: int, num_kv_heads: int, head_dim: int,
                        page_size: int, sm_scale: float | None, window: int | None,
                        softcap: float | None = None, alibi: tuple | None = None,
                        cache_dtype: str = "float32") -> tirx.PrimFunc:
    _check_heads(num_heads, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    heads = num_heads
    kv_heads = num_kv_heads
    dim = head_dim
    page = page_size
    lanes = REDUCE_LANES
    # q . k runs in 16-lane chunks; a head size that is not a multiple of 16 ends in a scalar tail.
    chunks = dim // lanes
    tail = dim % lanes
    scale, capped, cap, biased, slopes = score_constants(dim, sm_scale, softcap, alibi)
    neg_big = -3.0e38
    # Keys older than `span` positions before the query are outside a sliding window.
    span = window if window is not None else 2 ** 30

    @T.macro
    def attend_row(q: T.Buffer, out: T.Buffer, k_pages: T.Buffer, v_pages: T.Buffer,
                   page_table: T.Buffer, row: T.int64, h: T.int64, seq: T.int64, n_tokens: T.int32,
                   acc: T.Buffer, qs: T.Buffer, part: T.Buffer, scores: T.Buffer, stat: T.Buffer,
                   k_base: T.int64, v_base: T.int64):
        # out[row, h] = softmax(q[row, h] . K[seq, :n_tokens]) @ V[seq, :n_tokens], online over
        # pages. stat: running max, running sum, page max, rescale factor.
        kvh: T.let[T.int64] = h // group
        slope: T.let[T.float32] = head_slope(h, slopes)
        stat[0] = T.float32(neg_big)
        stat[1] = T.float32(0)
        for d in T.vectorized(dim):
            acc[d] = T.float32(0)
            qs[d] = q[row, h, d] * T.float32(scale)
        for p in T.serial((n_tokens + page - 1) // page):
            pid: T.let[T.int64] = T.Cast("int64", page_table[seq, p])
            valid: T.let[T.int32] = T.min(n_tokens - p * page, page)
            for t in T.serial(page):
                scores[t] = T.float32(neg_big)
                if t < valid and p * page + t >= n_tokens - span:
                    # q . k in 16-lane partial sums, then folded in halves: no scalar chain.
                    if chunks > 0:
                        for l in T.vectorized(lanes):
                            part[l] = qs[l] * T.Cast("float32", k_pages[pid + k_base, kvh, t, l])
                    else:
                        for l in T.vectorized(lanes):
                            part[l] = T.float32(0)
                    for c in T.serial(1, chunks):
                        for l in T.vectorized(lanes):
                            part[l] = part[l] + qs[c * lanes + l] * T.Cast("float32", k_pages[pid + k_base, kvh, t,
                                                                                          c * lanes + l])
                    if tail > 0:
                        for l in T.serial(tail):
                            part[l] = part[l] + (qs[chunks * lanes + l]
                                                 * T.Cast("float32", k_pages[pid + k_base, kvh, t,
                                                                             chunks * lanes + l]))
                    for l in T.vectorized(lanes // 2):
                        part[l] = part[l] + part[l + lanes // 2]
                    for l in T.vectorized(lanes // 4):
                        part[l] = part[l] + part[l + lanes // 4]
                    for l in T.vectorized(lanes // 8):
                        part[l] = part[l] + part[l + lanes // 8]
                    if capped:
                        scores[t] = T.float32(cap) * T.tanh(part[0] + part[1])
                    else:
                        scores[t] = part[0] + part[1]
                    if biased:
                        scores[t] = scores[t] + slope * T.Cast("float32", p * page + t - (n_tokens - 1))
            stat[2] = stat[0]
            for t in T.serial(page):
                stat[2] = T.max(stat[2], scores[t])
            for t in T.vectorized(page):
                scores[t] = exp2(scores[t] - stat[2])
            stat[3] = exp2(stat[0] - stat[2])
            stat[0] = stat[2]
            stat[1] = stat[1] * stat[3]
            for t in T.serial(page):
                stat[1] = stat[1] + scores[t]
            for d in T.vectorized(dim):
                acc[d] = acc[d] * stat[3]
            for t in T.serial(valid):
                for d in T.vectorized(dim):
                    acc[d] = acc[d] + scores[t] * T.Cast("float32", v_pages[pid + v_base, kvh, t, d])
        for d in T.vectorized(dim):
            out[row, h, d] = acc[d] / stat[1]

    @T.prim_func(s_tir=True)
    def paged_attention_decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, table_h: T.handle,
                               len_h: T.handle, out_h: T.handle, k_base: T.int64, v_base: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, CPU_ONLY: True})
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        q = T.match_buffer(q_h, (batch, heads, dim), "float32")
        k_pages = T.match_buffer(k_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        v_pages = T.match_buffer(v_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        lengths = T.match_buffer(len_h, (batch,), "int32")
        out = T.match_buffer(out_h, (batch, heads, dim), "float32")
        for task in T.parallel(batch * heads):
            with T.sblock("paged_attention_decode"):
                # Explicit regions: inference would pick up the let-bound loop bounds.
                T.reads(q[0:batch, 0:heads, 0:dim], k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        page_table[0:batch, 0:max_pages], lengths[0:batch])
                T.writes(out[0:batch, 0:heads, 0:dim])
                acc = T.sblock_alloc_buffer((dim,), "float32")
                qs = T.sblock_alloc_buffer((dim,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                scores = T.sblock_alloc_buffer((page,), "float32")
                stat = T.sblock_alloc_buffer((4,), "float32")
                b: T.let[T.int64] = task // heads
                attend_row(q, out, k_pages, v_pages, page_table, b, task % heads, b, lengths[b],
                           acc, qs, part, scores, stat, k_base, v_base)

    @T.prim_func(s_tir=True)
    def paged_attention_prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, table_h: T.handle,
                                seq_h: T.handle, pos_h: T.handle, out_h: T.handle, k_base: T.int64,
                                v_base: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, CPU_ONLY: True})
        rows = T.int64()
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        q = T.match_buffer(q_h, (rows, heads, dim), "float32")
        k_pages = T.match_buffer(k_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        v_pages = T.match_buffer(v_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        out = T.match_buffer(out_h, (rows, heads, dim), "float32")
        # Head-major task order: neighbouring tasks share a KV head's pages in cache.
        for task in T.parallel(heads * rows):
            with T.sblock("paged_attention_prefill"):
                T.reads(q[0:rows, 0:heads, 0:dim], k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(out[0:rows, 0:heads, 0:dim])
                acc = T.sblock_alloc_buffer((dim,), "float32")
                qs = T.sblock_alloc_buffer((dim,), "float32")
                part = T.sblock_alloc_buffer((lanes,), "float32")
                scores = T.sblock_alloc_buffer((page,), "float32")
                stat = T.sblock_alloc_buffer((4,), "float32")
                r: T.let[T.int64] = task % rows
                attend_row(q, out, k_pages, v_pages, page_table, r, task // rows,
                           T.Cast("int64", row_seq[r]), row_pos[r] + 1, acc, qs, part, scores, stat,
                           k_base, v_base)

    return paged_attention_decode if kind == "decode" else paged_attention_prefill


def attention_decode_func(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                          sm_scale: float | None = None, k_base: int = 0, v_base: int = 0,
                          window: int | None = None, softcap: float | None = None,
                          alibi: tuple | None = None, cache_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(q[b, H, D], k_pages, v_pages, page_table[b, P_max], lengths[b], out[b, H, D]).

    Query b attends to the first lengths[b] tokens of sequence b. One parallel task
    per (sequence, query head); the query heads of one KV head are neighbouring tasks,
    so a thread mostly rereads that head's K/V from L2. Already scheduled for CPU.
    """
    return _attention_func("decode", num_heads, num_kv_heads, head_dim, page_size, sm_scale, k_base, v_base,
                           window, softcap, alibi, cache_dtype)


def attention_prefill_func(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                           sm_scale: float | None = None, k_base: int = 0, v_base: int = 0,
                           window: int | None = None, softcap: float | None = None,
                           alibi: tuple | None = None, cache_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(q[s, H, D], k_pages, v_pages, page_table[b, P_max], row_seq[s], row_pos[s],
    out[s, H, D]): causal attention for query rows of several sequences packed together.

    Row r belongs to sequence row_seq[r] at absolute position row_pos[r] and attends
    to that sequence's tokens 0..row_pos[r] (its own K/V appended beforehand). One
    sequence of s new tokens after c cached ones: row_seq = 0, row_pos = c..c+s-1.
    """
    return _attention_func("prefill", num_heads, num_kv_heads, head_dim, page_size, sm_scale, k_base, v_base,
                           window, softcap, alibi, cache_dtype)


def kv_append_func(num_kv_heads: int, head_dim: int, page_size: int, k_base: int = 0,
                   v_base: int = 0, cache_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(k[s, Hkv, D], v[s, Hkv, D], page_table[b, P_max], row_seq[s], row_pos[s],
    k_pages, v_pages): writes row r's K/V at position row_pos[r] of sequence row_seq[r],
    in place (relax.call_tir_inplace with the pages as the in-place arguments), rounded to the pages' dtype.
    """
    return _specialize_bases(_kv_append_template(num_kv_heads, head_dim, page_size, cache_dtype), k_base, v_base)


@functools.lru_cache(maxsize=None)
def _kv_append_template(num_kv_heads: int, head_dim: int, page_size: int,
                        cache_dtype: str = "float32") -> tirx.PrimFunc:
    kv_heads = num_kv_heads
    dim = head_dim
    page = page_size

    @T.prim_func(s_tir=True)
    def paged_kv_append(k_h: T.handle, v_h: T.handle, table_h: T.handle, seq_h: T.handle,
                        pos_h: T.handle, kp_h: T.handle, vp_h: T.handle, k_base: T.int64, v_base: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, CPU_ONLY: True})
        rows = T.int64()
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        k = T.match_buffer(k_h, (rows, kv_heads, dim), "float32")
        v = T.match_buffer(v_h, (rows, kv_heads, dim), "float32")
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        k_pages = T.match_buffer(kp_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        v_pages = T.match_buffer(vp_h, (num_pages, kv_heads, page, dim), cache_dtype, offset_factor=1)
        for r in T.serial(rows):  # a few KB per token: cheaper on the calling thread than a pool hand-off
            with T.sblock("paged_kv_append"):
                T.reads(k[0:rows, 0:kv_heads, 0:dim], v[0:rows, 0:kv_heads, 0:dim],
                        page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                         v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim])
                pos: T.let[T.int32] = row_pos[r]
                pid: T.let[T.int64] = T.Cast("int64", page_table[row_seq[r], pos // page])
                for h in T.serial(kv_heads):
                    for d in T.vectorized(dim):
                        k_pages[pid + k_base, h, pos % page, d] = T.Cast(cache_dtype, k[r, h, d])
                        v_pages[pid + v_base, h, pos % page, d] = T.Cast(cache_dtype, v[r, h, d])

    return paged_kv_append


# ---------------------------------------------------------------------------------
# Emitting the attention kernels into Relax. They are TIR with data-dependent loop
# bounds, which TE cannot express, so they enter through call_tir rather than emit_te.
# ---------------------------------------------------------------------------------

def _ty(expr: relax.Expr) -> relax.TensorType:
    return expr.ty


def emit_attention_decode(bb: relax.BlockBuilder, q, k_pages, v_pages, page_table, lengths,
                          sm_scale: float | None = None) -> relax.Var:
    """out[b, H, D] for q[b, H, D]; shapes (heads, head_dim, page size) are read from the args."""
    num_pages, kv_heads, page, dim = _ty(k_pages).shape
    heads = _ty(q).shape[1]
    func = attention_decode_func(int(heads), int(kv_heads), int(dim), int(page), sm_scale)
    gvar = bb.add_func(func, ATTENTION_DECODE)
    return bb.emit(relax.call_tir(gvar, [q, k_pages, v_pages, page_table, lengths],
                                  relax.TensorType(_ty(q).shape, "float32")))


def emit_attention_prefill(bb: relax.BlockBuilder, q, k_pages, v_pages, page_table, row_seq,
                           row_pos, sm_scale: float | None = None) -> relax.Var:
    """out[s, H, D] for q[s, H, D] (see attention_prefill_func)."""
    num_pages, kv_heads, page, dim = _ty(k_pages).shape
    heads = _ty(q).shape[1]
    func = attention_prefill_func(int(heads), int(kv_heads), int(dim), int(page), sm_scale)
    gvar = bb.add_func(func, ATTENTION_PREFILL)
    return bb.emit(relax.call_tir(gvar, [q, k_pages, v_pages, page_table, row_seq, row_pos],
                                  relax.TensorType(_ty(q).shape, "float32")))


def emit_kv_append(bb: relax.BlockBuilder, k, v, page_table, row_seq, row_pos, k_pages,
                   v_pages) -> tuple[relax.Var, relax.Var]:
    """Writes k, v [s, Hkv, D] into the pages in place; returns the (aliased) new pages."""
    num_pages, kv_heads, page, dim = _ty(k_pages).shape
    gvar = bb.add_func(kv_append_func(int(kv_heads), int(dim), int(page)), KV_APPEND)
    pages = bb.emit(relax.call_tir_inplace(
        gvar, [k, v, page_table, row_seq, row_pos, k_pages, v_pages], [5, 6],
        [_ty(k_pages), _ty(v_pages)]))
    return bb.emit(relax.TupleGetItem(pages, 0)), bb.emit(relax.TupleGetItem(pages, 1))
