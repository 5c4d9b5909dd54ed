"""The whole pass pipeline: ragged steps (prefills, then batched decode) through the KV cache reproduce transformers' logits."""

import collections

import numpy as np
import pytest

from kiln.ir.symbolic import sym
from kiln.passes import PassManager, PassOptions
from kiln.passes.pipeline import PIPELINE

from kv_harness import generate_logits
from golden import copy_module
from smollm2 import smollm2_captured, smollm2_source
from tiny_models import FP32_TOLERANCE, TINY_ARCHS, VOCAB, captured, reference_logits

OPTIONS = PassOptions(max_seq_len=32, max_num_seqs=3, page_size=4, activation_seq_len=16)

# fused ops expected per architecture (2 layers each)
EXPECTED = {
    "llama": {"paged_attention": 2, "rope": 4, "rms_norm": 1, "add_rms_norm": 4, "gated_mlp": 2},
    "mistral": {"paged_attention": 2, "rope": 4, "rms_norm": 1, "add_rms_norm": 4, "gated_mlp": 2},
    "qwen2": {"paged_attention": 2, "rope": 4, "rms_norm": 1, "add_rms_norm": 4, "gated_mlp": 2},
    "phi3": {"paged_attention": 2, "rope": 4, "rms_norm": 1, "add_rms_norm": 4, "gated_mlp": 2},
    "gemma": {"paged_attention": 2, "rope": 4, "rms_norm": 1, "add_rms_norm": 4, "gated_mlp": 2},
    "gpt2": {"paged_attention": 2, "layer_norm": 5},
    "falcon": {"paged_attention": 2, "rope": 4, "layer_norm": 3},
    "gpt_neox": {"paged_attention": 2, "rope": 4, "layer_norm": 5},
}


def optimized(module, options=OPTIONS):
    module = copy_module(module)
    PassManager(PIPELINE).run(module, options)
    return module


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_prefill_then_batched_decode_match_transformers(arch):
    module = optimized(captured(arch))
    assert set(module.functions) == {"step", "step_decode"}
    assert module.metadata["unfused_attention"] == []
    ops = collections.Counter(n.op for n in module.functions["step"].nodes)
    for op, count in EXPECTED[arch].items():
        assert ops[op] == count, (arch, op, dict(ops))
    assert ops["sdpa"] == 0 and ops["softmax"] == 0 and ops["arange"] == 0
    rng = np.random.default_rng(1)
    full = [rng.integers(0, VOCAB, size=n) for n in (9, 6, 11)]  # different lengths decode together
    prompts = [f[:4] for f in full[:2]] + [full[2][:7]]
    steps = [f[len(p):] for f, p in zip(full, prompts)]
    got = generate_logits(module, prompts, steps)
    for seq, logits in zip(full, got):
        ref = reference_logits(arch, seq[None])[0]
        assert logits.shape == ref.shape
        assert np.abs(logits - ref).max() <= FP32_TOLERANCE * np.abs(ref).max(), arch


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_a_step_gives_the_logit_rows_asked_for_like_transformers(arch):
    """Two prompts (lengths 7 and 4) in one ragged step with one logit row each: transformers' logits at each
    prompt's last token; the selection sits above the output projection; the pools it leaves equal those of the
    same step asking for every row."""
    from kv_harness import empty_pools, run_step

    module = optimized(captured(arch))
    fn = module.functions["step"]
    select = [n for n in fn.nodes if n.op == "select_rows"]
    assert select and all(n.output.type.shape[1] == sym("rows") for n in select)
    output_projection = [n for n in fn.nodes if n.op == "linear"][-1]
    assert output_projection.output.type.shape == (1, sym("rows"), VOCAB)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, size=7), rng.integers(0, VOCAB, size=4)]
    chunks = [(0, prompts[0], 0), (1, prompts[1], 0)]
    logits, pools = run_step(module, empty_pools(module), chunks)
    _, pools_all = run_step(module, empty_pools(module), chunks, logits="all")
    assert logits.shape == (2, VOCAB)
    for name in pools:
        np.testing.assert_array_equal(pools[name], pools_all[name])
    for row, prompt in enumerate(prompts):
        ref = reference_logits(arch, np.asarray(prompt)[None])[0, -1]
        assert np.abs(logits[row] - ref).max() <= FP32_TOLERANCE * np.abs(ref).max(), arch


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_parameter_count_is_the_models_in_any_weight_format(quantize):
    """The optimized module counts torch's parameters of the tiny Llama (its RoPE buffer left out), whether its
    weights are fp32, int8 rows or packed int4 groups with scales and offsets."""
    from kiln.api import compile_options

    from tiny_models import tiny_model

    options = compile_options(max_seq_len=32, max_num_seqs=3, page_size=4, activation_seq_len=16,
                              quantize=quantize)
    module = optimized(captured("llama"), options)
    model = tiny_model("llama")
    assert module.metadata.get("quantization", {}).get("mode", "none") == quantize
    buffers = [name for name, _ in model.named_buffers()]
    assert module.parameter_count(exclude=buffers) == sum(p.numel() for p in model.parameters()) == 90_432


