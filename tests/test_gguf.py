"""GGUF reading: valid files against the gguf package, damaged files refused, SmolLM2 against transformers.

Small files are written with gguf.GGUFWriter and then damaged byte by byte; the
model test compares kiln's GGUF-loaded module with transformers' own GGUF loading.
"""

import os
import struct
import time

import gguf
import numpy as np
import pytest

from kiln.frontend.gguf_file import GGUFFile
from kiln.ir.errors import ModelFormatError

Q = gguf.GGMLQuantizationType



def _weights():
    rng = np.random.default_rng(0)
    return {
        "t.a": ("f32", rng.standard_normal((4, 8)).astype(np.float32)),
        "t.b": ("f16", rng.standard_normal((2, 32)).astype(np.float32)),
        "t.c": (Q.Q8_0, rng.standard_normal((3, 64)).astype(np.float32)),
        "t.d": (Q.Q4_0, rng.standard_normal((2, 64)).astype(np.float32)),
        "t.e": (Q.Q4_1, rng.standard_normal((2, 2, 32)).astype(np.float32)),
        "t.f": ("bf16", rng.standard_normal((5, 6)).astype(np.float32)),
        "t.g": ("f32", rng.standard_normal((7,)).astype(np.float32)),
    }


def write_gguf(path, alignment=None, extra=None):
    """A small valid GGUF with every value kind and every dequantizable tensor type."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("tiny")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_string("test.key_a", "première clé ✓")
    writer.add_int64("test.key_b", -5)
    writer.add_int8("test.int8", -3)
    writer.add_uint64("test.uint64", 2**40)
    writer.add_float64("test.float64", 0.125)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.strings", ["x", "yy", "日本"])
    writer.add_array("test.nested", [[1, 2], [3]])
    for key, (value, value_type) in (extra or {}).items():
        writer.add_key_value(key, value, value_type)
    for name, (kind, values) in _weights().items():
        if kind == "f32":
            writer.add_tensor(name, values)
        elif kind == "f16":
            writer.add_tensor(name, values.astype(np.float16))
        elif kind == "bf16":
            bits = (values.view(np.uint32) >> 16).astype(np.uint16)
            writer.add_tensor(name, bits, raw_dtype=Q.BF16)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def valid(tmp_path):
    return write_gguf(tmp_path / "valid.gguf")


def _locate(data: bytes, needle: bytes) -> int:
    """Offset of the string bytes of a unique key or tensor name (its u64 length is the 8 bytes before)."""
    found = data.find(struct.pack("<Q", len(needle)) + needle)
    assert found >= 0 and data.find(needle, found + 9) < 0, needle
    return found + 8


def _damaged(path, edit) -> str:
    data = bytearray(open(path, "rb").read())
    data = edit(data) or data
    out = str(path) + ".bad.gguf"
    with open(out, "wb") as f:
        f.write(bytes(data))
    return out


def _refused(path, *fragments):
    with pytest.raises(ModelFormatError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- valid files, against gguf's own reader -------------------------------------------------

def test_metadata_matches_gguf_reader(valid):
    ours = GGUFFile(valid)
    reference = gguf.GGUFReader(valid)
    assert ours.version == 3 and ours.alignment == 32
    for key, field in reference.fields.items():
        # gguf's reader flattens nested arrays; the nested one is checked below.
        if key.startswith("GGUF.") or key == "test.nested":
            continue
        expected = field.contents()
        if isinstance(expected, float):
            assert ours.metadata[key] == pytest.approx(expected, rel=1e-7), key
        else:
            assert ours.metadata[key] == expected, key
    assert ours.metadata["test.key_a"] == "première clé ✓"
    assert ours.metadata["test.nested"] == [[1, 2], [3]]
    assert ours.metadata["test.uint64"] == 2**40
    assert ours.metadata_types["test.strings"] == (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    assert list(ours.metadata) == [k for k in reference.fields if not k.startswith("GGUF.")]


def test_tensors_match_gguf_reader(valid):
    ours = GGUFFile(valid)
    reference = gguf.GGUFReader(valid)
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    weights = _weights()
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        original = weights[tensor.name][1]
        assert info.shape == original.shape and info.ggml_type == tensor.tensor_type
        assert info.nbytes == tensor.n_bytes and ours.data_offset + info.offset == tensor.data_offset
        np.testing.assert_array_equal(ours.raw(tensor.name).reshape(-1), np.asarray(tensor.data).view(np.uint8).reshape(-1))
        got = ours.dequantize(tensor.name)
        assert got.dtype == np.float32 and got.shape == original.shape
        if tensor.tensor_type == Q.BF16:
            expected = (original.view(np.uint32) & 0xFFFF0000).view(np.float32)
        else:
            expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(original.shape)
        np.testing.assert_array_equal(got, expected)
        # and close to what was written, within the type's precision
        tolerance = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2, Q.Q4_0: 0.5, Q.Q4_1: 0.5}[tensor.tensor_type]
        np.testing.assert_allclose(got, original, atol=tolerance * np.abs(original).max())


def test_sha256_is_the_files(valid):
    import hashlib

    assert GGUFFile(valid).sha256() == hashlib.sha256(open(valid, "rb").read()).hexdigest()


def test_custom_alignment(tmp_path):
    path = write_gguf(tmp_path / "aligned.gguf", alignment=64)
    ours = GGUFFile(path)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    reference = gguf.GGUFReader(path)
    for tensor in reference.tensors:
        np.testing.assert_array_equal(ours.dequantize(tensor.name).reshape(-1),
                                      gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(-1))


def test_dequantize_refuses_other_types(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_XS]
    writer.add_tensor("t.k", np.zeros((2, type_size), np.uint8), raw_dtype=Q.IQ4_XS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(tmp_path / "k.gguf")
    assert ours.tensors["t.k"].shape == (2, block_size)
    assert ours.raw("t.k").shape == (2, type_size)
    with pytest.raises(ModelFormatError, match="IQ4_XS"):
        ours.dequantize("t.k")
    with pytest.raises(ModelFormatError, match="no tensor"):
        ours.dequantize("t.missing")


# --- damaged files: one test per rejection -------------------------------------------------

def test_bad_magic(valid):
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(0, 4), b"GGML")), "magic", "b'GGML'")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(valid, version):
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", version))), "version", str(version))


def test_not_a_file(tmp_path):
    _refused(tmp_path, "expected a GGUF file", "found a directory")
    _refused(tmp_path / "absent.gguf", "not found", "GGUF file")
    os.mkfifo(tmp_path / "fifo.gguf")
    _refused(tmp_path / "fifo.gguf", "found a FIFO")  # without blocking on the open
    os.symlink("/dev/zero", tmp_path / "zero.gguf")
    _refused(tmp_path / "zero.gguf", "found a device")


def test_empty_and_tiny_files(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    _refused(tmp_path / "empty.gguf", "header")
    (tmp_path / "short.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3))
    _refused(tmp_path / "short.gguf", "header")


@pytest.mark.parametrize("where", ["counts", "key", "value", "array", "tensor_info", "last_tensor_info", "data"])
def test_truncated(valid, where):
    data = open(valid, "rb").read()
    reference = GGUFFile(valid)
    last = reference.tensors["t.g"]
    cut = {
        "counts": 20,
        "key": _locate(data, b"test.key_a") + 3,
        "value": _locate(data, b"test.key_a") + 10 + 4 + 8 + 2,
        "array": _locate(data, b"test.strings") + 20,
        "tensor_info": _locate(data, b"t.c") + 3 + 4 + 4,
        "last_tensor_info": reference.data_offset - 1,
        "data": reference.data_offset + last.offset + last.nbytes - 1,
    }[where]
    _refused(_damaged(valid, lambda d: d[:cut]))


def test_string_length_beyond_file(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.key_a") + len(b"test.key_a") + 4  # the value's length field
    message = _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**62))),
                       "test.key_a")
    assert str(2**62) in message


def test_key_length_beyond_file(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.key_a") - 8
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 10**12))), "metadata key")


def test_array_count_beyond_file(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.ints") + len(b"test.ints") + 4 + 4  # after value type and element type
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**61))), "test.ints", "array")


def test_string_array_count_beyond_file(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.strings") + len(b"test.strings") + 4 + 4
    # Each string needs at least its 8-byte length: a count that fits the bytes but not the strings is refused.
    remaining = len(data) - at - 8
    count = remaining // 8 + 1
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", count))), "test.strings")


@pytest.mark.parametrize("field", ["kv_count", "tensor_count"])
def test_counts_beyond_file(valid, field):
    at = {"tensor_count": 8, "kv_count": 16}[field]
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**40))), field)


def test_too_many_dims(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"t.a") + 3
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 5))), "n_dims", "at most 4")


def test_dimension_beyond_file(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"t.a") + 3 + 4 + 8  # second dim
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**60))), "'t.a'", "data section")


def test_dimension_not_multiple_of_block(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"t.c") + 3 + 4  # first (innermost) dim of the Q8_0 tensor
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 48))), "'t.c'", "block size")


def _tensor_offset_at(data: bytes, name: bytes, n_dims: int) -> int:
    return _locate(data, name) + len(name) + 4 + 8 * n_dims + 4


def test_tensor_out_of_range(valid):
    data = open(valid, "rb").read()
    at = _tensor_offset_at(data, b"t.g", 1)
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**20))), "'t.g'", "out of range")


def test_tensor_offset_overflow(valid):
    data = open(valid, "rb").read()
    at = _tensor_offset_at(data, b"t.g", 1)
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 2**64 - 32))), "'t.g'")


def test_tensor_misaligned(valid):
    data = open(valid, "rb").read()
    at = _tensor_offset_at(data, b"t.b", 2)
    offset = struct.unpack_from("<Q", data, at)[0]
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", offset + 4))), "'t.b'", "alignment")


def test_tensors_overlap(valid):
    data = open(valid, "rb").read()
    at = _tensor_offset_at(data, b"t.b", 2)
    # t.b now starts where t.a starts (offset 0).
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 8), struct.pack("<Q", 0))), "overlap")


def test_duplicate_tensor_names(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"t.b")
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 3), b"t.a")), "'t.a'", "duplicate")


def test_duplicate_metadata_keys(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.key_b")
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 10), b"test.key_a")), "'test.key_a'", "duplicate")


def test_unknown_ggml_type(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"t.a") + 3 + 4 + 16  # after n_dims and two dims
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 4))), "'t.a' type", "4")
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 999))), "'t.a' type", "999")


def test_unknown_value_type(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.key_b") + len(b"test.key_b")
    _refused(_damaged(valid, lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 13))), "test.key_b", "value type")


def test_invalid_utf8(valid):
    data = open(valid, "rb").read()
    at = _locate(data, b"test.key_a")
    _refused(_damaged(valid, lambda d: d.__setitem__(at, 0xFF)), "UTF-8")


def test_array_nested_too_deep(tmp_path):
    path = write_gguf(tmp_path / "deep.gguf", extra={"test.deep": ([[[[[1]]]]], gguf.GGUFValueType.ARRAY)})
    _refused(path, "test.deep", "nested")


V = gguf.GGUFValueType


@pytest.mark.parametrize("key, value, value_type, expected", [
    ("general.architecture", 7, V.UINT32, "a string"),
    ("llama.block_count", "two", V.STRING, "an integer"),
    ("llama.block_count", 2.0, V.FLOAT32, "an integer"),
    ("llama.rope.freq_base", 10000, V.UINT32, "a float"),
    ("tokenizer.ggml.add_bos_token", 1, V.UINT8, "a bool"),
    ("tokenizer.ggml.tokens", ["a", 1], V.ARRAY, "an array of string"),
    ("tokenizer.ggml.tokens", "a", V.STRING, "an array of string"),
    ("general.alignment", 32, V.UINT64, "a UINT32"),
    ("general.alignment", 48, V.UINT32, "power of two"),
    ("general.alignment", 0, V.UINT32, "power of two"),
])
def test_well_known_key_with_wrong_type(tmp_path, key, value, value_type, expected):
    if key == "tokenizer.ggml.tokens" and value_type == V.ARRAY:
        # The writer infers an array's element type from its first item: write ints instead.
        value = [1, 2]
    path = write_gguf(tmp_path / "typed.gguf", extra={key: (value, value_type)})
    _refused(path, repr(key), expected)


# --- whole models -----------------------------------------------------------------------------

def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_transformers_llama(tie: bool):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def write_llama_gguf(path, model, ggml_type=Q.F32, arch="llama", extra_tensors=(), skip=()):
    """A llama.cpp-style GGUF of a transformers Llama: names, q/k permutation, metadata, byte vocab."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    byte_map = {b: c for b, c in zip(*_gpt2_bytes())}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<s>", "</s>"] + [byte_map[b] for b in range(256)] + ["ab"])
    writer.add_token_types([3, 3] + [1] * 257)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for hf_name, values in state.items():
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{_GGUF_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                values = llama_cpp_permute(values, config.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                values = llama_cpp_permute(values, config.num_key_value_heads)
        if name in skip:
            continue
        if ggml_type == Q.F32 or values.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, ggml_type), raw_dtype=ggml_type)
    for name, values in extra_tensors:
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gpt2_bytes():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return printable + others, [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_gguf_logits_match_transformers(tmp_path, tie):
    import torch

    from kiln.frontend.gguf_model import load_gguf

    reference = tiny_transformers_llama(tie)
    path = write_llama_gguf(tmp_path / "tiny.gguf", reference)
    model, config, bundle = load_gguf(path)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.tie_word_embeddings is tie and bundle.bos_token_id == 0 and bundle.eos_token_ids == [1]
    ids = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("ggml_type", [Q.F32, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_tiny_llama_tensors_match_transformers_gguf_loader(tmp_path, ggml_type):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from kiln.frontend.gguf_model import load_gguf

    original = tiny_transformers_llama(False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", original, ggml_type=ggml_type)
    model, _, _ = load_gguf(path)
    expected = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=original)["tensors"]
    ours = model.state_dict()
    assert set(expected) == set(ours)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(ours[name].numpy(), tensor.numpy(), err_msg=name)


def test_gguf_model_refusals(tmp_path):
    from kiln.frontend.gguf_model import load_gguf

    reference = tiny_transformers_llama(True)
    path = write_llama_gguf(tmp_path / "mamba.gguf", reference, arch="mamba")
    with pytest.raises(ModelFormatError, match="general.architecture is 'mamba'; kiln loads only llama, qwen2"):
        load_gguf(path)
    path = write_llama_gguf(tmp_path / "extra.gguf", reference, extra_tensors=[("blk.0.mystery.weight", np.zeros(4, np.float32))])
    with pytest.raises(ModelFormatError, match="mystery"):
        load_gguf(path)
    path = write_llama_gguf(tmp_path / "rope.gguf", reference, extra_tensors=[("rope_freqs.weight", np.ones(5, np.float32))])
    with pytest.raises(ModelFormatError, match="rope_freqs"):
        load_gguf(path)
    path = write_llama_gguf(tmp_path / "missing.gguf", reference, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelFormatError, match="up_proj"):
        load_gguf(path)


def test_smollm2_loads_quickly(smollm2_path):
    from kiln.frontend.gguf_model import load_gguf

    start = time.perf_counter()
    model, config, bundle = load_gguf(smollm2_path)
    elapsed = time.perf_counter() - start
    print(f"\nSmolLM2-135M Q4_1 load_gguf: {elapsed:.2f} s")
    # SmolLM2-135M's published shape.
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert bundle.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_path):
    import torch
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

    from kiln.frontend.gguf_model import load_gguf

    model, _, bundle = load_gguf(smollm2_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path), dtype=torch.float32).eval()
    ids = torch.tensor([bundle.tokenizer().encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
