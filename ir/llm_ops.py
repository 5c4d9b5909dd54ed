"""Fused LLM ops: RMSNorm, RoPE, gated MLP, grouped attention, and attention over a paged KV cache.

The fusion passes produce these; each has its shape rule and a numpy reference
that mirrors the float32 arithmetic of the unfused graph it replaces.

The paged KV cache's pools are declared by ``kv_cache.KVCacheSpec``: a layer's
K and V live at ``[index, page, kv_head, offset, :]`` of its group's pools, and
token ``p`` of sequence ``s`` lives in page ``page_table[s, p // page_size]`` at
offset ``p % page_size``.
"""

from __future__ import annotations

import math

import numpy as np

from .core_ops import broadcast_shapes
from .ops import REQUIRED, define_op, fail
from .types import TensorType, is_float


# RMSNorm ----------------------------------------------------------------------
def _rms_norm(x, w, eps):
    x32 = x.astype(np.float32)
    variance = np.mean(np.square(x32, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    normed = x32 * (1.0 / np.sqrt(variance + np.float32(eps))).astype(np.float32)
    return (w.astype(np.float32) * normed.astype(x.dtype)).astype(x.dtype)


def _rms_norm_infer(types, attrs, module):
    x, w = types
    if w.shape != (x.shape[-1],):
        raise fail("rms_norm", f"weight must be [{x.shape[-1]}], found {w}")
    if not is_float(x.dtype):
        raise fail("rms_norm", f"expected a float input, found {x.dtype}")
    return [x]


define_op("rms_norm", infer=_rms_norm_infer, reference=lambda xs, a: [_rms_norm(xs[0], xs[1], a["eps"])],
          attrs={"eps": REQUIRED}, inputs=2, doc="x * rsqrt(mean(x^2, -1) + eps) * w")


def _add_rms_norm_infer(types, attrs, module):
    x, residual, w = types
    shape = broadcast_shapes("add_rms_norm", x.shape, residual.shape)
    if shape != tuple(x.shape):
        raise fail("add_rms_norm", f"residual {residual} must broadcast to x {x}")
    _rms_norm_infer([x, w], attrs, module)
    return [x, x]


def _add_rms_norm_ref(xs, attrs):
    x, residual, w = xs
    total = (x + residual).astype(x.dtype)
    return [total, _rms_norm(total, w, attrs["eps"])]


define_op("add_rms_norm", infer=_add_rms_norm_infer, reference=_add_rms_norm_ref, attrs={"eps": REQUIRED},
          inputs=3, doc="s = x + residual; returns (s, rms_norm(s, w))")


# RoPE ---------------------------------------------------------------------------
def rope_cos_sin(positions, inv_freq, scaling, interleaved=False):
    """cos/sin tables [P, S, rotary_dim] as transformers computes them in float32: each frequency for both
    features of its pair (i and i + rotary_dim / 2, or 2i and 2i + 1 when ``interleaved``)."""
    freqs = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)
    emb = np.repeat(freqs, 2, axis=-1) if interleaved else np.concatenate([freqs, freqs], axis=-1)
    return (np.cos(emb) * np.float32(scaling)).astype(np.float32), (np.sin(emb) * np.float32(scaling)).astype(np.float32)


def _rope_ref(xs, attrs):
    x, positions, inv_freq = xs
    rd, seq_axis = attrs["rotary_dim"], attrs["seq_axis"]
    interleaved = attrs.get("interleaved", False)
    cos, sin = rope_cos_sin(positions, inv_freq, attrs["scaling"], interleaved)
    # cos: [P, S, rd] -> broadcast against x (rank 4, batch first, head_dim last)
    shape = [cos.shape[0], 1, 1, rd]
    shape[seq_axis] = cos.shape[1]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    if interleaved:  # GPT-J / Cohere: pairs (2i, 2i + 1) -> (-x[2i + 1], x[2i])
        rotated = np.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    else:
        rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)
    return [np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out]


