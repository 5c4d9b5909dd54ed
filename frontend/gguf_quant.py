"""GGUF Q4_0 / Q4_1 / Q8_0 blocks as kiln quantized weights, without dequantizing them.

Each block covers 32 consecutive elements of a row:

- Q8_0 (34 bytes): f16 d, 32 x int8 q;          w = q * d          -> int8, group 32, f16 scale
- Q4_0 (18 bytes): f16 d, 16 bytes of nibbles;    w = (x - 8) * d    -> int4, group 32, f16 scale
- Q4_1 (20 bytes): f16 d, f16 m, 16 bytes;        w = x * d + m      -> int4, group 32, f16 scale + offset

In a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high nibble;
kiln packs element k of a row in bits 4 * (k % 8) of word k // 8 (ir.quant_ops.pack_int4). Moving
the nibbles between the two layouts is a permutation, and the scales are the file's f16 values, so
the compiled model computes from the same integers and scales the file holds.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from kiln.ir.quant_ops import QuantizedWeight, pack_int4

from .gguf_file import GGUFFile
from .gguf_model import hf_tensor_name, unpermute_rope_rows

BLOCK = 32
# ggml type -> (bytes per block, bits, has an offset)
IMPORTABLE = {
    GGMLQuantizationType.Q8_0: (34, 8, False),
    GGMLQuantizationType.Q4_0: (18, 4, False),
    GGMLQuantizationType.Q4_1: (20, 4, True),
}


def import_blocks(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> QuantizedWeight:
    """raw uint8 [N, row_bytes] of one 2-D tensor -> the same numbers in linear_q form."""
    block_bytes, bits, has_offset = IMPORTABLE[ggml_type]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
    groups = blocks.shape[1]
    scale = blocks[:, :, 0:2].copy().view("<f2").reshape(rows, groups).astype(np.float16)
    if bits == 8:
        q = blocks[:, :, 2:].copy().view(np.int8).reshape(rows, groups * BLOCK)
        return QuantizedWeight(8, BLOCK, q, scale)
    start = 4 if has_offset else 2
    offset = blocks[:, :, 2:4].copy().view("<f2").reshape(rows, groups).astype(np.float16) if has_offset else None
    packed = blocks[:, :, start:start + BLOCK // 2]
    nibbles = np.concatenate([packed & 15, packed >> 4], axis=2)  # elements 0..15, then 16..31
    return QuantizedWeight(4, BLOCK, pack_int4(nibbles.reshape(rows, groups * BLOCK)), scale, offset)


def permute_rows(weight: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    """The same weight with its output rows reordered (rows are independent in every format)."""
    return QuantizedWeight(weight.bits, weight.group_size, weight.q[order], weight.scale[order],
                           None if weight.offset is None else weight.offset[order])


def prequantized_weights(gguf_file: GGUFFile, config) -> dict:
    """{transformers weight name: QuantizedWeight} for every 2-D Q4_0 / Q4_1 / Q8_0 tensor of the file.

    q/k projections get the same row un-permutation the fp32 path applies (``unpermute_rope_rows``).
    """
    out = {}
    for name, info in gguf_file.tensors.items():
        if info.ggml_type not in IMPORTABLE or len(info.shape) != 2 or info.shape[1] % BLOCK:
            continue
        target = hf_tensor_name(name)
        if target is None:
            continue
        weight = import_blocks(gguf_file.raw(name), info.ggml_type)
        heads = (config.num_attention_heads if ".q_proj." in target
                 else config.num_key_value_heads if ".k_proj." in target else None)
        if heads is not None:
            order = unpermute_rope_rows(np.arange(info.shape[0]), heads)
            weight = permute_rows(weight, order)
        out[target] = weight
    # No output tensor: the logits projection is the embedding table (tied); capture may name it either way.
    if "model.embed_tokens.weight" in out and "output.weight" not in gguf_file.tensors:
        out[hf_tensor_name("output.weight")] = out["model.embed_tokens.weight"]
    return out
