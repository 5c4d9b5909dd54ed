"""Drive an optimized @step through the reference interpreter with a paged cache.

Test-side stand-in for the runtime's scheduler: each sequence owns a fixed run of pages (slot s owns
pages [s * P, (s + 1) * P)), and a step is a list of chunks (slot, token ids, first position), flattened
into one ragged batch exactly as the engine does it.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.interpreter import run_function
from kiln.ir.kv_cache import STEP, KVCacheSpec
from kiln.ir.types import numpy_dtype


def spec_of(module) -> KVCacheSpec:
    return KVCacheSpec.from_json(module.metadata["kv_cache"])


def empty_pools(module) -> dict:
    return {pool.name: np.zeros(pool.shape, numpy_dtype(pool.dtype)) for pool in spec_of(module).pools()}


def page_row(module, slot: int) -> np.ndarray:
    n = spec_of(module).pages_per_seq
    return np.arange(slot * n, (slot + 1) * n, dtype=np.int32)


def step_arrays(module, chunks: list, logits: str = "last") -> tuple:
    """The step's inputs for ``chunks`` [(slot, ids, start)]: token rows, page table, and logit rows (the
    last token of each chunk, or every token with ``logits='all'``)."""
    ids, positions, seqs, rows = [], [], [], []
    table = np.stack([page_row(module, slot) for slot, _, _ in chunks])
    for row, (slot, chunk, start) in enumerate(chunks):
        first = len(ids)
        ids += [int(t) for t in chunk]
        positions += list(range(start, start + len(chunk)))
        seqs += [row] * len(chunk)
        rows += list(range(first, len(ids))) if logits == "all" else [len(ids) - 1]
    return (np.asarray(ids, np.int64), np.asarray(positions, np.int64), np.asarray(seqs, np.int32), table,
            np.asarray(rows, np.int64))


def run_step(module, pools: dict, chunks: list, logits: str = "last", function: str = STEP) -> tuple:
    """One step over ``chunks``; returns (logits [rows, vocab], updated pools)."""
    arrays = step_arrays(module, chunks, logits)
    names = [pool.name for pool in spec_of(module).pools()]
    out = run_function(module, function, list(arrays) + [pools[n] for n in names])
    return out[0], dict(zip(names, out[1:]))


def generate_logits(module, prompts: list, steps: list) -> list:
    """Prefill each prompt alone, then decode all sequences together feeding ``steps[i]`` tokens.

    Returns, per sequence, the logits of every position stacked as [prompt_len + n_steps, vocab].
    """
    pools = empty_pools(module)
    outs = []
    for slot, prompt in enumerate(prompts):
        logits, pools = run_step(module, pools, [(slot, prompt, 0)], logits="all")
        outs.append([logits])
    lengths = [len(p) for p in prompts]
    for t in range(max(len(s) for s in steps)):
        chunks = [(i, [steps[i][t]], lengths[i] + t) for i in range(len(prompts)) if t < len(steps[i])]
        logits, pools = run_step(module, pools, chunks)
        for row, (i, _, _) in enumerate(chunks):
            outs[i].append(logits[row:row + 1])
    return [np.concatenate(o, axis=0) for o in outs]
