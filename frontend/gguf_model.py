"""Load a GGUF as a torch module, its config and tokenizer: llama and qwen2 as kiln's own LlamaForCausalLM,
the other architectures as transformers' classes (gguf_architectures). Tensors are dequantized to fp32,
renamed to transformers' names, and llama's q/k rows put back in Hugging Face order (llama.cpp's converter
interleaves them for its rope)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kiln.frontend.gguf_architectures import ARCHITECTURES, architecture_of
from kiln.frontend.gguf_architectures import load as load_with_transformers
from kiln.frontend.gguf_architectures import prequantized as prequantized_with_transformers
from kiln.frontend.gguf_file import DEQUANTIZABLE, GGUFFile
from kiln.frontend.llama import ROPE_FREQS, LlamaConfig, check_llama_tensors, llama_from_state_dict
from kiln.frontend.tokenizer import TokenizerBundle, check_tokenizer_fits, tokenizer_from_gguf
from kiln.ir.errors import ConfigError, ModelFormatError

# Built as kiln's own LlamaForCausalLM; the rest as transformers' classes. A llama file with experts is Mixtral.
NATIVE_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ARCHITECTURES = NATIVE_ARCHITECTURES + tuple(ARCHITECTURES)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Llama 3.1's rope scaling as llama.cpp stores it: per-dimension divisors of the rope frequencies.
ROPE_FREQS_TENSOR = "rope_freqs.weight"
# yarn keys llama.cpp's converter may write, with the values llama.cpp uses for a llama model whatever they say.
_YARN_DEFAULTS = {"yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_attn_factor": 1.0, "yarn_ext_factor": 1.0,
                  "yarn_log_multiplier": 0.0}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# A layer index of more than 9 digits names no real layer (and int() refuses 4300+ digits outright).
_BLOCK_PATTERN = re.compile(r"blk\.(\d{1,9})\.(.+)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """transformers' name for a llama / qwen2 GGUF tensor name, or None if kiln has no place for it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(match.group(1))}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head it stores rows (0, d/2, 1, d/2+1, ...) interleaved.

    The converter reshaped rows to [heads, 2, head_dim/2] and swapped the last two axes;
    the inverse reshapes to [heads, head_dim/2, 2] and swaps them back. Works for biases too.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def check_architecture(gguf_file: GGUFFile) -> str:
    arch = gguf_file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf_file.path}: GGUF general.architecture is {arch!r}; kiln loads only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files (use the Hugging Face checkpoint for other models)")
    return arch


def config_from_gguf(gguf_file: GGUFFile) -> LlamaConfig:
    """The model config a llama or qwen2 GGUF's metadata gives, checked for type, range and consistency
    (head counts against the width, head and rope sizes); the tensors are checked by check_gguf_tensors."""
    meta = gguf_file.metadata
    arch = check_architecture(gguf_file)
    if arch not in NATIVE_ARCHITECTURES:
        raise ModelFormatError(f"{gguf_file.path}: GGUF general.architecture {arch!r} is built by transformers, "
                               "not as kiln's LlamaForCausalLM; load it with load_gguf")

    def get(key: str, default=None, required: bool = False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ModelFormatError(f"{gguf_file.path}: GGUF metadata {full!r} is missing; expected it for a {arch} model")
            return default
        return meta[full]

    num_heads = get("attention.head_count", required=True)
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int):
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.attention.head_count_kv: expected one integer for all "
                               f"layers, found {type(num_kv_heads).__name__}")
    # qwen2 is llama with q/k/v biases; llama.cpp's rope scaling keys are read for llama files only.
    qwen2 = arch == "qwen2"
    if qwen2 and get("rope.scaling.type", "none") != "none":
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.scaling.type: expected 'none' (kiln reads rope "
                               f"scaling from llama GGUF files only), found {get('rope.scaling.type')!r}")
    rope_scaling = _rope_scaling_from_metadata(gguf_file, get)

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = get("vocab_size")
    if vocab_size is None:
        vocab_size = len(tokens) if tokens else None
    if vocab_size is None and "token_embd.weight" in gguf_file.tensors:
        vocab_size = gguf_file.tensors["token_embd.weight"].shape[0]
    try:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=get("embedding_length", required=True),
            intermediate_size=get("feed_forward_length", required=True),
            num_hidden_layers=get("block_count", required=True),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            # Without key_length the head size is the width over the heads (which must divide it).
            head_dim=get("attention.key_length"),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=get("context_length", 2048),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in gguf_file.tensors,
            attention_bias=qwen2,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            model_type=arch,
        )
    except ConfigError as err:
        raise ModelFormatError(f"{gguf_file.path}: GGUF metadata gives an unusable config: {err}") from None
    if get("attention.value_length", config.head_dim) != config.head_dim:
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.attention.value_length differs from the key head size "
                               f"{config.head_dim}; kiln expects equal q/k/v head sizes")
    rope_dims = get("rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.dimension_count: expected the head size "
                               f"{config.head_dim} (rope over whole heads), found {rope_dims}")
    if ROPE_FREQS_TENSOR in gguf_file.tensors and not qwen2:
        config = _with_rope_freqs(gguf_file, config)
    return config


