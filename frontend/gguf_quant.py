"""GGUF quantized blocks as kiln quantized weights (linear_q / embedding_q form), without dequantizing them.

A type is imported when its blocks are exactly one of kiln's formats (ir.quant_ops): the same integers
and the same scales, so the compiled model computes from the numbers the file holds.

- Q8_0 (34 bytes per 32): f16 d, 32 x int8 q;       w = q * d                   -> int8, group 32, f16 scale
- Q4_0 (18 bytes per 32): f16 d, 16 bytes nibbles;  w = (x - 8) * d             -> int4, group 32, f16 scale
- Q4_1 (20 bytes per 32): f16 d, f16 m, nibbles;    w = x * d + m               -> int4, group 32, f16 + offset
- Q5_0 (22 bytes per 32): f16 d, u32 high bits, nibbles; w = (x - 16) * d       -> int8, group 32, f16 scale
- Q4_K (144 bytes per 256): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
  sub-block j of 32: w = d * sc_j * x - dmin * m_j                              -> int4, group 32, f32 + offset
- Q6_K (210 bytes per 256): 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 x int8 sc, f16 d;
  sub-block j of 16: w = d * sc_j * (x - 32)                                    -> int8, group 16, f32 scale

The K-quant scales are f32: d * sc_j is an f16 times a 6- or 8-bit integer (at most 19 significant bits),
exact in f32 but not in f16. Q5_1, Q5_K, Q2_K and Q3_K are not imported (see NOT_IMPORTED): they load on
the fp32 path (gguf_file.dequantize) and stay fp32 under quantize="gguf".

Expert stacks (ffn_gate_exps / ffn_up_exps / ffn_down_exps, [E, N, K]) import the same way, row by row, with a
leading experts axis (moe_experts_q's form); gate and up become one [E, 2I, K] stack when their blocks land in
the same kiln format, and stay on the fp32 path otherwise (llama.cpp's mixes give them one type).

In the 4-bit blocks, byte j of a 32-element group holds element j in its low nibble and element j + 16
in its high nibble (a Q4_K sub-block pair shares 32 bytes: the low nibbles are sub-block 2c, the high
ones 2c + 1); kiln packs element k of a row in bits 4 * (k % 8) of word k // 8 (ir.quant_ops.pack_int4).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType

from kiln.ir.quant_ops import QuantizedWeight, pack_int4

from .gguf_file import GGUFFile
from .gguf_model import unpermute_rope_rows

Q = GGMLQuantizationType


class BlockFormat(NamedTuple):
    """How one ggml type's blocks land in kiln: bytes per block, kiln bits, offset or not, kiln group size."""

    block_bytes: int
    bits: int
    has_offset: bool
    group_size: int


