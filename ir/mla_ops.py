"""Multi-head latent attention (DeepSeek's MLA) with absorbed up-projections: ``latent_attention`` and
``paged_latent_attention``, which attend over one cached vector per token instead of per-head K/V.

Per token the cache keeps ``latent = [c_kv (value_dim), k_pe (rope dim)]``; each query head comes with the K
up-projection already applied (``q = [q_nope_h @ W_UK_h, q_pe_h]``), so the scores are ``q . latent`` and the
output ``softmax @ latent[:, :value_dim]`` (the V up-projection follows outside the op): multi-query attention
with one KV head whose values are the first ``value_dim`` columns of its keys.
"""

from __future__ import annotations

import numpy as np

from .llm_ops import attention_reference
from .ops import REQUIRED, define_op, fail
from .types import TensorType, is_float

# expanded_k_dim / expanded_v_dim: the per-head K and V sizes the latent stands for (qk_nope + rope, v_head_dim),
# kept so `kiln inspect` can say what an expanded multi-head cache would take; the arithmetic never reads them.
_ATTRS = {"num_heads": REQUIRED, "scale": REQUIRED, "value_dim": REQUIRED, "expanded_k_dim": REQUIRED,
          "expanded_v_dim": REQUIRED}


def _check(op, q, latent, attrs):
    if q.rank != 4 or latent.rank != 3:
        raise fail(op, f"expected q [batch, heads, seq, latent_dim] and latent [batch, seq, latent_dim], found "
                       f"{q} and {latent}")
    if attrs["num_heads"] != q.shape[1]:
        raise fail(op, f"num_heads {attrs['num_heads']} but q has {q.shape[1]} heads")
    if q.shape[3] != latent.shape[2] or q.shape[0] != latent.shape[0] or q.shape[2] != latent.shape[1]:
        raise fail(op, f"q {q} and latent {latent} must share batch, seq and latent_dim")
    width = latent.shape[2]
    value_dim = attrs["value_dim"]
    if not (isinstance(width, int) and isinstance(value_dim, int) and 0 < value_dim <= width):
        raise fail(op, f"value_dim must be in (0, {width}], found {value_dim!r}")
    if not is_float(q.dtype) or q.dtype != latent.dtype:
        raise fail(op, f"expected q and latent of one float dtype, found {q.dtype} and {latent.dtype}")


def _latent_attention_infer(types, attrs, module):
    q, latent = types
    _check("latent_attention", q, latent, attrs)
    return [TensorType(q.dtype, tuple(q.shape[:3]) + (attrs["value_dim"],))]


def _latent_attention_ref(xs, attrs):
    q, latent = xs
    positions = np.arange(q.shape[2])
    value_dim = attrs["value_dim"]
    return [np.stack([attention_reference(q[b], latent[b][None], latent[b][None, :, :value_dim], positions,
                                          positions, attrs["scale"], None) for b in range(q.shape[0])])]


define_op("latent_attention", infer=_latent_attention_infer, reference=_latent_attention_ref, attrs=dict(_ATTRS),
          inputs=2, doc="causal attention of q [b, H, s, L] over one latent [b, s, L] per token: scores "
                        "q . latent * scale, output softmax @ latent[..., :value_dim] -> [b, H, s, value_dim]")


