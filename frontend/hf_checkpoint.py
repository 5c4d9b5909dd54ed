"""Load a Hugging Face checkpoint directory (config.json + safetensors) into an fp32 torch module.

Weights go through kiln's bounded safetensors reader; nothing is unpickled and no
code from the directory (auto_map, *.py) is ever imported.
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
from kiln.ir.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    from kiln.frontend.tokenizer import TokenizerBundle

# Model types whose module kiln writes itself (kiln.frontend.llama); the rest need transformers.
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2")

# config.json and the shard index are a few hundred KB even for the largest models.
MAX_JSON_BYTES = 64 * 1024 * 1024

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
    # Building a module draws random initial weights; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        if native:
            module = _build_native(directory, config)
            rename = None
        else:
            module = _build_with_transformers(directory, config, attn_implementation)
            rename = _transformers_key_renamer(module)
    module = module.float()
    _load_weights(module, sources, directory, rename)
    module.eval()
    module.requires_grad_(False)

    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        from kiln.frontend.tokenizer import tokenizer_from_hf_dir

        tokenizer = tokenizer_from_hf_dir(directory)
    return LoadedCheckpoint(module, config, tokenizer, model_type, native, directory)


def _describe_quantization(quantization: object) -> str:
    if isinstance(quantization, dict) and isinstance(quantization.get("quant_method"), str):
        return quantization["quant_method"]
    return "unknown method"


def _read_json_object(file: Path, what: str) -> dict[str, Any]:
    size = file.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelFormatError(f"{file}: expected a {what} under {MAX_JSON_BYTES} bytes, found {size} bytes")
    try:
        value = json.loads(file.read_bytes().decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as err:
        raise ModelFormatError(f"{file}: expected unique keys in the {what}, found {err.key!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelFormatError(
            f"{file}: expected a JSON {what}, found unparsable text ({str(err).splitlines()[0]}); fix or re-download it"
        ) from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{file}: expected the {what} to be a JSON object, found {type(value).__name__}")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
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
    if single.is_file():
        weights = SafetensorsFile(single)
        return {name: (weights, SINGLE_WEIGHTS) for name in weights.tensors}
    if index.is_file():
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
        if not shard_path.is_file():
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


def _build_native(directory: Path, config: dict[str, Any]) -> torch.nn.Module:
    from kiln.frontend.llama import LlamaConfig, LlamaForCausalLM

    try:
        llama_config = LlamaConfig.from_hf_dict(config)
    except ConfigError as err:
        raise ConfigError(f"{directory}: {err}") from None
    return LlamaForCausalLM(llama_config)


def _build_with_transformers(directory: Path, config: dict[str, Any], attn_implementation: str) -> torch.nn.Module:
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

    # auto_map points at code in the directory; dropping it keeps transformers from ever looking there.
    settings = {key: value for key, value in config.items() if key != "auto_map"}
    try:
        hf_config = config_class.from_dict(settings)
        # Construct the class directly, not through AutoModel, so nothing can redirect to remote code.
        module = model_class._from_config(hf_config, dtype=torch.float32, attn_implementation=attn_implementation)
    except Exception as err:
        # transformers validates configs with its own exception types; the user needs one line either way.
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ConfigError(
            f"{directory / 'config.json'}: transformers could not build {model_class_name} from it ({reason}); "
            "check the config values"
        ) from err
    return module


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


def _load_weights(
    module: torch.nn.Module,
    sources: dict[str, tuple[SafetensorsFile, str]],
    directory: Path,
    rename: Callable[[str], tuple[str, bool]] | None = None,
) -> None:
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

    with torch.no_grad():
        for names, target in groups:
            present = [checkpoint_names[name] for name in names if name in checkpoint_names]
            if not present:
                tied = f" (nor its tied aliases {names[1:]})" if len(names) > 1 else ""
                raise ModelFormatError(
                    f"{directory}: tensor {names[0]!r}{tied}: expected by {type(module).__name__} "
                    f"{tuple(target.shape)}, found in no weight file; the checkpoint is incomplete or mismatches config.json"
                )
            loaded: torch.Tensor | None = None
            for name in present:
                weights, label = sources[name]
                info = weights.tensors[name]
                if info.shape != tuple(target.shape):
                    raise ModelFormatError(
                        f"{directory / label}: tensor {name!r}: expected shape {tuple(target.shape)} from config.json, "
                        f"found {info.shape} ({info.dtype_name}); the checkpoint does not match its config"
                    )
                value = _to_torch(weights.array(name), target)
                if loaded is None:
                    loaded = value
                    target.copy_(value)
                elif not torch.equal(loaded, value):
                    # The config ties these weights but the file holds two different tensors: one would be lost.
                    raise ModelFormatError(
                        f"{directory / label}: tensor {name!r}: expected it to equal its tied alias {present[0]!r} "
                        "(config ties them, e.g. tie_word_embeddings), found different values; fix config.json"
                    )
