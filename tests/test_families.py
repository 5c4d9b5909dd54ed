"""Every model family of the README's table against transformers, on both backends: a tiny random-weight model
with deliberately odd sizes (vocabulary 131, head size 12, three query heads per KV head where the family has
grouped KV heads, an intermediate width of 100) compiles, and its prefill logits and every decode step's logits
are within 1e-5 of transformers' relative to the largest logit (fp32), with identical greedy tokens.

The families whose paths other tests do not already cover run by default (interleaved rotary: GPT-J, Cohere); the
rest are marked slow (`python -m pytest -m slow tests/test_families.py`, about ten minutes on two cores).
"""

from __future__ import annotations

import functools

import pytest

import kiln

from tiny_models import assert_engine_matches_transformers, random_model

VOCAB = 131
_DECODER = dict(vocab_size=VOCAB, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128)
_HEAD = dict(head_dim=12)

# family -> (transformers config class, config keywords)
FAMILIES = {
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", {**_DECODER, "sliding_window": 5}),
    "mixtral": ("MixtralConfig", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen2_moe": ("Qwen2MoeConfig", {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 36, "shared_expert_intermediate_size": 52}),
    "qwen3": ("Qwen3Config", {**_DECODER, **_HEAD}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_DECODER, **_HEAD, "num_experts": 5, "num_experts_per_tok": 3,
                                     "moe_intermediate_size": 24}),
    "gemma": ("GemmaConfig", {**_DECODER, **_HEAD}),
    "gemma2": ("Gemma2Config", {**_DECODER, **_HEAD, "sliding_window": 5}),
    "gemma3_text": ("Gemma3TextConfig", {**_DECODER, **_HEAD, "sliding_window": 5}),
    "phi": ("PhiConfig", {**_DECODER, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", {**_DECODER, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=72, n_layer=2, n_head=6, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", {**_DECODER, "rotary_pct": 0.5}),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=72, n_layer=2, n_head=6, n_positions=128, rotary_dim=6)),
    "falcon": ("FalconConfig", {**_DECODER, "new_decoder_architecture": False, "multi_query": True}),
    "falcon_new_decoder": ("FalconConfig", {**_DECODER, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=72, n_layer=2, n_head=6)),
    "mpt": ("MptConfig", dict(vocab_size=VOCAB, d_model=72, n_layers=2, n_heads=6, max_seq_len=128)),
    "stablelm": ("StableLmConfig", {**_DECODER, "partial_rotary_factor": 0.5}),
    "starcoder2": ("Starcoder2Config", _DECODER),
    "olmo": ("OlmoConfig", _DECODER),
    "olmo2": ("Olmo2Config", _DECODER),
    "granite": ("GraniteConfig", _DECODER),
    "cohere": ("CohereConfig", _DECODER),
}
DEFAULT_FAMILIES = ("gptj", "cohere")
# Routers drawn with std 0.02 leave experts' probabilities within 1e-4 of each other, where a 1e-7 difference in
# the logits flips the choice; 4x wider routers keep every choice clear (as tests/test_moe.py measures).
ROUTER_SCALE = 4.0


@functools.lru_cache(maxsize=None)
def family_model(family: str):
    import transformers

    cls_name, kwargs = FAMILIES[family]
    return random_model(getattr(transformers, cls_name)(**kwargs), router_scale=ROUTER_SCALE)


def _params(families, slow: bool):
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(family, backend, marks=marks, id=f"{family}-{backend}")
            for family in families for backend in ("tvm", "onnxruntime")]


@pytest.mark.parametrize("family,backend", _params(DEFAULT_FAMILIES, slow=False)
                         + _params(sorted(set(FAMILIES) - set(DEFAULT_FAMILIES)), slow=True))
def test_family_matches_transformers(tmp_path, family, backend):
    model = family_model(family)
    engine = kiln.load(kiln.compile(model, backend=backend, max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, family, model=model)
