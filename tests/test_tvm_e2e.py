"""The TVM backend end to end: compiled artifacts generate what transformers generates.

Tiny architectures: prefill logits and every decode step's logits within 1e-5 of
transformers (relative to the largest logit) and identical greedy tokens; the same
check refuses a model whose RoPE base or norm epsilon differs; int4 / int8 models
against transformers running the weights quantized and dequantized in torch.
SmolLM2: prefill logits within 1e-5 of transformers' LlamaForCausalLM with the same
weights, and greedy output token-identical for 32 new tokens on five prompts, ties
(transformers' own top two logits within 1e-4) reported and the comparison of that
prompt stopped there; `kiln inspect` counts its parameters as the config does.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln

from smollm2 import assert_greedy_matches_transformers, assert_prefill_logits_match_transformers, smollm2_source
from runtime_check import assert_generates_without_torch
from tiny_models import (ENGINE_PROMPT, FP32_TOLERANCE, TINY_ARCHS, assert_engine_matches_transformers,
                         build_tiny_model, dequantized_tiny_llama, llama_parameter_count, relative_error,
                         tiny_model)

FAST_ARCHS = ("llama", "gpt2", "falcon")  # GQA + RMSNorm + RoPE; learned positions + LayerNorm; MQA


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch) / "model.kiln"
            cache[arch] = kiln.load(kiln.compile(tiny_model(arch), backend="tvm", max_seq_len=48, output=path))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_tiny_architecture_matches_transformers(compiled, arch):
    assert_engine_matches_transformers(compiled(arch), arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(TINY_ARCHS) - set(FAST_ARCHS)))
def test_tiny_architecture_matches_transformers_slow(compiled, arch):
    assert_engine_matches_transformers(compiled(arch), arch)


@pytest.mark.parametrize("quantize", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_model_matches_transformers_with_dequantized_weights(tmp_path, quantize):
    """The fused dequantize-matmul kernels compute what transformers computes with the same weights quantized
    and dequantized in torch (tests/tiny_models.py): the same codes, so the fp32 tolerance (measured: 4.9e-7)."""
    engine = kiln.load(kiln.compile(tiny_model("llama"), backend="tvm", max_seq_len=48, quantize=quantize,
                                    activations="float",
                                    output=tmp_path / "quantized.kiln"))
    assert_engine_matches_transformers(engine, "llama", model=dequantized_tiny_llama(quantize))


def test_f16_kv_cache_matches_transformers_within_its_rounding(tmp_path):
    """An f16 KV cache: K/V rounded to f16 (a relative step of 2^-11, so each element moves by up to 2.4e-4 of
    itself) as they are written, read back as f32. Measured 3.9e-4 of the largest logit from transformers' f32
    cache on the tiny Llama (the f32 cache: 1e-5); 2e-3 allows that and catches a cache read at the wrong place,
    which moves the logits by O(1). Greedy tokens stay identical."""
    engine = kiln.load(kiln.compile(tiny_model("llama"), backend="tvm", max_seq_len=48, kv_cache_dtype="f16",
                                    output=tmp_path / "f16.kiln"))
    assert engine.info.manifest["kv_cache"]["dtype"] == "f16"
    assert_engine_matches_transformers(engine, "llama", tolerance=2e-3)


def test_one_step_mixes_a_prefill_chunk_with_decodes(compiled):
    """The compiled step serves, in one call, a decode token of each of two sequences and the second chunk of a
    third sequence's prompt; then @step_decode (one token of one sequence) decodes each of the three."""
    engine = compiled("llama")
    model = tiny_model("llama")
    a, b, c = [3, 4, 5, 6, 7], [9, 8], [20, 21, 22, 23, 24, 25, 26]
    P = engine.spec.pages_per_seq
    table = np.arange(3 * P, dtype=np.int32).reshape(3, P)

    def step(function, chunks, rows, pages=table):
        ids = np.array([t for _, toks, _ in chunks for t in toks], np.int64)
        return engine.executor.step(function, {
            "token_ids": ids, "positions": np.array([p for _, toks, s in chunks for p in range(s, s + len(toks))]),
            "token_seq": np.array([row for row, toks, _ in chunks for _ in toks], np.int32),
            "page_table": pages, "logit_rows": np.asarray(rows, np.int64)})

    step("step", [(0, a, 0), (1, b, 0), (2, c[:3], 0)], [4])
    logits = step("step", [(0, [11], 5), (1, [12], 2), (2, c[3:], 3)], list(range(6)))
    decode = np.concatenate([step("step_decode", [(0, [token], start)], [0], table[row:row + 1])
                             for row, token, start in ((0, 13, 6), (1, 14, 3), (2, 15, 7))])
    with torch.no_grad():
        ref_a = model(torch.as_tensor([a + [11, 13]])).logits[0].numpy()
        ref_b = model(torch.as_tensor([b + [12, 14]])).logits[0].numpy()
        ref_c = model(torch.as_tensor([c + [15]])).logits[0].numpy()
    assert relative_error(logits[0], ref_a[5]) <= FP32_TOLERANCE
    assert relative_error(logits[1], ref_b[2]) <= FP32_TOLERANCE
    assert relative_error(logits[2:6], ref_c[3:7]) <= FP32_TOLERANCE
    assert relative_error(decode, np.stack([ref_a[6], ref_b[3], ref_c[7]])) <= FP32_TOLERANCE


