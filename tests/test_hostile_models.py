"""Hostile model files, one planted defect per case, in the manner of llama.cpp's test-gguf.

A tiny valid model of each kind is built here (a GGUF written byte by byte by this file's own
writer, a llama checkpoint directory, a GPT-2 checkpoint saved by transformers); each case
changes one thing and asserts that ``kiln.compile`` refuses it with kiln's typed error, in one
line naming the problem, within a few seconds and without a large allocation (the process's peak
RSS may not grow by more than ALLOCATION_LIMIT). The valid models themselves load, so each refusal
is the planted defect's. A few cases also run the CLI in a process under a hard memory limit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

import kiln
from kiln.frontend.safetensors_file import write_safetensors
from kiln.ir.errors import ConfigError, KilnError, ModelFormatError

ALLOCATION_LIMIT = 256 * 2**20
TIME_LIMIT_S = 10
V, Q = GGUFValueType, GGMLQuantizationType


# --- a tiny GGUF, written with struct -------------------------------------------------------------

_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value_type: GGUFValueType, value) -> bytes:
    if value_type == V.STRING:
        return _string(value)
    if value_type == V.ARRAY:
        element_type, items = value
        return struct.pack("<IQ", element_type, len(items)) + b"".join(_value(element_type, item) for item in items)
    return struct.pack(_SCALARS[value_type], value)


def gguf_bytes(metadata: dict, tensors: dict, *, tensor_count: int | None = None, kv_count: int | None = None) -> bytes:
    """A GGUF v3 file: metadata {key: (type, value)}; tensors {name: (numpy shape, ggml type, data bytes)}."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors) if tensor_count is None else tensor_count,
                                len(metadata) if kv_count is None else kv_count)]
    for key, (value_type, value) in metadata.items():
        out += [_string(key), struct.pack("<I", value_type), _value(value_type, value)]
    offset, blobs = 0, []
    for name, (shape, ggml_type, data) in tensors.items():
        dims = list(reversed(shape))  # GGUF stores the innermost dim first
        out += [_string(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", ggml_type, offset)]
        padded = data + b"\0" * (-len(data) % 32)
        blobs.append(padded)
        offset += len(padded)
    header = b"".join(out)
    return header + b"\0" * (-len(header) % 32) + b"".join(blobs)


TOKENS = ["<s>", "</s>", "a", "b", "ab", "c", "d", "e"]
VOCAB, WIDTH, HEADS, KV_HEADS, FFN = len(TOKENS), 8, 2, 1, 16
HEAD_DIM = WIDTH // HEADS


def llama_gguf_parts():
    """Metadata and tensors of a valid one-layer llama GGUF (tied embeddings, f32)."""
    metadata = {
        "general.architecture": (V.STRING, "llama"),
        "llama.block_count": (V.UINT32, 1),
        "llama.context_length": (V.UINT32, 64),
        "llama.embedding_length": (V.UINT32, WIDTH),
        "llama.feed_forward_length": (V.UINT32, FFN),
        "llama.attention.head_count": (V.UINT32, HEADS),
        "llama.attention.head_count_kv": (V.UINT32, KV_HEADS),
        "llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, 1e-5),
        "llama.rope.freq_base": (V.FLOAT32, 10000.0),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "smollm"),
        "tokenizer.ggml.tokens": (V.ARRAY, (V.STRING, TOKENS)),
        "tokenizer.ggml.token_type": (V.ARRAY, (V.INT32, [3, 3] + [1] * (VOCAB - 2))),
        "tokenizer.ggml.merges": (V.ARRAY, (V.STRING, ["a b"])),
        "tokenizer.ggml.bos_token_id": (V.UINT32, 0),
        "tokenizer.ggml.eos_token_id": (V.UINT32, 1),
    }
    shapes = {"token_embd.weight": (VOCAB, WIDTH), "output_norm.weight": (WIDTH,),
              "blk.0.attn_norm.weight": (WIDTH,), "blk.0.ffn_norm.weight": (WIDTH,),
              "blk.0.attn_q.weight": (HEADS * HEAD_DIM, WIDTH), "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, WIDTH),
              "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, WIDTH), "blk.0.attn_output.weight": (WIDTH, HEADS * HEAD_DIM),
              "blk.0.ffn_gate.weight": (FFN, WIDTH), "blk.0.ffn_up.weight": (FFN, WIDTH),
              "blk.0.ffn_down.weight": (WIDTH, FFN)}
    return metadata, {name: f32(shape) for name, shape in shapes.items()}


def f32(shape, seed: int = 0):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return shape, Q.F32, values.tobytes()


def write_gguf(tmp_path, meta=None, drop=(), tensors=None, name="model.gguf", **counts) -> str:
    """The valid GGUF with metadata keys replaced (None removes one) and tensors replaced or dropped."""
    metadata, base = llama_gguf_parts()
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    base.update(tensors or {})
    for key in drop:
        del base[key]
    path = tmp_path / name
    path.write_bytes(gguf_bytes(metadata, base, **counts))
    return str(path)


# --- a tiny llama checkpoint directory and a GPT-2 one --------------------------------------------

LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2}


