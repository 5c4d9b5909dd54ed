"""Execution side of the ONNX Runtime backend for embedding models: one InferenceSession over embed.onnx.

ONNX Runtime opens the model and its external data by path: it reads a private copy whose bytes were hashed
as they were written, removed by ``close()``.
"""

from __future__ import annotations

import os

import numpy as np

from kiln.ir.errors import ArtifactError


class ORTEmbeddingExecutor:
    def __init__(self, info, function: str, inputs: list, num_threads: int | None = None, provider: str | None = None):
        import onnxruntime as ort

        backend = info.manifest["backend_info"]
        target = info.manifest["target"]
        provider = provider or ("CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            raise ArtifactError(f"{info.path}: compiled for {target}, but this onnxruntime has no {provider}; "
                                f"install onnxruntime-gpu or recompile with --target cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # spinning idle threads halve the speed when other processes want the cores (see executor.py)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        files = backend["files"]
        self._copy = info.private_copy([files.get("model"), files.get("data")], "backend_info.files")
        try:
            self.session = ort.InferenceSession(self._copy.file(files["model"]), options, providers=[provider])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
            self._copy.close()
            raise ArtifactError(f"{info.path}: ONNX Runtime cannot load {files['model']} "
                                f"({' '.join(str(err).split())[:200]}); recompile the artifact") from None
        found = [i.name for i in self.session.get_inputs()]
        if found != list(inputs) or backend.get("inputs") != found:
            self.close()
            raise ArtifactError(f"{info.path}: {files['model']} takes the inputs {found}, the manifest names "
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
