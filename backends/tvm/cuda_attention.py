"""CUDA kernels for kiln's paged KV cache: decode and prefill attention and the in-place K/V append.

Same arguments and semantics as the CPU kernels (kernels.py, llm_lower.kv_append_func), so a
lowering picks one set by target. `bind_threads=False` builds the same TIR with the GPU thread
loops as CPU loops, which is how the kernels are checked numerically on a machine without a GPU.
q, k, v and the output are `io_dtype` (float32, or float16 / bfloat16 for half compute): read into
f32 registers, scores, softmax and the weighted sum accumulate in f32, the output is rounded once.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.ir.errors import ConfigError

from .kernels import head_slope, score_constants

# A thread block serves one (query row, query head): a tile of `threads` keys is scored at a time
# (one key per thread) and each thread owns head_dim / threads output columns. threads follows
# head_dim so both phases keep every thread busy: 32 <= threads <= 128.
MIN_THREADS = 32
MAX_THREADS = 128
APPEND_THREADS = 128

# The running max starts here; exp2(_NEG_BIG - real score) underflows to exactly 0.
_NEG_BIG = -3.0e38
# "No window": a span longer than any sequence.
_NO_WINDOW = 2 ** 30
# The activation dtypes the kernels take (q, k, v and the output); the arithmetic is f32 for all of them.
IO_DTYPES = ("float32", "float16", "bfloat16")


def _loops(bind_threads: bool, threads: int):
    """(block loop, thread loop, scope of block-shared buffers, register lanes) for a GPU or a CPU build.

    Threads never talk inside one thread loop: each phase is its own sibling thread loop and
    phases talk through block-shared buffers (TVM inserts __syncthreads between them). A thread's
    registers are row tx % lanes of a "local" buffer: one row per thread on the GPU, one row per
    serialised thread on the CPU. So running every thread loop serially computes what the GPU does.
    """
    if bind_threads:
        return (functools.partial(T.thread_binding, thread="blockIdx.x"),
                functools.partial(T.thread_binding, thread="threadIdx.x"), "shared", 1)
    return T.parallel, T.serial, "global", threads


def _block_threads(head_dim: int) -> int:
    return min(max(head_dim, MIN_THREADS), MAX_THREADS)


def _check_io(io_dtype: str) -> None:
    if io_dtype not in IO_DTYPES:
        raise ConfigError(f"expected q, k, v of one of {', '.join(IO_DTYPES)}, found {io_dtype}")


def _check(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, window: int | None):
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ConfigError(f"expected num_heads a multiple of num_kv_heads, found num_heads={num_heads} "
                          f"num_kv_heads={num_kv_heads}; check the model's attention config")
    if head_dim < 1 or page_size < 1:
        raise ConfigError(f"expected head_dim >= 1 and page_size >= 1, found {head_dim} and {page_size}")
    if window is not None and window < 1:
        raise ConfigError(f"expected a sliding window >= 1 or None, found {window}")


def _attention_cuda_func(kind: str, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                         sm_scale: float | None, k_base: int, v_base: int, window: int | None,
                         bind_threads: bool, softcap: float | None = None,
                         alibi: tuple | None = None, cache_dtype: str = "float32",
                         io_dtype: str = "float32") -> tirx.PrimFunc:
    _check(num_heads, num_kv_heads, head_dim, page_size, window)
    _check_io(io_dtype)
    heads, kv_heads, dim, page = num_heads, num_kv_heads, head_dim, page_size
    group = heads // kv_heads
    threads = _block_threads(dim)
    block_loop, thread_loop, shared, lanes = _loops(bind_threads, threads)
    dim_steps = (dim + threads - 1) // threads
    scale, capped, cap, biased, slopes = score_constants(dim, sm_scale, softcap, alibi)
    span = window if window is not None else _NO_WINDOW

    @T.macro
    def attend_row(q: T.Buffer, out: T.Buffer, k_pages: T.Buffer, v_pages: T.Buffer, page_table: T.Buffer,
                   row: T.int64, h: T.int64, seq: T.int64, n_tokens: T.int32, qs: T.Buffer, scores: T.Buffer,
                   probs: T.Buffer, key_page: T.Buffer, acc: T.Buffer, stat: T.Buffer, tmp: T.Buffer):
        # out[row, h] = softmax(q . K) @ V over the visible keys [start, n_tokens) of sequence `seq`,
        # online over tiles of `threads` keys. Every thread keeps the same running max, sum and
        # rescale factor (stat) and its own columns of the output (acc), in registers.
        kvh: T.let[T.int64] = h // group
        slope: T.let[T.float32] = head_slope(h, slopes)
        start: T.let[T.int32] = T.max(n_tokens - span, 0)
        count: T.let[T.int32] = T.max(n_tokens - start, 0)
        for tx in thread_loop(threads):
            for i in T.unroll(dim_steps):
                if i * threads + tx < dim:
                    qs[i * threads + tx] = T.Cast("float32", q[row, h, i * threads + tx]) * T.float32(scale)
                acc[tx % lanes, i] = T.float32(0)
            stat[tx % lanes, 0] = T.float32(_NEG_BIG)
            stat[tx % lanes, 1] = T.float32(0)
        for tile in T.serial((count + threads - 1) // threads):
            # scores of the tile's keys: thread tx takes key start + tile * threads + tx
            for tx in thread_loop(threads):
                scores[tx] = T.float32(_NEG_BIG)
                key_page[tx] = 0
                if start + tile * threads + tx < n_tokens:
                    key_page[tx] = page_table[seq, (start + tile * threads + tx) // page]
                    tmp[0] = T.float32(0)
                    for d in T.serial(dim):
                        tmp[0] = tmp[0] + qs[d] * T.Cast("float32", k_pages[
                            T.Cast("int64", page_table[seq, (start + tile * threads + tx) // page]) + k_base,
                            kvh, (start + tile * threads + tx) % page, d])
                    if capped:
                        scores[tx] = T.float32(cap) * T.tanh(tmp[0])
                    else:
                        scores[tx] = tmp[0]
                    if biased:
                        scores[tx] = scores[tx] + slope * T.Cast("float32", start + tile * threads + tx
                                                                 - (n_tokens - 1))
            # new running max (each thread the same), rescale factor, probabilities of the tile
            for tx in thread_loop(threads):
                tmp[0] = stat[tx % lanes, 0]
                for j in T.serial(threads):
                    tmp[0] = T.max(tmp[0], scores[j])
                stat[tx % lanes, 2] = T.exp2(stat[tx % lanes, 0] - tmp[0])
                stat[tx % lanes, 0] = tmp[0]
                probs[tx] = T.if_then_else(start + tile * threads + tx < n_tokens,
                                           T.exp2(scores[tx] - tmp[0]), T.float32(0))
            # running sum and weighted values: thread tx owns columns tx, tx + threads, ...
            for tx in thread_loop(threads):
                tmp[0] = stat[tx % lanes, 1] * stat[tx % lanes, 2]
                for j in T.serial(threads):
                    tmp[0] = tmp[0] + probs[j]
                stat[tx % lanes, 1] = tmp[0]
                for i in T.unroll(dim_steps):
                    if i * threads + tx < dim:
                        tmp[0] = acc[tx % lanes, i] * stat[tx % lanes, 2]
                        for j in T.serial(T.min(count - tile * threads, threads)):
                            tmp[0] = tmp[0] + probs[j] * T.Cast("float32", v_pages[
                                T.Cast("int64", key_page[j]) + v_base, kvh,
                                (start + tile * threads + j) % page, i * threads + tx])
                        acc[tx % lanes, i] = tmp[0]
        # a row that sees no key (a padding row) gets zeros rather than 0 / 0
        for tx in thread_loop(threads):
            for i in T.unroll(dim_steps):
                if i * threads + tx < dim:
                    out[row, h, i * threads + tx] = T.Cast(io_dtype, T.if_then_else(
                        stat[tx % lanes, 1] > T.float32(0), acc[tx % lanes, i] / stat[tx % lanes, 1],
                        T.float32(0)))

    @T.prim_func(s_tir=True)
    def paged_attention_decode_cuda(q_h: T.handle, k_h: T.handle, v_h: T.handle, table_h: T.handle,
                                    len_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        q = T.match_buffer(q_h, (batch, heads, dim), io_dtype)
        k_pages = T.match_buffer(k_h, (num_pages, kv_heads, page, dim), cache_dtype)
        v_pages = T.match_buffer(v_h, (num_pages, kv_heads, page, dim), cache_dtype)
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        lengths = T.match_buffer(len_h, (batch,), "int32")
        out = T.match_buffer(out_h, (batch, heads, dim), io_dtype)
        for task in block_loop(batch * heads):
            with T.sblock("paged_attention_decode_cuda"):
                # Explicit regions: inference would pick up the let-bound loop bounds.
                T.reads(q[0:batch, 0:heads, 0:dim], k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        page_table[0:batch, 0:max_pages], lengths[0:batch])
                T.writes(out[0:batch, 0:heads, 0:dim])
                qs = T.sblock_alloc_buffer((dim,), "float32", scope=shared)
                scores = T.sblock_alloc_buffer((threads,), "float32", scope=shared)
                probs = T.sblock_alloc_buffer((threads,), "float32", scope=shared)
                key_page = T.sblock_alloc_buffer((threads,), "int32", scope=shared)
                acc = T.sblock_alloc_buffer((lanes, dim_steps), "float32", scope="local")
                stat = T.sblock_alloc_buffer((lanes, 3), "float32", scope="local")
                tmp = T.sblock_alloc_buffer((1,), "float32", scope="local")
                b: T.let[T.int64] = task // heads
                attend_row(q, out, k_pages, v_pages, page_table, b, task % heads, b, lengths[b],
                           qs, scores, probs, key_page, acc, stat, tmp)

    @T.prim_func(s_tir=True)
    def paged_attention_prefill_cuda(q_h: T.handle, k_h: T.handle, v_h: T.handle, table_h: T.handle,
                                     seq_h: T.handle, pos_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        batch = T.int64()
        num_pages = T.int64()
        max_pages = T.int64()
        q = T.match_buffer(q_h, (rows, heads, dim), io_dtype)
        k_pages = T.match_buffer(k_h, (num_pages, kv_heads, page, dim), cache_dtype)
        v_pages = T.match_buffer(v_h, (num_pages, kv_heads, page, dim), cache_dtype)
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        out = T.match_buffer(out_h, (rows, heads, dim), io_dtype)
        # Row-major block order: the divisor is the constant head count (rows is symbolic).
        for task in block_loop(rows * heads):
            with T.sblock("paged_attention_prefill_cuda"):
                T.reads(q[0:rows, 0:heads, 0:dim], k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                        page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(out[0:rows, 0:heads, 0:dim])
                qs = T.sblock_alloc_buffer((dim,), "float32", scope=shared)
                scores = T.sblock_alloc_buffer((threads,), "float32", scope=shared)
                probs = T.sblock_alloc_buffer((threads,), "float32", scope=shared)
                key_page = T.sblock_alloc_buffer((threads,), "int32", scope=shared)
                acc = T.sblock_alloc_buffer((lanes, dim_steps), "float32", scope="local")
                stat = T.sblock_alloc_buffer((lanes, 3), "float32", scope="local")
                tmp = T.sblock_alloc_buffer((1,), "float32", scope="local")
                r: T.let[T.int64] = task // heads
                attend_row(q, out, k_pages, v_pages, page_table, r, task % heads,
                           T.Cast("int64", row_seq[r]), row_pos[r] + 1, qs, scores, probs, key_page, acc, stat,
                           tmp)

    return paged_attention_decode_cuda if kind == "decode" else paged_attention_prefill_cuda


def attention_decode_cuda_func(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                               sm_scale: float | None = None, k_base: int = 0, v_base: int = 0,
                               window: int | None = None, softcap: float | None = None,
                               alibi: tuple | None = None, cache_dtype: str = "float32", *,
                               bind_threads: bool = True, io_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(q[b, H, D], k_pages, v_pages, page_table[b, P_max], lengths[b], out[b, H, D]) for CUDA.

    As kernels.attention_decode_func: query b attends to the first lengths[b] tokens of sequence b
    (the last `window` of them with a sliding window); K pages are read at k_base + page id, V pages
    at v_base + page id. A query with no visible token gets zeros. One thread block per
    (sequence, query head).
    """
    return _attention_cuda_func("decode", num_heads, num_kv_heads, head_dim, page_size, sm_scale, k_base,
                                v_base, window, bind_threads, softcap, alibi, cache_dtype, io_dtype)