def _rope_scaling_from_metadata(gguf_file: GGUFFile, get) -> dict | None:
    """kiln's rope_scaling for the file's rope.scaling.* keys as llama.cpp reads them for a llama model: none,
    linear (factor) or yarn (factor, original_context_length). yarn's other keys, which llama.cpp ignores for
    llama models while transformers would honour them, are refused unless they hold the defaults."""
    arch = gguf_file.architecture
    kind = get("rope.scaling.type", "none")
    if kind not in ("none", "linear", "yarn"):
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.scaling.type: expected 'none', 'linear' or "
                               f"'yarn', found {kind!r}; use the Hugging Face checkpoint for other rope scaling")
    attention_factor = get("rope.scaling.attn_factor", 1.0)
    if attention_factor != 1.0:
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.scaling.attn_factor: expected 1.0, found "
                               f"{attention_factor!r}; kiln does not scale llama attention by it")
    if kind == "none":
        return None
    factor = get("rope.scaling.factor")
    if factor is None:
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.scaling.factor is missing; expected it with "
                               f"rope.scaling.type {kind!r}")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    for key, default in _YARN_DEFAULTS.items():
        value = get(f"rope.scaling.{key}", default)
        if value != default:
            raise ModelFormatError(
                f"{gguf_file.path}: GGUF {arch}.rope.scaling.{key}: expected {default} (llama.cpp's value for llama "
                f"models, which ignores the key), found {value!r}; use the Hugging Face checkpoint")
    original = get("rope.scaling.original_context_length")
    if original is None:
        raise ModelFormatError(f"{gguf_file.path}: GGUF {arch}.rope.scaling.original_context_length is missing; "
                               "expected it with rope.scaling.type 'yarn'")
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}


