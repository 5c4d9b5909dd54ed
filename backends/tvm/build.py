"""Compiling lowered Relax modules: the CPU and CUDA pipelines, CUDA source for an
nvcc check on machines without a GPU, and TVMFunction, one compiled entry with its
weights bound once. TVM is imported lazily so configure_threads can run first.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

import numpy as np

from kiln.ir.errors import ConfigError, KilnError

CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")


def configure_threads(num_threads: int) -> int:
    """Ask TVM's CPU thread pool for `num_threads` threads; returns the count in effect.

    The pool is sized from TVM_NUM_THREADS when it starts (unset, it used ONE thread
    on a 2-core machine), and later calls can shrink it but not grow it. So: set the
    variable, and if TVM is already loaded also reconfigure the running pool.
    """
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"expected a thread count >= 1, found {num_threads!r}")
    os.environ["TVM_NUM_THREADS"] = str(num_threads)
    if "tvm" not in sys.modules:
        return num_threads
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, num_threads)
    return int(tvm.runtime.num_threads())


# pipelines ----------------------------------------------------------------------
def _cpu_schedule_pass():
    """kiln's hand schedules for the kernels of kernels.py, when that module is present."""
    try:
        from kiln.backends.tvm import schedules
    except ImportError:  # pragma: no cover - schedules.py is written by another part of kiln
        return []
    return [schedules.apply_cpu_schedules]


# A kernel with fewer output elements than this runs on the calling thread: waking the pool costs more
# (1.2 us quiet, 7.6 us with another process running) than a norm, RoPE or residual add of a decode step does.
SERIAL_ELEMENTS = 1 << 14


def _small(sch, loops) -> bool:
    """Whether the spatial loops have fixed extents whose product is under SERIAL_ELEMENTS."""
    from tvm import tirx

    total = 1
    for loop in loops:
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return False
        total *= int(extent)
    return total < SERIAL_ELEMENTS


def _schedule_loops_cpu(func):
    """A plain CPU schedule for a PrimFunc nobody scheduled, or None if its shape is unusual.

    Per root block with loops [spatial..., reduction?]: the reduction loop moves
    outside the last spatial loop (so LLVM vectorizes that loop without reassociating
    floats) and the outer spatial loops are fused and run in parallel.
    """
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func, error_render_level="none")
    changed = False
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        iter_vars = sch.get(block).iter_vars
        if not loops or len(loops) != len(iter_vars):
            continue
        realize = sch.get(loops[-1]).body
        if not isinstance(realize, s_tir.SBlockRealize) or not all(
                value.same_as(sch.get(loop).loop_var) for value, loop in zip(realize.iter_values, loops)):
            continue
        if any(sch.get(loop).kind != tirx.ForKind.SERIAL for loop in loops):
            continue
        kinds = [iv.iter_type for iv in iter_vars]
        spatial = next((i for i, k in enumerate(kinds) if k != tirx.IterVar.DataPar), len(kinds))
        reductions = loops[spatial:]
        if any(k != tirx.IterVar.CommReduce for k in kinds[spatial:]) or spatial == 0:
            continue
        last = iter_vars[spatial - 1].var
        # Worth it only when some operand runs contiguously along the last spatial
        # axis (p @ v); a dot product along the reduction axis stays as it is.
        reorder = len(reductions) == 1 and spatial >= 2 and any(
            region.region and region.region[-1].min.same_as(last) for region in sch.get(block).reads)
        if reorder:
            sch.reorder(*loops[:spatial - 1], reductions[0], loops[spatial - 1])
        if spatial >= 2 and not _small(sch, loops[:spatial]):
            # parallel before decompose_reduction: the check wants the init inside the block
            sch.parallel(sch.fuse(*loops[:spatial - 1]) if spatial > 2 else loops[0])
            changed = True
        if reorder:
            sch.decompose_reduction(block, reductions[0])
    return sch.mod["main"] if changed else None