def _rope_infer(types, attrs, module):
    x, positions, inv_freq = types
    rd, seq_axis = attrs["rotary_dim"], attrs["seq_axis"]
    if x.rank != 4 or seq_axis not in (1, 2):
        raise fail("rope", f"expected x of rank 4 with seq_axis 1 or 2, found {x} seq_axis={seq_axis}")
    if not (isinstance(rd, int) and 0 < rd <= x.shape[-1] and rd % 2 == 0):
        raise fail("rope", f"rotary_dim must be even and in (0, {x.shape[-1]}], found {rd}")
    if inv_freq.shape != (rd // 2,):
        raise fail("rope", f"inv_freq must be [{rd // 2}], found {inv_freq}")
    if positions.rank != 2 or positions.dtype not in ("i64", "i32"):
        raise fail("rope", f"positions must be integer [batch, seq], found {positions}")
    if positions.shape[1] != x.shape[seq_axis] or positions.shape[0] not in (1, x.shape[0]):
        raise fail("rope", f"positions {positions} do not match x {x} (seq axis {seq_axis})")
    return [x]


define_op("rope", infer=_rope_infer, reference=_rope_ref,
          attrs={"rotary_dim": REQUIRED, "seq_axis": 2, "scaling": 1.0, "interleaved": False}, inputs=3,
          doc="RoPE on the first rotary_dim features, rotating feature pairs (i, i + rotary_dim / 2) (rotate-half) "
              "or, interleaved, (2i, 2i + 1) (GPT-J, Cohere); cos/sin from positions * inv_freq")


# gated MLP ------------------------------------------------------------------------
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _activation(x, kind):
    from .core_ops import _gelu, _sigmoid

    if kind == "silu":
        return (x.astype(np.float64) * _sigmoid(x.astype(np.float64))).astype(x.dtype)
    return _gelu(x, "tanh" if kind == "gelu_tanh" else "none")


def _gated_mlp_infer(types, attrs, module):
    x, wg, wu, wd = types
    if attrs["activation"] not in _ACTIVATIONS:
        raise fail("gated_mlp", f"activation must be one of {_ACTIVATIONS}, found {attrs['activation']!r}")
    hidden = x.shape[-1]
    if wg.shape != wu.shape or wg.rank != 2 or wg.shape[1] != hidden or wd.rank != 2 or wd.shape[1] != wg.shape[0]:
        raise fail("gated_mlp", f"expected w_gate/w_up [I, {hidden}] and w_down [N, I], found {wg}, {wu}, {wd}")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (wd.shape[0],))]


def _gated_mlp_ref(xs, attrs):
    x, wg, wu, wd = xs
    x64 = x.astype(np.float64)
    gate = (x64 @ wg.astype(np.float64).T).astype(x.dtype)
    up = (x64 @ wu.astype(np.float64).T).astype(x.dtype)
    h = (_activation(gate, attrs["activation"]) * up).astype(x.dtype)
    return [(h.astype(np.float64) @ wd.astype(np.float64).T).astype(x.dtype)]


define_op("gated_mlp", infer=_gated_mlp_infer, reference=_gated_mlp_ref, attrs={"activation": REQUIRED},
          inputs=4, doc="down(act(x @ w_gate.T) * (x @ w_up.T)): SwiGLU / GeGLU")


# attention ---------------------------------------------------------------------------
def _check_heads(op, q, k, v, attrs):
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise fail(op, f"expected rank-4 q, k, v [batch, heads, seq, head_dim], found {q}, {k}, {v}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if attrs["num_heads"] != heads or attrs["num_kv_heads"] != kv_heads or v.shape[1] != kv_heads:
        raise fail(op, f"head counts: attrs say {attrs['num_heads']}/{attrs['num_kv_heads']}, "
                       f"tensors have {heads}/{kv_heads}/{v.shape[1]}")
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise fail(op, f"num_heads {heads} must be a multiple of num_kv_heads {kv_heads}")
    if q.shape[3] != k.shape[3]:
        raise fail(op, f"q and k head dims differ: {q} vs {k}")
    if attrs["window"] is not None and attrs["window"] < 1:
        raise fail(op, f"window must be >= 1 or none, found {attrs['window']}")
    softcap = attrs.get("softcap")
    if softcap is not None and not (isinstance(softcap, float) and softcap > 0):
        raise fail(op, f"softcap must be a positive float or none, found {softcap!r}")
    alibi = attrs.get("alibi")
    if alibi is not None and not (isinstance(alibi, (tuple, list)) and len(alibi) == heads
                                  and all(isinstance(x, float) and math.isfinite(x) for x in alibi)):
        raise fail(op, f"alibi must be none or {heads} finite slopes (one per query head), found {alibi!r}")


def _attention_infer(types, attrs, module):
    q, k, v = types
    _check_heads("attention", q, k, v, attrs)
    if k.shape[2] != q.shape[2] or v.shape[2] != k.shape[2] or k.shape[0] != q.shape[0]:
        raise fail("attention", f"q, k, v must share batch and seq: {q}, {k}, {v}")
    return [TensorType(q.dtype, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))]


