"""Execution side of the ONNX Runtime backend for embedding models: one InferenceSession over embed.onnx.

ONNX Runtime opens the model and its external data by path: it reads a private copy whose bytes were hashed
as they were written, removed by ``close()``.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ArtifactError

from .executor import open_session


class ORTEmbeddingExecutor:
    def __init__(self, info, function: str, inputs: list, num_threads: int | None = None, provider: str | None = None):
        backend = info.manifest["backend_info"]
        self.session, self._copy, _ = open_session(info, num_threads, provider)
        found = [i.name for i in self.session.get_inputs()]
        if found != list(inputs) or backend.get("inputs") != found:
            self.close()
            raise ArtifactError(f"{info.path}: {backend['files']['model']} takes the inputs {found}, the manifest names "
                                f"{list(inputs)}; recompile the artifact")
        self.inputs = found
        self.output = backend.get("output")

    def embed(self, inputs: list) -> np.ndarray:
        """``inputs``: the entry's arrays in order (token ids and mask, i64 [batch, seq]) -> f32 [batch, hidden]."""
        feed = {name: np.ascontiguousarray(a, dtype=np.int64) for name, a in zip(self.inputs, inputs)}
        return self.session.run([self.output], feed)[0]

    def close(self) -> None:
        self.session = None
        self._copy.close()


def load_embedding_executor(info, function: str, inputs: list, num_threads: int | None = None,
                            provider: str | None = None):
    return ORTEmbeddingExecutor(info, function, inputs, num_threads=num_threads, provider=provider)