def attention_prefill_cuda_func(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                                sm_scale: float | None = None, k_base: int = 0, v_base: int = 0,
                                window: int | None = None, softcap: float | None = None,
                                alibi: tuple | None = None, cache_dtype: str = "float32", *,
                                bind_threads: bool = True, io_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(q[s, H, D], k_pages, v_pages, page_table[b, P_max], row_seq[s], row_pos[s], out[s, H, D]).

    As kernels.attention_prefill_func: row r attends to positions 0..row_pos[r] (within the window)
    of sequence row_seq[r]; a row with row_pos < 0 gets zeros. One thread block per (row, query head).
    """
    return _attention_cuda_func("prefill", num_heads, num_kv_heads, head_dim, page_size, sm_scale, k_base,
                                v_base, window, bind_threads, softcap, alibi, cache_dtype, io_dtype)


def kv_append_cuda_func(num_kv_heads: int, head_dim: int, page_size: int, k_base: int, v_base: int,
                        cache_dtype: str = "float32", *,
                        bind_threads: bool = True, io_dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(k[r, Hkv, D], v[r, Hkv, D], page_table[b, P], row_seq[r], row_pos[r], k_pages[n, Hkv, P, D],
    v_pages[n, Hkv, P, D]).

    As kernels.kv_append_func: row i's K goes to page k_base + page_table[row_seq[i], pos // P] of k_pages at
    slot pos % P (V at v_base + ... of v_pages), in place. One thread per written element. k and v are
    `io_dtype`; a value goes through f32 on its way into the cache (exact, then rounded once to the cache's
    dtype: CUDA has no direct bfloat16 -> half conversion).
    """
    _check_io(io_dtype)
    if num_kv_heads < 1 or head_dim < 1 or page_size < 1:
        raise ConfigError(f"expected num_kv_heads, head_dim and page_size >= 1, found {num_kv_heads}, "
                          f"{head_dim} and {page_size}")
    kv_heads, dim, page = num_kv_heads, head_dim, page_size
    per_row = kv_heads * dim
    threads = APPEND_THREADS
    block_loop, thread_loop, _, _ = _loops(bind_threads, threads)

    @T.prim_func(s_tir=True)
    def paged_kv_append_cuda(k_h: T.handle, v_h: T.handle, table_h: T.handle, seq_h: T.handle,
                             pos_h: T.handle, kp_h: T.handle, vp_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        batch = T.int64()
        max_pages = T.int64()
        num_pages = T.int64()
        k = T.match_buffer(k_h, (rows, kv_heads, dim), io_dtype)
        v = T.match_buffer(v_h, (rows, kv_heads, dim), io_dtype)
        page_table = T.match_buffer(table_h, (batch, max_pages), "int32")
        row_seq = T.match_buffer(seq_h, (rows,), "int32")
        row_pos = T.match_buffer(pos_h, (rows,), "int32")
        k_pages = T.match_buffer(kp_h, (num_pages, kv_heads, page, dim), cache_dtype)
        v_pages = T.match_buffer(vp_h, (num_pages, kv_heads, page, dim), cache_dtype)
        for bx in block_loop((rows * per_row + threads - 1) // threads):
            with T.sblock("paged_kv_append_cuda"):
                T.reads(k[0:rows, 0:kv_heads, 0:dim], v[0:rows, 0:kv_heads, 0:dim],
                        page_table[0:batch, 0:max_pages], row_seq[0:rows], row_pos[0:rows])
                T.writes(k_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim],
                         v_pages[0:num_pages, 0:kv_heads, 0:page, 0:dim])
                for tx in thread_loop(threads):
                    index: T.let[T.int64] = bx * threads + tx
                    if index < rows * per_row:
                        r: T.let[T.int64] = index // per_row
                        h: T.let[T.int64] = index // dim % kv_heads
                        d: T.let[T.int64] = index % dim
                        pos: T.let[T.int32] = row_pos[r]
                        pid: T.let[T.int64] = T.Cast("int64", page_table[row_seq[r], pos // page])
                        k_pages[pid + k_base, h, pos % page, d] = T.Cast(cache_dtype, T.Cast("float32", k[r, h, d]))
                        v_pages[pid + v_base, h, pos % page, d] = T.Cast(cache_dtype, T.Cast("float32", v[r, h, d]))

    return paged_kv_append_cuda
