"""Fuzz target: a GGUF file through kiln's reader, config, tokenizer and model construction.

An input starting with ``GGUF`` is the file itself; any other input is a script of structured edits to a
tiny valid llama GGUF (set, retype or delete the metadata keys kiln reads, with numbers at the edges of
their ranges; change tensor dims, types and names), written with the gguf package's writer, so that the
metadata and tensor checks are reached often. Every tensor of a file the reader accepts is read and
dequantized (what comes back must have the shape the header claims); the tokenizer is built on its own;
then the whole model is loaded as ``kiln.compile`` loads it (metadata and tensors checked before the
module is built on the meta device and given the file's tensors) and its quantized blocks imported.
Allocations are bounded by the file's size, so a small input stays small; only KilnError may escape.
Seeds (tiny llama models in f32, Q8_0, Q4_0 and Q4_1, a file with every value kind, edit scripts) are
written by ``--make-seeds``.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile

import gguf
import numpy as np

from harness import Choices, run, write_seeds
from kiln.frontend.gguf_file import DEQUANTIZABLE, GGUFFile
from kiln.frontend.gguf_model import load_gguf, prequantized_from_gguf
from kiln.frontend.tokenizer import tokenizer_from_gguf
from kiln.ir.errors import KilnError

V, Q = gguf.GGUFValueType, gguf.GGMLQuantizationType
_SCRATCH = tempfile.mkdtemp(prefix="kiln-fuzz-gguf-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)

TOKENS = ["<s>", "</s>", "a", "b", "ab", "<tool>", "c", "d"]
KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.context_length",
        "llama.embedding_length", "llama.feed_forward_length", "llama.vocab_size", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.attention.key_length", "llama.attention.value_length",
        "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.dimension_count",
        "llama.rope.scaling.type", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template"]
INTERESTING_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 32, 33, 64, 255, 4096, 4097, 2**24 + 1, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1]
INTERESTING_FLOATS = [0.0, -1.0, 1e-5, 1.0, 10000.0, 1e38, math.inf, -math.inf, math.nan]
INTERESTING_STRINGS = ["", "llama", "qwen2", "gpt2", "llama-bpe", "smollm", "mystery", "none", "linear", "a b",
                       "ab", "<s>", "a", "{{ x }}", "\u00e9t\u00e9"]
INT_TYPES = [V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64]
_RANGES = {V.UINT8: (0, 2**8), V.INT8: (-2**7, 2**7), V.UINT16: (0, 2**16), V.INT16: (-2**15, 2**15),
           V.UINT32: (0, 2**32), V.INT32: (-2**31, 2**31), V.UINT64: (0, 2**64), V.INT64: (-2**63, 2**63)}
TENSOR_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K, Q.I8]
TENSOR_NAMES = ["blk.1.ffn_up.weight", "blk.00.ffn_up.weight", "output.weight", "rope_freqs.weight",
                "blk.0.attn_q.bias", "blk.99999999999999999999.ffn_up.weight", "mystery"]
MAX_DATA_BYTES = 1 << 16


class GGUFChoices(Choices):
    def integer(self, value_type: gguf.GGUFValueType) -> int:
        low, high = _RANGES[value_type]
        value = self.pick(INTERESTING_INTS) * (-1 if self.byte() & 1 else 1)
        return low + (value - low) % (high - low)

    def typed_value(self):
        """(value, GGUF type) of a kind chosen by the input."""
        kind = self.byte() % 6
        if kind <= 1:
            value_type = self.pick(INT_TYPES)
            return self.integer(value_type), value_type
        if kind == 2:
            return self.pick(INTERESTING_FLOATS), self.pick([V.FLOAT32, V.FLOAT64])
        if kind == 3:
            return self.pick(INTERESTING_STRINGS), V.STRING
        if kind == 4:
            return bool(self.byte() & 1), V.BOOL
        count = 1 + self.byte() % 10
        if self.byte() & 1:
            return [self.pick(INTERESTING_STRINGS + TOKENS) for _ in range(count)], (V.ARRAY, V.STRING)
        return [self.integer(V.INT32) for _ in range(count)], (V.ARRAY, V.INT32)


def llama_model(ggml_type, width: int, heads: int, kv_heads: int, ffn: int, tied: bool, add_bos: bool):
    """Metadata {key: (value, type)} and tensors {name: (numpy shape, ggml type)} of a one-layer llama."""
    metadata = {
        "llama.block_count": (1, V.UINT32), "llama.context_length": (64, V.UINT32),
        "llama.embedding_length": (width, V.UINT32), "llama.feed_forward_length": (ffn, V.UINT32),
        "llama.attention.head_count": (heads, V.UINT32), "llama.attention.head_count_kv": (kv_heads, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32), "llama.rope.freq_base": (10000.0, V.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, (V.ARRAY, V.STRING)),
        "tokenizer.ggml.token_type": ([3, 3, 1, 1, 1, 4, 1, 1], (V.ARRAY, V.INT32)),
        "tokenizer.ggml.merges": (["a b"], (V.ARRAY, V.STRING)), "tokenizer.ggml.bos_token_id": (0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (1, V.UINT32), "tokenizer.ggml.add_bos_token": (add_bos, V.BOOL),
        "tokenizer.chat_template": ("{% for m in messages %}{{ m['content'] }}{% endfor %}", V.STRING),
    }
    head_dim = width // heads
    shapes = {"token_embd.weight": (len(TOKENS), width), "output_norm.weight": (width,),
              "blk.0.attn_norm.weight": (width,), "blk.0.ffn_norm.weight": (width,),
              "blk.0.attn_q.weight": (width, width), "blk.0.attn_k.weight": (kv_heads * head_dim, width),
              "blk.0.attn_v.weight": (kv_heads * head_dim, width), "blk.0.attn_output.weight": (width, width),
              "blk.0.ffn_gate.weight": (ffn, width), "blk.0.ffn_up.weight": (ffn, width),
              "blk.0.ffn_down.weight": (width, ffn)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), width)
    tensors = {name: (shape, Q.F32 if len(shape) == 1 else ggml_type) for name, shape in shapes.items()}
    return "llama", metadata, tensors


def write_gguf(path: str, arch: str, metadata: dict, tensors: dict, seed: int = 0) -> None:
    """Write with the gguf package; each tensor gets random bytes of the size its shape and type need
    (cut to MAX_DATA_BYTES, which leaves a huge tensor truncated), or quantized values where they fit."""
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, value_type) in metadata.items():
        if isinstance(value_type, tuple):
            writer.add_key_value(key, value, V.ARRAY, sub_type=value_type[1])
        else:
            writer.add_key_value(key, value, value_type)
    rng = np.random.default_rng(seed)
    for name, (shape, ggml_type) in tensors.items():
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        nbytes = math.prod(shape) // block_size * type_size
        if ggml_type in (Q.F32, Q.Q8_0, Q.Q4_0, Q.Q4_1) and nbytes <= MAX_DATA_BYTES and shape and \
                shape[-1] % block_size == 0 and math.prod(shape) > 0:
            values = rng.standard_normal(shape).astype(np.float32)
            data = values if ggml_type == Q.F32 else gguf.quants.quantize(values, ggml_type)
            writer.add_tensor(name, data.view(np.int8), raw_shape=shape, raw_dtype=ggml_type)
        else:
            writer.add_tensor(name, rng.integers(-128, 128, min(nbytes, MAX_DATA_BYTES), dtype=np.int8),
                              raw_shape=shape, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def edited_file(data: bytes, path: str) -> None:
    """Apply the edit script ``data`` to the valid model and write it to ``path``."""
    source = GGUFChoices(data)
    arch, metadata, tensors = llama_model(source.pick([Q.F32, Q.Q8_0, Q.Q4_0, Q.Q4_1]), 32, 4, 2, 32,
                                          tied=bool(source.byte() & 1), add_bos=bool(source.byte() & 1))
    for _ in range(source.byte() % 6):
        action = source.byte() % 6
        if action == 0:
            key = source.pick(KEYS)
            value = source.typed_value()
            if key == "general.architecture":
                arch = value[0] if isinstance(value[0], str) else arch
            else:
                metadata[key] = value
        elif action == 1:
            metadata.pop(source.pick(KEYS), None)
        elif action in (2, 3):
            name = source.pick(sorted(tensors))
            shape, ggml_type = tensors[name]
            dims = list(shape)
            index = source.byte() % (len(dims) + 1)
            dim = source.integer(V.UINT64)
            if index == len(dims):
                dims.append(dim)
            else:
                dims[index] = dim
            tensors[name] = (tuple(dims[:5]), ggml_type)
        elif action == 4:
            name = source.pick(sorted(tensors))
            tensors[name] = (tensors[name][0], source.pick(TENSOR_TYPES))
        else:
            name = source.pick(sorted(tensors))
            entry = tensors.pop(name) if source.byte() & 1 else tensors[name]
            tensors.setdefault(source.pick(TENSOR_NAMES), entry)
    try:
        write_gguf(path, arch, metadata, tensors)
    except (ValueError, OverflowError, TypeError, KeyError) as err:
        # The writer refuses some edits itself (e.g. a dim past 2**64); such an input is not a GGUF.
        raise KilnError(f"the gguf writer refused the edited file ({err})") from None


def check(data: bytes) -> None:
    path = os.path.join(_SCRATCH, "input.gguf")
    if data[:4] == b"GGUF":
        with open(path, "wb") as f:
            f.write(data)
    else:
        edited_file(data, path)
    gguf_file = GGUFFile(path)
    for name, info in gguf_file.tensors.items():
        raw = gguf_file.raw(name)
        assert raw.size == info.nbytes, (name, raw.shape, info)
        if info.ggml_type in DEQUANTIZABLE:
            values = gguf_file.dequantize(name)
            assert values.shape == info.shape and values.dtype == np.float32, (name, values.shape, info)
    try:
        bundle = tokenizer_from_gguf(gguf_file)
        bundle.tokenizer().encode("Hello, world! 123")
    except KilnError:
        pass
    model, config, _ = load_gguf(gguf_file)
    assert sum(p.numel() for p in model.parameters()) > 0
    prequantized_from_gguf(gguf_file, config)


def make_seeds(corpus: str) -> None:
    """Write the seed inputs into the corpus folder (tens of KB in all)."""
    for name, args in {"seed-llama-f32-tied.gguf": (Q.F32, 8, 2, 1, 16, True, False),
                       "seed-llama-q8_0-untied.gguf": (Q.Q8_0, 32, 4, 2, 32, False, True),
                       "seed-llama-q4_0-tied.gguf": (Q.Q4_0, 32, 2, 1, 32, True, False),
                       "seed-llama-q4_1-untied.gguf": (Q.Q4_1, 32, 4, 4, 32, False, True)}.items():
        write_gguf(os.path.join(corpus, name), *llama_model(*args))
    metadata = {"test.u8": (7, V.UINT8), "test.i16": (-3, V.INT16), "test.u64": (2**40, V.UINT64),
                "test.f64": (0.125, V.FLOAT64), "test.bool": (True, V.BOOL), "test.string": ("première ✓", V.STRING),
                "test.ints": ([1, -2, 3], (V.ARRAY, V.INT32)), "test.strings": (["x", "yy"], (V.ARRAY, V.STRING))}
    write_gguf(os.path.join(corpus, "seed-every-value-kind.gguf"), "test", metadata,
               {"t.f16": ((2, 8), Q.F16), "t.bf16": ((8,), Q.BF16), "t.q8": ((1, 32), Q.Q8_0)})
    # Edit scripts: the valid model as it is, and with a few edits.
    write_seeds(corpus, {"seed-edits-none.bin": b"\x00\x00\x00\x00",
                         "seed-edits-dims.bin": b"\x01\x01\x00\x02\x02\x03\x00\x05",
                         "seed-edits-keys.bin": b"\x02\x00\x01\x02\x00\x04\x00\x03\x05\x01\x00\x07"})


if __name__ == "__main__":
    run(check, "gguf", make_seeds)
