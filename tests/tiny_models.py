"""Tiny random-weight transformers models of each reference architecture, shared by tests.

Built with transformers' own classes (the independent reference) and cached per
process so capture and pass tests don't rebuild them.
"""

from __future__ import annotations

import functools
import re

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

# transformers draws every weight with std 0.02, which leaves 64-wide attention almost uniform (each
# row's largest weight 0.25 over 8 tokens, i.e. 1/8 plus noise): a wrong RoPE base, mask or window
# then barely moves the logits. Query and key projections 8x larger make the scores O(1) (the largest
# weight about 0.6), so positions matter. Fused q/k/v projections scale v too, which changes nothing
# that matters here.
QK_SCALE = 8.0
_QK_WEIGHTS = re.compile(r"\.(q_proj|k_proj|qkv_proj|c_attn|query_key_value|Wqkv)\.weight$")
_ROUTER_WEIGHTS = re.compile(r"mlp\.gate\.weight$")


def build_tiny_model(name: str, **overrides):
    """A fresh tiny model ``name`` (config ``overrides`` on top of the table's); the same weights for the
    same architecture, whatever the overrides that change no parameter shape (e.g. ``rope_theta``)."""
    import transformers

    cls_name, arch_overrides = TINY_ARCHS[name]
    kwargs = dict(arch_overrides) if name == "gpt2" else {**_COMMON, **arch_overrides}
    return random_model(getattr(transformers, cls_name)(**{**kwargs, **overrides}))


def random_model(config, router_scale: float = 1.0):
    """transformers' causal LM for ``config`` drawn with seed 0 (eval mode), its query and key projections
    :data:`QK_SCALE` times wider and its MoE routers (``mlp.gate``) ``router_scale`` times wider."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if _QK_WEIGHTS.search(param_name):
                param.mul_(QK_SCALE)
            elif router_scale != 1.0 and _ROUTER_WEIGHTS.search(param_name):
                param.mul_(router_scale)
    return model


@functools.lru_cache(maxsize=None)
def tiny_model(name: str):
    return build_tiny_model(name)


@functools.lru_cache(maxsize=None)
def captured(name: str):
    from kiln.frontend.capture import capture

    return capture(tiny_model(name), max_seq=128)


# fp32 end to end: kiln's engines and its interpreter differ from transformers by at most 1.2e-6 of the
# largest logit on these models (measured over every architecture, both backends; float32's epsilon is
# 1.2e-7, and the two sum in different orders). 1e-5 leaves room for that and nothing more: doubling the RoPE base moves the logits
# by 6e-2 with the same argmax (tests/test_tvm_e2e.py shows the check refusing it).
FP32_TOLERANCE = 1e-5


def reference_logits(name: str, ids):
    import torch

    with torch.no_grad():
        return tiny_model(name)(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()


def assert_forward_matches(module, name: str, ids) -> None:
    """The interpreter on ``module``'s forward gives transformers' logits for ``ids`` within
    :data:`FP32_TOLERANCE` times the largest logit."""
    import numpy as np

    from kiln.ir.interpreter import run_function

    ref = reference_logits(name, ids)
    (out,) = run_function(module, "forward", [ids])
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max())
    assert err <= FP32_TOLERANCE * float(np.abs(ref).max()), f"{name} {tuple(np.shape(ids))}: max error {err}"


ENGINE_PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


def relative_error(got, want) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_engine_matches_transformers(engine, name: str, prompt=ENGINE_PROMPT, new_tokens: int = 12,
                                       tolerance: float = FP32_TOLERANCE, model=None) -> None:
    """A compiled engine of tiny model ``name`` vs transformers (``model``, default the tiny model itself):
    the prefill's logits and every decode step's logits within ``tolerance`` of the largest reference
    logit, and greedy tokens identical."""
    import torch

    model = tiny_model(name) if model is None else model
    with torch.no_grad():
        prefill_ref = model(torch.as_tensor([list(prompt)])).logits[0].numpy()
    error = relative_error(engine.logits(prompt), prefill_ref)
    assert error <= tolerance, f"{name}: prefill logits differ by {error:.2e} of the largest"
    res = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        hf = model.generate(torch.as_tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        ref = model(torch.as_tensor([list(prompt) + res.token_ids[:-1]])).logits[0].numpy()
    error = relative_error(res.logits, ref[len(prompt) - 1:])
    assert error <= tolerance, f"{name}: decode logits differ by {error:.2e} of the largest"
    assert res.token_ids == hf


def _int8_rows(w):
    """Round-to-nearest int8, one scale per row (max |w| / 127), dequantized."""
    import torch

    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale  # torch.round: half to even, like rint


def _int4_groups_with_offsets(w, group: int = 32):
    """int4 in groups of ``group`` along a row: offset = the group's minimum, scale = (max - min) / 15, both
    stored as f16 and the nibbles computed against the stored values; dequantized as nibble x scale + offset."""
    import torch

    rows, k = w.shape
    g = w.reshape(rows, k // group, group)
    offset = g.amin(dim=2, keepdim=True).half().float()
    scale = ((g.amax(dim=2, keepdim=True) - offset) / 15).half().float()
    nibbles = torch.clamp(torch.round((g - offset) / scale), 0, 15)
    return (nibbles * scale + offset).reshape(rows, k)


@functools.lru_cache(maxsize=None)
def dequantized_tiny_llama(quantize: str):
    """The tiny Llama with the weights kiln's ``quantize`` mode ("int8" or "int4") computes with, quantized
    and dequantized here in torch from the README's description: the decoder's linear layers int8 per row or
    int4 in groups of 32 with offsets, the embedding table and the logits projection int8 per row."""
    import copy

    import torch

    model = copy.deepcopy(tiny_model("llama"))
    linear = {"int8": _int8_rows, "int4": _int4_groups_with_offsets}[quantize]
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(linear(module.weight))
        for table in (model.model.embed_tokens.weight, model.lm_head.weight):
            table.copy_(_int8_rows(table))
        moved = model(torch.as_tensor([ENGINE_PROMPT])).logits[0].numpy()
        unquantized = tiny_model("llama")(torch.as_tensor([ENGINE_PROMPT])).logits[0].numpy()
    # a comparison that could not tell the quantized model from the original would prove nothing
    assert relative_error(moved, unquantized) > 1000 * FP32_TOLERANCE, quantize
    return model


def llama_parameter_count(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                          intermediate: int, tied_embeddings: bool) -> int:
    """Parameters of a Llama-style model from its config: the embedding table (and an untied logits
    projection), per layer q/k/v/o, gate/up/down and two RMSNorm weights, and the final norm."""
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    layer = attention + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied_embeddings else 2) + layers * layer + hidden


# A word-level tokenizer for the tiny models: the specials, three chat roles, and "w6" ... "w127" (one token
# a word, joined by spaces when decoded), so text prompts, chat and EOS run without downloading anything.
TINY_WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(6, VOCAB)]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<s> assistant {% endif %}")


def save_tiny_checkpoint(directory, name: str = "llama", eos_token: str = "</s>") -> None:
    """Write tiny model ``name`` as a Hugging Face checkpoint directory with the word-level tokenizer,
    ``eos_token`` as its end-of-sequence token and :data:`TINY_CHAT_TEMPLATE`."""
    import json
    import os

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tiny_model(name).save_pretrained(directory, safe_serialization=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": eos_token, "unk_token": "<unk>",
                   "chat_template": TINY_CHAT_TEMPLATE}, f)


def transformers_tokenizer(directory):
    """transformers' own tokenizer for a directory :func:`save_tiny_checkpoint` wrote (the reference)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory))
