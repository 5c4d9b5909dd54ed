"""Execution side of the TVM backend: the compiled step with weights and the KV-cache pools on the device.

Imports only numpy and the TVM runtime. Every file comes through the artifact's verified accessors: the
library is loaded from a private copy whose bytes were hashed as they were written, the weights are
streamed once and their hash checked before the executor exists.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

from kiln.ir.errors import ArtifactError
from kiln.ir.kv_cache import DECODE_STEP, STEP, STEP_INPUTS, KVCacheSpec


_POOL_DTYPES = {"f32": "float32", "f16": "float16"}
_DLPACK_CPU = 1  # DLPack's kDLCPU


class _NoTorch:
    """Import hook that hides torch: tvm_ffi imports torch eagerly when it is installed, and the
    runtime must not load it (it costs seconds and memory, and an artifact must run without it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"kiln's runtime does not load {name}")
        return None


# Set to 1, a process that has not imported TVM yet loads only its runtime library when it loads an artifact
# (SmolLM2 gguf: 356 -> 248 MiB peak resident), and can then not compile. `kiln run/chat ARTIFACT` set it.
RUNTIME_ONLY_ENV = "KILN_TVM_RUNTIME_ONLY"


def import_tvm(runtime_only: bool = False):
    """TVM, imported without torch; ``runtime_only`` (when TVM is not imported yet): its runtime library alone."""
    if "tvm" not in sys.modules:
        hook = _NoTorch()
        sys.meta_path.insert(0, hook)
        saved = os.environ.get("TVM_USE_RUNTIME_LIB")
        if runtime_only:
            os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        restore = None
        try:
            if runtime_only:
                restore = _skip_unknown_type_lookups()
            import tvm  # noqa: F401
        finally:
            sys.meta_path.remove(hook)
            if restore is not None:
                restore()
            if runtime_only:
                if saved is None:
                    del os.environ["TVM_USE_RUNTIME_LIB"]
                else:
                    os.environ["TVM_USE_RUNTIME_LIB"] = saved
    return sys.modules["tvm"]


def _skip_unknown_type_lookups():
    """While TVM's Python package is imported on its runtime library alone, answer the object types that only the
    compiler library defines (137 of them, script.PrinterConfig first) with "unknown" without asking the library.

    TVM registers a Python class per C++ object type and asks tvm_ffi for each type's index; for a type the
    loaded libraries lack, tvm_ffi's C++ side throws, and its first error makes libbacktrace read the debug info
    of every loaded library: 38 MiB of resident memory held for the life of the process and 0.5 s. The library's
    own list of registered type keys answers the same question without an error. Returns the function that puts
    tvm_ffi's lookup back (None when this tvm_ffi lacks either piece: the import then runs as it would)."""
    try:
        import tvm_ffi
        from tvm_ffi import core
    except ImportError:
        return None
    lookup = getattr(core, "_object_type_key_to_index", None)
    if lookup is None or tvm_ffi.get_global_func("ffi.GetRegisteredTypeKeys", allow_missing=True) is None:
        return None
    known: set = set()

    def type_key_to_index(type_key: str):
        if type_key not in known:  # types registered since the last look (the runtime library loads meanwhile)
            known.update(tvm_ffi.get_global_func("ffi.GetRegisteredTypeKeys")())
        return lookup(type_key) if type_key in known else None

    core._object_type_key_to_index = type_key_to_index

    def restore():
        core._object_type_key_to_index = lookup

    return restore


def load_library(info, tvm, library: str):
    """(device, VirtualMachine) of the artifact's compiled ``library`` on its target's device: loaded from a
    private copy of the hashed bytes; a target this machine lacks or a library TVM cannot load is one
    ArtifactError line."""
    from tvm.runtime.vm import VirtualMachine  # the runtime's own (tvm.relax needs the compiler library)

    target = info.manifest["target"]
    if target == "cpu":
        device = tvm.cpu()
    elif target == "cuda":
        device = tvm.cuda(0)
        if not device.exist:
            raise ArtifactError(f"{info.path}: compiled for cuda, but this machine has no CUDA GPU; "
                                f"recompile with --target cpu")
    else:
        raise ArtifactError(f"{info.path}: unknown target {target!r}; recompile the artifact")
    copy = info.private_copy([library], "backend_info.files.library")
    try:
        lib = tvm.runtime.load_module(copy.file(library))
    except Exception as err:  # noqa: BLE001 - TVM raises its own error types
        raise ArtifactError(f"{info.path}: cannot load {library} ({str(err).splitlines()[0][:200]}); "
                            f"recompile the artifact") from None
    finally:
        copy.close()  # the library is mapped; its file is no longer needed
    return device, VirtualMachine(lib, device)


