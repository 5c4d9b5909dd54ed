"""Lowering side of the TVM backend: @step and @step_decode -> one Relax module -> model.so in the artifact."""

from __future__ import annotations

import os

from kiln.ir.errors import ConfigError
from kiln.ir.kv_cache import DECODE_STEP, STEP, KVCacheSpec

LIBRARY = "model.so"
DERIVED = "tvm_weights.safetensors"  # weights in the kernels' own layouts, computed from the module's
ENTRY_FUNCTIONS = (STEP, DECODE_STEP)  # step_decode when the pipeline made one


def compile_module(module, target: str, out_dir: str, options) -> dict:
    import tvm

    if tvm.base._RUNTIME_ONLY:
        raise ConfigError("this process loaded TVM's runtime library only (KILN_TVM_RUNTIME_ONLY=1, set by kiln run "
                          "ARTIFACT), which cannot compile; compile in another process or unset the variable")
    from . import llm_lower, mla_lower, moe_lower, quant_lower  # noqa: F401  (registers the fused-op, MLA, MoE and
    # quantized lowerings)
    from .build import PARALLEL_SUFFIX, build
    from .lower import ARGMAX_ROWS, add_argmax_rows, as_target, lower_functions, weight_names, widened_weight_names

    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected cpu or cuda")
    kv_dtype = KVCacheSpec.from_json(module.metadata["kv_cache"]).dtype
    if kv_dtype not in ("f32", "f16"):  # refused before lowering starts, so no half-built TVM module is left behind
        raise ConfigError(f"the TVM backend's attention kernels take an f32 or f16 KV cache, not {kv_dtype}; use "
                          f"--kv-cache-dtype f32 or f16")
    functions = [name for name in ENTRY_FUNCTIONS if name in module.functions]
    derived: dict = {}
    irmodule = lower_functions(module, functions, target, derived)
    if target == "cuda":  # a greedy step copies each row's argmax from the GPU, not the row (on the CPU the
        # executor's logits are a view of TVM's memory, and numpy's argmax over them is the faster)
        logits = module.functions[STEP].results[0].type  # [rows, vocab]
        irmodule = add_argmax_rows(irmodule, logits.shape[-1], logits.dtype, target)
    files = {"library": LIBRARY}
    if derived:
        from kiln.frontend.safetensors_file import write_safetensors

        write_safetensors(os.path.join(out_dir, DERIVED), derived)
        files["derived_weights"] = DERIVED
    launches: dict = {}
    executable = build(irmodule, target, launches=launches)
    executable.export_library(os.path.join(out_dir, LIBRARY))
    return {
        "target": target,
        "target_json": str(as_target(target)),
        "files": files,
        "weights": {name: weight_names(irmodule, name) for name in functions},
        # logits [rows, vocab] -> (each row's argmax as int32, its logit): what a greedy step copies to the host
        **({"argmax_function": ARGMAX_ROWS} if target == "cuda" else {}),
        # kernels one call runs (each a thread-pool hand-off on the CPU): @step_decode's is per decoded token
        "kernel_launches": {name: launches[name] for name in functions if name in launches},
        # of those, the ones that hand work to the thread pool (a wake-up and a join each)
        "parallel_launches": {name: launches[name + PARALLEL_SUFFIX] for name in functions
                              if name + PARALLEL_SUFFIX in launches},
        # f16 block scales the CPU kernels read as f32; the executor widens them when it loads them
        # weights in the kernels' own layouts (files.derived_weights), computed from the module's at compile time
        "derived_weights": sorted(derived),
        "widen_to_f32": sorted({w for name in functions for w in widened_weight_names(irmodule, name)}),
    }
