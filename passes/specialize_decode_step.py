"""Specialize @step_decode to its one shape: one new token of one sequence (``decode_tokens = seqs = 1``).

The engine calls @step_decode only for a step of DECODE_STEP_MAX_TOKENS (one) token, so its sizes are known
when compiling. With every dim fixed a backend plans the function's memory statically and computes no shapes
at run time: on TVM the VM otherwise evaluates thousands of shape instructions per decoded token.
"""

from __future__ import annotations

from kiln.ir.clone import clone_function
from kiln.ir.graph import Module
from kiln.ir.kv_cache import DECODE_STEP, DECODE_STEP_MAX_TOKENS

from .manager import PassOptions, register_pass

DECODE_DIMS = {"decode_tokens": DECODE_STEP_MAX_TOKENS, "seqs": DECODE_STEP_MAX_TOKENS}


@register_pass("specialize_decode_step")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites @step_decode with decode_tokens = seqs = 1 (no-op when there is no such function)."""
    fn = module.functions.get(DECODE_STEP)
    if fn is None or not any(s in DECODE_DIMS for p in fn.params for s in p.type.symbols):
        return False
    del module.functions[DECODE_STEP]
    clone_function(module, fn, DECODE_STEP, DECODE_DIMS)
    return True