def attention_reference(q, k, v, key_positions, query_positions, scale, window, softcap=None, alibi=None):
    """Grouped attention of q [H, Sq, D] over k/v [Hkv, Sk, D]; a key is visible when
    0 <= key_pos <= query_pos (and query_pos - key_pos < window). With ``softcap`` c the scaled
    scores s become c * tanh(s / c) before the mask (Gemma-2's attention-logit soft-capping); with
    ``alibi`` (one slope per query head) head h's scores get slope_h * (key_pos - query_pos) added (ALiBi)."""
    heads, kv_heads = q.shape[0], k.shape[0]
    rep = heads // kv_heads
    k64 = np.repeat(k.astype(np.float64), rep, axis=0)
    v64 = np.repeat(v.astype(np.float64), rep, axis=0)
    scores = np.matmul(q.astype(np.float64), np.swapaxes(k64, -1, -2)) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    qp = np.asarray(query_positions)[:, None]
    kp = np.asarray(key_positions)[None, :]
    if alibi is not None:
        scores = scores + np.asarray(alibi, np.float64)[:, None, None] * (kp - qp)[None]
    visible = (kp <= qp) & (kp >= 0)
    if window is not None:
        visible &= (qp - kp) < window
    scores = np.where(visible[None], scores, -np.inf)
    best = np.max(scores, axis=-1, keepdims=True)
    best = np.where(np.isfinite(best), best, 0.0)
    p = np.exp(scores - best)
    total = np.sum(p, axis=-1, keepdims=True)
    out = np.matmul(p / np.where(total > 0, total, 1.0), v64)
    return out.astype(q.dtype)


def _attention_ref(xs, attrs):
    q, k, v = xs
    seq = q.shape[2]
    positions = np.arange(seq)
    out = np.stack([attention_reference(q[b], k[b], v[b], positions, positions, attrs["scale"], attrs["window"],
                                        attrs.get("softcap"), attrs.get("alibi")) for b in range(q.shape[0])])
    return [out]


_ATTN_ATTRS = {"num_heads": REQUIRED, "num_kv_heads": REQUIRED, "scale": REQUIRED, "window": None, "softcap": None,
               "alibi": None}

define_op("attention", infer=_attention_infer, reference=_attention_ref, attrs=dict(_ATTN_ATTRS), inputs=3,
          doc="causal grouped-query attention over q [b, H, s, D], k/v [b, Hkv, s, D] (query head h reads "
              "KV head h // (H / Hkv)); optional sliding window, soft-capping of the scores (c * tanh(s / c)) "
              "and ALiBi slopes (head h's scores get alibi[h] * (key_pos - query_pos))")


