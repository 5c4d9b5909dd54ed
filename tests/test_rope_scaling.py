"""RoPE scaling (linear, dynamic NTK, yarn, llama3, longrope) from a torch module, a checkpoint directory and GGUF.

References: transformers' own models with each rope_parameters (logits and greedy decoding) and, for GGUF
files, llama.cpp (llama-cpp-python) on the same file. Tiny random models, compiled for the reference backend.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.frontend.gguf_model import load_gguf
from kiln.frontend.llama import LlamaConfig, rope_parameters
from kiln.ir.errors import ConfigError, ModelFormatError

from test_gguf import write_llama_gguf
from tiny_models import FP32_TOLERANCE, VOCAB, build_tiny_model, relative_error

THETA = 10000.0
MAX_SEQ_LEN = 32  # the compiles' max_seq_len: within every length limit below (128 and 64)
HEAD_HALF = 8  # tiny models: hidden 64 over 4 heads, head_dim 16
SHORT = [1.0 + i / 4 for i in range(HEAD_HALF)]
LONG = [2.0 + i for i in range(HEAD_HALF)]

# name -> (architecture, rope_parameters, other config overrides); max_position_embeddings is 128.
VARIANTS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 4.0}, {}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, {}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}, {}),
    "longrope": ("llama", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                           "original_max_position_embeddings": 64}, {}),
    # Phi-3 keeps original_max_position_embeddings at the config's top level; transformers prefers it there.
    "phi3_longrope": ("phi3", {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
                      {"original_max_position_embeddings": 64}),
}
# Variants whose frequencies depend on the sequence length: (config field, limit) named by the refusal.
LIMITS = {"dynamic": "max_position_embeddings 128", "longrope": "original_max_position_embeddings 64",
          "phi3_longrope": "original_max_position_embeddings 64"}
PROMPT = [5, 17, 99, 3, 42, 7, 64, 11, 90]
DECODE_STEPS = 4


def reference(name: str) -> torch.nn.Module:
    arch, rope, overrides = VARIANTS[name]
    return build_tiny_model(arch, rope_parameters={"rope_theta": THETA, **rope}, **overrides)


def greedy(model, ids, steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([ids]), use_cache=False).logits[0].numpy()


def assert_compiled_matches(source, model) -> None:
    engine = kiln.load(kiln.compile(source, backend="reference", max_seq_len=MAX_SEQ_LEN))
    assert relative_error(engine.logits(PROMPT), logits(model, PROMPT)) <= FP32_TOLERANCE
    result = engine.generate(PROMPT, max_new_tokens=DECODE_STEPS, ignore_eos=True)
    assert result.token_ids == greedy(model, PROMPT, DECODE_STEPS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_scaling_changes_the_reference(name):
    """The tiny models are sensitive to each variant (dynamic NTK within its limit is the default rope by design)."""
    arch = VARIANTS[name][0]
    moved = relative_error(logits(reference(name), PROMPT), logits(build_tiny_model(arch), PROMPT))
    assert moved == 0.0 if name == "dynamic" else moved > 1e-2


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_torch_module_matches_transformers(name):
    assert_compiled_matches(reference(name), reference(name))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoint_directory_matches_transformers(name, tmp_path):
    model = reference(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert_compiled_matches(str(tmp_path), model)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 3.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8, "mscale": 0.7, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.25},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 64},
    {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 64,
     "factor": 3.0, "attention_factor": 0.9},
], ids=lambda rope: "-".join(f"{v}" for k, v in rope.items() if not isinstance(v, list)))
def test_config_json_frequencies_equal_transformers(rope):
    """inv_freq and the attention factor read from a config.json dict, against transformers' rotary at init."""
    config = transformers.LlamaConfig(**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=128,
                                             rope_parameters={"rope_theta": THETA, **rope}))
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    inv_freq, attention_factor = rope_parameters(LlamaConfig.from_hf_dict(config.to_dict()))
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_length_dependent_rope_past_its_limit_is_refused(name, tmp_path):
    model = reference(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    limit = int(LIMITS[name].split()[-1])
    for source in (model, str(tmp_path)):
        with pytest.raises(ConfigError, match=f"rope_type '{VARIANTS[name][1]['rope_type']}' .* {LIMITS[name]}, .*"
                                              f"max_seq_len is {limit + 1}.* --max-seq-len {limit} or less"):
            kiln.compile(source, backend="reference", max_seq_len=limit + 1)
    # The refusal leaves the module's own (length-dependent) rotary as transformers built it.
    assert model.model.rotary_emb.rope_type == VARIANTS[name][1]["rope_type"]


def test_module_is_restored_after_capture():
    model = reference("longrope")
    before = model.model.rotary_emb.inv_freq
    kiln.compile(model, backend="reference", max_seq_len=MAX_SEQ_LEN, accuracy_gate="off")
    assert model.model.rotary_emb.rope_type == "longrope" and model.model.rotary_emb.inv_freq is before


@pytest.mark.parametrize("rope, fragment", [
    ({"rope_type": "proportional"}, "rope_type 'proportional' is not supported"),
    ({"rope_type": "linear", "factor": -2.0}, "linear rope scaling factor must be a positive finite number, found -2.0"),
    ({"rope_type": "longrope", "short_factor": SHORT[:3], "long_factor": LONG,
      "original_max_position_embeddings": 64}, "longrope rope scaling short_factor must be a list of 8 positive"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
     "yarn rope scaling original_max_position_embeddings must be a positive integer"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, "yarn rope scaling truncate must be true or false"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}, "yarn rope scaling beta_fast must be a positive finite "
                                                            "number, found -1"),
])
def test_unsupported_or_bad_scaling_is_refused(rope, fragment):
    d = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, max_position_embeddings=128, rope_parameters={"rope_theta": THETA, **rope})
    with pytest.raises(ConfigError, match=fragment):
        LlamaConfig.from_hf_dict(d)


