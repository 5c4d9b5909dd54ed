"""The TVM backend end to end: compiled artifacts generate what transformers generates.

Tiny architectures: prefill logits and every decode step's logits within 1e-3 of
transformers (relative to the largest logit) and identical greedy tokens.
SmolLM2: greedy output token-identical to transformers' LlamaForCausalLM with the
same weights for 32 new tokens on five prompts, ties (transformers' own top two
logits within 1e-4) reported and the comparison of that prompt stopped there.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln

from smollm2 import assert_greedy_matches_transformers, smollm2_source
from runtime_check import assert_generates_without_torch
from tiny_models import TINY_ARCHS, assert_engine_matches_transformers, tiny_model

FAST_ARCHS = ("llama", "gpt2", "falcon")  # GQA + RMSNorm + RoPE; learned positions + LayerNorm; MQA
PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


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


def test_two_sequences_decode_in_one_batch(compiled):
    """The compiled decode serves sequences of different lengths in one call."""
    engine = compiled("llama")
    model = tiny_model("llama")
    a, b = [3, 4, 5, 6, 7], [9, 8]
    seqs = [engine.pages.add_sequence(), engine.pages.add_sequence()]
    try:
        engine._step("prefill", [seqs[0]], np.array([a]))
        engine._step("prefill", [seqs[1]], np.array([b]))
        logits = engine._step("decode", seqs, np.array([[11], [12]]))
    finally:
        for s in seqs:
            engine.pages.remove_sequence(s)
    with torch.no_grad():
        ref_a = model(torch.as_tensor([a + [11]])).logits[0, -1].numpy()
        ref_b = model(torch.as_tensor([b + [12]])).logits[0, -1].numpy()
    assert np.abs(logits[0, 0] - ref_a).max() <= 1e-3 * np.abs(ref_a).max()
    assert np.abs(logits[1, 0] - ref_b).max() <= 1e-3 * np.abs(ref_b).max()


# SmolLM2 -------------------------------------------------------------------------
# "gguf" (the default for SmolLM2's Q4_1 file) computes from the file's own blocks; "none" from the
# dequantized fp32 weights. Both compute the same numbers as transformers given the dequantized weights.
@pytest.fixture(scope="module", params=["gguf", pytest.param("none", marks=pytest.mark.slow)])
def smollm2(tmp_path_factory, request):
    source = smollm2_source()
    path = tmp_path_factory.mktemp("smol") / "smollm2.kiln"
    artifact = kiln.compile("smollm2", backend="tvm", max_seq_len=128, max_num_seqs=1, output=path,
                            quantize=request.param)
    assert artifact.manifest["options"]["quantize"] == request.param
    if request.param == "gguf":  # no fp32 copy of an imported weight: every linear and the table are blocks
        assert artifact.manifest["quantization"]["fp32_weights_kept"] == []
        assert artifact.manifest["quantization"]["weight_formats"] == {"int4-g32+offset": 210, "int8-g32": 1}
    return path, kiln.load(path), source


def test_smollm2_greedy_matches_transformers(smollm2):
    assert_greedy_matches_transformers(smollm2[1])


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
