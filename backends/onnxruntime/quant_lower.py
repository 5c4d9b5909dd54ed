"""ONNX lowering of ``linear_q`` (ONNX Runtime's MatMulNBits) and ``embedding_q`` (a Gather of the
quantized rows, dequantized with standard ops).

Registered into ``lower.LOWERINGS`` on import. MatMulNBits reads ``W[N, K]`` as uint8 blocks
``[N, K / block, block * bits / 8]`` with per-block scales and computes ``(q - zero_point) * scale``.
Measured on ORT 1.32's CPU kernels (2 threads, [1, 576] x [576, 1536]): int4 with no or uint8
zero points about 0.1 ms; int4 with float zero points 3 ms; int8 at accuracy_level 0 1.3 ms
(no float-activation 8-bit kernel), at 4 0.03 ms. So:

- int4: kiln's u32 words hold element k in bits ``4 (k % 8)``; on a little-endian machine their
  bytes are already MatMulNBits' layout (element 2j the low nibble of byte j). Symmetric
  (``(nibble - 8) * scale``) is MatMulNBits' default zero point 8. With an offset,
  ``x @ (nibble * scale + offset).T = MatMulNBits(x, nibble, scale, zero point 0)
  + groupsum(x) @ offset.T``: the offsets become a small f32 matmul over the group sums of x.
- int8 at accuracy_level 0: ``q = 16 hi + lo`` with ``hi = q >> 4`` in [-8, 7] and ``lo = q & 15``,
  so ``x @ W.T`` is two exact int4 MatMulNBits (hi with scale 16 s and zero point 8, lo with
  scale s and zero point 0). At accuracy_level 4 (int8 activations), MatMulNBits with bits=8.
  A per-row scale is repeated over blocks of a power of two dividing K (or K is padded).
- int8 activations with a weight group smaller than 32 (GGUF Q6_K: int8 groups of 16): MatMulNBits at
  accuracy_level 4 quantizes the activations per weight block, so a block of 16 would round x per 16, not per
  32 as the IR says. Instead the weight is split into 32 / group MatMulNBits of block 32, part p holding the
  p-th group of every 32 columns (the others zero) with that group's scale; each part rounds x per 32 exactly
  as the IR does, and their sum is the IR's y. It stores 32 / group copies of the integers (two for Q6_K)
  and is faster than the alternative (x rounded with standard ops, then two int4 MatMulNBits at
  accuracy_level 0): 72 vs 105 us for Q6_K's 1536 x 576, 1.5 vs 3.3-6.1 ms for 8192 x 2048 (2 threads).
"""

from __future__ import annotations

import sys

import numpy as np

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.quant_ops import ACTIVATION_BLOCK, INT4_PER_WORD, pack_int4, unpack_int4

from .lower import MS_DOMAIN, _weight_of, lowering

BLOCK_SIZES = (256, 128, 64, 32, 16)  # MatMulNBits: a power of two, at least 16


def _block(k: int, group_size: int) -> int:
    if group_size:
        if group_size not in BLOCK_SIZES:
            raise ValueError(f"MatMulNBits needs a block size in {BLOCK_SIZES}, found group_size {group_size}")
        return group_size
    return next((b for b in BLOCK_SIZES if k % b == 0), 32)


