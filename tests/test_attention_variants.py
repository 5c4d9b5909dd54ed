"""Attention variants against transformers on both backends: BLOOM's ALiBi position biases (proven from the
graph, scores computed on [batch * heads, seq, seq] views), MPT's (the last seq columns of a precomputed table,
in bounds because the capture declares the length's range) and Gemma-2's soft-capping (attention scores
c * tanh(s / c) and the final logits likewise) with its alternating sliding-window and global layers.

Each variant is set up to matter: the tests first show transformers' outputs move by far more than the tolerance
when the biases or caps are removed, so a kernel that ignored them would fail.
"""

import functools

import numpy as np

import pytest

import kiln

from tiny_models import FP32_TOLERANCE, assert_engine_matches_transformers, random_model, relative_error

PROMPT = [5, 17, 99, 3, 42, 7, 64, 2, 11, 23]


@functools.lru_cache(maxsize=None)
def gemma2(attn_cap=1.0, final_cap=2.0):
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=4,
        attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap)
    return random_model(config)


def test_the_caps_matter_on_this_model():
    import torch

    with torch.no_grad():
        capped = gemma2()(torch.as_tensor([PROMPT])).logits[0].numpy()
        attn_only = gemma2(None, 2.0)(torch.as_tensor([PROMPT])).logits[0].numpy()
        final_only = gemma2(1.0, None)(torch.as_tensor([PROMPT])).logits[0].numpy()
    assert relative_error(attn_only, capped) > 1000 * FP32_TOLERANCE
    assert relative_error(final_only, capped) > 1000 * FP32_TOLERANCE


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_gemma2_soft_capping_matches_transformers(tmp_path, backend):
    model = gemma2()
    engine = kiln.load(kiln.compile(model, backend=backend, max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, "gemma2", prompt=PROMPT, model=model)


def test_soft_capping_is_fused_into_attention():
    from kiln.driver import optimize
    from kiln.frontend.capture import capture
    from kiln.passes import PassOptions

    module = capture(gemma2(), max_seq=48)
    optimize(module, PassOptions(max_seq_len=48))
    caps = {node.attrs["softcap"] for fn in module.functions.values() for node in fn.nodes
            if node.op == "paged_attention"}
    assert caps == {1.0}


# ALiBi ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def bloom():
    import transformers

    return random_model(transformers.BloomConfig(vocab_size=131, hidden_size=64, n_layer=2, n_head=4))


def test_the_alibi_biases_matter_on_this_model(monkeypatch):
    import torch
    from transformers.models.bloom import modeling_bloom

    with torch.no_grad():
        biased = bloom()(torch.as_tensor([PROMPT])).logits[0].numpy()
        monkeypatch.setattr(modeling_bloom, "_get_alibi_slopes", lambda heads, device: torch.zeros(heads))
        unbiased = bloom()(torch.as_tensor([PROMPT])).logits[0].numpy()
    assert relative_error(unbiased, biased) > 1000 * FP32_TOLERANCE


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_bloom_alibi_matches_transformers(tmp_path, backend):
    model = bloom()
    engine = kiln.load(kiln.compile(model, backend=backend, max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, "bloom", prompt=PROMPT, model=model)


def test_alibi_slopes_are_proven_and_fused_as_transformers_computes_them():
    """BLOOM adds its biases to [batch * heads, seq, seq] scores (baddbmm); the fused attention carries the slopes
    transformers' own _get_alibi_slopes gives."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from kiln.driver import optimize
    from kiln.frontend.capture import capture
    from kiln.passes import PassOptions

    module = capture(bloom(), max_seq=48)
    optimize(module, PassOptions(max_seq_len=48))
    slopes = {node.attrs["alibi"] for fn in module.functions.values() for node in fn.nodes
              if node.op == "paged_attention"}
    assert len(slopes) == 1
    np.testing.assert_allclose(slopes.pop(), _get_alibi_slopes(4, "cpu").numpy(), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def mpt():
    import transformers

    return random_model(transformers.MptConfig(vocab_size=131, d_model=72, n_layers=2, n_heads=6, max_seq_len=128))


def test_the_mpt_alibi_biases_matter_on_this_model(monkeypatch):
    import torch
    from transformers.models.mpt import modeling_mpt

    with torch.no_grad():
        biased = mpt()(torch.as_tensor([PROMPT])).logits[0].numpy()
        monkeypatch.setattr(modeling_mpt, "build_mpt_alibi_tensor",
                            lambda heads, length, *args, **kw: torch.zeros(heads, 1, length))
        unbiased = mpt()(torch.as_tensor([PROMPT])).logits[0].numpy()
    assert relative_error(unbiased, biased) > 1000 * FP32_TOLERANCE


def test_mpt_alibi_slopes_are_proven_and_fused_as_transformers_computes_them():
    """MPT slices the last seq columns of its 128-column table (start 128 - seq, in bounds since the capture
    declares seq <= 48) and masks with masked_fill; the fused attention carries the slopes of transformers' own
    table (six heads: the interleaved slopes of eight)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from kiln.driver import optimize
    from kiln.frontend.capture import capture
    from kiln.passes import PassOptions

    module = capture(mpt(), max_seq=48)
    assert module.symbol_ranges["seq"] == (1, 48)
    optimize(module, PassOptions(max_seq_len=48))
    slopes = {node.attrs["alibi"] for fn in module.functions.values() for node in fn.nodes
              if node.op == "paged_attention"}
    assert len(slopes) == 1
    table = build_mpt_alibi_tensor(6, 2).numpy()  # [heads, 1, 2]: slope * (-1, 0)
    np.testing.assert_allclose(slopes.pop(), table[:, 0, 1] - table[:, 0, 0], rtol=1e-6)


def test_mpt_alibi_matches_transformers_on_onnxruntime(tmp_path):
    """The default suite's end-to-end check (2 s); both backends run in tests/test_families.py under -m slow."""
    model = mpt()
    engine = kiln.load(kiln.compile(model, backend="onnxruntime", max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, "mpt", prompt=PROMPT, model=model)


def test_mpt_longer_than_its_alibi_table_is_refused_in_one_line(tmp_path):
    from kiln.ir.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        kiln.compile(mpt(), backend="onnxruntime", max_seq_len=200, output=tmp_path / "model.kiln")
    message = str(info.value)
    assert "max_seq_len 128 is the length of MPT's ALiBi table" in message and "--max-seq-len 128" in message
    assert "\n" not in message
