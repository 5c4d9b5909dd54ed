"""Embedding models: a sentence-transformers directory (modules.json, 1_Pooling, 2_Normalize) or a plain BERT,
RoBERTa or XLM-RoBERTa checkpoint (mean pooling, as sentence-transformers treats one) -> a torch module from token
ids and a mask to one pooled vector per sentence. Nothing is unpickled and no code from the directory is
imported."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.ir.embedding import EMBED_INPUTS, POOLINGS
from kiln.ir.errors import ConfigError, ModelFormatError

# config.json model_type -> transformers' (config class, encoder class, where positions start)
ENCODERS = {
    "bert": ("BertConfig", "BertModel", "from_zero"),
    # fairseq's positions: padding_idx + 1 onwards for every token that is not padding, from the ids
    "roberta": ("RobertaConfig", "RobertaModel", "after_padding_idx"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "after_padding_idx"),
}
ENCODER_MODEL_TYPES = tuple(ENCODERS)
MODULES_FILE = "modules.json"
# sentence-transformers' module classes kiln runs, in the order a pipeline may hold them
_TRANSFORMER, _POOLING, _NORMALIZE = (f"sentence_transformers.models.{name}"
                                      for name in ("Transformer", "Pooling", "Normalize"))
# 1_Pooling/config.json's flags, each naming one pooling kiln computes
POOLING_FLAGS = dict(zip(("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                          "pooling_mode_mean_sqrt_len_tokens"), POOLINGS))
_UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How the embed entry turns hidden states into sentence vectors, and the longest input it takes."""

    pooling: str  # one of POOLINGS
    normalize: bool  # L2-normalise each vector (sentence-transformers' Normalize module)
    max_seq_len: int  # tokens per sentence after truncation (its start and end tokens included)
    hidden_size: int
    source: str  # "sentence-transformers", or a plain checkpoint's model_type (mean pooling by convention)

    def to_json(self) -> dict:
        return asdict(self)