IMPORTABLE = {
    Q.Q8_0: BlockFormat(34, 8, False, 32),
    Q.Q4_0: BlockFormat(18, 4, False, 32),
    Q.Q4_1: BlockFormat(20, 4, True, 32),
    Q.Q5_0: BlockFormat(22, 8, False, 32),
    Q.Q4_K: BlockFormat(144, 4, True, 32),
    Q.Q6_K: BlockFormat(210, 8, False, 16),
}
# Why these load on the fp32 path instead. Q5_1 (x * d + m) and Q5_K (d * sc * x - dmin * m) hold 5-bit
# integers under an offset: kiln's int8 format has no offset and int4 cannot hold 5 bits, so importing them
# would mean requantizing, a second rounding on top of the file's, and "gguf" promises the file's numbers
# (quantize="int8" / "int4" requantize the whole model when a smaller artifact matters more). Q2_K and
# Q3_K would fit int4 groups of 16 exactly (2- and 3-bit integers, 4- and 6-bit scales), a layout no
# backend test covers yet.
NOT_IMPORTED = (Q.Q5_1, Q.Q5_K, Q.Q2_K, Q.Q3_K)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at bytes [start, start + 2) of every block, as f16 [rows, blocks]."""
    return blocks[:, :, start:start + 2].copy().view("<f2")[:, :, 0].astype(np.float16)


def _low_then_high_nibbles(packed: np.ndarray) -> np.ndarray:
    """u8[..., 16] -> u8[..., 32]: element j from the low nibble of byte j, element j + 16 from its high one."""
    return np.concatenate([packed & 15, packed >> 4], axis=-1)


def _legacy_blocks(blocks: np.ndarray, ggml_type: GGMLQuantizationType) -> QuantizedWeight:
    """Q8_0 / Q4_0 / Q4_1 / Q5_0: one f16 scale (and Q4_1's f16 offset) per block of 32."""
    rows, groups = blocks.shape[:2]
    scale = _f16(blocks, 0)
    if ggml_type == Q.Q8_0:
        return QuantizedWeight(8, 32, blocks[:, :, 2:].copy().view(np.int8).reshape(rows, groups * 32), scale)
    if ggml_type == Q.Q5_0:
        high_bits = blocks[:, :, 2:6].copy().view("<u4")  # bit j is bit 4 of element j
        fifth = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        values = (_low_then_high_nibbles(blocks[:, :, 6:22]) | fifth).astype(np.int16) - 16
        return QuantizedWeight(8, 32, values.astype(np.int8).reshape(rows, groups * 32), scale)
    has_offset = ggml_type == Q.Q4_1
    start = 4 if has_offset else 2
    nibbles = _low_then_high_nibbles(blocks[:, :, start:start + 16])
    return QuantizedWeight(4, 32, pack_int4(nibbles.reshape(rows, groups * 32)), scale,
                           _f16(blocks, 2) if has_offset else None)


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple:
    """12 bytes per super-block -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4):
    sub-blocks 0-3 take the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take a nibble
    of bytes 8-11 (low: scale, high: min) under the top 2 bits of bytes 0-3 (scale) and 4-7 (min)."""
    first, second, third = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([first & 63, (third & 15) | ((first >> 6) << 4)], axis=-1)
    mins = np.concatenate([second & 63, (third >> 4) | ((second >> 6) << 4)], axis=-1)
    return scales, mins


def _q4_k(blocks: np.ndarray) -> QuantizedWeight:
    rows, supers = blocks.shape[:2]
    d = _f16(blocks, 0).astype(np.float32)[..., None]
    dmin = _f16(blocks, 2).astype(np.float32)[..., None]
    scales, mins = _q4_k_scales_and_mins(blocks[:, :, 4:16])
    # 4 chunks of 32 bytes: the low nibbles are sub-block 2c, the high nibbles sub-block 2c + 1.
    packed = blocks[:, :, 16:144].reshape(rows, supers, 4, 1, 32)
    nibbles = np.concatenate([packed & 15, packed >> 4], axis=3).reshape(rows, supers * 256)
    scale = (d * scales.astype(np.float32)).reshape(rows, supers * 8)
    offset = -(dmin * mins.astype(np.float32)).reshape(rows, supers * 8)
    return QuantizedWeight(4, 32, pack_int4(nibbles), scale, offset)


def _q6_k(blocks: np.ndarray) -> QuantizedWeight:
    rows, supers = blocks.shape[:2]
    # Each half of 128 elements reads 64 bytes of low nibbles and 32 of 2-bit highs: its 32-element
    # quarter i takes the low (i < 2) or high (i >= 2) nibbles of low-byte run i % 2, and bits 2i, 2i + 1.
    low_bytes = blocks[:, :, 0:128].reshape(rows, supers, 2, 1, 2, 32)
    low = np.concatenate([low_bytes & 15, low_bytes >> 4], axis=3).reshape(rows, supers, 2, 4, 32)
    high_bytes = blocks[:, :, 128:192].reshape(rows, supers, 2, 1, 32)
    high = (high_bytes >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    values = (low | (high << 4)).astype(np.int16) - 32
    sub_scales = blocks[:, :, 192:208].copy().view(np.int8).astype(np.float32)
    scale = (_f16(blocks, 208).astype(np.float32)[..., None] * sub_scales).reshape(rows, supers * 16)
    return QuantizedWeight(8, 16, values.astype(np.int8).reshape(rows, supers * 256), scale)


def import_blocks(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> QuantizedWeight:
    """raw uint8 [N, row_bytes] of one 2-D tensor -> the same numbers in linear_q form."""
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, IMPORTABLE[ggml_type].block_bytes)
    if ggml_type == Q.Q4_K:
        return _q4_k(blocks)
    if ggml_type == Q.Q6_K:
        return _q6_k(blocks)
    return _legacy_blocks(blocks, ggml_type)


def permute_rows(weight: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    """The same weight with its output rows reordered (rows are independent in every format)."""
    return QuantizedWeight(weight.bits, weight.group_size, weight.q[order], weight.scale[order],
                           None if weight.offset is None else weight.offset[order])


def import_expert_stack(gguf_file: GGUFFile, sources: tuple) -> QuantizedWeight | None:
    """The experts stack made of GGUF tensors ``sources`` ([E, N, K] each; several are stacked along N, gate then
    up) as a QuantizedWeight with a leading E axis, or None when one is not IMPORTABLE or their formats differ."""
    stacks = []
    for name in sources:
        info = gguf_file.tensors[name]
        if info.ggml_type not in IMPORTABLE or len(info.shape) != 3:
            return None
        experts, rows = info.shape[:2]
        flat = import_blocks(gguf_file.raw(name).reshape(experts * rows, -1), info.ggml_type)
        stacks.append(QuantizedWeight(flat.bits, flat.group_size, *(
            None if a is None else a.reshape((experts, rows) + a.shape[1:]) for a in (flat.q, flat.scale, flat.offset))))
    formats = {(w.bits, w.group_size, w.scale.dtype, w.offset is not None) for w in stacks}
    if len(formats) != 1:
        return None

    def along_rows(arrays):
        return None if arrays[0] is None else np.concatenate(arrays, axis=1)

    return QuantizedWeight(stacks[0].bits, stacks[0].group_size, along_rows([w.q for w in stacks]),
                           along_rows([w.scale for w in stacks]), along_rows([w.offset for w in stacks]))


def prequantized_weights(gguf_file: GGUFFile, targets: dict) -> dict:
    """{module weight name: QuantizedWeight} for every 2-D tensor of an IMPORTABLE type named in ``targets``:
    GGUF name -> (the module names it becomes (tied aliases too), and its head count when llama.cpp's converter
    interleaved its rows for rope, else None). Such rows get the fp32 path's un-permutation (``unpermute_rope_rows``).
    """
    out = {}
    for name, (module_names, rope_heads) in targets.items():
        info = gguf_file.tensors[name]
        if info.ggml_type not in IMPORTABLE or len(info.shape) != 2:
            continue
        weight = import_blocks(gguf_file.raw(name), info.ggml_type)
        if rope_heads is not None:
            weight = permute_rows(weight, unpermute_rope_rows(np.arange(info.shape[0]), rope_heads))
        for module_name in module_names:
            out[module_name] = weight
    return out
