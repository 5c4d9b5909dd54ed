"""Running an embedding artifact: texts -> the tokenizer's ids (WordPiece, byte-level BPE or Unigram, from
tokenizer.json) truncated at the model's length -> padded batches -> the backend's ``@embed`` -> one vector per
text. :class:`EmbeddingEngine` is what :func:`kiln.load` gives for such an artifact; its generation methods refuse
in one line. Imports numpy, tokenizers and the backend only."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kiln.ir.embedding import EMBED, EMBED_INPUTS, POOLINGS
from kiln.ir.errors import ArtifactError, ConfigError

from .artifact import ArtifactInfo, open_artifact

DEFAULT_BATCH_SIZE = 32  # sentences per call of @embed (sentence-transformers' default too)
EMBEDDING_BACKENDS = ("tvm", "onnxruntime")


def is_embedding_manifest(manifest: dict) -> bool:
    return isinstance(manifest, dict) and manifest.get("embedding") is not None


def check_embedding_manifest(manifest: dict, fail) -> None:
    """The fields an embedding artifact adds (and the tokenizer it needs), each failure one line through
    ``fail(field, expected, found)``."""
    spec = manifest.get("embedding")
    if not isinstance(spec, dict):
        raise fail("embedding", "an object", spec)
    if spec.get("function") != EMBED or spec.get("inputs") != list(EMBED_INPUTS):
        raise fail("embedding", f"function {EMBED} with inputs {', '.join(EMBED_INPUTS)}",
                   {k: spec.get(k) for k in ("function", "inputs")})
    if spec.get("pooling") not in POOLINGS:
        raise fail("embedding.pooling", f"one of {', '.join(POOLINGS)}", spec.get("pooling"))
    if not isinstance(spec.get("normalize"), bool):
        raise fail("embedding.normalize", "true or false", spec.get("normalize"))
    for field in ("max_seq_len", "hidden_size"):
        value = spec.get(field)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise fail(f"embedding.{field}", "a positive integer", value)
    if manifest.get("backend") not in EMBEDDING_BACKENDS:
        raise fail("backend", f"one of {', '.join(EMBEDDING_BACKENDS)} for an embedding model", manifest.get("backend"))
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("file"), str):
        raise fail("tokenizer", "an object naming the tokenizer file (an embedding model encodes text)", tokenizer)


def load_embedding_executor(info: ArtifactInfo, **options):
    """The execution side of the artifact's backend for ``@embed``; ``options`` are the backend's own, each
    name checked by kiln.backends."""
    from kiln.backends import load_embedding_executor as load

    return load(info, EMBED, list(EMBED_INPUTS), **options)


class EmbeddingEngine:
    """Runs one compiled embedding model. Build with :func:`kiln.load`."""

    def __init__(self, info: ArtifactInfo, **backend_options):
        from .engine import Tokenizer

        self.info = info
        self.manifest = info.manifest
        self.spec = dict(info.manifest["embedding"])
        self.max_seq_len = self.spec["max_seq_len"]
        self.hidden_size = self.spec["hidden_size"]
        self.vocab_size = info.manifest["model"]["vocab_size"]
        self.notices: list = []
        tok = info.manifest["tokenizer"]
        self.tokenizer = Tokenizer(info.read_text(tok["file"], "tokenizer.file"), tok)
        # tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2's: pad and cut at 128);
        # the model's length decides, and batches are padded here
        self.tokenizer.backend.no_padding()
        self.tokenizer.backend.enable_truncation(self.max_seq_len)
        self.executor = load_embedding_executor(info, **backend_options)
        self._closed = False

    @classmethod
    def from_path(cls, path: str, **options) -> "EmbeddingEngine":
        return cls(open_artifact(path), **options)

    def embed(self, texts, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Embed one text (-> float32 [hidden]) or a list of texts (-> float32 [len, hidden], in order). Texts
        longer than the model's maximum are truncated to it, as sentence-transformers does."""
        if self._closed:
            raise ConfigError("this engine was closed; load the artifact again")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        single = isinstance(texts, str)
        items = [texts] if single else texts
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"embed takes a text (str) or a non-empty list of texts, got "
                              f"{type(texts).__name__ if not isinstance(texts, (list, tuple)) else 'an empty list'}")
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise ConfigError(f"embed takes texts (str); item {index} is {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ConfigError(f"text {index} is not valid Unicode (a lone surrogate at character {err.start}); "
                                  f"pass UTF-8 text") from None
        ids = [self.tokenizer.encode(text) for text in items]
        # similar lengths share a batch, so little of each call is padding
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.hidden_size), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            out[chosen] = self._run([ids[i] for i in chosen])
        return out[0] if single else out

    def _run(self, batch: Sequence[list]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        token_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            if not ids or max(ids) >= self.vocab_size or min(ids) < 0:
                raise ArtifactError(f"{self.info.path}: the tokenizer gave ids outside the model's vocabulary of "
                                    f"{self.vocab_size}; the artifact's tokenizer does not match its model")
            token_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        vectors = self.executor.embed([token_ids, mask])
        if vectors.shape != (len(batch), self.hidden_size):
            raise ArtifactError(f"{self.info.path}: @{EMBED} returned shape {vectors.shape}, the manifest says "
                                f"[{len(batch)}, {self.hidden_size}]; recompile the artifact")
        return vectors

    def _not_generative(self, *args, **kwargs):
        raise ConfigError(f"this artifact is an embedding model ({self.manifest['model'].get('name')}, "
                          f"{self.spec['pooling']} pooling): it has no next-token logits to generate from; use "
                          f"embed()")

    generate = stream = submit = chat = logits = chat_prompt = _not_generative

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.close()

    def __enter__(self) -> "EmbeddingEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
