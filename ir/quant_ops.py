"""Weight-only quantized linear: ``linear_q(x, q, scale[, zero]) {bits, group_size}`` = x @ dequantize(q).T.

int8: q i8[N, K], scale f32[N] (one per output channel), w = q * scale.
int4: q u32[N, K / 8] with element k of a row in bits 4 * (k % 8) of word k // 8,
scale f32[N, K / group_size]; w = (nibble - zero) * scale with zero f32[N, K / group_size]
when given, else (nibble - 8) * scale (symmetric).
"""

from __future__ import annotations

import numpy as np

from .ops import REQUIRED, define_op, fail
from .types import TensorType, is_float

INT4_PER_WORD = 8
QUANT_BITS = (4, 8)


def pack_int4(nibbles: np.ndarray) -> np.ndarray:
    """u8[N, K] values in [0, 15] -> u32[N, K / 8], element k in bits 4 * (k % 8) of word k // 8."""
    rows, k = nibbles.shape
    if k % INT4_PER_WORD:
        raise ValueError(f"expected K a multiple of {INT4_PER_WORD} to pack int4, found {k}")
    parts = nibbles.astype(np.uint32).reshape(rows, k // INT4_PER_WORD, INT4_PER_WORD)
    shifts = (4 * np.arange(INT4_PER_WORD, dtype=np.uint32))
    return np.bitwise_or.reduce(parts << shifts, axis=-1).astype(np.uint32)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """u32[N, K / 8] -> u8[N, K] nibbles (the inverse of :func:`pack_int4`)."""
    shifts = (4 * np.arange(INT4_PER_WORD, dtype=np.uint32))
    nibbles = (packed[..., None] >> shifts) & np.uint32(15)
    return nibbles.reshape(packed.shape[0], -1).astype(np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, group_size: int) -> np.ndarray:
    """The float64 weight [N, K] a linear_q computes with."""
    if bits == 8:
        return q.astype(np.float64) * scale.astype(np.float64)[:, None]
    nibbles = unpack_int4(q).astype(np.float64)
    expand = lambda a: np.repeat(a.astype(np.float64), group_size, axis=1)  # noqa: E731
    shift = expand(zero) if zero is not None else 8.0
    return (nibbles - shift) * expand(scale)


def _linear_q_infer(types, attrs, module):
    x, q, scale = types[:3]
    zero = types[3] if len(types) == 4 else None
    bits, group = attrs["bits"], attrs["group_size"]
    if bits not in QUANT_BITS:
        raise fail("linear_q", f"bits must be 4 or 8, found {bits}")
    if x.rank < 1 or not is_float(x.dtype) or not isinstance(x.shape[-1], int):
        raise fail("linear_q", f"expected a float x[..., K] with a fixed K, found {x}")
    k = x.shape[-1]
    if q.rank != 2 or scale.dtype != "f32" or not all(isinstance(d, int) for d in q.shape):
        raise fail("linear_q", f"expected a fixed 2-D q and f32 scales, found {q} and {scale}")
    n = q.shape[0]
    if bits == 8:
        if q.dtype != "i8" or q.shape[1] != k or scale.shape != (n,) or zero is not None or group != 0:
            raise fail("linear_q", f"int8 expects q i8[N, {k}], scale f32[N], no zero and group_size 0, "
                                   f"found {q}, {scale}, zero={zero}, group_size={group}")
    else:
        if not (isinstance(group, int) and group > 0 and k % group == 0 and k % INT4_PER_WORD == 0):
            raise fail("linear_q", f"int4 expects a group_size dividing K={k} (and K a multiple of 8), "
                                   f"found group_size={group}")
        groups = (n, k // group)
        if q.dtype != "u32" or q.shape != (n, k // INT4_PER_WORD) or scale.shape != groups:
            raise fail("linear_q", f"int4 expects q u32[N, {k // INT4_PER_WORD}] and scale f32[N, {k // group}], "
                                   f"found {q} and {scale}")
        if zero is not None and (zero.dtype != "f32" or zero.shape != groups):
            raise fail("linear_q", f"int4 zero points must be f32{list(groups)}, found {zero}")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (n,))]


def _linear_q_ref(xs, attrs):
    x, q, scale = xs[:3]
    zero = xs[3] if len(xs) == 4 else None
    w = dequantize(q, scale, zero, attrs["bits"], attrs["group_size"])
    return [np.matmul(x.astype(np.float64), w.T).astype(x.dtype)]


define_op("linear_q", infer=_linear_q_infer, reference=_linear_q_ref, attrs={"bits": REQUIRED, "group_size": 0},
          inputs=(3, 4), doc="x @ dequantize(q, scale[, zero]).T: weight-only int8 (per output channel) or "
                             "int4 (group-wise, symmetric or with zero points) dense layer")