class TVMExecutor:
    shares_pages = True
    def __init__(self, info, num_threads: int | None = None):
        from kiln.backends.tvm.build import configure_threads

        configure_threads(num_threads or os.cpu_count() or 1)
        tvm = import_tvm(runtime_only=os.environ.get(RUNTIME_ONLY_ENV) == "1")
        backend = info.manifest["backend_info"]
        functions = _check_backend_info(info)
        library = backend["files"]["library"]
        self.device, self.vm = load_library(info, tvm, library)
        missing = [name for name in functions if not _has_function(self.vm, name)]
        if missing:
            raise ArtifactError(f"{info.path}: {library} has no function {', '.join(missing)} that the manifest "
                                f"lists; recompile the artifact")
        self.functions = {name: self.vm[name] for name in functions}
        # @argmax_rows (CUDA artifacts): a greedy step copies each row's argmax from the GPU, not the row
        argmax = backend.get("argmax_function")
        if argmax is not None and not (isinstance(argmax, str) and _has_function(self.vm, argmax)):
            raise ArtifactError(f"{info.path}: manifest field backend_info.argmax_function names {argmax!r}, which "
                                f"{library} lacks; recompile the artifact")
        self._argmax = self.vm[argmax] if argmax is not None else None
        self._on_cpu = self.device.dlpack_device_type() == _DLPACK_CPU
        spec = KVCacheSpec.from_json(info.manifest["kv_cache"])
        if spec.dtype not in _POOL_DTYPES or (spec.dtype != "f32" and any(g.kind != "kv" for g in spec.groups)):
            raise ArtifactError(f"{info.path}: the TVM backend's kernels take an f32 or f16 K/V cache or an f32 latent "
                                f"cache, the manifest declares "
                                f"{spec.dtype} {'/'.join(sorted({g.kind for g in spec.groups}))}; recompile the "
                                f"artifact")
        self.pool_names = [pool.name for pool in spec.pools()]
        self.inputs = list(STEP_INPUTS) + self.pool_names
        for name, weight_names in functions.items():  # bind by name: the library's parameters, checked once
            params = _param_names(self.vm, name)
            expected = self.inputs + [_relax_name(w) for w in weight_names]
            if params != expected:
                differ = next(i for i in range(max(len(params), len(expected)))
                              if i >= len(params) or i >= len(expected) or params[i] != expected[i])
                raise ArtifactError(f"{info.path}: {library}'s @{name} takes "
                                    f"{params[differ] if differ < len(params) else 'nothing'} as parameter {differ}, "
                                    f"the manifest names {expected[differ] if differ < len(expected) else 'nothing'}; "
                                    f"recompile the artifact")
        widen = set(backend.get("widen_to_f32", ()))

        def to_device(name, array):
            if name in widen:  # f16 block scales -> f32, exact
                array = array.astype(np.float32)
            return tvm.runtime.tensor(array, self.device)

        needed = {n for names in functions.values() for n in names}
        derived = set(backend.get("derived_weights", ()))  # the kernels' own layouts (e.g. repacked for VNNI)
        weights = info.load_safetensors(backend["files"]["weights"], to_device, wanted=needed - derived,
                                        field="backend_info.files.weights")
        if needed & derived:
            weights.update(info.load_safetensors(backend["files"]["derived_weights"], to_device,
                                                 wanted=needed & derived, field="backend_info.files.derived_weights"))
        self.weights = {fn: [weights[n] for n in names] for fn, names in functions.items()}
        self.pools = {}
        try:
            for pool in spec.pools():
                # Left unwritten: the kernels read only the slots of tokens they wrote, so the memory of a page
                # is touched (and resident) once a token lands in it, not at load.
                self.pools[pool.name] = tvm.runtime.empty(pool.shape, _POOL_DTYPES[spec.dtype], self.device)
        except MemoryError:
            raise ArtifactError(f"{info.path}: cannot allocate the KV cache of {spec.total_bytes:,} bytes; "
                                f"recompile with a smaller --max-num-seqs, --max-seq-len or --kv-cache-budget") \
                from None
        self._tvm = tvm

    def has_function(self, name: str) -> bool:
        return name in self.functions

    def end_sequence(self, first_page: int) -> None:
        """Nothing to do: the paged cache needs no per-sequence state beyond the engine's page table."""

    def close(self) -> None:
        """Nothing to release early: the library's file was removed once it was loaded."""

    @property
    def computes_argmax(self) -> bool:
        """Whether ``step(..., want="argmax")`` takes each row's argmax on the device."""
        return self._argmax is not None

    def step(self, function: str, inputs: dict, want: str = "logits"):
        """Run one step. ``want="logits"``: the logits [rows, vocab] as numpy. ``want="argmax"``: (each row's
        argmax as int64 [rows], the logit there [rows]), numpy's argmax (the lowest index among ties), taken on
        the device by @argmax_rows, so only those two numbers per row are copied to the host."""
        tensor = self._tvm.runtime.tensor
        args = [tensor(np.ascontiguousarray(inputs[name], dtype=_INPUT_DTYPES[name]), self.device)
                for name in STEP_INPUTS]
        out = self.functions[function](*args, *(self.pools[name] for name in self.pool_names),
                                       *self.weights[function])
        for index, name in enumerate(self.pool_names):
            self.pools[name] = out[1 + index]
        if want == "logits":
            return self._to_host(out[0])
        assert want == "argmax" and self._argmax is not None, f"step(want={want!r}) on {function}"
        ids, values = self._argmax(out[0])
        return self._to_host(ids).astype(np.int64), self._to_host(values)

    def _to_host(self, tensor) -> np.ndarray:
        """A result as numpy: on the CPU a view of TVM's tensor (which the view keeps alive; 0.4 us where
        Tensor.numpy() copies in 4.5 us), from a GPU a copy."""
        return np.from_dlpack(tensor) if self._on_cpu else tensor.numpy()


