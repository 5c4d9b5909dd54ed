"""Tiny random-weight transformers models of each reference architecture, shared by tests.

Built with transformers' own classes (the independent reference) and cached per
process so capture and pass tests don't rebuild them.
"""

from __future__ import annotations

import functools

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# name -> (transformers config class, overrides)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", {}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": VOCAB}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25}),
}

PROMPT_SHAPES = [(1, 1), (2, 7), (1, 13)]


@functools.lru_cache(maxsize=None)
def tiny_model(name: str):
    import torch
    import transformers

    cls_name, overrides = TINY_ARCHS[name]
    kwargs = dict(overrides) if name == "gpt2" else {**_COMMON, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


@functools.lru_cache(maxsize=None)
def captured(name: str):
    from kiln.frontend.capture import capture

    return capture(tiny_model(name), max_seq=128)


def reference_logits(name: str, ids):
    import torch

    with torch.no_grad():
        return tiny_model(name)(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()


def assert_forward_matches(module, name: str, ids, tolerance: float = 1e-4) -> None:
    """The interpreter on ``module``'s forward gives transformers' logits for ``ids`` within
    ``tolerance`` times the largest logit."""
    import numpy as np

    from kiln.ir.interpreter import run_function

    ref = reference_logits(name, ids)
    (out,) = run_function(module, "forward", [ids])
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max())
    assert err <= tolerance * float(np.abs(ref).max()), f"{name} {tuple(np.shape(ids))}: max error {err}"


ENGINE_PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


def assert_engine_matches_transformers(engine, name: str, prompt=ENGINE_PROMPT, new_tokens: int = 12,
                                       tolerance: float = 1e-3) -> None:
    """A compiled engine of tiny model ``name`` vs transformers: greedy tokens identical, every decode step's
    logits and the prefill's logits within ``tolerance`` of the largest reference logit."""
    import numpy as np
    import torch

    model = tiny_model(name)
    res = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        hf = model.generate(torch.as_tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        ref = model(torch.as_tensor([list(prompt) + res.token_ids[:-1]])).logits[0].numpy()
    assert res.token_ids == hf

    def relative(got, want):
        return float(np.abs(got - want).max() / np.abs(want).max())

    assert relative(res.logits, ref[len(prompt) - 1:]) <= tolerance
    assert relative(engine.logits(prompt), ref[:len(prompt)]) <= tolerance
