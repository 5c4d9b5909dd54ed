"""SmolLM2 (the embedded default) loaded and captured once per test process."""

from __future__ import annotations

import functools

import pytest


def _require():
    from kiln.frontend.sources import default_model_path
    from kiln.ir.errors import ConfigError

    try:
        return default_model_path()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")


@functools.lru_cache(maxsize=None)
def smollm2_source():
    _require()
    from kiln.frontend.sources import load_source

    return load_source("smollm2")


@functools.lru_cache(maxsize=None)
def smollm2_captured(max_seq: int = 256):
    from kiln.frontend.capture import capture

    return capture(smollm2_source().model, max_seq=max_seq)


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@functools.lru_cache(maxsize=None)
def transformers_smollm2():
    """transformers' own LlamaForCausalLM holding the weights kiln's GGUF loader reads (the reference)."""
    from kiln.frontend.gguf_model import transformers_llama

    return transformers_llama(smollm2_source())


def assert_prefill_logits_match_transformers(engine, tolerance: float, prompts=SMOL_PROMPTS) -> list:
    """The engine's prefill logits at every position of each prompt within ``tolerance`` of the largest of
    transformers' logits (same weights); returns the relative errors."""
    import numpy as np
    import torch

    model = transformers_smollm2()
    errors = []
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model(torch.as_tensor([ids])).logits[0].numpy().astype(np.float64)
        got = engine.logits(ids).astype(np.float64)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        errors.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
        assert errors[-1] <= tolerance, (prompt, errors[-1])
    return errors


def assert_greedy_matches_transformers(engine, prompts=SMOL_PROMPTS, new_tokens: int = 32):
    """The engine's greedy tokens equal transformers' argmax at every step; a near-tie (transformers' top
    two logits within 1e-4) may differ once, after which that prompt stops being compared."""
    import numpy as np
    import torch

    model = transformers_smollm2()
    ties = []
    for prompt in prompts:
        ids = engine.tokenizer.encode(prompt)
        res = engine.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
        with torch.no_grad():
            ref = model(torch.as_tensor([ids + res.token_ids])).logits[0].numpy()
        for step, token in enumerate(res.token_ids):
            row = ref[len(ids) - 1 + step]
            top2 = np.sort(row)[-2:]
            if token != int(np.argmax(row)):
                assert top2[1] - top2[0] <= 1e-4, (prompt, step, token, int(np.argmax(row)))
                ties.append((prompt, step))
                break
    assert len(ties) <= 1, ties
    return ties