def is_embedding_source(path) -> bool:
    """Whether ``path`` is a directory kiln compiles as an embedding model: it has modules.json, or its
    config.json names an encoder-only model type."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    directory = Path(path)
    if os.path.lexists(directory / MODULES_FILE):
        return True
    if not os.path.lexists(directory / "config.json"):
        return False
    from kiln.frontend.hf_checkpoint import _read_config

    return _read_config(directory)["model_type"] in ENCODER_MODEL_TYPES


class SentenceEmbedder(torch.nn.Module):
    """A BERT-family encoder's embeddings and layers, then pooling over the unmasked tokens and optional L2
    normalisation: ``forward(input_ids [batch, seq], attention_mask [batch, seq]) -> [batch, hidden]``.

    The mask over keys is built here (not by transformers' mask helpers) as a boolean [batch, 1, 1, seq], so
    capture sees one scaled_dot_product_attention per layer with a padding mask; token types are all 0, as a
    single sentence has them. BERT's positions are an arange; RoBERTa's and XLM-R's are left to transformers,
    which numbers the tokens that are not padding from padding_idx + 1 (texts are padded on the right, so a
    text's positions do not depend on its batch)."""

    def __init__(self, encoder: torch.nn.Module, spec: EmbeddingSpec, positions: str = "from_zero"):
        super().__init__()
        self.wrapped = encoder
        self.pooling = spec.pooling
        self.normalize = spec.normalize
        self.positions = positions

    def forward(self, input_ids, attention_mask):
        positions = None
        if self.positions == "from_zero":
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.wrapped.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids),
                                         position_ids=positions)
        keys = attention_mask.bool()[:, None, None, :]
        hidden = self.wrapped.encoder(hidden, attention_mask=keys).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """sentence-transformers' Pooling for one mode, its clamps and padding fill included: hidden [batch, seq,
    width], attention_mask [batch, seq] of 0/1."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return torch.where(mask > 0, hidden, torch.full_like(hidden, -1e9)).amax(dim=1)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return summed / (count if pooling == "mean" else count.sqrt())


@dataclass
class LoadedEmbedder:
    module: SentenceEmbedder
    spec: EmbeddingSpec
    config: dict[str, Any]  # config.json as it is
    tokenizer: Any  # kiln.frontend.tokenizer.TokenizerBundle
    vocab_size: int  # rows of the token embedding (config.json's, or transformers' default)


def load_embedding_model(path) -> LoadedEmbedder:
    """Load a sentence-transformers directory or a BERT-family checkpoint directory (see the module docstring)."""
    from kiln.frontend.hf_checkpoint import _read_json_object

    root = Path(path)
    if os.path.lexists(root / MODULES_FILE):
        model_dir, pooling, normalize = _read_modules(root, _read_modules_file(root / MODULES_FILE))
        source = "sentence-transformers"
    else:
        model_dir, pooling, normalize, source = root, "mean", False, None
    encoder, config, positions = _load_encoder(model_dir)
    source = source or config["model_type"]
    max_seq_len = encoder.config.max_position_embeddings  # transformers' default where config.json has none
    if positions == "after_padding_idx":  # rows up to padding_idx are never a text's position
        padding_idx = encoder.config.pad_token_id
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or padding_idx < 0:
            raise ConfigError(f"{model_dir / 'config.json'}: {config['model_type']} positions start after "
                              f"pad_token_id, which is {padding_idx!r}; expected a token id")
        max_seq_len -= padding_idx + 1
        if max_seq_len < 1:
            raise ConfigError(f"{model_dir / 'config.json'}: max_position_embeddings "
                              f"{encoder.config.max_position_embeddings} leaves no position after pad_token_id "
                              f"{padding_idx}, where {config['model_type']} positions start")
    st_config = model_dir / "sentence_bert_config.json"
    if os.path.lexists(st_config):
        limit = _read_json_object(st_config, "sentence_bert_config.json").get("max_seq_length", max_seq_len)
        if not _positive_int(limit):
            raise ModelFormatError(f"{st_config}: expected max_seq_length to be a positive integer, found {limit!r}")
        max_seq_len = min(limit, max_seq_len)
    if not os.path.lexists(model_dir / "tokenizer.json"):
        raise ModelFormatError(f"{model_dir}: expected a tokenizer.json (the tokenizer's vocabulary) beside the "
                               f"weights, found none")
    from kiln.frontend.tokenizer import check_tokenizer_fits, tokenizer_from_hf_dir

    tokenizer = tokenizer_from_hf_dir(model_dir)
    check_tokenizer_fits(tokenizer, encoder.config.vocab_size, str(model_dir))
    spec = EmbeddingSpec(pooling=pooling, normalize=normalize, max_seq_len=max_seq_len,
                         hidden_size=encoder.config.hidden_size, source=source)
    return LoadedEmbedder(SentenceEmbedder(encoder, spec, positions).eval(), spec, config, tokenizer,
                          encoder.config.vocab_size)


def _read_modules(root: Path, modules) -> tuple[Path, str, bool]:
    """modules.json -> (the transformer's directory, pooling, normalize). kiln runs Transformer, then Pooling,
    then optionally Normalize; any other module (Dense, a custom class) is refused by name."""
    from kiln.frontend.hf_checkpoint import _read_json_object

    where = root / MODULES_FILE
    entries = modules
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ModelFormatError(f"{where}: expected a list of module objects, found {type(entries).__name__}")
    types = [e.get("type") for e in entries]
    expected = [_TRANSFORMER, _POOLING] + ([_NORMALIZE] if len(types) == 3 else [])
    if types != expected:
        other = next((t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)), None)
        detail = f"module {other!r}, which kiln does not run" if other else f"the modules {types}"
        raise ConfigError(f"{where}: kiln compiles Transformer, Pooling and optionally Normalize, in that order; "
                          f"found {detail}")
    transformer_dir = _module_dir(root, entries[0], where)
    pooling_file = _module_dir(root, entries[1], where) / "config.json"
    if not os.path.lexists(pooling_file):
        raise ModelFormatError(f"{where}: expected the Pooling module's config at {pooling_file}, found none")
    settings = _read_json_object(pooling_file, "pooling config")
    used = [flag for flag in _UNSUPPORTED_POOLING_FLAGS if settings.get(flag)]
    chosen = [mode for flag, mode in POOLING_FLAGS.items() if settings.get(flag)]
    if used or len(chosen) != 1:
        found = ", ".join(used + chosen) or "none"
        raise ConfigError(f"{pooling_file}: kiln pools with exactly one of {', '.join(POOLING_FLAGS)}; found {found}")
    return transformer_dir, chosen[0], len(types) == 3


def _read_modules_file(file: Path):
    """modules.json: a JSON list (bounded read, one-line error when it does not parse)."""
    import json

    from kiln.ir.files import MAX_JSON_BYTES, read_text

    try:
        return json.loads(read_text(file, MODULES_FILE, MAX_JSON_BYTES))
    except (ValueError, RecursionError) as err:
        raise ModelFormatError(f"{file}: expected a JSON list of modules, found unparsable text "
                               f"({' '.join(str(err).split())[:200]})") from None


def _module_dir(root: Path, entry: dict, where: Path) -> Path:
    """A module's directory: its path must stay inside the model directory (a plain relative name or "")."""
    relative = entry.get("path", "")
    parts = Path(relative).parts if isinstance(relative, str) else None
    if parts is None or Path(relative).is_absolute() or any(part in ("..", ".") for part in parts) or "\0" in relative:
        raise ModelFormatError(f"{where}: module {entry.get('name')!r} has path {relative!r}; expected a folder "
                               f"inside {root}")
    return root.joinpath(*parts)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _load_encoder(directory: Path) -> tuple[torch.nn.Module, dict, str]:
    """transformers' BertModel, RobertaModel or XLMRobertaModel (no pooler) over the directory's safetensors, its
    config.json and where its positions start (ENCODERS); a checkpoint of a task model (``bert.`` or ``roberta.``
    prefixed, with ``cls.`` or ``lm_head.`` heads) gives its encoder."""
    import transformers

    from kiln.frontend.hf_checkpoint import _check_buffers, _open_weights, _read_config, _read_weights

    config = _read_config(directory)
    if config["model_type"] not in ENCODER_MODEL_TYPES:
        raise ConfigError(f"{directory / 'config.json'}: kiln embeds with {', '.join(ENCODER_MODEL_TYPES)} models, "
                          f"found model_type {config['model_type']!r}")
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("is_decoder"):
        raise ConfigError(f"{directory / 'config.json'}: kiln embeds with bidirectional encoders with absolute "
                          f"positions, found position_embedding_type {config.get('position_embedding_type')!r}"
                          f"{' and is_decoder' if config.get('is_decoder') else ''}")
    config_class, model_class, positions = ENCODERS[config["model_type"]]
    config_class, model_class = getattr(transformers, config_class), getattr(transformers, model_class)

    sources = _open_weights(directory)
    try:
        hf_config = config_class.from_dict({k: v for k, v in config.items() if k != "auto_map"})
        layers = hf_config.num_hidden_layers
        if isinstance(layers, int) and layers > len(sources):
            raise ModelFormatError(f"{directory / 'config.json'}: the config gives {layers} layers but the weights "
                                   f"hold only {len(sources)} tensors; the checkpoint does not match its config")
        with torch.device("meta"):
            meta = model_class(hf_config, add_pooling_layer=False)
    except ModelFormatError:
        raise
    except Exception as err:  # transformers validates configs with its own exception types
        raise ConfigError(f"{directory / 'config.json'}: transformers could not build {model_class.__name__} from "
                          f"it ({' '.join(str(err).split())[:300] or type(err).__name__}); check the config values") \
            from None
    # the pooler and the pre-training / task heads are not part of a sentence embedding
    meta._keys_to_ignore_on_load_unexpected = [r"(^|\.)pooler\.", r"^cls\.", r"^lm_head\.", r"^classifier\.",
                                               r"^qa_outputs\."]
    prefix = meta.base_model_prefix + "."
    _check_buffers(meta, sources, directory)
    tensors = _read_weights(meta, sources, directory,
                            lambda key: (key[len(prefix):] if key.startswith(prefix) else key, False))
    # _read_weights checked every tensor's name and shape; random initial weights are drawn (on a forked
    # generator, so the caller's stream is untouched) and replaced at once
    with torch.random.fork_rng(devices=[]):
        encoder = model_class(hf_config, add_pooling_layer=False)
    encoder.load_state_dict({name: tensor for name, (_, tensor) in tensors.items()}, strict=True)
    return encoder.eval().requires_grad_(False), config, positions


def capture_embedder(model: SentenceEmbedder, *, max_batch: int = 64, max_seq: int = 512):
    """``torch.export`` the embedder over dynamic batch and seq and translate it; returns a verified kiln
    module whose one function takes ``input_ids`` and ``attention_mask`` (i64 [batch, seq])."""
    from kiln.frontend.capture import _Translator
    from kiln.ir.verifier import verify_module

    length = min(11, max_seq)  # torch.export specialises sizes 0 and 1: the example stays >= 2 when it can
    example = (torch.zeros((2, length), dtype=torch.long), torch.ones((2, length), dtype=torch.long))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    with torch.no_grad():
        program = torch.export.export(model.eval(), example,
                                      dynamic_shapes={name: {0: batch, 1: seq} for name in EMBED_INPUTS})
    module = _Translator(program).run()
    module.metadata["capture"] = {"max_batch": max_batch, "max_seq": max_seq}
    verify_module(module)
    return module