_INPUT_DTYPES = {"token_ids": np.int64, "positions": np.int64, "token_seq": np.int32, "page_table": np.int32,
                 "logit_rows": np.int64}


def _check_backend_info(info) -> dict:
    """backend_info's fields this executor reads: {function: [weight names]} with step, the library and
    weights files, and the names of the f16 scales to widen."""
    backend = info.manifest["backend_info"]
    functions = backend.get("weights")
    if not (isinstance(functions, dict) and STEP in functions and set(functions) <= {STEP, DECODE_STEP}
            and all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in functions.values())):
        raise ArtifactError(f"{info.path}: manifest field backend_info.weights must map {STEP} (and {DECODE_STEP}) "
                            f"to lists of weight names; recompile the artifact")
    widen = backend.get("widen_to_f32", [])
    if not (isinstance(widen, list) and all(isinstance(n, str) for n in widen)):
        raise ArtifactError(f"{info.path}: manifest field backend_info.widen_to_f32 must be a list of weight names; "
                            f"recompile the artifact")
    for role in ("library", "weights"):
        info.entry(backend["files"].get(role), f"backend_info.files.{role}")
    derived = backend.get("derived_weights", [])
    if not (isinstance(derived, list) and all(isinstance(n, str) for n in derived)):
        raise ArtifactError(f"{info.path}: manifest field backend_info.derived_weights must be a list of weight "
                            f"names; recompile the artifact")
    if derived:
        info.entry(backend["files"].get("derived_weights"), "backend_info.files.derived_weights")
    return functions


def _param_names(vm, name: str) -> list:
    return [vm._get_function_param_name(name, i) for i in range(vm._get_function_arity(name))]


def _relax_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "v"  # as backends/tvm/lower.py names a weight's parameter


def _has_function(vm, name: str) -> bool:
    try:
        vm[name]
    except Exception:  # noqa: BLE001 - TVM raises its own error for an unknown function
        return False
    return True


def load_executor(info, num_threads: int | None = None):
    return TVMExecutor(info, num_threads=num_threads)
