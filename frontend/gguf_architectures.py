"""GGUF architectures kiln builds as transformers' own model classes (qwen3, qwen2moe, qwen3moe, phi3, gemma,
gemma2, gpt2, and llama files with experts: Mixtral): the config from the file's metadata, each module tensor's
GGUF name from gguf-py's tensor map, and llama.cpp's converter transforms (q/k row order, Gemma's 1 + w norms,
GPT-2's transposed Conv1D weights, stacked experts) undone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from kiln.ir.errors import ModelFormatError

from .gguf_file import DEQUANTIZABLE, GGUFFile

# Far above any released model (vocab ~262k, width ~53k, 512 experts) and low enough that nothing sized from
# them is absurd before the tensors are compared with the config.
_MAX_SIZE = 2**24
_MAX_HEAD_DIM = 4096
_MAX_EXPERTS = 4096
# A layer index of more than 9 digits names no real layer.
_LAYER = re.compile(r"\.layers\.(\d{1,9})\.|\.h\.(\d{1,9})\.")
_FUSED_EXPERTS = re.compile(r".*\.experts\.(gate_up_proj|down_proj)")


class _Keys:
    """The file's ``<arch>.*`` metadata, each value checked for type and range as it is read."""

    def __init__(self, gguf_file: GGUFFile, arch: str) -> None:
        self.file, self.arch, self.meta = gguf_file, arch, gguf_file.metadata

    def fail(self, key: str, expected: str, found: Any) -> ModelFormatError:
        return ModelFormatError(f"{self.file.path}: GGUF {self.arch}.{key}: expected {expected}, found {found!r}")

    def get(self, key: str, default: Any, required: bool) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if required:
            raise ModelFormatError(f"{self.file.path}: GGUF metadata {full!r} is missing; expected it for a "
                                   f"{self.arch} model")
        return default

    def integer(self, key: str, default: int | None = None, *, required: bool = False, minimum: int = 1,
                maximum: int = _MAX_SIZE) -> int | None:
        value = self.get(key, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(key, f"one integer in [{minimum}, {maximum:,}]", value)
        return value

    def number(self, key: str, default: float | None = None, *, required: bool = False, positive: bool = True,
               below_one: bool = False) -> float | None:
        value = self.get(key, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0) or (below_one and value >= 1):
            expected = "a finite number" + (" in (0, 1)" if below_one else " above 0" if positive else "")
            raise self.fail(key, expected, value)
        return float(value)


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture becomes a transformers model."""

    model_type: str  # transformers' model_type: its built-in config and causal-LM classes
    config: Callable[[_Keys], dict]  # the config's fields from the file's metadata
    # llama.cpp's converter interleaved q/k rows for its rope (LlamaModel.permute); the NeoX-rope
    # architectures (qwen, phi3, gemma, gpt2) keep transformers' order.
    interleaved_rope_rows: bool = False
    # Gemma's converter stores 1 + w for every RMSNorm weight (llama.cpp multiplies by the weight itself).
    norms_hold_one_plus_weight: bool = False


def _token_ids(keys: _Keys, vocab_size: int) -> dict:
    ids = {}
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        value = keys.meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= value < vocab_size:
            raise ModelFormatError(f"{keys.file.path}: GGUF tokenizer.ggml.{key}: expected a token id below the "
                                   f"vocabulary size {vocab_size}, found {value}")
        ids[field] = value
    return ids


def _vocab_size(keys: _Keys) -> int:
    """As llama.cpp sizes it: vocab_size, else the token list, else the embedding rows (checked later)."""
    size = keys.integer("vocab_size")
    if size is None:
        tokens = keys.meta.get("tokenizer.ggml.tokens")
        embedding = keys.file.tensors.get("token_embd.weight")
        size = len(tokens) if tokens else embedding.shape[0] if embedding is not None and embedding.shape else None
    if size is None or not 0 < size <= _MAX_SIZE:
        raise ModelFormatError(f"{keys.file.path}: GGUF gives no vocabulary size ({keys.arch}.vocab_size, "
                               "tokenizer.ggml.tokens or a token_embd tensor); expected one of them")
    return size


def _layers(keys: _Keys) -> int:
    layers = keys.integer("block_count", required=True, maximum=4096)
    # Every layer holds several tensors: a larger count is refused before any module is built from it.
    if layers > len(keys.file.tensors):
        raise ModelFormatError(f"{keys.file.path}: GGUF {keys.arch}.block_count gives {layers} layers but the file "
                               f"holds only {len(keys.file.tensors)} tensors; expected at least one per layer")
    return layers


def _refuse_rope_scaling(keys: _Keys) -> None:
    kind = keys.get("rope.scaling.type", "none", False)
    if kind != "none":
        raise keys.fail("rope.scaling.type", "'none' (kiln reads rope scaling from llama GGUF files only)", kind)


def _heads(keys: _Keys, hidden: int, *, partial_rope: bool = False) -> dict:
    heads = keys.integer("attention.head_count", required=True, maximum=4096)
    kv_heads = keys.meta.get(f"{keys.arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or not 0 < kv_heads <= heads \
            or heads % kv_heads:
        raise keys.fail("attention.head_count_kv", f"one integer for all layers dividing the {heads} query heads",
                        kv_heads)
    head_dim = keys.integer("attention.key_length", maximum=_MAX_HEAD_DIM)
    if head_dim is None:
        if hidden % heads:
            raise keys.fail("attention.head_count", f"a divisor of the width {hidden} (no attention.key_length "
                                                    "gives the head size)", heads)
        head_dim = hidden // heads
    if keys.integer("attention.value_length", head_dim, maximum=_MAX_HEAD_DIM) != head_dim:
        raise keys.fail("attention.value_length", f"the key head size {head_dim}",
                        keys.meta[f"{keys.arch}.attention.value_length"])
    rope_dims = keys.integer("rope.dimension_count", head_dim, maximum=_MAX_HEAD_DIM)
    fields = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    if partial_rope and rope_dims < head_dim and rope_dims % 2 == 0:
        fields["partial_rotary_factor"] = rope_dims / head_dim
    elif rope_dims != head_dim:
        raise keys.fail("rope.dimension_count", f"the head size {head_dim} (rope over whole heads)", rope_dims)
    return fields


def _decoder(keys: _Keys, *, partial_rope: bool = False) -> dict:
    """The fields every Llama-like decoder (RMSNorm, rope, gated MLP) reads."""
    _refuse_rope_scaling(keys)
    vocab_size = _vocab_size(keys)
    hidden = keys.integer("embedding_length", required=True)
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": keys.integer("feed_forward_length", required=True),
        "num_hidden_layers": _layers(keys),
        **_heads(keys, hidden, partial_rope=partial_rope),
        "max_position_embeddings": keys.integer("context_length", 2048, maximum=2**30),
        "rms_norm_eps": keys.number("attention.layer_norm_rms_epsilon", required=True, below_one=True),
        "rope_parameters": {"rope_type": "default", "rope_theta": keys.number("rope.freq_base", 10000.0)},
        "tie_word_embeddings": "output.weight" not in keys.file.tensors,
        **_token_ids(keys, vocab_size),
    }


def _experts(keys: _Keys, count_field: str) -> dict:
    experts = keys.integer("expert_count", required=True, maximum=_MAX_EXPERTS)
    return {count_field: experts,
            "num_experts_per_tok": keys.integer("expert_used_count", required=True, maximum=experts)}


def _qwen3(keys: _Keys) -> dict:
    return {**_decoder(keys), "attention_bias": "blk.0.attn_q.bias" in keys.file.tensors}


def _qwen2moe(keys: _Keys) -> dict:
    # llama.cpp runs every qwen2moe layer as MoE with a gated shared expert and unnormalised top-k weights.
    return {**_decoder(keys), **_experts(keys, "num_experts"),
            "moe_intermediate_size": keys.integer("expert_feed_forward_length", required=True),
            "shared_expert_intermediate_size": keys.integer("expert_shared_feed_forward_length", required=True),
            "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


def _qwen3moe(keys: _Keys) -> dict:
    # llama.cpp renormalises qwen3moe's top-k weights whatever the file says.
    return {**_qwen3(keys), **_experts(keys, "num_experts"),
            "moe_intermediate_size": keys.integer("expert_feed_forward_length", required=True),
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def _mixtral(keys: _Keys) -> dict:
    return {**_decoder(keys), **_experts(keys, "num_local_experts"), "sliding_window": None}


def _phi3(keys: _Keys) -> dict:
    fields = _decoder(keys, partial_rope=True)
    # llama.cpp disables Phi-3's sliding window (attention.sliding_window is read and then dropped), so the
    # file's model attends to the whole context.
    return {**fields, "sliding_window": None, "original_max_position_embeddings": fields["max_position_embeddings"]}


def _gemma(keys: _Keys) -> dict:
    return {**_decoder(keys), "hidden_act": "gelu_pytorch_tanh"}


def _gemma2(keys: _Keys) -> dict:
    fields = _decoder(keys)
    # llama.cpp scales queries by 1/sqrt(head size), except for Gemma-2 27B (46 layers): 1/sqrt(width / heads).
    if fields["num_hidden_layers"] == 46:
        scalar = fields["hidden_size"] // fields["num_attention_heads"]
    else:
        scalar = fields["head_dim"]
    # Defaults: llama.cpp's when a key is absent.
    return {**fields, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
            "attn_logit_softcapping": keys.number("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": keys.number("final_logit_softcapping", 30.0),
            "sliding_window": keys.integer("attention.sliding_window", 4096, maximum=2**30)}


def _gpt2(keys: _Keys) -> dict:
    vocab_size = _vocab_size(keys)
    hidden = keys.integer("embedding_length", required=True)
    heads = keys.integer("attention.head_count", required=True, maximum=4096)
    if hidden % heads:
        raise keys.fail("attention.head_count", f"a divisor of the width {hidden}", heads)
    return {
        "vocab_size": vocab_size, "n_embd": hidden, "n_head": heads, "n_layer": _layers(keys),
        "n_inner": keys.integer("feed_forward_length", required=True),
        "n_positions": keys.integer("context_length", required=True, maximum=2**24),
        "layer_norm_epsilon": keys.number("attention.layer_norm_epsilon", required=True, below_one=True),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in keys.file.tensors,
        **_token_ids(keys, vocab_size),
    }


ARCHITECTURES = {
    "qwen3": Architecture("qwen3", _qwen3),
    "qwen2moe": Architecture("qwen2_moe", _qwen2moe),
    "qwen3moe": Architecture("qwen3_moe", _qwen3moe),
    "phi3": Architecture("phi3", _phi3),
    "gemma": Architecture("gemma", _gemma, norms_hold_one_plus_weight=True),
    "gemma2": Architecture("gemma2", _gemma2, norms_hold_one_plus_weight=True),
    "gpt2": Architecture("gpt2", _gpt2),
}
# A llama file with experts (ffn_gate_inp, ffn_*_exps) is Mixtral: llama.cpp's converter writes it as llama.
MIXTRAL = Architecture("mixtral", _mixtral, interleaved_rope_rows=True)


def architecture_of(gguf_file: GGUFFile) -> Architecture | None:
    """The transformers architecture for the file, or None for the ones kiln builds itself (dense llama, qwen2)."""
    arch = gguf_file.architecture
    if arch == "llama":
        return MIXTRAL if f"{arch}.expert_count" in gguf_file.metadata else None
    return ARCHITECTURES.get(arch)


@dataclass(frozen=True)
class Placement:
    """One module tensor (with its tied aliases) and the GGUF tensors it is made from."""

    names: tuple[str, ...]  # the module's state-dict names, tied aliases after the first
    sources: tuple[str, ...]  # GGUF tensors; experts' gate_up is (gate, up) stacked on axis 1
    shape: tuple[int, ...]  # the module's shape
    transform: str  # "", "rope_q", "rope_k", "minus_one", "transpose", "gate_up", "reshape"

    def file_shapes(self) -> list[tuple[int, ...]]:
        """The shapes the file must hold (for "reshape", the shape without its leading 1 also fits)."""
        if self.transform == "transpose":
            return [tuple(reversed(self.shape))]
        if self.transform == "gate_up":
            experts, rows, width = self.shape
            return [(experts, rows // 2, width)]
        if self.transform == "reshape":
            return [self.shape, self.shape[1:]]
        return [self.shape]


@dataclass
class Plan:
    """What a GGUF file becomes: a transformers model class and where each of its tensors comes from."""

    model_class: type
    placements: list[Placement]


def _transformers_classes(model_type: str) -> tuple[type, type]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Only the static built-in tables: classes registered at run time may be remote code.
    return (getattr(transformers, CONFIG_MAPPING_NAMES[model_type]),
            getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))


def config_from_gguf(gguf_file: GGUFFile, arch: Architecture):
    """transformers' config for the file, from its metadata (checked for type, range and consistency)."""
    config_class, _ = _transformers_classes(arch.model_type)
    fields = arch.config(_Keys(gguf_file, gguf_file.architecture))
    try:
        return config_class(**fields)
    except Exception as err:  # transformers validates with its own exception types
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelFormatError(f"{gguf_file.path}: GGUF metadata gives an unusable {arch.model_type} config "
                               f"({reason})") from None


def plan_from_config(gguf_file: GGUFFile, arch: Architecture, config) -> Plan:
    """Where every module tensor comes from, for ``config`` (from config_from_gguf); nothing is read yet."""
    import gguf
    from transformers.pytorch_utils import Conv1D

    from .hf_checkpoint import _tensor_groups

    _, model_class = _transformers_classes(arch.model_type)
    try:
        with torch.device("meta"):
            meta = model_class._from_config(config, dtype=torch.float32, attn_implementation="eager")
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelFormatError(f"{gguf_file.path}: transformers could not build {model_class.__name__} from the "
                               f"GGUF metadata ({reason})") from None
    gguf_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[gguf_file.architecture]
    tensor_map = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    transposed = {f"{name}.weight" for name, module in meta.named_modules() if isinstance(module, Conv1D)}
    placements = []
    for names, tensor in _tensor_groups(meta):
        shape = tuple(tensor.shape)
        placement = None
        for name in names:
            placement = _place(name, names, shape, tensor_map, arch, transposed)
            if placement is not None:
                break
        if placement is None:
            raise ModelFormatError(f"{gguf_file.path}: {model_class.__name__} weight {names[0]!r} has no GGUF "
                                   f"tensor name in gguf-py's {gguf_file.architecture} map; kiln cannot load it")
        placements.append(placement)
    return Plan(model_class, placements)


def _place(name: str, names: tuple, shape: tuple, tensor_map, arch: Architecture, transposed: set) -> Placement | None:
    """The placement of module tensor ``name`` (of tied group ``names``), or None if gguf-py has no name for it."""
    names = (name, *(n for n in names if n != name))
    fused = _FUSED_EXPERTS.fullmatch(name)
    if fused:
        match = _LAYER.search(name)
        layer = match.group(1) or match.group(2)
        if fused.group(1) == "down_proj":
            return Placement(names, (f"blk.{layer}.ffn_down_exps.weight",), shape, "")
        return Placement(names, (f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"), shape,
                         "gate_up")
    base, _, suffix = name.rpartition(".")
    gguf_base = tensor_map.get_name(base)
    if gguf_base is None:
        return None
    transform = ""
    if name in transposed:
        transform = "transpose"
    elif arch.interleaved_rope_rows and gguf_base.endswith((".attn_q", ".attn_k")):
        transform = "rope_q" if gguf_base.endswith(".attn_q") else "rope_k"
    elif arch.norms_hold_one_plus_weight and name.endswith("norm.weight"):
        transform = "minus_one"
    elif len(shape) == 2 and shape[0] == 1:
        transform = "reshape"  # Qwen2-MoE's shared-expert gate [1, width]: llama.cpp reads a vector
    return Placement(names, (f"{gguf_base}.{suffix}",), shape, transform)


def check_tensors(gguf_file: GGUFFile, plan: Plan) -> None:
    """Refuse the file unless its tensors are exactly the plan's (names, shapes) in types kiln reads; runs before
    any tensor is dequantized."""
    claimed = {}
    for placement in plan.placements:
        for source in placement.sources:
            claimed[source] = placement
    for name in gguf_file.tensors:
        if name not in claimed:
            raise ModelFormatError(f"{gguf_file.path}: GGUF tensor {name!r}: expected a {gguf_file.architecture} "
                                   f"tensor of {plan.model_class.__name__} (names from gguf-py's tensor map), found "
                                   "an unknown name")
    for source, placement in claimed.items():
        info = gguf_file.tensors.get(source)
        if info is None:
            raise ModelFormatError(f"{gguf_file.path}: GGUF tensor {source!r} ({placement.names[0]}) is missing; "
                                   f"expected it for this {gguf_file.architecture} config")
        if info.shape not in placement.file_shapes():
            raise ModelFormatError(
                f"{gguf_file.path}: GGUF tensor {source!r} ({placement.names[0]}): expected shape "
                f"{list(placement.file_shapes()[0])} from the metadata, found {list(info.shape)}")
        if info.ggml_type not in DEQUANTIZABLE:
            raise ModelFormatError(
                f"{gguf_file.path}: tensor {source!r} has ggml type {info.ggml_type.name}; kiln reads only "
                f"{', '.join(t.name for t in DEQUANTIZABLE)}; convert the model with one of those")


def _values(gguf_file: GGUFFile, placement: Placement, config) -> np.ndarray:
    from .gguf_model import unpermute_rope_rows

    arrays = [gguf_file.dequantize(source) for source in placement.sources]
    values = arrays[0]
    if placement.transform == "gate_up":
        values = np.concatenate(arrays, axis=1)
    elif placement.transform == "transpose":
        values = values.T
    elif placement.transform == "rope_q":
        values = unpermute_rope_rows(values, config.num_attention_heads)
    elif placement.transform == "rope_k":
        values = unpermute_rope_rows(values, config.num_key_value_heads)
    elif placement.transform == "minus_one":
        values = values - 1  # the module adds the 1 back: 1 + (v - 1) is the stored v again (to one rounding)
    elif placement.transform == "reshape":
        values = values.reshape(placement.shape)
    return np.ascontiguousarray(values, dtype=np.float32)


def load(gguf_file: GGUFFile, arch: Architecture, check_tokenizer: Callable[[int], None]):
    """(transformers module in eval mode with fp32 weights, its config); metadata, tensors and (through
    ``check_tokenizer``, given the vocabulary size) the tokenizer are checked before anything is dequantized."""
    config = config_from_gguf(gguf_file, arch)
    plan = plan_from_config(gguf_file, arch, config)
    check_tensors(gguf_file, plan)
    check_tokenizer(config.vocab_size)
    state_dict = {}
    for placement in plan.placements:
        tensor = torch.from_numpy(_values(gguf_file, placement, config))
        for name in placement.names:
            state_dict[name] = tensor
    # Nothing here should draw random numbers; the caller's stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        module = plan.model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32,
                                                  attn_implementation="eager")
    module.eval().requires_grad_(False)
    return module, config


def prequantized(gguf_file: GGUFFile, config) -> dict:
    """{module weight name: QuantizedWeight} of the file's importable blocks: 2-D weights, and expert stacks
    (gate and up stacked as the module's gate_up_proj, with a leading experts axis). GPT-2's Conv1D weights are
    [in, out] in the module and [out, in] in the file: the blocks go under the name passes.canonicalize gives the
    [out, in] copy the linear reads, ``<name>.T``."""
    from .gguf_quant import import_expert_stack, prequantized_weights

    arch = architecture_of(gguf_file)
    heads = {"rope_q": config.num_attention_heads, "rope_k": getattr(config, "num_key_value_heads", None)}
    targets, stacks = {}, {}
    for placement in plan_from_config(gguf_file, arch, config).placements:
        if _FUSED_EXPERTS.fullmatch(placement.names[0]):
            stack = import_expert_stack(gguf_file, placement.sources)
            if stack is not None:
                stacks.update(dict.fromkeys(placement.names, stack))
            continue
        if len(placement.sources) != 1:
            continue
        if placement.transform in ("", "rope_q", "rope_k"):
            targets[placement.sources[0]] = (placement.names, heads.get(placement.transform))
        elif placement.transform == "transpose":
            targets[placement.sources[0]] = (tuple(f"{name}.T" for name in placement.names), None)
    return {**prequantized_weights(gguf_file, targets), **stacks}
