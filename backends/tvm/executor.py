"""Execution side of the TVM backend: the compiled prefill/decode with weights and the KV cache on the device.

Imports only numpy and the TVM runtime. Every file comes through the artifact's verified accessors: the
library is loaded from a private copy whose bytes were hashed as they were written, the weights are
streamed once and their hash checked before the executor exists.
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
        from tvm import relax

        backend = info.manifest["backend_info"]
        functions = _check_backend_info(info)
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
        library = backend["files"]["library"]
        copy = info.private_copy([library], "backend_info.files.library")
        try:
            lib = tvm.runtime.load_module(copy.file(library))
        except Exception as err:  # noqa: BLE001 - TVM raises its own error types
            raise ArtifactError(f"{info.path}: cannot load {library} ({str(err).splitlines()[0][:200]}); "
                                f"recompile the artifact") from None
        finally:
            copy.close()  # the library is mapped; its file is no longer needed
        self.vm = relax.VirtualMachine(lib, self.device)
        missing = [name for name in functions if not _has_function(self.vm, name)]
        if missing:
            raise ArtifactError(f"{info.path}: {library} has no function {', '.join(missing)} that the manifest "
                                f"lists; recompile the artifact")
        self.functions = {name: self.vm[name] for name in functions}
        widen = set(backend.get("widen_to_f32", ()))

        def to_device(name, array):
            if name in widen:  # f16 block scales -> f32, exact
                array = array.astype(np.float32)
            return tvm.runtime.tensor(array, self.device)

        needed = {n for names in functions.values() for n in names}
        weights = info.load_safetensors(backend["files"]["weights"], to_device, wanted=needed,
                                        field="backend_info.files.weights")
        self.weights = {fn: [weights[n] for n in names] for fn, names in functions.items()}
        plan = info.manifest["kv_cache"]
        shape = (plan["num_layers"], 2, plan["num_pages"], plan["num_kv_heads"], plan["page_size"], plan["head_dim"])
        try:
            self.cache = tvm.runtime.tensor(np.zeros(shape, dtype=np.float32), self.device)
        except MemoryError:
            raise ArtifactError(f"{info.path}: cannot allocate the KV cache of {plan['total_bytes']:,} bytes; "
                                f"recompile with a smaller --max-num-seqs, --max-seq-len or --kv-cache-budget") \
                from None
        self._tvm = tvm

    def has_function(self, name: str) -> bool:
        return name in self.functions

    def end_sequence(self, first_page: int) -> None:
        """Nothing to do: the paged cache needs no per-sequence state beyond the engine's page table."""

    def close(self) -> None:
        """Nothing to release early: the library's file was removed once it was loaded."""

    def run(self, function: str, input_ids: np.ndarray, positions: np.ndarray, page_table: np.ndarray) -> np.ndarray:
        tensor = self._tvm.runtime.tensor
        out = self.functions[function](tensor(np.ascontiguousarray(input_ids, dtype=np.int64), self.device),
                                       tensor(np.ascontiguousarray(positions, dtype=np.int64), self.device),
                                       self.cache,
                                       tensor(np.ascontiguousarray(page_table, dtype=np.int32), self.device),
                                       *self.weights[function])
        self.cache = out[1]
        return out[0].numpy()


def _check_backend_info(info) -> dict:
    """backend_info's fields this executor reads: {function: [weight names]} with prefill and decode, the
    library and weights files, and the names of the f16 scales to widen."""
    backend = info.manifest["backend_info"]
    functions = backend.get("weights")
    if not (isinstance(functions, dict) and {"prefill", "decode"} <= set(functions)
            and all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in functions.values())):
        raise ArtifactError(f"{info.path}: manifest field backend_info.weights must map prefill, decode (and "
                            f"prefill_last) to lists of weight names; recompile the artifact")
    widen = backend.get("widen_to_f32", [])
    if not (isinstance(widen, list) and all(isinstance(n, str) for n in widen)):
        raise ArtifactError(f"{info.path}: manifest field backend_info.widen_to_f32 must be a list of weight names; "
                            f"recompile the artifact")
    for role in ("library", "weights"):
        info.entry(backend["files"].get(role), f"backend_info.files.{role}")
    return functions


def _has_function(vm, name: str) -> bool:
    try:
        vm[name]
    except Exception:  # noqa: BLE001 - TVM raises its own error for an unknown function
        return False
    return True


def load_executor(info, num_threads: int | None = None):
    return TVMExecutor(info, num_threads=num_threads)
