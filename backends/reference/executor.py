"""Execution side of the reference backend: prefill/decode through the numpy interpreter."""

from __future__ import annotations

import numpy as np

from kiln.ir.interpreter import run_function
from kiln.ir.parser import parse_module


class ReferenceExecutor:
    def __init__(self, module, weights: dict):
        self.module = module
        self.weights = weights
        plan = module.metadata["kv_cache"]
        self.cache = np.zeros((plan["num_layers"], 2, plan["num_pages"], plan["num_kv_heads"], plan["page_size"],
                               plan["head_dim"]), dtype={"f32": np.float32, "f16": np.float16}[plan["dtype"]])

    def has_function(self, name: str) -> bool:
        return name in self.module.functions

    def end_sequence(self, first_page: int) -> None:
        """Nothing to do: the paged cache needs no per-sequence state beyond the engine's page table."""

    def close(self) -> None:
        """Nothing to release early: the library's file was removed once it was loaded."""

    def run(self, function: str, input_ids: np.ndarray, positions: np.ndarray, page_table: np.ndarray) -> np.ndarray:
        logits, self.cache = run_function(self.module, function, [input_ids, positions, self.cache, page_table],
                                          weights=self.weights)
        return logits


def load_executor(info, num_threads: int | None = None):
    """``num_threads`` is accepted for a uniform interface; numpy picks its own."""
    module = parse_module(info.read_text(info.manifest["module"], "module"))
    weights = info.manifest["backend_info"]["files"].get("weights")
    return ReferenceExecutor(module, info.load_safetensors(weights, field="backend_info.files.weights"))
