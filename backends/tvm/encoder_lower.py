"""Lowering side of the TVM backend for embedding models: ``@embed`` -> one Relax function -> model.so.

Attention is the generic ``sdpa`` lowering (plain Relax matmul / where / softmax over the padding mask):
an encoder keeps no KV cache, so no paged kernel is involved.
"""

from __future__ import annotations

import os

from kiln.ir.errors import ConfigError

LIBRARY = "model.so"
DERIVED = "tvm_weights.safetensors"  # weights in a kernel's own layout, computed from the module's


def compile_embedding(module, function: str, target: str, out_dir: str) -> dict:
    """Lower and build ``@function`` into ``out_dir``; returns the manifest's backend_info."""
    import tvm

    if tvm.base._RUNTIME_ONLY:
        raise ConfigError("this process loaded TVM's runtime library only (KILN_TVM_RUNTIME_ONLY=1), which cannot "
                          "compile; compile in another process or unset the variable")
    from .build import build
    from .lower import as_target, lower_functions, weight_names

    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected cpu or cuda")
    derived: dict = {}
    irmodule = lower_functions(module, [function], target, derived)
    files = {"library": LIBRARY}
    if derived:
        from kiln.frontend.safetensors_file import write_safetensors

        write_safetensors(os.path.join(out_dir, DERIVED), derived)
        files["derived_weights"] = DERIVED
    build(irmodule, target).export_library(os.path.join(out_dir, LIBRARY))
    return {"target": target, "target_json": str(as_target(target)), "files": files,
            "weights": weight_names(irmodule, function), "derived_weights": sorted(derived)}