def _block_scales(scale: np.ndarray, k: int, block: int, group_size: int) -> np.ndarray:
    scale = scale.astype(np.float32)
    return scale if group_size else np.repeat(scale[:, None], -(-k // block), axis=1)


def pack_nibbles(nibbles: np.ndarray, block: int, pad: int) -> np.ndarray:
    """u8[N, K] values in [0, 15] -> MatMulNBits' B [N, K / block, block / 2] (K padded with ``pad``)."""
    n, k = nibbles.shape
    padded = -(-k // block) * block
    full = np.full((n, padded), pad, dtype=np.uint8)
    full[:, :k] = nibbles
    return (full[:, 0::2] | (full[:, 1::2] << 4)).astype(np.uint8).reshape(n, padded // block, block // 2)


def int4_weights(q: np.ndarray, scale: np.ndarray, group_size: int) -> tuple:
    """(B, scales, block) of an int4 linear_q weight (words reinterpreted as MatMulNBits bytes)."""
    n = q.shape[0]
    k = q.shape[1] * INT4_PER_WORD
    block = _block(k, group_size)
    assert sys.byteorder == "little", "the int4 repack reads u32 words as little-endian bytes"
    return q.view(np.uint8).reshape(n, k // block, block // 2), scale.astype(np.float32), block


def int8_as_int4_pair(q: np.ndarray, scale: np.ndarray, group_size: int) -> tuple:
    """((B_hi, scales_hi), (B_lo, scales_lo), block): q = 16 hi + lo, hi read with zero point 8, lo with 0."""
    k = q.shape[1]
    block = _block(k, group_size)
    wide = q.astype(np.int16)
    hi = ((wide >> 4) + 8).astype(np.uint8)  # arithmetic shift: floor(q / 16) in [-8, 7]
    lo = (wide & 15).astype(np.uint8)
    scales = _block_scales(scale, k, block, group_size)
    return (pack_nibbles(hi, block, 8), scales * np.float32(16)), (pack_nibbles(lo, block, 0), scales), block


def int8_weights(q: np.ndarray, scale: np.ndarray, group_size: int) -> tuple:
    """(B, scales, block) for MatMulNBits bits=8 (q + 128, the default zero point)."""
    n, k = q.shape
    block = _block(k, group_size)
    padded = -(-k // block) * block
    shifted = np.full((n, padded), 128, dtype=np.uint8)  # zero weights in the padding
    shifted[:, :k] = (q.astype(np.int16) + 128).astype(np.uint8)
    return shifted.reshape(n, padded // block, block), _block_scales(scale, k, block, group_size), block


def small_group_parts(q, scale, offset, bits: int, group_size: int) -> dict:
    """prepare_linear_q at accuracy_level 4 for a group dividing 32: one block-32 MatMulNBits per position of a
    group inside the 32 columns, the other positions' weights zero (int8 0, int4 nibble 8 symmetric or 0 with
    offsets), each with its groups' scales; the offsets keep their own group sums (``group``)."""
    n = q.shape[0]
    per = ACTIVATION_BLOCK // group_size
    k = q.shape[1] * (INT4_PER_WORD if bits == 4 else 1)
    ints = q if bits == 8 else unpack_int4(q)
    empty = 0 if bits == 8 or offset is not None else 8
    parts = []
    for position in range(per):
        masked = np.full((n, k // ACTIVATION_BLOCK, per, group_size), empty, dtype=ints.dtype)
        masked[:, :, position] = ints.reshape(n, k // ACTIVATION_BLOCK, per, group_size)[:, :, position]
        masked = masked.reshape(n, k)
        scales = np.ascontiguousarray(scale.reshape(n, -1)[:, position::per])
        if bits == 8:
            blob, scales, block = int8_weights(masked, scales, ACTIVATION_BLOCK)
            parts.append((blob, scales, None, 8))
            continue
        blob, scales, block = int4_weights(pack_int4(masked), scales, ACTIVATION_BLOCK)
        zero = None if offset is None else np.zeros((n, -(-blob.shape[1] // 2)), np.uint8)
        parts.append((blob, scales.astype(np.float32), zero, 4))
    return {"parts": parts, "offset_t": None if offset is None else offset.astype(np.float32).T, "block": block,
            "n": n, "group": group_size}


def prepare_linear_q(q, scale, offset, bits: int, group_size: int, accuracy_level: int) -> dict:
    """MatMulNBits operands of one linear_q weight: ``parts`` (each (B, scales, zero points or None, bits),
    summed), ``offset_t`` (the offsets transposed, for the group-sum correction) or None, ``block``, ``n``."""
    n = q.shape[0]
    if accuracy_level == 4 and 0 < group_size < ACTIVATION_BLOCK:
        return small_group_parts(q, scale, offset, bits, group_size)
    if accuracy_level == 4 and group_size != ACTIVATION_BLOCK:
        # MatMulNBits quantizes activations per weight block; the IR's int8 activations are per 32
        k = q.shape[1] * (INT4_PER_WORD if bits == 4 else 1)
        repeat = (k if group_size == 0 else group_size) // ACTIVATION_BLOCK
        scale = np.repeat(scale.reshape(n, -1), repeat, axis=1)
        offset = None if offset is None else np.repeat(offset, repeat, axis=1)
        group_size = ACTIVATION_BLOCK
    if bits == 4:
        blob, scales, block = int4_weights(q, scale, group_size)
        if offset is None:
            return {"parts": [(blob, scales, None, 4)], "offset_t": None, "block": block, "n": n}
        zero = np.zeros((n, -(-blob.shape[1] // 2)), np.uint8)  # zero point 0: x @ (nibble * scale).T
        return {"parts": [(blob, scales, zero, 4)], "offset_t": offset.astype(np.float32).T, "block": block, "n": n,
                "group": group_size}
    if accuracy_level == 4:
        blob, scales, block = int8_weights(q, scale, group_size)
        return {"parts": [(blob, scales, None, 8)], "offset_t": None, "block": block, "n": n}
    (hi, hi_scales), (lo, lo_scales), block = int8_as_int4_pair(q, scale, group_size)
    zero = np.zeros((n, -(-hi.shape[1] // 2)), np.uint8)
    return {"parts": [(hi, hi_scales, None, 4), (lo, lo_scales, zero, 4)], "offset_t": None, "block": block, "n": n}


def accuracy_level(node) -> int:
    """MatMulNBits' accuracy_level for a linear_q: 4 (int8 activations per block) when the IR says its
    activations are int8, else 0 (float activations)."""
    return 4 if node.attrs.get("activations") == "int8" else 0


def int8_rows(ctx, x: str, width: int) -> str:
    """x f32 [..., K] rounded to int8 per block of 32 and back (quant_ops.quantize_activations): s = max|x| / 127,
    x ~ clip(rint(x * (127 / max|x|)), -127, 127) * s, 0 for an all-zero block."""
    blocks = ctx.add("Reshape", [x, ctx.const([-1, width // ACTIVATION_BLOCK, ACTIVATION_BLOCK], "i64")])
    amax = ctx.add("ReduceMax", [ctx.add("Abs", [blocks]), ctx.const([-1], "i64")], keepdims=1)
    positive = ctx.add("Greater", [amax, ctx.const(0.0, "f32")])
    inverse = ctx.add("Where", [positive, ctx.add("Div", [ctx.const(127.0, "f32"), ctx.add(
        "Where", [positive, amax, ctx.const(1.0, "f32")])]), ctx.const(0.0, "f32")])
    xq = ctx.add("Clip", [ctx.add("Round", [ctx.add("Mul", [blocks, inverse])]), ctx.const(-127.0, "f32"),
                          ctx.const(127.0, "f32")])
    rows = ctx.add("Mul", [xq, ctx.add("Div", [amax, ctx.const(127.0, "f32")])])
    return ctx.add("Reshape", [rows, ctx.add("Shape", [x])])


def _emit(ctx, x: str, x_type, prepared: dict, prefix: str, group_size: int, level: int) -> str:
    k, n = x_type.shape[-1], prepared["n"]
    y = None
    for i, (blob, scales, zero, bits) in enumerate(prepared["parts"]):
        inputs = [x, ctx.derived(f"{prefix}.nbits{i}", lambda b=blob: b),
                  ctx.derived(f"{prefix}.nbits{i}_scales", lambda sc=scales: sc)]
        if zero is not None:
            inputs.append(ctx.derived(f"{prefix}.nbits{i}_zero", lambda z=zero: z))
        part = ctx.add("MatMulNBits", inputs, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=prepared["block"],
                       accuracy_level=level if bits == 4 else 4)
        y = part if y is None else ctx.add("Add", [y, part])
    if prepared["offset_t"] is not None:  # + groupsum(x) @ offset.T, x the int8 rows with accuracy_level 4
        group_size = prepared["group"]
        grouped = tuple(x_type.shape[:-1]) + (k // group_size, group_size)
        rows = x if level != 4 else ctx.cached(("int8_rows", x), lambda: int8_rows(ctx, x, k))
        sums = ctx.cached(("group_sums", rows, group_size), lambda: ctx.add(
            "ReduceSum", [ctx.reshape(rows, x_type.shape, grouped), ctx.const([-1], "i64")], keepdims=0))
        offset_t = ctx.derived(f"{prefix}.offset.T", lambda: prepared["offset_t"])
        y = ctx.add("Add", [y, ctx.add("MatMul", [sums, offset_t])])
    return y


def _linear_q_signature(ctx, node):
    if node.op != "linear_q" or any(_weight_of(ctx, node, i) is None for i in range(1, len(node.inputs))):
        return None
    return ("linear_q", node.attrs["bits"], node.attrs["group_size"], len(node.inputs), node.inputs[2].type.dtype,
            accuracy_level(node))


def _prepared(ctx, node) -> dict:
    data = ctx.module.weight_data
    q, scale = data[_weight_of(ctx, node, 1)], data[_weight_of(ctx, node, 2)]
    offset = data[_weight_of(ctx, node, 3)] if len(node.inputs) == 4 else None
    return prepare_linear_q(q, scale, offset, node.attrs["bits"], node.attrs["group_size"], accuracy_level(node))


@lowering("linear_q")
def _lower_linear_q(ctx, node):
    x_type = ctx.in_type(0)
    if x_type.dtype != "f32":
        raise UnsupportedOpError(f"{ctx.where()}: the ONNX Runtime quantized matmul takes f32 activations, "
                                 f"found {x_type}; compile the model in f32")
    if _linear_q_signature(ctx, node) is None:
        ctx.weight_array(1)  # raises: the weights must be known when compiling
        raise UnsupportedOpError(f"{ctx.where()}: scale and offset must be module weights")
    try:
        return _emit(ctx, ctx.input(0), x_type, _prepared(ctx, node), _weight_of(ctx, node, 1), node.attrs["group_size"],
                     accuracy_level(node))
    except ValueError as err:
        raise UnsupportedOpError(f"{ctx.where()}: {err}; quantize with group size 32 or 128") from None


@lowering("embedding_q")
def _lower_embedding_q(ctx, node):
    """W[ids] as f32: gather the rows of q, scale (and offset), then dequantize them."""
    bits, group_size = node.attrs["bits"], node.attrs["group_size"]
    ids_type, q_type = ctx.in_type(0), ctx.in_type(1)
    n = q_type.shape[0]
    ids = ctx.add("Clip", [ctx.cast(ctx.input(0), ids_type.dtype, "i64"), ctx.const(0, "i64"),
                           ctx.const(n - 1, "i64")])
    lead = tuple(ids_type.shape)
    k = ctx.out_type().shape[-1]
    rows = ctx.add("Gather", [ctx.input(1), ids], axis=0)
    scale = ctx.add("Gather", [ctx.cast(ctx.input(2), ctx.in_type(2).dtype, "f32"), ids], axis=0)
    if bits == 8:
        values = ctx.add("Cast", [rows], to=1)  # f32 [..., K]
    else:
        shifts = ctx.const((4 * np.arange(INT4_PER_WORD)).astype(np.uint32), "u32")
        words = ctx.add("Unsqueeze", [rows, ctx.const([-1], "i64")])
        nibbles = ctx.add("BitwiseAnd", [ctx.add("BitShift", [words, shifts], direction="RIGHT"),
                                         ctx.const(15, "u32")])
        values = ctx.add("Reshape", [ctx.add("Cast", [nibbles], to=1), ctx.shape(lead + (k,))])
        if len(node.inputs) == 3:
            values = ctx.add("Sub", [values, ctx.const(8.0, "f32")])
    if group_size:
        groups = k // group_size
        values = ctx.add("Reshape", [values, ctx.shape(lead + (groups, group_size))])
    values = ctx.add("Mul", [values, ctx.add("Unsqueeze", [scale, ctx.const([-1], "i64")])])
    if len(node.inputs) == 4:
        offset = ctx.add("Gather", [ctx.cast(ctx.input(3), ctx.in_type(3).dtype, "f32"), ids], axis=0)
        values = ctx.add("Add", [values, ctx.add("Unsqueeze", [offset, ctx.const([-1], "i64")])])
    if group_size:
        values = ctx.add("Reshape", [values, ctx.shape(lead + (k,))])
    return values
