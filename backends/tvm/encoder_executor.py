"""Execution side of the TVM backend for embedding models: ``@embed`` with its weights on the device.

Imports only numpy and the TVM runtime (never torch). The library is loaded from a private copy hashed as it
was written, and the weights are streamed with their hash checked, as for a generation artifact.
"""

from __future__ import annotations

import os

import numpy as np

from kiln.ir.errors import ArtifactError

from .executor import RUNTIME_ONLY_ENV, _has_function, _param_names, _relax_name, import_tvm, load_library


class TVMEmbeddingExecutor:
    def __init__(self, info, function: str, inputs: list, num_threads: int | None = None):
        from kiln.backends.tvm.build import configure_threads

        configure_threads(num_threads or os.cpu_count() or 1)
        tvm = import_tvm(runtime_only=os.environ.get(RUNTIME_ONLY_ENV) == "1")
        backend = info.manifest["backend_info"]
        names = backend.get("weights")
        derived = backend.get("derived_weights", [])
        if not all(isinstance(n, list) and all(isinstance(w, str) for w in n) for n in (names, derived)):
            raise ArtifactError(f"{info.path}: manifest fields backend_info.weights and derived_weights must be "
                                f"lists of weight names; recompile the artifact")
        library = backend["files"].get("library")
        self.device, self.vm = load_library(info, tvm, library)
        if not _has_function(self.vm, function):
            raise ArtifactError(f"{info.path}: {library} has no function {function}; recompile the artifact")
        expected = list(inputs) + [_relax_name(n) for n in names]
        if _param_names(self.vm, function) != expected:
            raise ArtifactError(f"{info.path}: {library}'s @{function} does not take the inputs and weights the "
                                f"manifest names; recompile the artifact")

        def to_device(name, array):
            return tvm.runtime.tensor(array, self.device)

        plain = [n for n in names if n not in derived]
        weights = info.load_safetensors(backend["files"].get("weights"), to_device, wanted=plain,
                                        field="backend_info.files.weights")
        if derived:
            weights.update(info.load_safetensors(backend["files"].get("derived_weights"), to_device,
                                                 wanted=derived, field="backend_info.files.derived_weights"))
        self.weights = [weights[n] for n in names]
        self.function = self.vm[function]
        self._tensor = tvm.runtime.tensor

    def embed(self, inputs: list) -> np.ndarray:
        """``inputs``: the entry's arrays in order (token ids and mask, i64 [batch, seq]) -> f32 [batch, hidden]."""
        args = [self._tensor(np.ascontiguousarray(a, dtype=np.int64), self.device) for a in inputs]
        return self.function(*args, *self.weights).numpy()

    def close(self) -> None:
        """Nothing to release early: the library's file was removed once it was loaded."""


def load_embedding_executor(info, function: str, inputs: list, num_threads: int | None = None):
    return TVMEmbeddingExecutor(info, function, inputs, num_threads=num_threads)
