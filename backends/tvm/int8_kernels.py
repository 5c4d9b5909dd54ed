"""CPU kernels for ``linear_q {activations=int8}``: integer dot products with AVX512-VNNI ``vpdpbusd``.

The IR's semantics (``kiln.ir.quant_ops``): each row of x is quantized per block of 32 (scale s = max|x| / 127,
xq = rint(x / s)), and the matmul reads xq * s. Per output row j and block b the kernels compute

    y[i, j] = sum_b  d[j, b] * s[i, b] * (xq[i, b] . u[j, b])  +  c[j, b] * s[i, b] * sum(xq[i, b])

with u the weight's unsigned integers (int4: the nibbles, int8: q + 128) and c the zero-point term
(Q4_1: the offset m; Q4_0: -8 d; int8: -128 d). ``xq . u`` is ``vpdpbusd`` (u8 x s8 -> i32, 64 bytes at once);
the second term needs only the activation block sums, computed once per row by :func:`quantize_rows_func`.

Layout, repacked at compile time by :func:`repack` (the weights the kernel reads instead of q / scale / offset):
four output rows share one 64-byte vector, one 16-byte quarter each, so one load feeds ``vpdpbusd`` for four
rows and the activations are one 16-byte broadcast (and a software prefetch runs about 6 KB ahead of the loads):

- int4 ``q`` u32[N/4, K/32, 16]: the 16 bytes of row 4g + r's block b at words 4r..4r+3, as kiln packs them
  (byte i: element 2i in the low nibble, 2i + 1 in the high one), so ``w & 0x0f`` holds the even elements
  and ``w >> 4 & 0x0f`` the odd ones.
- int8 ``q`` u32[N/4, K/32, 32]: words 0..15 the even elements of the four rows' block (16 bytes each),
  words 16..31 the odd ones, each byte q + 128.
- ``scale`` [N/4, K/32, 4] (per block; a group of 64 or 128 repeats its scale) or [N/4, 4] (per row), and
  ``offset`` [N/4, K/32, 4]: in the weight's dtype, so f16 GGUF scales stay f16 in memory.

The activations are laid out to match: :func:`quantize_rows_func` writes each block's even elements, then its odd
ones. Rows of x are processed ``row_tile`` at a time over one group of weights (1 for decode, 8 for prefill),
so prefill reads each weight once per eight rows from L1.

Weight groups smaller than the activation block (GGUF Q6_K: int8 in groups of 16; any group of 8 or 16, int8
or int4) keep the same weight layout and a different sum. In the vectors above, lane 4r + t of ``vpdpbusd``'s
result holds row r's bytes 4t..4t+3 of the even elements and, after the second call, of the odd ones: elements
8t..8t+7 of the block, one contiguous quarter. A group of 16 is two quarters and a group of 8 one, so each lane
lies inside one weight group and takes that group's scale:

    y[i, j] = sum_b s[i, b] * sum_t d[j, b, t] * (xq[i, b, 8t:8t+8] . u[j, b, 8t:8t+8]  -  Z * S[i, b, t])
              +  sum_b s[i, b] * sum_t m[j, b, t] * S[i, b, t]

with d[j, b, t] the scale of the group holding quarter t, S[i, b, t] = sum(xq[i, b, 8t:8t+8]) (the quarter
sums, integers written by :func:`quantize_rows_func` beside xq), Z the zero point of the unsigned form
(int8: 128, int4 without offsets: 8; with offsets Z = 0 and m the offset). The zero-point term is subtracted
in int32 before the conversion to f32 (each lane's product sum is then the exact signed dot product, and the
integer term starts the ``vpdpbusd`` accumulator), so a group of 16 costs no more float work per block than a
group of 32: one f32 multiply and one multiply-add of 16 lanes per block and row, ``d * s`` the lane's factor.
Scales (and offsets) are laid out [N/4, K/32, 4 * 32 / group]: row r's groups of block b from r * 32 / group
on, in order.

A target without VNNI (or an N not a multiple of 4, or a group of 1, 2 or 4) takes :func:`dequantize_rows` and
the float kernels: the same int8 rows, multiplied in f32.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from kiln.ir.quant_ops import ACTIVATION_BLOCK, unpack_int4

GROUP_ROWS = 4  # output rows per 64-byte vector
PREFILL_ROW_TILE = 8
# The weight stream is read this far ahead with software prefetches: the hardware prefetcher alone left a
# GEMV at about half a plain read loop's bandwidth on this machine (1536 x 576 int4, 2 threads, weights
# from DRAM: 18-19 GB/s; 4-5 groups, about 6 KB, ahead: 33-40 GB/s; a read loop: 40-42 GB/s).
PREFETCH_BYTES = 6144
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
# Attribute of the kernels here: scheduled by hand, CPU only (schedules.py leaves them alone).
SCHEDULED = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}


def has_vnni(target) -> bool:
    """Whether ``target`` (an llvm Target) can run ``vpdpbusd`` on 512-bit vectors."""
    return target.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features("avx512vnni", target))


QUARTER = 8  # elements of a block one vpdpbusd lane covers (both calls, even and odd elements)
SMALL_GROUPS = (8, 16)  # weight groups smaller than a block the kernels take: whole quarters


def fits(n: int, k: int, group_size: int = 0) -> bool:
    """Whether the VNNI kernels take a weight of N rows, K columns and this group (else the float path runs)."""
    groups_fit = group_size % ACTIVATION_BLOCK == 0 or group_size in SMALL_GROUPS
    return n % GROUP_ROWS == 0 and k % ACTIVATION_BLOCK == 0 and groups_fit


def _per_block_groups(group_size: int) -> int:
    """Scales per row and block of 32 in the repacked layout: 32 / group for a small group, else 1."""
    return ACTIVATION_BLOCK // group_size if 0 < group_size < ACTIVATION_BLOCK else 1


# ---------------------------------------------------------------------------------
# Compile-time weight layout.
# ---------------------------------------------------------------------------------

def _per_block(a: np.ndarray, n: int, k: int, group_size: int) -> np.ndarray:
    """scale / offset [N, K / group] -> [N / 4, K / 32, 4], one value per block of 32 (group a multiple of 32),
    or [N / 4, K / 32, 4 * 32 / group] for a small group (row r's groups of the block together)."""
    blocks, per = k // ACTIVATION_BLOCK, _per_block_groups(group_size)
    if group_size > ACTIVATION_BLOCK:
        a = np.repeat(a.reshape(n, -1), group_size // ACTIVATION_BLOCK, axis=1)
    a = a.reshape(n // GROUP_ROWS, GROUP_ROWS, blocks, per).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(a.reshape(n // GROUP_ROWS, blocks, GROUP_ROWS * per) if per > 1 else a[..., 0])


def repack(bits: int, group_size: int, q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> list:
    """linear_q's (q, scale[, offset]) -> the arrays the VNNI kernel reads, in its parameter order."""
    n = q.shape[0]
    groups, blocks = n // GROUP_ROWS, None
    if bits == 4:
        k = q.shape[1] * 8
        blocks = k // ACTIVATION_BLOCK
        packed = q.reshape(groups, GROUP_ROWS, blocks, 4).transpose(0, 2, 1, 3).reshape(groups, blocks, 16)
    else:
        k = q.shape[1]
        blocks = k // ACTIVATION_BLOCK
        u = (q.astype(np.int16) + 128).astype(np.uint8).reshape(groups, GROUP_ROWS, blocks, 16, 2)
        packed = u.transpose(0, 2, 4, 1, 3).reshape(groups, blocks, 2 * GROUP_ROWS * 16).view(np.uint32)
    out = [np.ascontiguousarray(packed, dtype=np.uint32)]
    if group_size == 0:
        out.append(np.ascontiguousarray(scale.reshape(groups, GROUP_ROWS)))
    else:
        out.append(_per_block(scale, n, k, group_size))
    if offset is not None:
        out.append(_per_block(offset, n, k, group_size))
    return out


def unpack_reference(bits: int, group_size: int, arrays: list, n: int, k: int) -> np.ndarray:
    """The float64 weight [N, K] of repacked arrays (for tests: the inverse of :func:`repack`)."""
    groups, blocks = n // GROUP_ROWS, k // ACTIVATION_BLOCK
    packed = arrays[0]
    if bits == 4:
        words = packed.reshape(groups, blocks, GROUP_ROWS, 4).transpose(0, 2, 1, 3).reshape(n, k // 8)
        u = unpack_int4(words).astype(np.float64)
    else:
        b = packed.view(np.uint8).reshape(groups, blocks, 2, GROUP_ROWS, 16).transpose(0, 3, 1, 4, 2)
        u = b.reshape(n, k).astype(np.float64) - 128
    per = _per_block_groups(group_size)

    def per_element(a):  # [N/4, K/32, 4 * per] -> [N, K]
        a = a.astype(np.float64).reshape(groups, blocks, GROUP_ROWS, per).transpose(0, 2, 1, 3)
        return np.repeat(a.reshape(n, blocks * per), ACTIVATION_BLOCK // per, 1)

    s = np.repeat(arrays[1].astype(np.float64).reshape(n, 1), k, 1) if group_size == 0 else per_element(arrays[1])
    if len(arrays) == 3:
        return u * s + per_element(arrays[2])
    return (u - 8) * s if bits == 4 else u * s


def embedding_rows(ids: te.Tensor, q: te.Tensor, scale: te.Tensor, offset: te.Tensor | None, bits: int,
                   group_size: int, n: int, k: int) -> te.Tensor:
    """out[i, c] = W[clip(ids[i]), c] (f32) read from the repacked layout: a tied embedding table, which the
    logits projection reads repacked, is then held in memory once."""
    half = ACTIVATION_BLOCK // 2

    def weight(j, c):
        g, r = j // GROUP_ROWS, j % GROUP_ROWS
        b, w = c // ACTIVATION_BLOCK, c % ACTIVATION_BLOCK
        if bits == 4:
            word = q[g, b, r * 4 + w // 8]
            u = ((word >> ((w % 8) * 4).astype("uint32")) & tirx.const(15, "uint32")).astype("float32")
        else:  # byte (parity, row, i) of the block: element 2i + parity, stored + 128
            byte = (w % 2) * (GROUP_ROWS * half) + r * half + w // 2
            word = q[g, b, byte // 4]
            u = ((word >> ((byte % 4) * 8).astype("uint32")) & tirx.const(255, "uint32")).astype("float32")
            u = u - tirx.const(128, "float32")
        per = _per_block_groups(group_size)
        at = r if per == 1 else r * per + w // group_size  # the repacked scale (and offset) of (row, c)
        s = (scale[g, r] if group_size == 0 else scale[g, b, at]).astype("float32")
        if offset is not None:
            return u * s + offset[g, b, at].astype("float32")
        return (u - tirx.const(8, "float32")) * s if bits == 4 else u * s

    def row(i):
        return te.max(te.min(ids[i], tirx.const(n - 1, ids.dtype)), tirx.const(0, ids.dtype))

    return te.compute((ids.shape[0], k), lambda i, c: weight(row(i), c), name="embedding_q")


# ---------------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------------

def _row_scales(x: te.Tensor, k: int):
    """(scale, inverse) [m, K / 32]: max|x| / 127 and 127 / max|x| (0 for an all-zero block)."""
    m = x.shape[0]
    blocks = k // ACTIVATION_BLOCK
    e = te.reduce_axis((0, ACTIVATION_BLOCK), name="e")
    amax = te.compute((m, blocks), lambda i, b: te.max(te.abs(x[i, b * ACTIVATION_BLOCK + e]), axis=e),
                      name="block_amax")
    zero = tirx.const(0, "float32")
    scale = te.compute((m, blocks), lambda i, b: amax[i, b] / tirx.const(127, "float32"), name="block_scale")
    inverse = te.compute((m, blocks), lambda i, b: tirx.Select(
        amax[i, b] > zero, tirx.const(127, "float32") / amax[i, b], zero), name="block_inverse")
    return scale, inverse


def _rounded(x, i, c, inverse, b):
    v = tirx.nearbyint(x[i, c] * inverse[i, b])
    return te.max(te.min(v, tirx.const(127, "float32")), tirx.const(-127, "float32"))


@functools.lru_cache(maxsize=None)
def quantize_rows_func(k: int, parallel: bool, quarter_sums: bool = False) -> tirx.PrimFunc:
    """PrimFunc(x f32[m, K] -> xq i8[m, K], scale f32[m, K / 32], block sums times scale f32[m, K / 32]): the
    int8 rows, xq holding each block's even elements, then its odd ones (the order the repacked weights'
    nibbles come in). One loop over the rows, in parallel for a prefill's many rows (``parallel``) and on the
    calling thread for a decode step's one. ``quarter_sums`` (the small-group kernels): the third output is
    i32[m, K / 8] instead, the integer sum of xq over each 8 consecutive elements."""
    blocks, half = k // ACTIVATION_BLOCK, ACTIVATION_BLOCK // 2
    quarters = ACTIVATION_BLOCK // QUARTER
    sums_shape, sums_dtype = ((k // QUARTER,), "int32") if quarter_sums else ((blocks,), "float32")

    @T.macro
    def quantize_row(x, xq, sx, xs, i, stat):
        for b in range(blocks):
            stat[0] = T.float32(0)
            for e in range(ACTIVATION_BLOCK):
                stat[0] = T.max(stat[0], T.abs(x[i, b * ACTIVATION_BLOCK + e]))
            stat[1] = T.Select(stat[0] > T.float32(0), T.float32(127) / stat[0], T.float32(0))
            for t in range(quarters):
                stat[2 + t] = T.float32(0)
            for c in range(ACTIVATION_BLOCK):  # each block's even elements, then its odd ones
                v = T.meta_var(T.max(T.min(T.nearbyint(x[i, b * ACTIVATION_BLOCK + (c % half) * 2 + c // half]
                                                       * stat[1]), T.float32(127)), T.float32(-127)))
                xq[i, b * ACTIVATION_BLOCK + c] = T.Cast("int8", v)
                if quarter_sums:  # element 2 (c % 16) + c // 16 lies in quarter (c % 16) // 4
                    stat[2 + (c % half) // (QUARTER // 2)] = stat[2 + (c % half) // (QUARTER // 2)] + v
                else:
                    stat[2] = stat[2] + v
            sx[i, b] = stat[0] / T.float32(127)
            if quarter_sums:
                for t in range(quarters):
                    xs[i, b * quarters + t] = T.Cast("int32", stat[2 + t])
            else:
                xs[i, b] = stat[2] * (stat[0] / T.float32(127))

    rows = T.parallel if parallel else T.serial

    @T.prim_func(private=True, s_tir=True)
    def quantize(x_h: T.handle, xq_h: T.handle, sx_h: T.handle, xs_h: T.handle):
        T.func_attr(SCHEDULED)
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        xq = T.match_buffer(xq_h, (m, k), "int8")
        sx = T.match_buffer(sx_h, (m, blocks), "float32")
        xs = T.match_buffer(xs_h, (m,) + sums_shape, sums_dtype)
        for i in rows(m):
            with T.sblock("quantize_rows"):
                T.reads(x[0:m, 0:k])
                T.writes(xq[0:m, 0:k], sx[0:m, 0:blocks], xs[0:m, 0:sums_shape[0]])
                stat = T.sblock_alloc_buffer((2 + quarters,), "float32")
                quantize_row(x, xq, sx, xs, i, stat)

    return quantize


def dequantize_rows(x: te.Tensor) -> te.Tensor:
    """x f32[m, K] -> its int8 rows as f32 (xq * scale): the int8-activation semantics for the float kernels."""
    k = int(x.shape[1])
    scale, inverse = _row_scales(x, k)
    return te.compute(x.shape, lambda i, c: _rounded(x, i, c, inverse, c // ACTIVATION_BLOCK)
                      * scale[i, c // ACTIVATION_BLOCK], name="int8_rows")


# ---------------------------------------------------------------------------------
# The dot-product kernel.
# ---------------------------------------------------------------------------------

LANES = 16  # int32 / f32 lanes of one 512-bit vector
NIBBLES = 0x0F0F0F0F


def _operands(q, g, b, bits: int):
    """The two u8 operands of block b for group g's four rows (even elements, odd elements)."""
    w = q[g, b, T.Ramp(0, 1, 16)]
    if bits == 8:
        return T.reinterpret("int8x64", w), T.reinterpret("int8x64", q[g, b, T.Ramp(16, 1, 16)])
    nibbles = T.Broadcast(tirx.const(NIBBLES, "uint32"), 16)
    lo = w & nibbles
    hi = (w >> T.Broadcast(tirx.const(4, "uint32"), 16)) & nibbles
    return T.reinterpret("int8x64", lo), T.reinterpret("int8x64", hi)


def _broadcast16(xq, row, start):
    """16 activation bytes repeated in the four 128-bit quarters of a vector."""
    v = T.reinterpret("int32x4", xq[row, T.Ramp(start, 1, 16)])
    return T.reinterpret("int8x64", T.Shuffle([v, v, v, v], list(range(16))))


def _prefetch(address):
    """llvm.prefetch(address, read, keep in all levels, data)."""
    return T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id("llvm.prefetch.p0"), address,
                              T.int32(0), T.int32(3), T.int32(1))


def _dot(lo, hi, xe, xo, start):
    """start + the u8 x s8 dot products of (lo, xe) and (hi, xo), four bytes per int32 lane."""
    vp = T.llvm_lookup_intrinsic_id(VPDPBUSD)
    return T.call_llvm_pure_intrin("int32x16", vp, T.call_llvm_pure_intrin("int32x16", vp, start, lo, xe), hi, xo)


def _fold(a):
    """f32x16 -> f32x4: the sum of each row's four lanes."""
    return (T.Shuffle([a], [0, 4, 8, 12]) + T.Shuffle([a], [1, 5, 9, 13]) + T.Shuffle([a], [2, 6, 10, 14])
            + T.Shuffle([a], [3, 7, 11, 15]))


def _spread(v, per: int):
    """f32 x (4 * per), row r's per values together -> f32x16, lane 4r + t taking value r * per + t * per / 4
    (per 1: row r's value over its four lanes; 2: groups of 16, two lanes each; 4: groups of 8, one lane each)."""
    if per == GROUP_ROWS:
        return v
    copies = [v] * (GROUP_ROWS // per)  # a shuffle gives at most the lanes it is given
    return T.Shuffle(copies, [(lane // 4) * per + (lane % 4) * per // 4 for lane in range(LANES)])


@functools.lru_cache(maxsize=None)  # parsing TVMScript costs ~0.1 s; a model asks for a few shapes many times
def matmul_func(n: int, k: int, bits: int, group_size: int, scale_dtype: str, has_offset: bool,
                row_tile: int) -> tirx.PrimFunc:
    """y f32[m, N] = int8 rows (xq, scale, sums) @ the repacked weight, ``row_tile`` rows per pass. The sums are
    the block sums times the scale (f32[m, K / 32]), or for a group of 8 or 16 the quarter sums
    (i32[m, K / 8], :func:`quantize_rows_func` with ``quarter_sums``)."""
    if 0 < group_size < ACTIVATION_BLOCK:
        return _small_group_func(n, k, bits, group_size, scale_dtype, has_offset, row_tile)
    groups, blocks = n // GROUP_ROWS, k // ACTIVATION_BLOCK
    words = 16 if bits == 4 else 32
    per_row = group_size == 0
    zero_point = 0.0 if has_offset else (8.0 if bits == 4 else 128.0)
    sdt = "float16" if scale_dtype == "f16" else "float32"
    s_shape = (groups, GROUP_ROWS) if per_row else (groups, blocks, GROUP_ROWS)
    o_shape = (groups, blocks, GROUP_ROWS) if has_offset else s_shape  # no offset: the scale passed twice
    tile = row_tile
    ahead = max(1, -(-PREFETCH_BYTES // (blocks * words * 4)))  # groups
    lanes = LANES

    def row_scales(s, g, b):  # f32x4: the four rows' scales of block b (or of the row)
        return T.Cast("float32x4", s[g, T.Ramp(0, 1, 4)] if per_row else s[g, b, T.Ramp(0, 1, 4)])

    def zero_term(s, o, g, b):  # f32x4: what each row adds per unit of the block's scaled sum
        if has_offset:
            return T.Cast("float32x4", o[g, b, T.Ramp(0, 1, 4)])
        return row_scales(s, g, b) * T.Broadcast(tirx.const(-zero_point, "float32"), 4)

    def block_scale(s, g, b, sx_value):  # f32x16 multiplying the block's integer sums
        if per_row:
            return T.Broadcast(sx_value, lanes)
        return _spread(row_scales(s, g, b), 1) * T.Broadcast(sx_value, lanes)

    def finish(s, g, total, c):
        return total * row_scales(s, g, 0) + c if per_row else total + c

    zero = T.Broadcast(tirx.const(0, "int32"), lanes)

    @T.prim_func(private=True)
    def kernel(xq_h: T.handle, sx_h: T.handle, xs_h: T.handle, q_h: T.handle, s_h: T.handle, o_h: T.handle,
               y_h: T.handle):
        T.func_attr(SCHEDULED)
        m = T.int64()
        xq = T.match_buffer(xq_h, (m, k), "int8")
        sx = T.match_buffer(sx_h, (m, blocks), "float32")
        xs = T.match_buffer(xs_h, (m, blocks), "float32")
        q = T.match_buffer(q_h, (groups, blocks, words), "uint32")
        s = T.match_buffer(s_h, s_shape, sdt)
        o = T.match_buffer(o_h, o_shape, sdt)
        y = T.match_buffer(y_h, (m, n), "float32")
        for g in T.parallel(groups):
            acc = T.alloc_buffer((tile, lanes), "float32", annotations={"disable_lower_builtin": True})
            corr = T.alloc_buffer((tile, GROUP_ROWS), "float32", annotations={"disable_lower_builtin": True})
            for io in range((m + tile - 1) // tile):
                for r in T.unroll(tile):
                    acc[r, T.Ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                    corr[r, T.Ramp(0, 1, GROUP_ROWS)] = T.Broadcast(T.float32(0), GROUP_ROWS)
                for b in range(blocks):
                    for line in T.unroll(words // 16):  # the weight lines a few groups ahead
                        T.evaluate(_prefetch(T.address_of(q[T.min(g + ahead, groups - 1), b, line * 16])))
                    lo, hi = T.meta_var(_operands(q, g, b, bits))
                    c4 = T.meta_var(zero_term(s, o, g, b))
                    for r in T.unroll(tile):
                        row = T.meta_var(T.min(io * tile + r, m - 1))
                        isum = T.meta_var(_dot(lo, hi, _broadcast16(xq, row, b * 32),
                                               _broadcast16(xq, row, b * 32 + 16), zero))
                        acc[r, T.Ramp(0, 1, lanes)] = (acc[r, T.Ramp(0, 1, lanes)] + T.Cast("float32x16", isum)
                                                       * block_scale(s, g, b, sx[row, b]))
                        corr[r, T.Ramp(0, 1, 4)] = corr[r, T.Ramp(0, 1, 4)] + c4 * T.Broadcast(xs[row, b], 4)
                for r in T.unroll(tile):
                    if io * tile + r < m:
                        y[io * tile + r, T.Ramp(g * 4, 1, 4)] = finish(s, g, _fold(acc[r, T.Ramp(0, 1, lanes)]),
                                                                       corr[r, T.Ramp(0, 1, 4)])

    return kernel


def _small_group_func(n: int, k: int, bits: int, group_size: int, scale_dtype: str, has_offset: bool,
                      row_tile: int) -> tirx.PrimFunc:
    """matmul_func for a group of 8 or 16 (the module docstring's second formula): each lane's int32 sum, less
    Z times its quarter sum, converted once and multiplied by its group's scale times the block's."""
    if group_size not in SMALL_GROUPS:
        raise ValueError(f"the VNNI kernels take groups of {' or '.join(map(str, SMALL_GROUPS))} below "
                         f"{ACTIVATION_BLOCK}, found group_size {group_size}")
    groups, blocks = n // GROUP_ROWS, k // ACTIVATION_BLOCK
    words = 16 if bits == 4 else 32
    per = _per_block_groups(group_size)
    width = GROUP_ROWS * per  # scales of one block for the four rows
    zero_point = 0 if has_offset else (8 if bits == 4 else 128)
    sdt = "float16" if scale_dtype == "f16" else "float32"
    quarters = ACTIVATION_BLOCK // QUARTER
    tile = row_tile
    # weights and their scales a few groups ahead (the scales are a quarter of the weight bytes or more here)
    ahead = max(1, -(-PREFETCH_BYTES // (blocks * words * 4)))

    def lane_values(a, g, b):  # f32x16: the scale (or offset) of each lane's group
        return _spread(T.Cast(f"float32x{width}", a[g, b, T.Ramp(0, 1, width)]), per)

    def quarter_sums(xs, row, b):  # i32x16: S[row, b, t] at lane 4r + t
        v = xs[row, T.Ramp(b * quarters, 1, quarters)]
        return T.Shuffle([v, v, v, v], list(range(LANES)))

    def start(xs, row, b):  # the int32 lanes' start: -Z * S (no zero point with offsets)
        if zero_point == 0:
            return T.Broadcast(tirx.const(0, "int32"), LANES)
        return quarter_sums(xs, row, b) * T.Broadcast(tirx.const(-zero_point, "int32"), LANES)

    @T.prim_func(private=True)
    def kernel(xq_h: T.handle, sx_h: T.handle, xs_h: T.handle, q_h: T.handle, s_h: T.handle, o_h: T.handle,
               y_h: T.handle):
        T.func_attr(SCHEDULED)
        m = T.int64()
        xq = T.match_buffer(xq_h, (m, k), "int8")
        sx = T.match_buffer(sx_h, (m, blocks), "float32")
        xs = T.match_buffer(xs_h, (m, blocks * quarters), "int32")
        q = T.match_buffer(q_h, (groups, blocks, words), "uint32")
        s = T.match_buffer(s_h, (groups, blocks, width), sdt)
        o = T.match_buffer(o_h, (groups, blocks, width), sdt)  # no offset: the scale passed twice
        y = T.match_buffer(y_h, (m, n), "float32")
        for g in T.parallel(groups):
            acc = T.alloc_buffer((tile, LANES), "float32", annotations={"disable_lower_builtin": True})
            for io in range((m + tile - 1) // tile):
                for r in T.unroll(tile):
                    acc[r, T.Ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for b in range(blocks):
                    ahead_g = T.meta_var(T.min(g + ahead, groups - 1))
                    for line in T.unroll(words // 16):
                        T.evaluate(_prefetch(T.address_of(q[ahead_g, b, line * 16])))
                    T.evaluate(_prefetch(T.address_of(s[ahead_g, b, 0])))
                    lo, hi = T.meta_var(_operands(q, g, b, bits))
                    d16 = T.meta_var(lane_values(s, g, b))
                    for r in T.unroll(tile):
                        row = T.meta_var(T.min(io * tile + r, m - 1))
                        isum = T.meta_var(_dot(lo, hi, _broadcast16(xq, row, b * 32),
                                               _broadcast16(xq, row, b * 32 + 16), start(xs, row, b)))
                        block = T.meta_var(T.Broadcast(sx[row, b], LANES))
                        if has_offset:
                            acc[r, T.Ramp(0, 1, LANES)] = (
                                acc[r, T.Ramp(0, 1, LANES)]
                                + (T.Cast("float32x16", isum) * d16
                                   + T.Cast("float32x16", quarter_sums(xs, row, b)) * lane_values(o, g, b)) * block)
                        else:
                            acc[r, T.Ramp(0, 1, LANES)] = (acc[r, T.Ramp(0, 1, LANES)]
                                                           + T.Cast("float32x16", isum) * (d16 * block))
                for r in T.unroll(tile):
                    if io * tile + r < m:
                        y[io * tile + r, T.Ramp(g * 4, 1, 4)] = _fold(acc[r, T.Ramp(0, 1, LANES)])

    return kernel
