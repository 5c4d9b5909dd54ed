"""Weight-only quantized ops: ``linear_q`` (a dense layer) and ``embedding_q`` (a row lookup).

Both read one quantized weight ``W[N, K]`` as ``(q, scale[, offset]) {bits, group_size}``:

- int8: q i8[N, K]; scale [N] (group_size 0: one per row) or [N, K / group_size]; w = q * scale.
- int4: q u32[N, K / 8], element k of a row in bits 4 * (k % 8) of word k // 8;
  scale [N, K / group_size]; w = nibble * scale + offset with offset [N, K / group_size]
  when given (GGUF Q4_1: scale d, offset m), else (nibble - 8) * scale (symmetric, GGUF Q4_0).

scale and offset are f32 or f16 (a GGUF file's block scales are f16); the arithmetic is f32.
``linear_q(x, q, scale[, offset])`` = x @ W.T; ``embedding_q(ids, q, scale[, offset])`` = W[ids].

``linear_q``'s ``activations`` attribute says what the matmul does with x:

- ``float`` (default): x as it is.
- ``int8``: each row of x is quantized per block of 32 along K first, as llama.cpp's Q8_0 and ONNX
  Runtime's accuracy_level 4 do: s = max|x_block| / 127, xq = clip(rint(x / s), -127, 127) (s = 0 and
  xq = 0 for an all-zero block), and the matmul reads xq * s. Kernels compute it as integer dot
  products of xq with the weight's integers, times the block scales (:func:`quantize_activations`
  is the reference). K must be a multiple of 32 and the weight's group per row, a multiple of 32, or a
  divisor of 32 (GGUF Q6_K: 16), so that every activation block meets whole weight groups. With a group
  g dividing 32, block b of row i and weight row j meet 32 / g groups, each with its own scale (int8 weights;
  int4 ones likewise with their dequantized values):

      y[i, j] = sum_b s[i, b] * sum_h d[j, (32 / g) b + h] * (xq[i, b, g h : g (h + 1)] . q[j, b, g h : g (h + 1)])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ops import REQUIRED, define_op, fail
from .types import TensorType, is_float

INT4_PER_WORD = 8
QUANT_BITS = (4, 8)
SCALE_DTYPES = ("f32", "f16")
ACTIVATIONS = ("float", "int8")
ACTIVATION_BLOCK = 32  # int8 activations: one scale per 32 values of a row


@dataclass
class QuantizedWeight:
    """One weight in linear_q / embedding_q form (the arrays a module stores)."""

    bits: int
    group_size: int
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None = None

    def arrays(self) -> list:
        return [self.q, self.scale] + ([self.offset] if self.offset is not None else [])

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scale, self.offset, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


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


def _per_element(a: np.ndarray, group_size: int) -> np.ndarray:
    """scale/offset [N] or [N, G] -> float64 broadcastable against W[N, K]."""
    a = a.astype(np.float32).astype(np.float64)
    return a[:, None] if a.ndim == 1 else np.repeat(a, group_size, axis=1)


def dequantize(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, bits: int, group_size: int) -> np.ndarray:
    """The float64 weight [N, K] a linear_q / embedding_q computes with."""
    s = _per_element(scale, group_size)
    if bits == 8:
        return q.astype(np.float64) * s
    nibbles = unpack_int4(q).astype(np.float64)
    if offset is None:
        return (nibbles - 8.0) * s
    return nibbles * s + _per_element(offset, group_size)


def check_quantized(op: str, q: TensorType, scale: TensorType, offset: TensorType | None, bits, group,
                    k: int | None = None) -> tuple:
    """Shape/dtype rule of a quantized weight; returns (N, K). ``k``: the K the caller expects."""
    if bits not in QUANT_BITS:
        raise fail(op, f"bits must be 4 or 8, found {bits}")
    if not isinstance(group, int) or group < 0:
        raise fail(op, f"group_size must be a non-negative integer, found {group!r}")
    if q.rank != 2 or not all(isinstance(d, int) for d in q.shape):
        raise fail(op, f"expected a fixed 2-D q, found {q}")
    if scale.dtype not in SCALE_DTYPES or (offset is not None and offset.dtype != scale.dtype):
        raise fail(op, f"expected f32 or f16 scales (and offsets of the same dtype), found {scale} and {offset}")
    n = q.shape[0]
    if bits == 8:
        qk = q.shape[1]
        if q.dtype != "i8" or offset is not None:
            raise fail(op, f"int8 expects q i8[N, K] and no offset, found {q} and offset={offset}")
    else:
        qk = q.shape[1] * INT4_PER_WORD
        if q.dtype != "u32" or group == 0:
            raise fail(op, f"int4 expects q u32[N, K / 8] and a group_size > 0, found {q}, group_size={group}")
    if k is not None and qk != k:
        raise fail(op, f"expected q for K={k} columns, found {q} (K={qk})")
    if group:
        if qk % group:
            raise fail(op, f"expected a group_size dividing K={qk}, found group_size={group}")
        want = (n, qk // group)
    else:
        want = (n,)
    if scale.shape != want or (offset is not None and offset.shape != want):
        raise fail(op, f"expected scale{' and offset' if offset is not None else ''} of shape {list(want)} "
                       f"(N={n}, K={qk}, group_size={group}), found {scale}"
                       f"{'' if offset is None else f' and {offset}'}")
    return n, qk


def int8_activations_fit(k: int, group_size: int) -> bool:
    """Whether a linear_q over K columns with this weight group can take int8 activations: K a multiple of
    the activation block (32), and the group per row (0), a multiple of 32 or a divisor of 32 (GGUF Q6_K's
    16), so that no weight group straddles two activation blocks."""
    return k % ACTIVATION_BLOCK == 0 and (group_size % ACTIVATION_BLOCK == 0 or ACTIVATION_BLOCK % group_size == 0)


def quantize_activations(x: np.ndarray) -> tuple:
    """int8 activations of x[..., K] (K a multiple of 32): (xq i8[..., K], scale f32[..., K / 32]),
    xq * scale (per block) being what a linear_q with activations=int8 multiplies by."""
    blocks = x.astype(np.float32).reshape(x.shape[:-1] + (x.shape[-1] // ACTIVATION_BLOCK, ACTIVATION_BLOCK))
    amax = np.abs(blocks).max(axis=-1)
    scale = (amax / np.float32(127)).astype(np.float32)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(blocks * inverse[..., None]), -127, 127).astype(np.int8)
    return xq.reshape(x.shape), scale


def _linear_q_infer(types, attrs, module):
    x, q, scale = types[:3]
    offset = types[3] if len(types) == 4 else None
    if x.rank < 1 or not is_float(x.dtype) or not isinstance(x.shape[-1], int):
        raise fail("linear_q", f"expected a float x[..., K] with a fixed K, found {x}")
    n, _ = check_quantized("linear_q", q, scale, offset, attrs["bits"], attrs["group_size"], k=x.shape[-1])
    if attrs["activations"] not in ACTIVATIONS:
        raise fail("linear_q", f"activations must be one of {', '.join(ACTIVATIONS)}, found {attrs['activations']!r}")
    if attrs["activations"] == "int8" and not int8_activations_fit(x.shape[-1], attrs["group_size"]):
        raise fail("linear_q", f"int8 activations need K and the weight group to be multiples of {ACTIVATION_BLOCK} "
                               f"(or the group a divisor of {ACTIVATION_BLOCK}), found K={x.shape[-1]}, "
                               f"group_size={attrs['group_size']}; use activations=float for this weight")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (n,))]


def _linear_q_ref(xs, attrs):
    """(xq * s) @ W.T in float64, W dequantized per element: the same statement for every group the fit
    rule allows (a group dividing 32 only means more weight scales inside one activation block)."""
    x, q, scale = xs[:3]
    offset = xs[3] if len(xs) == 4 else None
    w = dequantize(q, scale, offset, attrs["bits"], attrs["group_size"])
    a = x.astype(np.float64)
    if attrs.get("activations", "float") == "int8":
        xq, s = quantize_activations(x)
        a = (xq.astype(np.float64).reshape(s.shape + (ACTIVATION_BLOCK,)) * s[..., None]).reshape(x.shape)
    return [np.matmul(a, w.T).astype(x.dtype)]


define_op("linear_q", infer=_linear_q_infer, reference=_linear_q_ref,
          attrs={"bits": REQUIRED, "group_size": 0, "activations": "float"},
          inputs=(3, 4), doc="x @ dequantize(q, scale[, offset]).T: weight-only int8 (per row or group-wise) or "
                             "int4 (group-wise, symmetric or with offsets) dense layer; activations=int8 "
                             "quantizes x per block of 32 first (integer dot products)")


def _embedding_q_infer(types, attrs, module):
    ids, q, scale = types[:3]
    offset = types[3] if len(types) == 4 else None
    if ids.dtype not in ("i64", "i32"):
        raise fail("embedding_q", f"ids must be integer, found {ids.dtype}")
    _, k = check_quantized("embedding_q", q, scale, offset, attrs["bits"], attrs["group_size"])
    return [TensorType("f32", tuple(ids.shape) + (k,))]


def _embedding_q_ref(xs, attrs):
    ids, q, scale = xs[:3]
    offset = xs[3] if len(xs) == 4 else None
    rows = np.clip(ids.astype(np.int64), 0, q.shape[0] - 1).reshape(-1)
    sub = [q[rows], scale[rows]] + ([offset[rows]] if offset is not None else [None])
    w = dequantize(sub[0], sub[1], sub[2], attrs["bits"], attrs["group_size"]).astype(np.float32)
    return [w.reshape(tuple(ids.shape) + (w.shape[-1],))]


define_op("embedding_q", infer=_embedding_q_infer, reference=_embedding_q_ref,
          attrs={"bits": REQUIRED, "group_size": 0}, inputs=(3, 4),
          doc="dequantize(q, scale[, offset])[ids]: f32 rows of a quantized table (ids clipped to the table)")
