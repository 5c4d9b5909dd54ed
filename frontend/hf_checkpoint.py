"""Load a Hugging Face checkpoint directory (config.json + safetensors) into an fp32 torch module.

Weights go through kiln's bounded safetensors reader; nothing is unpickled and no
code from the directory (auto_map, *.py) is ever imported. The module is first built
on the meta device and every tensor's name and shape checked against it (the layer
count against the tensors first, so a huge config is never expanded); only then are
real tensors read, and random initial weights are never materialised.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from kiln.frontend.safetensors_file import SafetensorsFile, _DuplicateKey, _reject_duplicate_keys
from kiln.ir import files
from kiln.ir.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    from kiln.frontend.tokenizer import TokenizerBundle

# Model types whose module kiln writes itself (kiln.frontend.llama); the rest need transformers.
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2")

# config.json and the shard index are a few hundred KB even for the largest models.
MAX_JSON_BYTES = files.MAX_JSON_BYTES
# Buffers a module computes from its config (rotary tables, masks) may take at most this much beyond
# the size of the weights themselves before the config counts as absurd.
BUFFER_ALLOWANCE_BYTES = 64 * files.MiB

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Old Llama-family exports stored each layer's rotary table; it is recomputed from config.json now.
_ALWAYS_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready for capture: ``module`` is in eval mode with fp32 weights."""

    module: torch.nn.Module
    config: dict[str, Any]
    tokenizer: TokenizerBundle | None
    model_type: str
    native: bool
    path: Path