def _paged_latent_attention_infer(types, attrs, module):
    q, latent, pool, page_table, positions, token_seq = types
    _check("paged_latent_attention", q, latent, attrs)
    if q.shape[0] != 1:
        raise fail("paged_latent_attention", f"the step's tokens are one flat row: expected q [1, heads, tokens, "
                                             f"latent_dim], found {q}")
    if pool.rank != 4 or pool.shape[3] != latent.shape[2] or pool.dtype != latent.dtype:
        raise fail("paged_latent_attention", f"pool must be {latent.dtype}[layers, pages, page_size, "
                                             f"{latent.shape[2]}], found {pool}")
    if not (isinstance(attrs["index"], int) and 0 <= attrs["index"] < pool.shape[0]):
        raise fail("paged_latent_attention", f"index {attrs['index']} outside the pool's {pool.shape[0]} layers")
    if not (isinstance(attrs["layer"], int) and attrs["layer"] >= 0):
        raise fail("paged_latent_attention", f"layer must be a non-negative integer, found {attrs['layer']}")
    if page_table.rank != 2 or page_table.dtype != "i32":
        raise fail("paged_latent_attention", f"page_table must be i32[seqs, pages_per_seq], found {page_table}")
    if positions.rank != 2 or positions.dtype != "i64" or positions.shape != (1, q.shape[2]):
        raise fail("paged_latent_attention", f"positions must be i64[1, {q.shape[2]}], found {positions}")
    if token_seq.rank != 1 or token_seq.dtype != "i32" or token_seq.shape[0] != q.shape[2]:
        raise fail("paged_latent_attention", f"token_seq must be i32[{q.shape[2]}], found {token_seq}")
    return [TensorType(q.dtype, (1, q.shape[1], q.shape[2], attrs["value_dim"])), pool]


def _paged_latent_attention_ref(xs, attrs):
    q, latent, pool, page_table, positions, token_seq = xs
    index, value_dim = attrs["index"], attrs["value_dim"]
    page_size = pool.shape[2]
    pool = pool.copy()
    positions = positions[0]
    for t in range(q.shape[2]):
        pos, seq = int(positions[t]), int(token_seq[t])
        pool[index, int(page_table[seq, pos // page_size]), pos % page_size] = latent[0, t]
    out = np.zeros((1, q.shape[1], q.shape[2], value_dim), dtype=q.dtype)
    for seq in sorted(set(int(s) for s in token_seq)):
        rows = np.flatnonzero(token_seq == seq)
        length = int(positions[rows].max()) + 1
        pages = [int(page_table[seq, i]) for i in range((length + page_size - 1) // page_size)]
        cached = np.concatenate([pool[index, p] for p in pages], axis=0)[None, :length]
        out[0][:, rows] = attention_reference(q[0][:, rows], cached, cached[:, :, :value_dim], np.arange(length),
                                              positions[rows], attrs["scale"], None)
    return [out, pool]


define_op("paged_latent_attention", infer=_paged_latent_attention_infer, reference=_paged_latent_attention_ref,
          attrs={**_ATTRS, "layer": REQUIRED, "index": REQUIRED}, inputs=6,
          doc="the ragged step's latent attention: token t (sequence token_seq[t], position positions[0, t]) "
              "writes its latent into pool[index, page_table[seq, pos // page_size], pos % page_size], then "
              "attends causally over that sequence's cached latents 0..pos; returns (output, updated pool)")


def latent_cache_reads(function) -> dict | None:
    """What the latent attentions of ``function`` cache per token (for ``kiln inspect``): layers, heads, latent
    and value widths, the cache's bytes per token, and the bytes multi-head attention with the same heads and the
    expanded K/V sizes would cache in the same dtype; None without latent attention."""
    from .types import numpy_dtype

    layers = [node for node in function.nodes if node.op in ("latent_attention", "paged_latent_attention")]
    if not layers:
        return None
    latent = expanded = 0
    for node in layers:
        cached = node.inputs[2] if node.op == "paged_latent_attention" else node.inputs[1]
        element = np.dtype(numpy_dtype(cached.type.dtype)).itemsize
        latent += cached.type.shape[-1] * element
        expanded += node.attrs["num_heads"] * (node.attrs["expanded_k_dim"] + node.attrs["expanded_v_dim"]) * element
    first = layers[0]
    return {"layers": len(layers), "num_heads": first.attrs["num_heads"], "latent_dim": first.inputs[1].type.shape[-1],
            "value_dim": first.attrs["value_dim"], "expanded_k_dim": first.attrs["expanded_k_dim"],
            "expanded_v_dim": first.attrs["expanded_v_dim"], "bytes_per_token": latent,
            "mha_bytes_per_token": expanded}