def _fallback_cpu_schedules():
    import tvm
    from tvm import s_tir, tirx

    @tvm.transform.module_pass(opt_level=0, name="kiln.FallbackCPUSchedules")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (
                    func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
                continue
            try:
                scheduled = _schedule_loops_cpu(func)
            except s_tir.ScheduleError:  # a shape this simple schedule does not handle
                scheduled = None
            if scheduled is not None:
                updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass


PARALLEL_SUFFIX = ":parallel"  # launches[name + this]: the launches that hand work to the thread pool


def _is_parallel(func) -> bool:
    return "T.parallel(" in func.script()  # TVM 0.27 exposes no TIR visitor to Python


def count_launches(launches: dict | None):
    """A module pass that records, per Relax function, how many kernels one call runs (its calls of PrimFuncs
    once the dataflow is lowered: each is one launch, parallel or not) into ``launches``."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="kiln.CountLaunches")
    def _count(mod, _ctx):
        if launches is not None:
            for gvar, func in mod.functions.items():
                if isinstance(func, relax.Function):
                    calls = []
                    relax.analysis.post_order_visit(func, lambda e: calls.append(e.op) if (
                        isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar)
                        and isinstance(mod[e.op], tirx.PrimFunc)) else None)
                    launches[gvar.name_hint] = len(calls)
                    launches[gvar.name_hint + PARALLEL_SUFFIX] = sum(_is_parallel(mod[op]) for op in calls)
        return mod

    return _count


def cpu_pipeline(target, launches: dict | None = None):
    """Relax -> VM for the CPU: legalize, fuse elementwise chains, schedule kiln's kernels; ``launches`` (a
    dict) receives each function's kernel launches per call."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from kiln.ir.kv_cache import DECODE_STEP

    from .launch_fusion import fuse_launches

    @tvm.transform.module_pass(opt_level=0, name="kiln.CPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            passes = (
                cpu.library_dispatch_passes(target)
                # before legalization, so matmul(x, permute_dims(w)) becomes one NT kernel
                + [relax.transform.FuseTransposeMatmul()]
                + cpu.legalize_passes(target)
                + _cpu_schedule_pass()
                # the rest: parallel outer loops (dlight's cpu rules measured slower here)
                + [_fallback_cpu_schedules()]
                + cpu.dataflow_lower_passes(target)
                # a decode step's kernels in a few thread-pool launches (launch_fusion.py); KILN_FUSE_LAUNCHES=0
                # turns it off (to compare, or to rule it out)
                + ([fuse_launches({DECODE_STEP})] if os.environ.get("KILN_FUSE_LAUNCHES", "1") != "0" else [])
                # reshapes became views above; their kernels would still go through LLVM
                + [relax.transform.DeadCodeElimination(), count_launches(launches)]
                + cpu.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def cuda_pipeline(target, launches: dict | None = None):
    """Relax -> VM for CUDA: legalize, fuse, dlight's default GPU schedules (``launches`` as for the CPU)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="kiln.CUDAPipeline")
    def _pipeline(mod, _ctx):
        with target:
            passes = (
                cuda.library_dispatch_passes(target)
                + [relax.transform.FuseTransposeMatmul(),
                   relax.transform.LegalizeOps(),
                   relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(),
                   relax.transform.FuseOps(),
                   relax.transform.FuseTIR(),
                   dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                           dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                           dl.gpu.Fallback())]
                + cuda.dataflow_lower_passes(target)
                + [relax.transform.DeadCodeElimination(), count_launches(launches)]
                + cuda.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _target(target, arch: str | None = None):
    from kiln.backends.tvm.lower import as_target

    if target == "cuda" and arch is not None:
        target = f"cuda:{arch}"
    return as_target(target)


def build(irmodule, target="cpu", num_threads: int | None = None, arch: str | None = None,
          launches: dict | None = None):
    """Compile a lowered IRModule; returns a tvm Executable (load with relax.VirtualMachine).

    target: "cpu" (LLVM for this host's CPU), "cuda" (arch defaults to sm_80), or a Target. ``launches``
    (a dict) receives the kernel launches of one call of each Relax function.
    """
    if num_threads is not None:
        configure_threads(num_threads)
    import tvm

    target = _target(target, arch)
    if target.kind.name == "llvm":
        return tvm.compile(irmodule, target, relax_pipeline=cpu_pipeline(target, launches))
    if target.kind.name == "cuda":
        # nvcc, not NVRTC (which needs the cuda-bindings package); and nvcc needs
        # the target in scope to know the architecture on a machine without a GPU.
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        with target:
            return tvm.compile(irmodule, target, relax_pipeline=cuda_pipeline(target, launches))
    raise ConfigError(f"expected a cpu or cuda target, found {target.kind.name}")


def cuda_source(irmodule, arch: str = "sm_80") -> str:
    """The CUDA C source TVM generates for `irmodule` (no GPU or driver needed)."""
    if arch not in CUDA_ARCHS:
        raise ConfigError(f"expected a CUDA arch in {', '.join(CUDA_ARCHS)}, found {arch!r}")
    executable = build(irmodule, "cuda", arch=arch)
    sources, kinds, pending = [], [], [executable.mod]
    while pending:  # the CUDA module hangs under the host (llvm) module
        mod = pending.pop()
        kinds.append(mod.kind)
        if mod.kind == "cuda":
            sources.append(mod.inspect_source("cuda"))
        pending.extend(mod.imports)
    if not sources:
        raise ConfigError(f"expected a CUDA module in the build for {arch}, found {kinds}")
    return "\n".join(sources)


def compile_cuda_source(source: str, arch: str = "sm_80") -> bytes:
    """Compile CUDA C with nvcc to a fatbin (proves the generated code compiles)."""
    import shutil

    if shutil.which("nvcc") is None:
        raise ConfigError("expected nvcc on PATH to compile CUDA source, found none; install the CUDA toolkit")
    from tvm.support import nvcc

    # nvcc asks the current target for the compute version when no GPU is present
    with _target("cuda", arch):
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))


# running ------------------------------------------------------------------------
def _contiguous(array) -> np.ndarray:
    # not np.ascontiguousarray: it turns a rank-0 array into shape (1,)
    return np.asarray(array, order="C")


class TVMFunction:
    """One entry of a compiled module with its weights uploaded once.

    Call with numpy inputs (in the kiln function's parameter order); returns a
    list of numpy arrays, one per result.
    """

    def __init__(self, executable, entry: str, weight_names: Sequence[str],
                 weights: Mapping[str, np.ndarray], device=None, widen: Sequence[str] = ()):
        import tvm
        from tvm import relax

        self.device = device if device is not None else tvm.cpu()
        self.entry = entry
        self.weight_names = list(weight_names)
        missing = [n for n in self.weight_names if n not in weights]
        if missing:
            raise KilnError(f"@{entry}: expected data for weights {missing[:3]}"
                            f"{' ...' if len(missing) > 3 else ''}, found none; load the module's weights")
        self._vm = relax.VirtualMachine(executable, self.device)
        self._func = self._vm[entry]
        self.num_inputs = int(self._vm._get_function_arity(entry)) - len(self.weight_names)
        widen = set(widen)  # f16 block scales the kernels take as f32
        self._weights = [tvm.runtime.tensor(_contiguous(weights[n].astype(np.float32) if n in widen else weights[n]),
                                            self.device)
                         for n in self.weight_names]

    @classmethod
    def from_module(cls, module, function_name: str, target="cpu", num_threads: int | None = None,
                    weights: Mapping[str, np.ndarray] | None = None) -> "TVMFunction":
        """Lower, build and bind one kiln function (weights default to the module's data)."""
        from kiln.backends.tvm.lower import lower_function, weight_names, widened_weight_names

        import tvm

        target = _target(target)
        derived: dict = {}  # weights in a kernel's own layout (the VNNI kernels' repacked blocks)
        irmodule = lower_function(module, function_name, target, derived)
        executable = build(irmodule, target, num_threads=num_threads)
        device = tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu()
        return cls(executable, function_name, weight_names(irmodule, function_name),
                   {**(module.weight_data if weights is None else weights), **derived}, device,
                   widen=widened_weight_names(irmodule, function_name))

    def __call__(self, *arrays) -> list:
        import tvm

        if len(arrays) != self.num_inputs:
            raise KilnError(f"@{self.entry}: expected {self.num_inputs} input arrays, found {len(arrays)}")
        inputs = [tvm.runtime.tensor(_contiguous(a), self.device) for a in arrays]
        out = self._func(*inputs, *self._weights)
        if isinstance(out, tvm.runtime.Tensor):
            return [out.numpy()]
        return [o.numpy() for o in out]