@pytest.mark.parametrize("change", [{"rope_theta": 20000.0}, {"rms_norm_eps": 1.1e-6}])
def test_the_comparison_refuses_a_perturbed_model(compiled, change):
    """The engine compiled from the tiny Llama, checked against transformers running the same weights with
    the RoPE base doubled (logits move by 6e-2) or the RMSNorm epsilon 10% larger (2e-4, which the old
    tolerance of 1e-3 let through): both are refused, though transformers' argmax does not move."""
    import torch

    perturbed = build_tiny_model("llama", **change)
    with torch.no_grad():
        true = tiny_model("llama")(torch.as_tensor([ENGINE_PROMPT])).logits[0].numpy()
        moved = perturbed(torch.as_tensor([ENGINE_PROMPT])).logits[0].numpy()
    assert (true.argmax(-1) == moved.argmax(-1)).all()
    assert relative_error(moved, true) > 10 * FP32_TOLERANCE
    with pytest.raises(AssertionError, match="llama: prefill logits differ by"):
        assert_engine_matches_transformers(compiled("llama"), "llama", model=perturbed)


# SmolLM2 -------------------------------------------------------------------------
# "gguf" (the default for SmolLM2's Q4_1 file) computes from the file's own blocks; "none" from the
# dequantized fp32 weights. Both compute the same numbers as transformers given the dequantized weights.
@pytest.fixture(scope="module", params=["gguf", pytest.param("none", marks=pytest.mark.slow)])
def smollm2(tmp_path_factory, request):
    source = smollm2_source()
    path = tmp_path_factory.mktemp("smol") / "smollm2.kiln"
    artifact = kiln.compile("smollm2", backend="tvm", max_seq_len=128, max_num_seqs=1, output=path,
                            quantize=request.param, activations="float")
    assert artifact.manifest["options"]["quantize"] == request.param
    if request.param == "gguf":  # no fp32 copy of an imported weight: every linear and the table are blocks
        assert artifact.manifest["quantization"]["fp32_weights_kept"] == []
        assert artifact.manifest["quantization"]["weight_formats"] == {"int4-g32+offset": 210, "int8-g32": 1}
    return path, kiln.load(path), source


def test_smollm2_prefill_logits_match_transformers(smollm2):
    """fp32 through 30 layers: kiln's logits are within 3.2e-6 of the largest (measured, "gguf" and "none")."""
    assert_prefill_logits_match_transformers(smollm2[1], FP32_TOLERANCE)


def test_smollm2_greedy_matches_transformers(smollm2):
    assert_greedy_matches_transformers(smollm2[1])


def test_smollm2_inspect_counts_the_parameters_of_the_config(smollm2):
    """The quantized artifact's parameters are SmolLM2's 134,515,008 (the config's count, tied embeddings once),
    not the elements of its packed blocks."""
    import json

    path, _, source = smollm2
    config = source.config
    expected = llama_parameter_count(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                                     config["num_attention_heads"], config["num_key_value_heads"],
                                     config["head_dim"], config["intermediate_size"], config["tie_word_embeddings"])
    assert expected == 134_515_008
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "inspect", str(path), "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parameters"] == expected


def test_smollm2_chat_answers_paris(smollm2):
    path, engine, _ = smollm2
    reply = engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply.text
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(path), "What is the capital of France?",
                          "--chat", "-n", "24"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


_RSS_SCRIPT = """
import sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
from kiln.backends.tvm.executor import import_tvm
import_tvm()
before = rss()
import kiln
engine = kiln.load(sys.argv[1])
engine.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)
print(rss() - before)
"""


def test_smollm2_resident_memory_follows_the_weight_file(smollm2):
    """A fresh process that loads the artifact and generates grows by about its weight file plus the KV
    cache: no fp32 copy of a quantized weight (4x-8x the file for the int4 blocks) exists at run time.
    Measured: gguf 96.7 MB of weights, 94.4 MB KV cache, growth 217 MB (the rest: library, tokenizer)."""
    import json
    import os

    path = smollm2[0]
    with open(os.path.join(path, "manifest.json")) as f:
        kv_bytes = json.load(f)["kv_cache"]["total_bytes"]
    weights = os.path.getsize(os.path.join(path, "weights.safetensors"))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth - kv_bytes <= 1.35 * weights + 48 * 2**20, (growth, kv_bytes, weights)


def test_tvm_runtime_never_imports_torch(compiled):
    """tvm_ffi imports torch eagerly when installed; kiln's runtime keeps it out."""
    assert_generates_without_torch(compiled("llama").info.path)


def test_runtime_only_tvm_generates_the_same_tokens_and_refuses_to_compile(compiled):
    """KILN_TVM_RUNTIME_ONLY=1 (what `kiln run ARTIFACT` sets): the artifact runs on TVM's runtime library alone
    and gives the same tokens; a compile in that process is refused in one line."""
    path = compiled("llama").info.path
    want = compiled("llama").generate([1, 2, 3], max_new_tokens=6, ignore_eos=True).token_ids
    code = (
        "import sys, kiln\n"
        "from kiln.ir.errors import ConfigError\n"
        f"eng = kiln.load({str(path)!r})\n"
        "assert sys.modules['tvm'].base._RUNTIME_ONLY and 'tvm.relax' not in sys.modules\n"
        "print(eng.generate([1, 2, 3], max_new_tokens=6, ignore_eos=True).token_ids)\n"
        "from tiny_models import tiny_model\n"
        "try:\n"
        "    kiln.compile(tiny_model('llama'), backend='tvm', max_seq_len=16)\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "KILN_TVM_RUNTIME_ONLY": "1", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    tokens, refusal = out.stdout.strip().splitlines()
    assert tokens == str(want)
    assert "loaded TVM's runtime library only" in refusal