def test_step_decode_is_the_step_for_one_token_of_one_sequence():
    """specialize_decode_step fixes @step_decode's sizes (one token, one sequence): the engine's only use."""
    from kv_harness import empty_pools, run_step

    module = optimized(captured("llama"))
    step, decode = module.functions["step"], module.functions["step_decode"]
    assert [p.name for p in decode.params] == [p.name for p in step.params]
    assert [str(p.type) for p in decode.params][:5] == ["i64[1]", "i64[1]", "i32[1]", "i32[1, 8]", "i64[1]"]
    assert not any(v.type.symbols for n in decode.nodes for v in n.outputs)
    def compute(fn):  # one token makes some permutes plain reshapes
        return collections.Counter(n.op for n in fn.nodes if n.op not in ("permute", "reshape"))

    assert compute(decode) == compute(step)
    assert sum(n.op == "permute" for n in decode.nodes) < sum(n.op == "permute" for n in step.nodes)
    # the same logits for the decode step of each of three sequences after their prompts
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, size=n) for n in (5, 2, 9)]
    pools = empty_pools(module)
    for slot, prompt in enumerate(prompts):
        _, pools = run_step(module, pools, [(slot, prompt[:-1], 0)])
    for slot, prompt in enumerate(prompts):
        chunk = [(slot, prompt[-1:], len(prompt) - 1)]
        got, _ = run_step(module, dict(pools), chunk, function="step_decode")
        want, _ = run_step(module, dict(pools), chunk)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_smollm2_fusions_and_kv_bytes():
    module = optimized(smollm2_captured(), PassOptions(max_seq_len=64, max_num_seqs=1, page_size=16,
                                                       activation_seq_len=16))
    step = module.functions["step"]
    attentions = [n for n in step.nodes if n.op == "paged_attention"]
    assert len(attentions) == 30
    assert {(n.attrs["num_heads"], n.attrs["num_kv_heads"], n.inputs[1].type.shape[3]) for n in attentions} == \
        {(9, 3, 64)}
    ops = collections.Counter(n.op for n in step.nodes)
    assert ops["rms_norm"] + ops["add_rms_norm"] == 61
    assert ops["gated_mlp"] == 30
    assert module.metadata["kv_cache"]["bytes_per_token"] == 46080
    half = optimized(smollm2_captured(), PassOptions(max_seq_len=64, max_num_seqs=1, kv_cache_dtype="f16",
                                                     activation_seq_len=16))
    assert half.metadata["kv_cache"]["bytes_per_token"] == 23040


def test_smollm2_prefill_and_decode_match_torch_eager():
    import torch

    module = optimized(smollm2_captured(), PassOptions(max_seq_len=64, max_num_seqs=1, activation_seq_len=16))
    tokens = np.array([1, 9690, 28, 314, 5248, 253, 1345, 30, 2, 1014], dtype=np.int64)
    with torch.no_grad():
        ref = smollm2_source().model(torch.as_tensor(tokens[None])).numpy()[0]
    (got,) = generate_logits(module, [tokens[:7]], [tokens[7:]])
    assert np.abs(got - ref).max() <= FP32_TOLERANCE * np.abs(ref).max()