def load_hf_checkpoint(path: str | os.PathLike, *, attn_implementation: str = "eager") -> LoadedCheckpoint:
    """Load the checkpoint directory at ``path``.

    llama, mistral and qwen2 use kiln's own module; other model types use the
    built-in transformers class when transformers is installed
    (``attn_implementation`` applies to those only).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ModelFormatError(
            f"{directory}: expected a Hugging Face checkpoint directory (config.json + model.safetensors), "
            "found no such directory"
        )
    config = _read_config(directory)
    model_type = config["model_type"]
    if config.get("quantization_config") is not None:
        raise ConfigError(
            f"{directory / 'config.json'}: expected an unquantized checkpoint, found quantization_config "
            f"({_describe_quantization(config['quantization_config'])}); "
            "use the original fp16/bf16/fp32 weights"
        )
    # Validate every header before spending time building the module.
    sources = _open_weights(directory)

    native = model_type in NATIVE_MODEL_TYPES
    # Nothing here should draw random numbers; keep the caller's RNG stream untouched regardless.
    with torch.random.fork_rng(devices=[]):
        if native:
            module = _load_native(directory, config, sources)
        else:
            module = _load_with_transformers(directory, config, sources, attn_implementation)
    module.eval()
    module.requires_grad_(False)

    tokenizer = None
    if os.path.lexists(directory / "tokenizer.json"):
        from kiln.frontend.tokenizer import check_tokenizer_fits, tokenizer_from_hf_dir

        tokenizer = tokenizer_from_hf_dir(directory)
        vocab_size = _output_rows(module)
        if vocab_size is not None:
            check_tokenizer_fits(tokenizer, vocab_size, str(directory))
    return LoadedCheckpoint(module, config, tokenizer, model_type, native, directory)


def _describe_quantization(quantization: object) -> str:
    if isinstance(quantization, dict) and isinstance(quantization.get("quant_method"), str):
        return quantization["quant_method"]
    return "unknown method"


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    text = files.read_text(file, what, MAX_JSON_BYTES)
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as err:
        raise ModelFormatError(f"{file}: expected unique keys in the {what}, found {err.key!r} twice") from None
    except (ValueError, RecursionError) as err:
        raise ModelFormatError(
            f"{file}: expected a JSON {what}, found unparsable text ({str(err).splitlines()[0]}); fix or re-download it"
        ) from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{file}: expected the {what} to be a JSON object, found {type(value).__name__}")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not os.path.lexists(file):
        raise ModelFormatError(f"{directory}: expected a config.json in the checkpoint directory, found none")
    config = _read_json_object(file, "config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFormatError(f"{file}: expected a string 'model_type' (e.g. \"llama\"), found {model_type!r}")
    return config


def _open_weights(directory: Path) -> dict[str, tuple[SafetensorsFile, str]]:
    """Map every tensor name to (the file holding it, a label for messages)."""
    single = directory / SINGLE_WEIGHTS
    index = directory / WEIGHTS_INDEX
    # lexists: a FIFO or a link to a device under these names is refused by the reader, not skipped.
    if os.path.lexists(single):
        weights = SafetensorsFile(single)
        return {name: (weights, SINGLE_WEIGHTS) for name in weights.tensors}
    if os.path.lexists(index):
        return _open_sharded(directory, index)

    names = sorted(entry.name for entry in directory.iterdir())
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ModelFormatError(
            f"{directory}: found only pickled weights ({', '.join(pickles[:3])}) and kiln never unpickles checkpoints "
            "(unpickling can run arbitrary code); convert them to safetensors first, e.g. "
            "python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{directory}').save_pretrained('{directory}-safetensors', safe_serialization=True)\""
        )
    stray = [name for name in names if name.endswith(".safetensors")]
    if stray:
        raise ModelFormatError(
            f"{directory}: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}, found only {', '.join(stray[:3])}; "
            f"add the {WEIGHTS_INDEX} that lists which shard holds each tensor"
        )
    raise ModelFormatError(f"{directory}: expected weights in {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}, found neither")


def _is_plain_file_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and ":" not in name
        and os.path.basename(name) == name
    )


def _open_sharded(directory: Path, index: Path) -> dict[str, tuple[SafetensorsFile, str]]:
    weight_map = _read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty object" if weight_map == {} else type(weight_map).__name__
        raise ModelFormatError(f"{index}: expected a non-empty 'weight_map' object (tensor -> shard file), found {found}")
    shards: dict[str, SafetensorsFile] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ModelFormatError(f"{index}: tensor {tensor!r}: expected a shard file name, found {shard!r}")
        if shard in shards:
            continue
        # The index is data from the model's author: a name may only point at a file beside it.
        if not _is_plain_file_name(shard) or not shard.endswith(".safetensors"):
            raise ModelFormatError(
                f"{index}: tensor {tensor!r}: expected a plain *.safetensors file name inside {directory}, "
                f"found {shard!r}"
            )
        shard_path = directory / shard
        if not os.path.lexists(shard_path):
            raise ModelFormatError(
                f"{index}: tensor {tensor!r}: expected shard {shard!r} in {directory}, found no such file; "
                "the download is incomplete"
            )
        shards[shard] = SafetensorsFile(shard_path)
    sources: dict[str, tuple[SafetensorsFile, str]] = {}
    for tensor, shard in weight_map.items():
        if tensor not in shards[shard].tensors:
            raise ModelFormatError(
                f"{index}: tensor {tensor!r}: expected it in shard {shard!r} as the index says, found it missing there"
            )
        sources[tensor] = (shards[shard], shard)
    return sources


def _load_native(directory: Path, config: dict[str, Any], sources: dict[str, tuple[SafetensorsFile, str]]) -> torch.nn.Module:
    from kiln.frontend.llama import LlamaConfig, LlamaForCausalLM, check_layer_count, llama_from_state_dict

    try:
        llama_config = LlamaConfig.from_hf_dict(config)
    except ConfigError as err:
        raise ConfigError(f"{directory}: {err}") from None
    check_layer_count(llama_config, sources, str(directory / "config.json"))
    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config)
    tensors = _read_weights(meta, sources, directory)
    return llama_from_state_dict(llama_config, {name: tensor for name, (_, tensor) in tensors.items()},
                                 where=str(directory))


def _load_with_transformers(directory: Path, config: dict[str, Any], sources: dict[str, tuple[SafetensorsFile, str]],
                            attn_implementation: str) -> torch.nn.Module:
    model_type = config["model_type"]
    native_list = ", ".join(NATIVE_MODEL_TYPES)
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ConfigError(
            f"{directory}: model_type {model_type!r} is not native to kiln (native: {native_list}); "
            "`pip install transformers` lets kiln build the other built-in architectures"
        ) from None

    # Only the static built-in tables count: classes registered at run time may be remote code.
    config_class_name = CONFIG_MAPPING_NAMES.get(model_type)
    model_class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if config_class_name is None or model_class_name is None:
        custom = " and its auto_map code is never run" if "auto_map" in config else ""
        raise ConfigError(
            f"{directory}: model_type {model_type!r} is neither native to kiln (native: {native_list}) nor a built-in "
            f"transformers {transformers.__version__} causal LM{custom}; use a supported architecture"
        )
    config_class = getattr(transformers, config_class_name)
    model_class = getattr(transformers, model_class_name)
    for cls in (config_class, model_class):
        assert cls.__module__.startswith("transformers.models."), f"{cls} is not a built-in transformers class"

    def config_error(err: Exception) -> ConfigError:
        # transformers validates configs with its own exception types; the user needs one line either way.
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        return ConfigError(
            f"{directory / 'config.json'}: transformers could not build {model_class_name} from it ({reason}); "
            "check the config values"
        )

    # auto_map points at code in the directory; dropping it keeps transformers from ever looking there.
    settings = {key: value for key, value in config.items() if key != "auto_map"}
    try:
        hf_config = config_class.from_dict(settings)
    except Exception as err:
        raise config_error(err) from err
    # Each layer holds at least one tensor: a larger count is refused before the module is expanded.
    layers = getattr(hf_config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(sources):
        raise ModelFormatError(
            f"{directory / 'config.json'}: the config gives {layers} layers but the weights hold only {len(sources)} "
            "tensors; the checkpoint does not match its config")
    try:
        # Construct the class directly, not through AutoModel, so nothing can redirect to remote code.
        with torch.device("meta"):
            meta = model_class._from_config(hf_config, dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception as err:
        raise config_error(err) from err
    rename = _transformers_key_renamer(meta)
    _check_buffers(meta, sources, directory)
    tensors = _read_weights(meta, sources, directory, rename)
    # transformers loads the checked tensors itself, under their checkpoint names (it renames and ties
    # them as its own loader does) and computes the buffers; the model is built on the meta device.
    by_checkpoint_name = {checkpoint_name: tensor for checkpoint_name, tensor in tensors.values()}
    try:
        module = model_class.from_pretrained(None, config=hf_config, state_dict=by_checkpoint_name,
                                             dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception as err:
        raise config_error(err) from err
    return module


def _check_buffers(meta: torch.nn.Module, sources: dict[str, tuple[SafetensorsFile, str]], directory: Path) -> None:
    """Refuse a config whose computed buffers (not in the checkpoint) would dwarf the weights."""
    weight_bytes = sum(weights.tensors[name].nbytes for name, (weights, _) in sources.items())
    persistent = set(meta.state_dict())
    computed = [(name, buffer) for name, buffer in meta.named_buffers() if name not in persistent]
    total = sum(buffer.numel() * buffer.element_size() for _, buffer in computed)
    if total > weight_bytes + BUFFER_ALLOWANCE_BYTES:
        name, largest = max(computed, key=lambda item: item[1].numel() * item[1].element_size())
        raise ConfigError(
            f"{directory / 'config.json'}: the config asks for {total:,} bytes of computed buffers ({name} "
            f"{tuple(largest.shape)}), far more than the {weight_bytes:,} bytes of weights; check the config values")


def _tensor_groups(module: torch.nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """State-dict entries grouped by the tensor they name; tied weights share one group."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


