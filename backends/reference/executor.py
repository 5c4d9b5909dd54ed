"""Execution side of the reference backend: the step through the numpy interpreter, pools as numpy arrays."""

from __future__ import annotations

import numpy as np

from kiln.ir.interpreter import run_function
from kiln.ir.kv_cache import STEP_INPUTS, KVCacheSpec
from kiln.ir.parser import parse_module
from kiln.ir.types import numpy_dtype


class ReferenceExecutor:
    shares_pages = True

    def __init__(self, module, weights: dict):
        self.module = module
        self.weights = weights
        spec = KVCacheSpec.from_json(module.metadata["kv_cache"])
        self.pools = {pool.name: np.zeros(pool.shape, numpy_dtype(pool.dtype)) for pool in spec.pools()}

    def has_function(self, name: str) -> bool:
        return name in self.module.functions

    def end_sequence(self, first_page: int) -> None:
        """Nothing to do: the paged cache needs no per-sequence state beyond the engine's page table."""

    def close(self) -> None:
        """Nothing to release early."""

    def step(self, function: str, inputs: dict) -> np.ndarray:
        fn = self.module.functions[function]
        names = [p.name for p in fn.params]
        arrays = [inputs[name] if name in STEP_INPUTS else self.pools[name] for name in names]
        out = run_function(self.module, function, arrays, weights=self.weights)
        self.pools.update(zip(names[len(STEP_INPUTS):], out[1:]))
        return out[0]


def load_executor(info, num_threads: int | None = None):
    """``num_threads`` is accepted for a uniform interface; numpy picks its own."""
    module = parse_module(info.read_text(info.manifest["module"], "module"))
    weights = info.manifest["backend_info"]["files"].get("weights")
    return ReferenceExecutor(module, info.load_safetensors(weights, field="backend_info.files.weights"))
