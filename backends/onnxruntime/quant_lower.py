"""ONNX lowering of ``linear_q`` (ONNX Runtime's MatMulNBits, int4 and int8) and ``embedding_q``
(a Gather of the quantized rows, dequantized with standard ops).

Registered into ``lower.LOWERINGS`` on import. MatMulNBits reads ``W[N, K]`` as uint8 blocks
``[N, K / block, block * bits / 8]`` with per-block scales and computes ``(q - zero_point) * scale``:

- int4: kiln's u32 words hold element k in bits ``4 (k % 8)``; on a little-endian machine their
  bytes are already MatMulNBits' layout (element 2j the low nibble of byte j). Symmetric
  (``(nibble - 8) * scale``) is MatMulNBits' default zero point 8; an offset becomes the float
  zero point ``-offset / scale``.
- int8: ``q + 128`` as uint8 with the default zero point 128; a per-row scale is repeated over
  blocks of a power of two dividing K (or K is padded with zero weights).
"""

from __future__ import annotations

import sys

import numpy as np

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.quant_ops import INT4_PER_WORD

from .lower import MS_DOMAIN, lowering

BLOCK_SIZES = (256, 128, 64, 32, 16)  # MatMulNBits: a power of two, at least 16


def _arrays(ctx, node):
    q, scale = ctx.weight_array(1), ctx.weight_array(2)
    offset = ctx.weight_array(3) if len(node.inputs) == 4 else None
    return q, scale, offset


def matmul_nbits_weights(q, scale, offset, bits: int, group_size: int, dtype=np.float32):
    """(B, scales, zero_points or None, block_size) for MatMulNBits from kiln's linear_q arrays."""
    n = q.shape[0]
    scale = scale.astype(np.float32)
    if bits == 4:
        if group_size not in BLOCK_SIZES:
            raise ValueError(f"MatMulNBits needs a block size in {BLOCK_SIZES}, found group_size {group_size}")
        k = q.shape[1] * INT4_PER_WORD
        assert sys.byteorder == "little", "the int4 repack reads u32 words as little-endian bytes"
        blob = q.view(np.uint8).reshape(n, k // group_size, group_size // 2)
        zero_points = None
        if offset is not None:
            offset = offset.astype(np.float32)
            # w = nibble * scale + offset = (nibble - zp) * scale with zp = -offset / scale. A zero scale with
            # a non-zero offset (a constant group) takes a scale of 2^-20 |offset|: error <= 15 * 2^-20 |offset|.
            flat = (scale == 0) & (offset != 0)
            scale = np.where(flat, np.abs(offset) * np.float32(2.0 ** -20), scale).astype(np.float32)
            safe = np.where(scale == 0, np.float32(1), scale)
            zero_points = np.where(scale == 0, np.float32(0), -offset / safe).astype(dtype)
        return blob, scale.astype(dtype), zero_points, group_size
    k = q.shape[1]
    if group_size:
        if group_size not in BLOCK_SIZES:
            raise ValueError(f"MatMulNBits needs a block size in {BLOCK_SIZES}, found group_size {group_size}")
        block, scales = group_size, scale
    else:
        block = next((b for b in BLOCK_SIZES if k % b == 0), 32)
        scales = np.repeat(scale[:, None], -(-k // block), axis=1)
    padded = -(-k // block) * block
    shifted = np.full((n, padded), 128, dtype=np.uint8)  # zero weights in the padding
    shifted[:, :k] = (q.astype(np.int16) + 128).astype(np.uint8)
    return shifted.reshape(n, padded // block, block), scales.astype(dtype), None, block


@lowering("linear_q")
def _lower_linear_q(ctx, node):
    bits, group_size = node.attrs["bits"], node.attrs["group_size"]
    x_type = ctx.in_type(0)
    if x_type.dtype not in ("f32", "f16"):
        raise UnsupportedOpError(f"{ctx.where()}: MatMulNBits takes f32 or f16 activations, found {x_type}")
    q, scale, offset = _arrays(ctx, node)
    n = q.shape[0]
    k = x_type.shape[-1]
    dtype = np.float32 if x_type.dtype == "f32" else np.float16
    name = ctx.weight_name(1)
    try:
        prepared = matmul_nbits_weights(q, scale, offset, bits, group_size, dtype)
    except ValueError as err:
        raise UnsupportedOpError(f"{ctx.where()}: {err}; quantize with group size 32 or 128") from None
    blob, scales, zero_points, block = prepared
    inputs = [ctx.input(0), ctx.derived(f"{name}.nbits", lambda: blob),
              ctx.derived(f"{name}.nbits_scales.{np.dtype(dtype).name}", lambda: scales)]
    if zero_points is not None:
        inputs.append(ctx.derived(f"{name}.nbits_zero_points.{np.dtype(dtype).name}", lambda: zero_points))
    return ctx.add("MatMulNBits", inputs, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                   accuracy_level=int(ctx.options.get("accuracy_level", 0)))


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