def _ignored_unexpected(module: torch.nn.Module) -> tuple[set[str], list[re.Pattern]]:
    # Non-persistent buffers (rotary tables, causal masks) are rebuilt from config.json.
    persistent = set(module.state_dict().keys())
    buffers = {name for name, _ in module.named_buffers() if name not in persistent}
    # Built-in transformers classes list legacy tensors their own loader drops.
    patterns = [re.compile(p) for p in (getattr(module, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return buffers, patterns


def _to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if like.is_floating_point():
        return torch.from_numpy(np.array(array, dtype=np.float32))
    return torch.from_numpy(np.array(array))


def _transformers_key_renamer(module: torch.nn.Module) -> Callable[[str], tuple[str, bool]]:
    """How transformers renames checkpoint keys for ``module``: key -> (module key, needs merging).

    transformers 5 keeps older checkpoint names on disk (e.g. GPT-NeoX's ``embed_out``) and renames
    them while loading; some keys are also merged with others (stacked MoE experts), which kiln
    does not do. Older transformers have no such table, so names are taken as they are.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(module)
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    renamings = [transform for transform in transforms if not isinstance(transform, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        renamed, converter_pattern = rename_source_key(key, renamings, converters)
        return renamed, converter_pattern is not None

    return rename


def _output_rows(module: torch.nn.Module) -> int | None:
    """Rows of the logits projection (the model's vocabulary), where the module says."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else getattr(module, "lm_head", None)
    weight = getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _read_weights(
    module: torch.nn.Module,
    sources: dict[str, tuple[SafetensorsFile, str]],
    directory: Path,
    rename: Callable[[str], tuple[str, bool]] | None = None,
) -> dict[str, tuple[str, torch.Tensor]]:
    """Match the checkpoint's tensors to ``module`` (on the meta device): names, shapes, tied copies.

    Everything is checked before any tensor data is read. Returns {module name: (checkpoint name, fp32
    or integer tensor)} with one entry per tensor group (tied names share one entry, the first present).
    """
    groups = _tensor_groups(module)
    expected_names = {name for names, _ in groups for name in names}
    ignored_buffers, ignored_patterns = _ignored_unexpected(module)
    # Module key -> checkpoint key.
    checkpoint_names: dict[str, str] = {}
    for name, (_, label) in sources.items():
        module_name, needs_merge = rename(name) if rename is not None else (name, False)
        if needs_merge:
            raise ConfigError(
                f"{directory / label}: tensor {name!r}: transformers merges it with others into {module_name!r} "
                f"while loading {type(module).__name__}, which kiln does not do; this architecture is not supported"
            )
        if module_name in checkpoint_names:
            raise ModelFormatError(
                f"{directory / label}: tensor {name!r}: expected one tensor for {module_name!r}, found it and "
                f"{checkpoint_names[module_name]!r}; remove the duplicate"
            )
        if module_name in expected_names:
            checkpoint_names[module_name] = name
            continue
        if name in ignored_buffers or module_name in ignored_buffers or _ALWAYS_IGNORED.search(name):
            continue
        if any(pattern.search(name) for pattern in ignored_patterns):
            continue
        raise ModelFormatError(
            f"{directory / label}: tensor {name!r}: found in the checkpoint but {type(module).__name__} has no such "
            "weight; the checkpoint does not match config.json (model_type or sizes)"
        )

    matched: list[tuple[list[str], list[str], torch.Tensor]] = []
    for names, target in groups:
        present = [checkpoint_names[name] for name in names if name in checkpoint_names]
        if not present:
            tied = f" (nor its tied aliases {names[1:]})" if len(names) > 1 else ""
            raise ModelFormatError(
                f"{directory}: tensor {names[0]!r}{tied}: expected by {type(module).__name__} "
                f"{tuple(target.shape)}, found in no weight file; the checkpoint is incomplete or mismatches config.json"
            )
        if target.numel() == 0:
            raise ModelFormatError(
                f"{directory / 'config.json'}: tensor {names[0]!r}: the config gives it shape {tuple(target.shape)}, "
                "with no elements; check the config's sizes"
            )
        for name in present:
            weights, label = sources[name]
            info = weights.tensors[name]
            if info.shape != tuple(target.shape):
                raise ModelFormatError(
                    f"{directory / label}: tensor {name!r}: expected shape {tuple(target.shape)} from config.json, "
                    f"found {info.shape} ({info.dtype_name}); the checkpoint does not match its config"
                )
        matched.append((names, present, target))

    tensors: dict[str, tuple[str, torch.Tensor]] = {}
    for names, present, target in matched:
        loaded: torch.Tensor | None = None
        for name in present:
            weights, label = sources[name]
            value = _to_torch(weights.array(name), target)
            if loaded is None:
                loaded = value
            elif not torch.equal(loaded, value):
                # The config ties these weights but the file holds two different tensors: one would be lost.
                raise ModelFormatError(
                    f"{directory / label}: tensor {name!r}: expected it to equal its tied alias {present[0]!r} "
                    "(config ties them, e.g. tie_word_embeddings), found different values; fix config.json"
                )
        module_name = next(name for name in names if checkpoint_names.get(name) == present[0])
        tensors[module_name] = (present[0], loaded)
    return tensors
