"""CPU schedules (s_tir.Schedule) for the kernels of kernels.py, build helpers, and the
dlight GPU path with an nvcc compile check for machines without a GPU.

Dispatch is by block name: the plain form of a linear kernel gets the GEMV schedule
(decode), the row-tiled form the GEMM schedule (prefill); attention comes scheduled.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from kiln.backends.tvm import kernels
from kiln.ir.errors import ConfigError

# GEMV: each parallel task owns `GEMV_COL_TILE` output columns; `GEMV_COL_UNROLL` of
# them are computed at once so that many independent FMA chains hide the FMA latency.
GEMV_COL_TILE = 32
GEMV_COL_UNROLL = 4
# GEMM: a register tile is row_tile x GEMM_COL_UNROLL 16-lane accumulators; a task
# owns GEMM_COL_TILE columns of one row tile, so its weight slice stays in L2.
GEMM_COL_TILE = 32
GEMM_COL_UNROLL = 4


def _reduction_lanes(sch: s_tir.Schedule, loop) -> int:
    extent = sch.get(loop).extent
    return kernels._reduce_lanes(int(extent)) if isinstance(extent, tirx.IntImm) else 1


def schedule_gemv(func: tirx.PrimFunc, block_name: str = "linear",
                  col_tile: int = GEMV_COL_TILE, col_unroll: int = GEMV_COL_UNROLL) -> tirx.PrimFunc:
    """Decode schedule for the plain form y[m, N] = sum_k x[m, k] * w(N, k), m symbolic.

    K is split by 16 and rfactor'ed so the inner loop is a vector FMA into 16-lane
    partial sums; N is split into parallel tiles; the m rows sit inside a column
    group so the few weight rows of that group are reused from L1 by every row.
    """
    sch = s_tir.Schedule(func)
    if _has_block(func, block_name + kernels.DEQUANT_SUFFIX):
        sch.compute_inline(sch.get_sblock(block_name + kernels.DEQUANT_SUFFIX))
    block = sch.get_sblock(block_name)
    _, _, k = sch.get_loops(block)
    lanes = _reduction_lanes(sch, k)
    _, k_inner = sch.split(k, [None, lanes])
    partial = sch.rfactor(k_inner, factor_axis=2)
    i, j, k_outer, k_inner = sch.get_loops(partial)
    j_task, j_group, j_unroll = sch.split(j, [None, col_tile // col_unroll, col_unroll])
    sch.reorder(j_task, j_group, i, k_outer, j_unroll, k_inner)
    sch.parallel(j_task)
    sch.unroll(j_unroll)
    sch.vectorize(k_inner)
    sch.reverse_compute_at(block, i)
    init = sch.decompose_reduction(partial, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_gemm(func: tirx.PrimFunc, block_name: str = "linear",
                  col_tile: int = GEMM_COL_TILE, col_unroll: int = GEMM_COL_UNROLL) -> tirx.PrimFunc:
    """Prefill schedule for the row-tiled form (kernels.linear*(..., row_tile=r)).

    The partial block [row_tiles, r, N, 16] is computed in registers: for each
    16-wide chunk of K, r x col_unroll vector FMAs reuse r rows of x and col_unroll
    weight rows. (column tile, row tile) pairs are the parallel tasks.
    """
    # The partial block yields padding rows the final block never reads, which the
    # default region-cover check cannot prove for a symbolic m; the schedule is
    # correct by construction (kernels._matmul), so checks are off here.
    sch = s_tir.Schedule(func, enable_check=False)
    partial = sch.get_sblock(block_name + kernels.PARTIAL_SUFFIX)
    final = sch.get_sblock(block_name)
    i_tile, i_inner, j, k_inner, k_outer = sch.get_loops(partial)
    j_task, j_group, j_unroll = sch.split(j, [None, col_tile // col_unroll, col_unroll])
    sch.reorder(j_task, i_tile, j_group, k_outer, i_inner, j_unroll, k_inner)
    sch.parallel(sch.fuse(j_task, i_tile))
    sch.unroll(i_inner)
    sch.unroll(j_unroll)
    sch.vectorize(k_inner)
    sch.set_scope(partial, 0, "local")
    j_group = sch.get_loops(partial)[1]
    sch.reverse_compute_at(final, j_group)
    init = sch.decompose_reduction(partial, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_block(func: tirx.PrimFunc, name: str) -> bool:
    try:
        s_tir.Schedule(func, error_render_level="none").get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a plain error for a missing block
        return False
    return True


def schedule_cpu(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The CPU schedule for a PrimFunc from kernels.py, or None if it is not one of them."""
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return func
    for name in kernels.LINEAR_BLOCKS:
        if _has_block(func, name + kernels.PARTIAL_SUFFIX):
            return schedule_gemm(func, name)
        if _has_block(func, name):
            return schedule_gemv(func, name)
    return None