def llama_tensors(config=LLAMA_CONFIG) -> dict:
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
                       prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
                       prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
                       prefix + "mlp.gate_proj.weight": (ffn, hidden), prefix + "mlp.up_proj.weight": (ffn, hidden),
                       prefix + "mlp.down_proj.weight": (hidden, ffn)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def tokenizer_json(vocab_size: int = 24, added=()) -> str:
    """A word-level tokenizer.json: ids 0..vocab_size-1, plus added tokens [(content, id)]."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    added_tokens = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for c, i in [("<s>", 1), ("</s>", 2), *added]]
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
                       "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                       "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}})


def write_checkpoint(tmp_path, config=None, tensors=None, tokenizer=True, name="ckpt") -> str:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG if config is None else config))
    write_safetensors(directory / "model.safetensors", llama_tensors() if tensors is None else tensors)
    if tokenizer:
        (directory / "tokenizer.json").write_text(tokenizer_json())
        (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(directory)


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def gpt2_with(tmp_path, gpt2_checkpoint, **changes) -> str:
    directory = tmp_path / "gpt2"
    shutil.copytree(gpt2_checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


# --- running one case ----------------------------------------------------------------------------

def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def refused(source, error: type[KilnError], *fragments: str) -> str:
    """kiln.compile(source) must raise ``error`` in one line holding every fragment, quickly and small."""
    before, start = _max_rss(), time.perf_counter()
    with pytest.raises(KilnError) as info:
        kiln.compile(source, backend="reference")
    elapsed, grown = time.perf_counter() - start, _max_rss() - before
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    assert "\n" not in message and message.strip(), message
    for fragment in fragments:
        assert fragment in message, message
    assert elapsed < TIME_LIMIT_S, f"refused after {elapsed:.1f} s"
    assert grown < ALLOCATION_LIMIT, f"peak RSS grew by {grown:,} bytes before refusing"
    return message


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory, gpt2_checkpoint):
    """Load each valid model once, so imports do not count against the first case's allocation."""
    from kiln.frontend.sources import load_source

    directory = tmp_path_factory.mktemp("warm")
    load_source(write_gguf(directory))
    load_source(write_checkpoint(directory))
    load_source(str(gpt2_checkpoint))


def test_the_valid_models_load(tmp_path, gpt2_checkpoint):
    import torch
    import transformers

    from kiln.frontend.sources import load_source

    gguf_source = load_source(write_gguf(tmp_path))
    assert gguf_source.config["num_hidden_layers"] == 1 and gguf_source.tokenizer.eos_token_ids == [1]
    llama = load_source(write_checkpoint(tmp_path))
    assert llama.config["vocab_size"] == 32 and llama.tokenizer.bos_token_id == 1
    gpt2 = load_source(str(gpt2_checkpoint))
    reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2_checkpoint).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(gpt2.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)


