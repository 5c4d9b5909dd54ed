"""Drive optimized prefill/decode functions through the reference interpreter with a paged cache.

Test-side stand-in for the runtime's page manager: each sequence owns a fixed
run of pages, so sequences of different lengths decode together in one batch.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.interpreter import run_function


def empty_cache(plan: dict) -> np.ndarray:
    dtype = {"f32": np.float32, "f16": np.float16}[plan["dtype"]]
    return np.zeros((plan["num_layers"], 2, plan["num_pages"], plan["num_kv_heads"], plan["page_size"],
                     plan["head_dim"]), dtype=dtype)


def page_row(plan: dict, slot: int) -> np.ndarray:
    n = plan["pages_per_seq"]
    return np.arange(slot * n, (slot + 1) * n, dtype=np.int32)


def generate_logits(module, prompts: list, steps: list) -> list:
    """Prefill each prompt alone, then decode all sequences together feeding ``steps[i]`` tokens.

    Returns, per sequence, the logits of every position [len(prompt) + len(steps[i]) - 1 ... ] stacked
    as [prompt_len + n_steps, vocab].
    """
    plan = module.metadata["kv_cache"]
    cache = empty_cache(plan)
    outs = []
    for slot, prompt in enumerate(prompts):
        ids = np.asarray(prompt, dtype=np.int64)[None]
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, cache = run_function(module, "prefill", [ids, positions, cache, page_row(plan, slot)[None]])
        outs.append([logits[0]])
    table = np.stack([page_row(plan, slot) for slot in range(len(prompts))])
    lengths = [len(p) for p in prompts]
    for t in range(max(len(s) for s in steps)):
        batch = [i for i in range(len(prompts)) if t < len(steps[i])]
        ids = np.array([[steps[i][t]] for i in batch], dtype=np.int64)
        positions = np.array([[lengths[i] + t] for i in batch], dtype=np.int64)
        logits, cache = run_function(module, "decode", [ids, positions, cache, table[batch]])
        for row, i in enumerate(batch):
            outs[i].append(logits[row])
    return [np.concatenate(o, axis=0) for o in outs]