@tvm.transform.module_pass(opt_level=0, name="kiln.ApplyCPUSchedules")
def apply_cpu_schedules(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Module pass: schedules every PrimFunc that came from kernels.py; leaves others."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            scheduled = schedule_cpu(func)
            if scheduled is not None and not scheduled.same_as(func):
                updates[gvar] = scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


# --------------------------------------------------------------------------------------
# Building for the CPU
# --------------------------------------------------------------------------------------

def cpu_target() -> tvm.target.Target:
    """The host CPU as an LLVM target with its real mcpu (plain "llvm" has no AVX)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def configure_threads(num_threads: int) -> int:
    """Makes TVM's CPU thread pool use `num_threads` threads; returns the count in use.

    TVM creates its pool once, at the first parallel launch (or the first call of
    this), sized by TVM_NUM_THREADS (else OMP_NUM_THREADS, else a guess that was 1 on
    a 2-core VM); afterwards runtime.config_threadpool can move between 1 and that size
    but never above it. So kiln sets os.environ["TVM_NUM_THREADS"] in its entry point
    (CLI / kiln.load) before any TVM kernel runs, or calls this first thing; it raises
    ConfigError if the pool already exists with fewer threads.
    """
    if num_threads < 1:
        raise ConfigError(f"expected a thread count >= 1, found {num_threads}")
    os.environ["TVM_NUM_THREADS"] = str(num_threads)
    tvm.get_global_func("runtime.config_threadpool")(0, num_threads)
    in_use = tvm.runtime.num_threads()
    if in_use != num_threads:
        raise ConfigError(
            f"expected TVM to run {num_threads} threads, found its pool fixed at {in_use}; "
            "set TVM_NUM_THREADS before the first TVM kernel runs")
    return in_use


def build_cpu(func_or_mod: tirx.PrimFunc | tvm.IRModule, target: tvm.target.Target | None = None,
              num_threads: int | None = None, entry: str = "main") -> Callable:
    """Schedules (apply_cpu_schedules) and compiles; returns the entry function.

    The callable takes tvm.runtime tensors, outputs last (destination passing).
    """
    mod = func_or_mod if isinstance(func_or_mod, tvm.IRModule) else tvm.IRModule({entry: func_or_mod})
    if num_threads is not None:
        configure_threads(num_threads)
    mod = apply_cpu_schedules(mod)
    return tvm.compile(mod, target or cpu_target())[entry]


# --------------------------------------------------------------------------------------
# GPU: dlight schedules and CUDA source for an nvcc compile check
# --------------------------------------------------------------------------------------

def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    """A CUDA target for `arch` (sm_80, sm_90, ...), host = this CPU. 48 KiB is the static
    shared memory every arch since sm_70 gives a block; dlight warns when it is unset."""
    return tvm.target.Target(
        {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
         "max_threads_per_block": 1024}, host=cpu_target())


def dlight_gpu_rules():
    """dlight's GPU rules in the order the default GPU pipeline tries them."""
    return (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.LowBatchGEMV(),
            dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())


def schedule_cuda(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Applies dlight's GPU rules to every unscheduled PrimFunc of `mod`."""
    with target:
        return dlight.ApplyDefaultSchedule(*dlight_gpu_rules())(mod)


def unscheduled_funcs(mod: tvm.IRModule) -> list[str]:
    """Names of PrimFuncs no rule scheduled (they would fail to build for a GPU)."""
    return [gvar.name_hint for gvar, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc)
            and not (func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))]


def build_cuda_source(func_or_mod: tirx.PrimFunc | tvm.IRModule, arch: str = "sm_80") -> str:
    """Schedules with dlight and builds for CUDA; returns the generated CUDA C source.

    Without libcuda (CI), tvm.compile keeps the CUDA source instead of compiling it;
    compile_cuda_source proves it compiles.
    """
    mod = func_or_mod if isinstance(func_or_mod, tvm.IRModule) else tvm.IRModule({"main": func_or_mod})
    cpu_only = [gvar.name_hint for gvar, func in mod.functions_items()
                if isinstance(func, tirx.PrimFunc) and func.attrs is not None
                and func.attrs.get(kernels.CPU_ONLY, False)]
    if cpu_only:
        raise ConfigError(f"expected GPU-schedulable kernels for {arch}, found CPU-only kernels "
                          f"{cpu_only}; use TVM's TIRPagedKVCache attention on GPUs")
    target = cuda_target(arch)
    mod = schedule_cuda(mod, target)
    missing = unscheduled_funcs(mod)
    if missing:
        raise ConfigError(f"expected dlight to schedule every kernel for {arch}, found none "
                          f"applies to {missing}; give them a GPU schedule")
    with target:
        executable = tvm.compile(mod, target)
    sources = [m.inspect_source() for m in executable.mod.imports if m.kind == "cuda"]
    if not sources:
        raise ConfigError(f"expected a CUDA module from tvm.compile for {arch}, found "
                          f"{[m.kind for m in executable.mod.imports]}")
    return "\n".join(sources)


def compile_cuda_source(source: str, arch: str = "sm_80") -> bytes:
    """Compiles CUDA C with nvcc (not NVRTC, which needs cuda-bindings) to a fatbin."""
    from tvm.support import nvcc

    # nvcc reads the compute version from the current target when no GPU is present.
    with cuda_target(arch):
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))