def _with_rope_freqs(gguf_file: GGUFFile, config: LlamaConfig) -> LlamaConfig:
    """The config with the rope_freqs tensor's values as per-dimension divisors of the rope frequencies
    (llama.cpp's Llama 3.1 scaling: it divides each frequency by its entry)."""
    info = gguf_file.tensors[ROPE_FREQS_TENSOR]
    expected = (config.head_dim // 2,)
    if config.rope_scaling is not None:
        raise ModelFormatError(f"{gguf_file.path}: GGUF has both a {ROPE_FREQS_TENSOR} tensor and rope.scaling.type "
                               f"{config.rope_scaling['rope_type']!r}; kiln loads one rope scaling at a time")
    if tuple(info.shape) != expected or info.ggml_type not in _FLOAT_TYPES:
        raise ModelFormatError(f"{gguf_file.path}: GGUF tensor {ROPE_FREQS_TENSOR!r}: expected shape {list(expected)} "
                               f"(head_dim / 2) of a float type, found {list(info.shape)} of {info.ggml_type.name}")
    divisors = gguf_file.dequantize(ROPE_FREQS_TENSOR).tolist()
    try:
        return dataclasses.replace(config, rope_scaling={"rope_type": ROPE_FREQS, "divisors": divisors})
    except ConfigError as err:
        raise ModelFormatError(f"{gguf_file.path}: GGUF tensor {ROPE_FREQS_TENSOR!r} is unusable: {err}") from None


def check_gguf_tensors(gguf_file: GGUFFile, config: LlamaConfig) -> None:
    """Refuse the file unless its tensors are exactly the config's (names, count, shapes) in types kiln
    reads; runs before any tensor is dequantized or the module built."""
    shapes: dict[str, tuple[int, ...]] = {}
    sources: dict[str, str] = {}
    for name, info in gguf_file.tensors.items():
        if name == ROPE_FREQS_TENSOR and config.model_type == "llama":
            continue  # read into the config's rope scaling (config_from_gguf checks it)
        hf_name = hf_tensor_name(name)
        if hf_name is None:
            raise ModelFormatError(f"{gguf_file.path}: GGUF tensor {name!r}: expected a {config.model_type} tensor "
                                   "(token_embd, blk.N.attn_*/ffn_*, output_norm, output), found an unknown name")
        if hf_name in sources:
            raise ModelFormatError(f"{gguf_file.path}: GGUF tensors {sources[hf_name]!r} and {name!r} are the same "
                                   f"weight ({hf_name}); expected one of them")
        if info.ggml_type not in DEQUANTIZABLE:
            raise ModelFormatError(
                f"{gguf_file.path}: tensor {name!r} has ggml type {info.ggml_type.name}; kiln reads only "
                f"{', '.join(t.name for t in DEQUANTIZABLE)}; convert the model with one of those")
        sources[hf_name] = name
        shapes[hf_name] = info.shape
    check_llama_tensors(config, shapes, where=f"{gguf_file.path}: GGUF")


def _rope_heads(hf_name: str, config: LlamaConfig) -> int | None:
    """The head count whose q/k rows llama.cpp's converter interleaved (llama only; qwen2 keeps HF order)."""
    if config.model_type != "llama":
        return None
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    return config.num_key_value_heads if ".k_proj." in hf_name else None


def state_dict_from_gguf(gguf_file: GGUFFile, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """fp32 tensors under transformers' names, q/k rows in Hugging Face order (after check_gguf_tensors)."""
    tensors = {}
    for name in gguf_file.tensors:
        if name == ROPE_FREQS_TENSOR:
            continue
        hf_name = hf_tensor_name(name)
        values = gguf_file.dequantize(name)
        heads = _rope_heads(hf_name, config)
        if heads is not None:
            values = unpermute_rope_rows(values, heads)
        if not values.flags.writeable:
            values = values.copy()
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(values))
    return tensors


def _open(source: str | os.PathLike | GGUFFile) -> GGUFFile:
    return source if isinstance(source, GGUFFile) else GGUFFile(source)


def load_gguf(source: str | os.PathLike | GGUFFile) -> tuple[torch.nn.Module, Any, TokenizerBundle]:
    """Read a GGUF (a path or an open GGUFFile) into an fp32 torch module, its config and its tokenizer: kiln's
    LlamaForCausalLM and LlamaConfig for llama and qwen2, transformers' model and config for the other
    SUPPORTED_ARCHITECTURES. Metadata, tensors and tokenizer are all checked before any tensor is dequantized."""
    gguf_file = _open(source)
    check_architecture(gguf_file)
    arch = architecture_of(gguf_file)
    if arch is not None:
        tokenizer = tokenizer_from_gguf(gguf_file)
        model, config = load_with_transformers(gguf_file, arch, check_tokenizer=lambda vocab: check_tokenizer_fits(
            tokenizer, vocab, gguf_file.path))
        return model, config, tokenizer
    config = config_from_gguf(gguf_file)
    check_gguf_tensors(gguf_file, config)
    tokenizer = tokenizer_from_gguf(gguf_file)
    check_tokenizer_fits(tokenizer, config.vocab_size, gguf_file.path)
    model = llama_from_state_dict(config, state_dict_from_gguf(gguf_file, config), where=gguf_file.path)
    return model, config, tokenizer


def prequantized_from_gguf(source: str | os.PathLike | GGUFFile, config) -> dict:
    """{module weight name: QuantizedWeight} of the file's Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K tensors, as
    stored; ``config`` is what load_gguf returned for the file."""
    from .gguf_quant import prequantized_weights

    gguf_file = _open(source)
    if not isinstance(config, LlamaConfig):
        return prequantized_with_transformers(gguf_file, config)
    targets = {}
    for name in gguf_file.tensors:
        hf_name = hf_tensor_name(name)
        if hf_name is not None:
            targets[name] = ((hf_name,), _rope_heads(hf_name, config))
    # No output tensor: the logits projection is the embedding table (tied); capture may name it either way.
    if "token_embd.weight" in targets and "output.weight" not in gguf_file.tensors:
        targets["token_embd.weight"] = (("model.embed_tokens.weight", hf_tensor_name("output.weight")), None)
    return prequantized_weights(gguf_file, targets)


def transformers_llama(source):
    """transformers' own LlamaForCausalLM (eval mode) holding the weights this loader read into ``source`` (a
    ModelSource of a GGUF file): the independent reference of tests and benchmarks, and what the speed benchmark
    saves as a Hugging Face checkpoint. Needs the transformers package."""
    import transformers

    cfg = source.config
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == ROPE_FREQS:
        raise ConfigError(f"{source.name}: the GGUF's {ROPE_FREQS_TENSOR} tensor has no transformers equivalent; "
                          "compare with the model's Hugging Face checkpoint (llama3 rope scaling) instead")
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        # kiln spells linear and yarn scaling with transformers' own keys.
        rope_parameters={"rope_theta": cfg["rope_theta"], "rope_type": "default", **scaling},
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"], head_dim=cfg["head_dim"],
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(source.model.state_dict(), strict=False)
    if unexpected or not all("rotary" in m for m in missing):
        raise ModelFormatError(f"the GGUF's weights do not fit transformers' LlamaForCausalLM: missing {missing}, "
                               f"unexpected {unexpected}")
    return model
