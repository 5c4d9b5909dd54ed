"""GGUF Q4_0 / Q4_1 / Q8_0 blocks imported as kiln quantized weights, without a dequantize-requantize.

The independent reference is the gguf package's own quantizer and dequantizer: blocks it makes,
imported by kiln, must dequantize (through kiln's documented formats) to exactly what gguf's
dequantize gives, and keep the file's f16 scales bit for bit.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from kiln.frontend.gguf_quant import IMPORTABLE, import_blocks, permute_rows
from kiln.ir.quant_ops import unpack_int4

from smollm2 import smollm2_source

TYPES = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_imported_blocks_dequantize_exactly_like_gguf(ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    w = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 2, (6, 1))).astype(np.float32)
    w[2, :32] = 0.0  # an all-zero block
    raw = quants.quantize(w, ggml_type)
    weight = import_blocks(raw, ggml_type)
    expected = quants.dequantize(raw, ggml_type)
    bits = IMPORTABLE[ggml_type][1]
    assert (weight.bits, weight.group_size) == (bits, 32)
    assert weight.scale.dtype == np.float16 and weight.scale.shape == (6, 4)
    # the file's f16 scale of each block, bit for bit (the first two bytes of a block)
    block_bytes = IMPORTABLE[ggml_type][0]
    file_scales = raw.reshape(6, 4, block_bytes)[:, :, :2].copy().view(np.float16).reshape(6, 4)
    np.testing.assert_array_equal(weight.scale.view(np.uint16), file_scales.view(np.uint16))
    np.testing.assert_array_equal(weight.dequantize().astype(np.float32), expected)
    if ggml_type == GGMLQuantizationType.Q4_1:
        assert weight.offset is not None and weight.offset.dtype == np.float16
    else:
        assert weight.offset is None


def test_nibble_order_moves_from_gguf_halves_to_kiln_words():
    """Q4_0 block: byte j holds element j (low nibble) and j + 16 (high nibble); kiln's word c // 8 holds
    element c in bits 4 * (c % 8). Elements 0..31 set to their own index mod 16 must come back in order."""
    block = np.zeros(18, dtype=np.uint8)
    block[0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    values = np.arange(32) % 16
    block[2:] = (values[:16] | (values[16:] << 4)).astype(np.uint8)
    weight = import_blocks(block[None], GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(unpack_int4(weight.q)[0], values)


def test_row_permutation_keeps_blocks_whole():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q4_1)
    order = rng.permutation(8)
    permuted = permute_rows(import_blocks(raw, GGMLQuantizationType.Q4_1), order)
    np.testing.assert_array_equal(permuted.dequantize().astype(np.float32),
                                  quants.dequantize(raw, GGMLQuantizationType.Q4_1)[order])


def test_smollm2_blocks_equal_the_fp32_weights_the_model_is_built_from():
    """Every imported SmolLM2 weight (q/k rows un-permuted, the tied table under both names) dequantizes
    exactly to the fp32 tensor kiln's GGUF loader gives transformers."""
    source = smollm2_source()
    blocks = source.prequantized()
    state = {k: v.numpy() for k, v in source.model.state_dict().items()}
    assert len(blocks) == 30 * 7 + 2  # seven linears per layer, the table and its tied logits alias
    assert blocks["lm_head.weight"] is blocks["model.embed_tokens.weight"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(blocks[name].dequantize().astype(np.float32), state[name], err_msg=name)