# --- GGUF ------------------------------------------------------------------------------------------

GGUF_METADATA_CASES = {
    # key: (value, error fragments)
    "huge-block-count": ({"llama.block_count": (V.UINT32, 2**32 - 1)}, ["num_hidden_layers", "4,096"]),
    "block-count-beyond-tensors": ({"llama.block_count": (V.UINT32, 4000)}, ["4000 layers", "tensors for 1 layers"]),
    "zero-block-count": ({"llama.block_count": (V.UINT32, 0)}, ["num_hidden_layers", "positive"]),
    "huge-embedding-length": ({"llama.embedding_length": (V.UINT64, 2**40)}, ["hidden_size", "at most"]),
    "embedding-length-vs-tensors": ({"llama.embedding_length": (V.UINT32, 16), "llama.attention.head_count": (V.UINT32, 4)},
                                    ["model.embed_tokens.weight", "[8, 16]", "[8, 8]"]),
    "negative-feed-forward": ({"llama.feed_forward_length": (V.INT32, -16)}, ["intermediate_size", "-16"]),
    "feed-forward-vs-tensors": ({"llama.feed_forward_length": (V.UINT32, 1 << 19)}, ["mlp.gate_proj.weight", "524288"]),
    "zero-heads": ({"llama.attention.head_count": (V.UINT32, 0)}, ["num_attention_heads", "positive"]),
    "heads-do-not-divide-width": ({"llama.attention.head_count": (V.UINT32, 3), "llama.attention.head_count_kv": (V.UINT32, 1)},
                                  ["hidden_size 8 is not divisible by num_attention_heads 3"]),
    "kv-heads-do-not-divide-heads": ({"llama.attention.head_count_kv": (V.UINT32, 3)}, ["not a multiple of num_key_value_heads 3"]),
    "odd-head-size": ({"llama.attention.key_length": (V.UINT32, 3)}, ["head_dim", "even", "found 3"]),
    "huge-head-size": ({"llama.attention.key_length": (V.UINT32, 2**20)}, ["head_dim", "4096"]),
    "rope-dims-not-head-size": ({"llama.rope.dimension_count": (V.UINT32, 2)}, ["rope.dimension_count", "found 2"]),
    "huge-vocab-size": ({"llama.vocab_size": (V.UINT64, 2**40)}, ["vocab_size", "at most"]),
    "vocab-size-vs-tensors": ({"llama.vocab_size": (V.UINT32, 10**6)}, ["model.embed_tokens.weight", "1000000"]),
    "zero-context": ({"llama.context_length": (V.UINT32, 0)}, ["max_position_embeddings", "positive"]),
    "huge-context": ({"llama.context_length": (V.UINT64, 2**62)}, ["max_position_embeddings", "at most"]),
    "nan-rms-eps": ({"llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, float("nan"))}, ["rms_norm_eps"]),
    "infinite-rope-base": ({"llama.rope.freq_base": (V.FLOAT32, float("inf"))}, ["rope_theta", "inf"]),
    "block-count-a-string": ({"llama.block_count": (V.STRING, "30")}, ["'llama.block_count'", "an integer", "STRING"]),
    "width-a-float": ({"llama.embedding_length": (V.FLOAT32, 8.0)}, ["'llama.embedding_length'", "an integer", "FLOAT32"]),
    "kv-heads-a-string": ({"llama.attention.head_count_kv": (V.STRING, "1")}, ["head_count_kv", "one integer"]),
    "architecture-an-integer": ({"general.architecture": (V.UINT32, 7)}, ["general.architecture", "a string"]),
    "missing-width": ({"llama.embedding_length": None}, ["'llama.embedding_length' is missing"]),
    "eot-id-a-string": ({"tokenizer.ggml.eot_token_id": (V.STRING, "2")}, ["'tokenizer.ggml.eot_token_id'", "an integer"]),
    "eos-beyond-tokens": ({"tokenizer.ggml.eos_token_id": (V.UINT32, 4000)}, ["eos_token_id", "4000"]),
    "tokens-beyond-vocab": ({"tokenizer.ggml.tokens": (V.ARRAY, (V.STRING, TOKENS + ["f", "g"])),
                             "tokenizer.ggml.token_type": (V.ARRAY, (V.INT32, [3, 3] + [1] * VOCAB)),
                             "llama.vocab_size": (V.UINT32, VOCAB)},
                            ["token 'g' with id 9", "beyond the model's 8 embedding rows"]),
}


@pytest.mark.parametrize("case", GGUF_METADATA_CASES)
def test_gguf_metadata(tmp_path, case):
    meta, fragments = GGUF_METADATA_CASES[case]
    path = write_gguf(tmp_path, meta=meta)
    refused(path, ModelFormatError, path, *fragments)


GGUF_TENSOR_CASES = {
    "zero-dim": ({"token_embd.weight": ((0, WIDTH), Q.F32, b"")}, [], ["'token_embd.weight'", "no elements"]),
    "zero-dim-beside-huge-dim": ({"blk.0.ffn_up.weight": ((2**62, 0), Q.F32, b"")}, [], ["no elements"]),
    "huge-dim": ({"blk.0.ffn_up.weight": ((2**40, WIDTH), Q.F32, b"\0" * 64)}, [], ["'blk.0.ffn_up.weight' extent"]),
    "missing-tensor": ({}, ["blk.0.ffn_up.weight"], ["missing", "model.layers.0.mlp.up_proj.weight"]),
    "unknown-tensor": ({"blk.0.mystery.weight": f32((4,))}, [], ["'blk.0.mystery.weight'", "unknown name"]),
    "same-weight-twice": ({"blk.00.ffn_up.weight": f32((FFN, WIDTH))}, [], ["'blk.0.ffn_up.weight' and 'blk.00.ffn_up.weight'"]),
    "extra-layer": ({"blk.1.ffn_up.weight": f32((FFN, WIDTH))}, [], ["unexpected", "model.layers.1.mlp.up_proj.weight"]),
    # int() refuses more than 4300 digits with a ValueError; no real layer index has more than a few.
    "layer-index-of-5000-digits": ({f"blk.{'9' * 5000}.ffn_up.weight": f32((FFN, WIDTH))}, [], ["unknown name"]),
    "shape-vs-heads": ({"blk.0.attn_k.weight": f32((2 * HEAD_DIM, WIDTH))}, [], ["k_proj", "[4, 8]", "[8, 8]"]),
    "type-kiln-cannot-read": ({"blk.0.ffn_up.weight": ((FFN, 256), Q.IQ4_XS, b"\0" * (FFN * 136))}, [], ["IQ4_XS"]),
}


@pytest.mark.parametrize("case", GGUF_TENSOR_CASES)
def test_gguf_tensors(tmp_path, case):
    tensors, drop, fragments = GGUF_TENSOR_CASES[case]
    path = write_gguf(tmp_path, tensors=tensors, drop=drop)
    refused(path, ModelFormatError, path, *fragments)


def test_gguf_truncated_data(tmp_path):
    path = write_gguf(tmp_path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])
    refused(path, ModelFormatError, "extent", "truncated")


@pytest.mark.parametrize("field", ["kv_count", "tensor_count"])
def test_gguf_counts_beyond_file(tmp_path, field):
    path = write_gguf(tmp_path, **{field: 2**40})
    refused(path, ModelFormatError, field, str(2**40))


# --- safetensors -----------------------------------------------------------------------------------

def _raw_safetensors(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def _entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


SAFETENSORS_CASES = {
    "huge-header-length": (lambda p: _raw_safetensors(p, {}, header_len=2**63), ["header length"]),
    "header-not-json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), ["JSON header"]),
    "offsets-beyond-file": (lambda p: _raw_safetensors(p, {"w": _entry((4,), (0, 16))}, b"\0" * 8), ["data_offsets", "[0, 16]"]),
    "overlapping": (lambda p: _raw_safetensors(p, {"a": _entry((2,), (0, 8)), "b": _entry((2,), (4, 12))}, b"\0" * 12),
                    ["overlap"]),
    "absurd-dims": (lambda p: _raw_safetensors(p, {"w": _entry((0, 2**62), (0, 0))}), ["fits in 64 bits"]),
    "size-vs-shape": (lambda p: _raw_safetensors(p, {"w": _entry((3,), (0, 8))}, b"\0" * 8), ["expected 12 bytes"]),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_file(tmp_path, case):
    plant, fragments = SAFETENSORS_CASES[case]
    directory = write_checkpoint(tmp_path)
    plant(tmp_path / "ckpt" / "model.safetensors")
    refused(directory, ModelFormatError, "model.safetensors", *fragments)


def test_safetensors_truncated(tmp_path):
    directory = write_checkpoint(tmp_path)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    refused(directory, ModelFormatError, "model.safetensors", "truncated")


def test_safetensors_tensor_with_no_elements(tmp_path):
    tensors = llama_tensors()
    tensors["model.norm.weight"] = np.zeros((0,), np.float32)
    refused(write_checkpoint(tmp_path, tensors=tensors), ModelFormatError, "'model.norm.weight'", "(16,)", "(0,)")


def test_safetensors_layer_index_of_5000_digits(tmp_path):
    tensors = llama_tensors()
    tensors[f"model.layers.{'9' * 5000}.mlp.up_proj.weight"] = np.zeros(2, np.float32)
    refused(write_checkpoint(tmp_path, tensors=tensors), ModelFormatError, "99999", "no such weight")


def test_safetensors_missing_tensor(tmp_path):
    tensors = llama_tensors()
    del tensors["model.layers.1.mlp.down_proj.weight"]
    refused(write_checkpoint(tmp_path, tensors=tensors), ModelFormatError, "'model.layers.1.mlp.down_proj.weight'",
            "found in no weight file")


# --- config.json -----------------------------------------------------------------------------------

CONFIG_CASES = {
    "huge-hidden-size": ({"hidden_size": 2**40}, ConfigError, ["hidden_size", "at most"]),
    "hidden-size-vs-tensors": ({"hidden_size": 2**16, "num_attention_heads": 512}, ModelFormatError,
                               ["'model.embed_tokens.weight'", "(32, 65536)", "(32, 16)"]),
    "huge-vocab": ({"vocab_size": 2**40}, ConfigError, ["vocab_size", "at most"]),
    "vocab-vs-tensors": ({"vocab_size": 10**6}, ModelFormatError, ["'model.embed_tokens.weight'", "1000000"]),
    "huge-layer-count": ({"num_hidden_layers": 2**31}, ConfigError, ["num_hidden_layers", "at most"]),
    "layers-beyond-tensors": ({"num_hidden_layers": 4000}, ModelFormatError, ["4000 layers", "tensors for 2 layers"]),
    "heads-do-not-divide-width": ({"num_attention_heads": 3, "num_key_value_heads": 1}, ConfigError,
                                  ["hidden_size 16 is not divisible by num_attention_heads 3"]),
    "kv-heads-do-not-divide-heads": ({"num_key_value_heads": 3}, ConfigError, ["not a multiple of num_key_value_heads 3"]),
    "zero-kv-heads": ({"num_key_value_heads": 0}, ConfigError, ["num_key_value_heads", "found 0"]),
    "negative-ffn": ({"intermediate_size": -1}, ConfigError, ["intermediate_size", "found -1"]),
    "width-a-string": ({"hidden_size": "16"}, ConfigError, ["hidden_size", "'16'"]),
    "layers-a-bool": ({"num_hidden_layers": True}, ConfigError, ["num_hidden_layers", "True"]),
    "huge-head-dim": ({"head_dim": 2**30}, ConfigError, ["head_dim", "4096"]),
    "nan-rope-theta": ({"rope_theta": float("nan")}, ConfigError, ["rope_theta", "nan"]),
    "infinite-rms-eps": ({"rms_norm_eps": float("inf")}, ConfigError, ["rms_norm_eps", "inf"]),
    "eos-beyond-vocab": ({"eos_token_id": 32}, ConfigError, ["eos_token_id", "32"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_json(tmp_path, case):
    changes, error, fragments = CONFIG_CASES[case]
    directory = write_checkpoint(tmp_path, config={**LLAMA_CONFIG, **changes})  # json writes NaN/Infinity as Python reads them
    refused(directory, error, directory, *fragments)


TRANSFORMERS_CONFIG_CASES = {
    "huge-layer-count": ({"n_layer": 10**6}, ModelFormatError, ["1000000 layers", "only"]),
    "huge-width": ({"n_embd": 2**40}, ConfigError, ["could not build GPT2LMHeadModel", "overflowed"]),
    "width-vs-tensors": ({"n_embd": 2**16}, ModelFormatError, ["'transformer.wte.weight'", "(32, 65536)"]),
    "huge-positions": ({"n_positions": 2**31}, ModelFormatError, ["'transformer.wpe.weight'", "2147483648"]),
    "zero-width": ({"n_embd": 0, "n_head": 1}, ConfigError, ["could not build GPT2LMHeadModel"]),
    "zero-vocab": ({"vocab_size": 0}, ModelFormatError, ["'transformer.wte.weight'", "(0, 16)", "no elements"]),
}


@pytest.mark.parametrize("case", TRANSFORMERS_CONFIG_CASES)
def test_config_json_built_by_transformers(tmp_path, gpt2_checkpoint, case):
    changes, error, fragments = TRANSFORMERS_CONFIG_CASES[case]
    refused(gpt2_with(tmp_path, gpt2_checkpoint, **changes), error, "config.json", *fragments)


# --- tokenizer and config files that are not regular files, or broken ----------------------------

def _fifo(path):
    os.mkfifo(path)


def _dev_zero(path):
    os.symlink("/dev/zero", path)


SPECIAL_FILE_CASES = {
    "config-fifo": ("config.json", _fifo, ["config.json", "FIFO"]),
    "config-dev-zero": ("config.json", _dev_zero, ["config.json", "device"]),
    "weights-fifo": ("model.safetensors", _fifo, ["model.safetensors", "FIFO"]),
    "tokenizer-json-fifo": ("tokenizer.json", _fifo, ["tokenizer.json", "FIFO"]),
    "tokenizer-config-fifo": ("tokenizer_config.json", _fifo, ["tokenizer_config.json", "FIFO"]),
    "tokenizer-config-dev-zero": ("tokenizer_config.json", _dev_zero, ["tokenizer_config.json", "device"]),
    "generation-config-dev-zero": ("generation_config.json", _dev_zero, ["generation_config.json", "device"]),
    "chat-template-fifo": ("chat_template.jinja", _fifo, ["chat_template.jinja", "FIFO"]),
}


@pytest.mark.parametrize("case", SPECIAL_FILE_CASES)
def test_files_that_are_not_regular(tmp_path, case):
    name, plant, fragments = SPECIAL_FILE_CASES[case]
    directory = write_checkpoint(tmp_path)
    target = os.path.join(directory, name)
    if os.path.exists(target):
        os.unlink(target)
    plant(target)
    refused(directory, ModelFormatError, *fragments)


def _tokenizer_with(**fields) -> str:
    tokenizer = json.loads(tokenizer_json())
    tokenizer.update(fields)
    return json.dumps(tokenizer)


TOKENIZER_CASES = {
    "tokenizer-json-broken": ("tokenizer.json", '{"model": ', ["tokenizer.json", "cannot load"]),
    "tokenizer-config-broken": ("tokenizer_config.json", "[1, 2", ["tokenizer_config.json", "JSON"]),
    # The model's 32 rows are all taken by the vocabulary: the added token gets id 32.
    "added-token-beyond-vocab": ("tokenizer.json", tokenizer_json(vocab_size=32, added=[("<extra>", 32)]),
                                 ["'<extra>' with id 32", "beyond the model's 32 embedding rows"]),
    "vocab-beyond-model": ("tokenizer.json", tokenizer_json(vocab_size=40), ["with id 39", "32 embedding rows"]),
    "generation-eos-beyond-vocab": ("generation_config.json", json.dumps({"eos_token_id": [2, 77]}),
                                    ["eos_token_id 77", "32 embedding rows"]),
    "panics-while-loading": ("tokenizer.json", _tokenizer_with(normalizer={"type": "Precompiled", "precompiled_charsmap": "!!"}),
                             ["tokenizer.json", "panicked"]),
    "panics-on-text": ("tokenizer.json", _tokenizer_with(pre_tokenizer={"type": "FixedLength", "length": 0}),
                       ["panicked", "chunk size"]),
    "huge-chat-template": ("tokenizer_config.json", json.dumps({"chat_template": "x" * (2**20 + 1)}),
                           ["chat template", "1,048,577 bytes"]),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_tokenizer_files(tmp_path, case):
    name, text, fragments = TOKENIZER_CASES[case]
    directory = write_checkpoint(tmp_path)
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)
    refused(directory, ModelFormatError, *fragments)


# --- model paths -----------------------------------------------------------------------------------

def test_model_path_is_a_fifo(tmp_path):
    path = str(tmp_path / "model.gguf")
    os.mkfifo(path)
    refused(path, ModelFormatError, path, "FIFO")


def test_model_path_links_to_a_device(tmp_path):
    path = str(tmp_path / "model.gguf")
    os.symlink("/dev/zero", path)
    refused(path, ModelFormatError, path, "device")


def test_directory_hash_refuses_a_fifo(tmp_path):
    from kiln.frontend.sources import content_hash

    directory = write_checkpoint(tmp_path)
    os.mkfifo(os.path.join(directory, "extra.json"))
    with pytest.raises(ModelFormatError, match="extra.json.*FIFO"):
        content_hash(directory)


# --- the CLI, in a process under a hard memory limit ------------------------------------------------

MEMORY_LIMIT = 4 * 2**30


def _cli(*args):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env={**os.environ, "KILN_CACHE_DIR": os.devnull})


def _one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # Progress lines ("kiln: loading model... failed") come first; the error is one line.
    errors = [line for line in proc.stderr.splitlines() if not line.endswith("... failed")]
    assert len(errors) == 1 and errors[0].startswith("kiln: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("case", ["huge-block-count-gguf", "huge-hidden-size-config", "tokenizer-config-dev-zero"])
def test_cli_compile_refuses_in_one_line(tmp_path, case):
    if case == "huge-block-count-gguf":
        model, fragments = write_gguf(tmp_path, meta={"llama.block_count": (V.UINT32, 4000)}), ["4000 layers"]
    elif case == "huge-hidden-size-config":
        model, fragments = write_checkpoint(tmp_path, config={**LLAMA_CONFIG, "hidden_size": 2**40}), ["hidden_size"]
    else:
        model = write_checkpoint(tmp_path)
        os.unlink(os.path.join(model, "tokenizer_config.json"))
        os.symlink("/dev/zero", os.path.join(model, "tokenizer_config.json"))
        fragments = ["tokenizer_config.json", "device"]
    output = tmp_path / "out.kiln"
    _one_error_line(_cli("compile", model, "-o", str(output)), *fragments)
    assert not output.exists()


def test_cli_run_on_a_fifo_does_not_hang(tmp_path):
    fifo = str(tmp_path / "model.gguf")
    os.mkfifo(fifo)
    _one_error_line(_cli("run", fifo, "hello"), fifo, "FIFO")
