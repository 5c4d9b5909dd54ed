"""Execution side of the TVM backend: the compiled prefill/decode with weights and the KV cache on the device.

Imports only numpy, safetensors and the TVM runtime. The library is loaded after
the runtime checked the artifact's hashes (kiln.runtime.artifact.open_artifact).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from kiln.ir.errors import ArtifactError


class _NoTorch:
    """Import hook that hides torch: tvm_ffi imports torch eagerly when it is installed, and the
    runtime must not load it (it costs seconds and memory, and an artifact must run without it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"kiln's runtime does not load {name}")
        return None


def import_tvm():
    if "tvm" not in sys.modules:
        hook = _NoTorch()
        sys.meta_path.insert(0, hook)
        try:
            import tvm  # noqa: F401
        finally:
            sys.meta_path.remove(hook)
    return sys.modules["tvm"]


class TVMExecutor:
    def __init__(self, info, num_threads: int | None = None):
        from kiln.backends.tvm.build import configure_threads

        configure_threads(num_threads or os.cpu_count() or 1)
        tvm = import_tvm()
        from safetensors import safe_open
        from tvm import relax

        backend = info.manifest["backend_info"]
        target = info.manifest["target"]
        if target == "cpu":
            self.device = tvm.cpu()
        elif target == "cuda":
            self.device = tvm.cuda(0)
            if not self.device.exist:
                raise ArtifactError(f"{info.path}: compiled for cuda, but this machine has no CUDA GPU; "
                                    f"recompile with --target cpu")
        else:
            raise ArtifactError(f"{info.path}: unknown target {target!r}; recompile the artifact")
        lib = tvm.runtime.load_module(info.file(backend["library"]))
        self.vm = relax.VirtualMachine(lib, self.device)
        self.functions = {name: self.vm[name] for name in backend["weights"]}
        needed = sorted({n for names in backend["weights"].values() for n in names})
        widen = set(backend.get("widen_to_f32", ()))
        weights = {}
        with safe_open(info.file("weights.safetensors"), framework="numpy") as f:
            for name in needed:
                array = np.asarray(f.get_tensor(name), order="C")
                if name in widen:  # f16 block scales -> f32, exact
                    array = array.astype(np.float32)
                weights[name] = tvm.runtime.tensor(array, self.device)
        self.weights = {fn: [weights[n] for n in names] for fn, names in backend["weights"].items()}
        plan = info.manifest["kv_cache"]
        shape = (plan["num_layers"], 2, plan["num_pages"], plan["num_kv_heads"], plan["page_size"], plan["head_dim"])
        self.cache = tvm.runtime.tensor(np.zeros(shape, dtype=np.float32), self.device)
        self._tvm = tvm

    def has_function(self, name: str) -> bool:
        return name in self.functions

    def run(self, function: str, input_ids: np.ndarray, positions: np.ndarray, page_table: np.ndarray) -> np.ndarray:
        tensor = self._tvm.runtime.tensor
        out = self.functions[function](tensor(np.ascontiguousarray(input_ids, dtype=np.int64), self.device),
                                       tensor(np.ascontiguousarray(positions, dtype=np.int64), self.device),
                                       self.cache,
                                       tensor(np.ascontiguousarray(page_table, dtype=np.int32), self.device),
                                       *self.weights[function])
        self.cache = out[1]
        return out[0].numpy()


def load_executor(info, num_threads: int | None = None, **options):
    return TVMExecutor(info, num_threads=num_threads)