# --- GGUF ---------------------------------------------------------------------------------------------------------

_F32, _STR, _U32 = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32


def write_scaled_gguf(path, model, metadata: dict, monkeypatch, extra_tensors=()):
    """tests/test_gguf.py's llama.cpp-style GGUF of ``model`` with extra metadata {key: (value, type)}."""

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            for key, (value, value_type) in metadata.items():
                self.add_key_value(key, value, value_type)
            super().write_header_to_file(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gguf, "GGUFWriter", Writer)
        return write_llama_gguf(path, model, extra_tensors=extra_tensors)


def gguf_reference(rope: dict) -> torch.nn.Module:
    """A tiny transformers Llama with the GGUF tokenizer's 259 ids, q/k scaled up so positions matter."""
    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_theta": THETA, **rope})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def llama_cpp_logits(path, ids) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF reference")
    # f32 K/V: llama.cpp's default f16 cache would round the keys.
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=64, n_threads=1, type_k=0,
                          type_v=0, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama3_rope_freqs(factor, low_freq_factor, high_freq_factor, original, dim=16) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for llama3 rope_parameters: 1 for short wavelengths,
    factor for long ones, 1 / ((1 - smooth) / factor + smooth) between."""
    out = []
    for freq in 1.0 / THETA ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high_freq_factor:
            out.append(1.0)
        elif wavelen > original / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
GGUF_CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0},
               {"llama.rope.scaling.type": ("linear", _STR), "llama.rope.scaling.factor": (4.0, _F32)}, ()),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             {"llama.rope.scaling.type": ("yarn", _STR), "llama.rope.scaling.factor": (4.0, _F32),
              "llama.rope.scaling.original_context_length": (32, _U32)}, ()),
    "rope_freqs": (LLAMA3, {}, [("rope_freqs.weight", llama3_rope_freqs(8.0, 1.0, 4.0, 32))]),
}
GGUF_IDS = [5, 17, 99, 3, 42, 7, 100, 200, 33, 34, 35, 36, 37, 38, 39, 40, 41]


@pytest.mark.parametrize("name", sorted(GGUF_CASES))
def test_gguf_scaling_matches_transformers_and_llama_cpp(name, tmp_path, monkeypatch):
    rope, metadata, extra = GGUF_CASES[name]
    model = gguf_reference(rope)
    path = write_scaled_gguf(tmp_path / f"{name}.gguf", model, metadata, monkeypatch, extra_tensors=extra)
    loaded, _, _ = load_gguf(path)
    with torch.no_grad():
        got = loaded(torch.as_tensor([GGUF_IDS]))[0].numpy()
    expected = logits(model, GGUF_IDS)
    assert relative_error(expected, logits(gguf_reference({"rope_type": "default"}), GGUF_IDS)) > 1e-2
    assert relative_error(got, expected) <= FP32_TOLERANCE
    # llama.cpp reads the same file the same way (measured 6e-7 of the largest logit with an f32 cache).
    assert relative_error(got, llama_cpp_logits(path, GGUF_IDS)) <= FP32_TOLERANCE


def test_gguf_rope_freqs_compiles_and_decodes_like_transformers(tmp_path, monkeypatch):
    model = gguf_reference(LLAMA3)
    rope, metadata, extra = GGUF_CASES["rope_freqs"]
    path = write_scaled_gguf(tmp_path / "llama31.gguf", model, metadata, monkeypatch, extra_tensors=extra)
    engine = kiln.load(kiln.compile(str(path), backend="reference", max_seq_len=MAX_SEQ_LEN))
    assert relative_error(engine.logits(GGUF_IDS), logits(model, GGUF_IDS)) <= FP32_TOLERANCE
    result = engine.generate(GGUF_IDS, max_new_tokens=DECODE_STEPS, ignore_eos=True)
    assert result.token_ids == greedy(model, GGUF_IDS, DECODE_STEPS)


@pytest.mark.parametrize("metadata, extra, fragment", [
    ({"llama.rope.scaling.type": ("longrope", _STR)}, (), "rope.scaling.type: expected 'none', 'linear' or 'yarn', "
                                                           "found 'longrope'"),
    ({"llama.rope.scaling.type": ("linear", _STR)}, (), "rope.scaling.factor is missing"),
    ({"llama.rope.scaling.type": ("linear", _STR), "llama.rope.scaling.factor": (-1.0, _F32)}, (),
     "linear rope scaling factor must be a positive finite number, found -1.0"),
    ({"llama.rope.scaling.type": ("yarn", _STR), "llama.rope.scaling.factor": (4.0, _F32)}, (),
     "original_context_length is missing"),
    ({"llama.rope.scaling.type": ("yarn", _STR), "llama.rope.scaling.factor": (4.0, _F32),
      "llama.rope.scaling.original_context_length": (32, _U32), "llama.rope.scaling.yarn_beta_fast": (8.0, _F32)},
     (), "yarn_beta_fast: expected 32.0 .* found 8.0"),
    ({}, [("rope_freqs.weight", np.ones(5, np.float32))], "'rope_freqs.weight': expected shape \\[8\\]"),
    ({}, [("rope_freqs.weight", np.zeros(8, np.float32))], "rope_freqs rope scaling divisors must be a list of 8 positive"),
    ({"llama.rope.scaling.type": ("linear", _STR), "llama.rope.scaling.factor": (4.0, _F32)},
     [("rope_freqs.weight", np.ones(8, np.float32))], "both a rope_freqs.weight tensor and rope.scaling.type"),
])
def test_gguf_rope_refusals(tmp_path, monkeypatch, metadata, extra, fragment):
    path = write_scaled_gguf(tmp_path / "bad.gguf", gguf_reference({"rope_type": "default"}), metadata, monkeypatch,
                             extra_tensors=extra)
    with pytest.raises(ModelFormatError, match=fragment):
        load_gguf(path)