def _paged_attention_infer(types, attrs, module):
    q, k, v, k_pool, v_pool, page_table, positions, token_seq = types
    _check_heads("paged_attention", q, k, v, attrs)
    if q.shape[0] != 1:
        raise fail("paged_attention", f"the step's tokens are one flat row: expected q [1, heads, tokens, head_dim], "
                                      f"found {q}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise fail("paged_attention", f"q, k, v must share tokens: {q}, {k}, {v}")
    for name, pool, x in (("k_pool", k_pool, k), ("v_pool", v_pool, v)):
        if pool.rank != 5 or pool.shape[2] != x.shape[1] or pool.shape[4] != x.shape[3]:
            raise fail("paged_attention", f"{name} must be [layers, pages, {x.shape[1]}, page_size, {x.shape[3]}], "
                                          f"found {pool}")
        if not is_float(pool.dtype):
            raise fail("paged_attention", f"{name} dtype must be a float type, found {pool.dtype}")
    if k_pool.shape[:2] != v_pool.shape[:2] or k_pool.shape[3] != v_pool.shape[3] or k_pool.dtype != v_pool.dtype:
        raise fail("paged_attention", f"k_pool and v_pool differ in layers, pages, page size or dtype: {k_pool}, "
                                      f"{v_pool}")
    if not (isinstance(attrs["index"], int) and 0 <= attrs["index"] < k_pool.shape[0]):
        raise fail("paged_attention", f"index {attrs['index']} outside the pools' {k_pool.shape[0]} layers")
    if not (isinstance(attrs["layer"], int) and attrs["layer"] >= 0):
        raise fail("paged_attention", f"layer must be a non-negative integer, found {attrs['layer']}")
    if page_table.rank != 2 or page_table.dtype != "i32":
        raise fail("paged_attention", f"page_table must be i32[seqs, pages_per_seq], found {page_table}")
    if positions.rank != 2 or positions.dtype != "i64" or positions.shape != (1, q.shape[2]):
        raise fail("paged_attention", f"positions must be i64[1, {q.shape[2]}], found {positions}")
    if token_seq.rank != 1 or token_seq.dtype != "i32" or token_seq.shape[0] != q.shape[2]:
        raise fail("paged_attention", f"token_seq must be i32[{q.shape[2]}], found {token_seq}")
    return [TensorType(q.dtype, (1, q.shape[1], q.shape[2], v.shape[3])), k_pool, v_pool]


def _paged_attention_ref(xs, attrs):
    q, k, v, k_pool, v_pool, page_table, positions, token_seq = xs
    index = attrs["index"]
    page_size = k_pool.shape[3]
    k_pool, v_pool = k_pool.copy(), v_pool.copy()
    positions = positions[0]
    for t in range(q.shape[2]):
        pos, seq = int(positions[t]), int(token_seq[t])
        page = int(page_table[seq, pos // page_size])
        k_pool[index, page, :, pos % page_size, :] = k[0, :, t, :]
        v_pool[index, page, :, pos % page_size, :] = v[0, :, t, :]
    out = np.zeros((1, q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype)
    for seq in sorted(set(int(s) for s in token_seq)):
        rows = np.flatnonzero(token_seq == seq)
        length = int(positions[rows].max()) + 1
        pages = [int(page_table[seq, i]) for i in range((length + page_size - 1) // page_size)]
        keys = np.concatenate([k_pool[index, p] for p in pages], axis=1)[:, :length]
        values = np.concatenate([v_pool[index, p] for p in pages], axis=1)[:, :length]
        out[0][:, rows] = attention_reference(q[0][:, rows], keys, values, np.arange(length), positions[rows],
                                              attrs["scale"], attrs["window"], attrs.get("softcap"),
                                              attrs.get("alibi"))
    return [out, k_pool, v_pool]


define_op("paged_attention", infer=_paged_attention_infer, reference=_paged_attention_ref,
          attrs={**_ATTN_ATTRS, "layer": REQUIRED, "index": REQUIRED}, inputs=8,
          doc="the ragged step's attention: token t of the flat batch belongs to sequence token_seq[t] at "
              "positions[0, t]; its K/V are written into the pools at [index, page_table[seq, pos // page_size], "
              ":, pos % page_size], then it attends causally over that sequence's cached tokens 0..pos (within "
              "the window); returns (output, updated k_pool, updated v_pool)")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _select_rows_infer(types, attrs, module):
    x, rows = types
    if x.rank < 2 or x.shape[0] != 1 or rows.rank != 1 or rows.dtype != "i64":
        raise fail("select_rows", f"expected x[1, tokens, ...] and rows i64[n], found {x} and {rows}")
    return [TensorType(x.dtype, (1, rows.shape[0]) + tuple(x.shape[2:]))]


define_op("select_rows", infer=_select_rows_infer, reference=lambda xs, a: [np.take(xs[0], xs[1], axis=1)],
          inputs=2, doc="x[:, rows]: the step's positions that need logits (one per sequence when generating, "
                        "all of them for perplexity), so the per-position tail runs on those rows only")
