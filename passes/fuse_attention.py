"""Fuse attention: ATen SDPA and eager ``softmax(q @ k^T * scale + mask) @ v`` -> one grouped ``attention`` op.

Soft-capped scores (``cap * tanh(q @ k^T * scale / cap)``, Gemma-2) fuse with the op's ``softcap``; ALiBi
position biases (BLOOM, which also computes attention on [batch * heads, seq, head_dim] views; MPT, which adds
the last seq columns of a precomputed table and masks with ``where(not causal, -inf, scores)``) with its
``alibi`` slopes, proven like the mask below.

The K/V head repetition (``repeat_kv``: expand + reshape, or a broadcast
single head) is absorbed, so MHA, GQA and MQA become one op with
``num_heads`` / ``num_kv_heads``. A mask is accepted only when it is proven
causal or sliding-window (plus, for ALiBi, biases linear in the key's distance
from the query): its subgraph depends on sequence positions alone, so
it is evaluated and compared with the expected mask for every length from 1 to
256 and at sampled lengths up to the captured maximum (powers of two and their
neighbours, and the maximum itself; never past the module's declared range of
``seq``), for batch 1 and 2. An attention that
cannot be proven stays unfused and the reason is recorded in
``module.metadata["unfused_attention"]``. Evaluating a mask at n tokens takes
memory in n^2; a maximum length whose evaluation would not fit in half of
this machine's memory is refused with the bytes it would take.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.errors import ConfigError
from kiln.ir.files import memory_bytes
from kiln.ir.graph import Function, Module, Node, Value
from kiln.ir.ops import OPS, concrete_attrs
from kiln.ir.printer import format_node
from kiln.ir.symbolic import evaluate

from .manager import PassOptions, register_pass
from .patterns import operands, producer, scalar_value

_EXHAUSTIVE_UP_TO = 256


# K/V head repetition ------------------------------------------------------------
def _kv_source(k: Value, num_heads: int, grouped: bool = False):
    """Undo repeat_kv: returns the [b, Hkv, s, D] value and Hkv, or None. ``grouped``: the op itself maps
    query head h to K/V head h // (H / Hkv) (SDPA's enable_gqa)."""
    if k.type.rank != 4:
        return None
    heads = k.type.shape[1]
    if heads == 1:
        return k, 1
    reshape = producer(k, "reshape")
    expand = reshape and producer(reshape.inputs[0], "expand")
    if expand is not None and expand.output.type.rank == 5:
        b, kv, rep, s, d = expand.output.type.shape
        src = expand.inputs[0]
        if src.type.shape == (b, kv, 1, s, d) and reshape.output.type.shape == (b, kv * rep, s, d):
            inner = producer(src, "reshape")
            base = inner.inputs[0] if inner is not None and inner.inputs[0].type.shape == (b, kv, s, d) else None
            if base is None:
                base = _fresh_reshape(k, src, (b, kv, s, d))
            return base, kv
    expand = producer(k, "expand")
    if expand is not None and expand.inputs[0].type.rank == 4 and expand.inputs[0].type.shape[1] == 1:
        return expand.inputs[0], 1
    if heads == num_heads or (grouped and isinstance(heads, int) and num_heads % heads == 0):
        return k, heads
    return None


def _fresh_reshape(anchor: Value, src: Value, shape):
    fn = anchor.function
    return fn.emit("reshape", src, shape=shape, insert_before=anchor.producer)


# mask proof ------------------------------------------------------------------------
def _backward_slice(value: Value):
    """Nodes the value depends on, in function order; None if it reaches a function parameter."""
    seen, stack, nodes = set(), [value], []
    while stack:
        v = stack.pop()
        if v.producer is None:
            return None
        node = v.producer
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.inputs)
    order = {id(n): i for i, n in enumerate(value.function.nodes)}
    return sorted(nodes, key=lambda n: order[id(n)])


def _evaluate(nodes, value: Value, env: dict, module: Module) -> np.ndarray:
    values = {}
    for node in nodes:
        if node.op == "weight":
            outs = [np.asarray(module.weight_data[node.attrs["name"]])]
        else:
            outs = OPS[node.op].reference([values[id(v)] for v in node.inputs], concrete_attrs(node.attrs, env))
        for v, out in zip(node.outputs, outs):
            values[id(v)] = out
    return values[id(value)]


def _check_evaluation_fits(nodes, max_seq: int) -> None:
    """Refuse a maximum length at which the mask's subgraph (every intermediate is kept) would take more than
    half of this machine's memory, before evaluating anything."""
    env = {"batch": 1, "seq": max_seq}
    need = sum(evaluate(v.type.nbytes(), env) for node in nodes for v in node.outputs)
    limit = memory_bytes() // 2
    if need > limit:
        raise ConfigError(f"kiln proves the attention mask by evaluating it, which at --max-seq-len {max_seq:,} "
                          f"takes {need:,} bytes, more than half of this machine's memory ({limit * 2:,} bytes); "
                          f"lower --max-seq-len")


def _expected(n: int, window):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    return keep


def check_lengths(max_seq: int) -> list:
    lengths = set(range(1, min(_EXHAUSTIVE_UP_TO, max_seq) + 1))
    p = 256
    while p <= max_seq * 2:
        lengths.update(x for x in (p - 1, p, p + 1) if 1 <= x <= max_seq)
        p *= 2
    lengths.add(max_seq)
    return sorted(lengths)


def prove_bias(terms: list, num_heads: int, module: Module, max_seq: int):
    """The sum of ``terms`` (values added to the scores: boolean or additive masks, position biases; each
    [b, H | 1, s | 1, s], or flat [b * H, s | 1, s] when its flag says so) is proven to be a causal or
    sliding-window mask plus, optionally, ALiBi biases slope_h * (key - query) (up to a constant per row, which
    softmax ignores). Returns ("ok", window, slopes) with window None for plain causal and slopes None without
    ALiBi, or ("fail", reason)."""
    slices = []
    for value, _ in terms:
        nodes = _backward_slice(value)
        if nodes is None:
            return "fail", "the mask depends on the input tokens, not only on positions"
        if not value.type.symbols <= {"batch", "seq"}:
            return "fail", f"the mask depends on unknown sizes {sorted(value.type.symbols - {'batch', 'seq'})}"
        _check_evaluation_fits(nodes, max_seq)
        slices.append(nodes)
    window, slopes = "unknown", None
    batches = [b for b in (1, 2) if b <= module.symbol_ranges.get("batch", (1, 2))[1]]
    for batch in batches:
        for n in check_lengths(max_seq) if batch == 1 else [1, 2, 7, min(max_seq, 64)]:
            env = {"batch": batch, "seq": n}
            total = np.zeros((1, 1, 1, n))
            for (value, flat), nodes in zip(terms, slices):
                part = _evaluate(nodes, value, env, module)
                if part.dtype == np.bool_:
                    part = np.where(part, 0.0, -np.inf)
                part = part.astype(np.float64)
                if flat:
                    if part.ndim != 3 or part.shape[0] % num_heads:
                        return "fail", f"a flat score bias has shape {list(part.shape)} at length {n}"
                    part = part.reshape(part.shape[0] // num_heads, num_heads, *part.shape[1:])
                part = np.where(part <= np.finfo(np.float32).min / 2, -np.inf, part)
                if part.ndim > 4 or part.shape[-1] != n:
                    return "fail", f"the mask has shape {list(part.shape)} at length {n}"
                try:
                    total = total + part.reshape((1,) * (4 - part.ndim) + part.shape)
                except ValueError:
                    return "fail", f"the mask has shape {list(part.shape)} at length {n}"
            full = np.broadcast_to(total, total.shape[:2] + (n, n))
            keep = np.isfinite(full)
            rows = keep.reshape(-1, n, n)
            if window == "unknown":
                visible = int(rows[0, n - 1].sum())
                if visible != n:
                    window = visible
                elif n == max_seq:
                    window = None
            expected = _expected(n, None if window == "unknown" else window)
            if not np.all(rows == expected[None]):
                kind = "causal" if window in ("unknown", None) else f"sliding-window ({window})"
                return "fail", f"the mask differs from a {kind} mask at length {n}"
            status, slopes = _alibi_slopes(full, keep, num_heads, slopes, n)
            if status != "ok":
                return "fail", status
    return "ok", None if window == "unknown" else window, slopes


def _alibi_slopes(full: np.ndarray, keep: np.ndarray, num_heads: int, slopes, n: int):
    """("ok", slopes) when the finite values of ``full`` [b, H | 1, n, n] are slope_h * (key - query) plus a
    constant per row for every row (slopes None when they are all zero), consistent with ``slopes`` found at
    other lengths; else (reason, None)."""
    if n < 2:
        return "ok", slopes
    diagonal = np.diagonal(full, axis1=2, axis2=3)[..., None]  # each row's value at key == query (always kept)
    relative = np.where(keep, full - diagonal, 0.0)
    scale = max(float(np.abs(relative).max()), 1.0)
    if np.abs(relative).max() == 0:
        return ("ok", slopes) if slopes is None else (f"the position bias vanishes at length {n}", None)
    distance = np.arange(n)[None, :] - np.arange(n)[:, None]  # key - query
    per_head = relative[..., 1, 0] / -1.0  # row 1, key 0: slope * (0 - 1)
    found = np.broadcast_to(per_head, full.shape[:2])
    if not np.allclose(found, found[:1], rtol=0, atol=1e-6 * scale):
        return f"the position bias differs between sequences of the batch at length {n}", None
    found = np.broadcast_to(found[0], (num_heads,))
    predicted = found[None, :, None, None] * distance[None, None]
    if not np.allclose(np.where(keep, predicted, 0.0), relative, rtol=1e-5, atol=1e-6 * scale):
        return (f"the scores get a bias that is neither a mask nor linear in the key's distance (ALiBi) at "
                f"length {n}"), None
    found = tuple(float(x) for x in found)
    if slopes is not None and not np.allclose(found, slopes, rtol=1e-5, atol=1e-7):
        return f"the ALiBi slopes change with the length (at {n})", None
    return "ok", slopes if slopes is not None else found


# rewriting ----------------------------------------------------------------------------
def _unflatten_heads(value: Value, num_heads: int | None = None):
    """x [b * H, ...] made by reshaping a 4-D [b, H, ...] -> that 4-D value, or None (BLOOM computes attention
    with batch and heads merged)."""
    shaping = producer(value, "reshape")
    if shaping is None or value.type.rank != 3:
        return None
    source = shaping.inputs[0]
    shape = source.type.shape
    if source.type.rank != 4 or shape[2:] != value.type.shape[1:] or (num_heads and shape[1] != num_heads):
        return None
    return source if shape[0] * shape[1] == value.type.shape[0] else None


def _additive_terms(scores: Value, num_heads: int, anchor: Node):
    """What is added up into the [b, H, s, s] scores: (value, flat) pairs, flat marking a [b * H, ...] value
    reshaped to the scores' shape on the way. A where(keep, x, -inf) adds its boolean ``keep`` and x's terms;
    where(masked, -inf, x) (MPT's masked_fill) a ``not(masked)`` emitted before ``anchor``, and x's terms."""
    terms, stack = [], [(scores, False)]
    while stack:
        value, flat = stack.pop()
        if value.type.dtype == "bool":
            terms.append((value, flat))
            continue
        add = producer(value, "add")
        if add is not None:
            stack.extend((v, flat) for v in add.inputs)
            continue
        where = producer(value, "where")
        if where is not None:
            # (a where choosing a scalar, such as where(keep, 0, -inf), is itself an additive mask)
            condition, kept, filled = where.inputs
            if _is_minus_infinity(filled) and kept.type.rank:
                terms.append((condition, flat))
                stack.append((kept, flat))
                continue
            if _is_minus_infinity(kept) and filled.type.rank:
                terms.append((anchor.function.emit("not", condition, insert_before=anchor), flat))
                stack.append((filled, flat))
                continue
        shaping = producer(value, "reshape")
        if not flat and shaping is not None and value.type.rank == 4 and shaping.inputs[0].type.rank == 3:
            inner = shaping.inputs[0]
            if (value.type.shape[1] == num_heads and inner.type.shape[1:] == value.type.shape[2:]
                    and inner.type.shape[0] == value.type.shape[0] * num_heads and producer(inner, "add")):
                stack.append((inner, True))
                continue
        terms.append((value, flat))
    return terms


def _match_eager(node: Node):
    """matmul(softmax(S), v) with S = q @ k^T * scale (soft-capped or not) plus masks and position biases (or
    where(mask, ., -inf)) -> (q, k, v, bias terms, scale, softcap), or None. Also BLOOM's form, where the
    matmuls run on [b * H, s, D] views of the 4-D tensors."""
    probs, values = node.inputs
    flat = node.output.type.rank == 3
    if flat:
        probs, values = _unflatten_heads(probs), _unflatten_heads(values)
        if probs is None or values is None:
            return None
    soft = producer(probs, "softmax", "cast")
    if soft is not None and soft.op == "cast":
        soft = producer(soft.inputs[0], "softmax")
    if soft is None or soft.attrs["axis"] not in (-1, soft.output.type.rank - 1) or soft.output.type.rank != 4:
        return None
    num_heads = soft.output.type.shape[1]
    terms = _additive_terms(soft.inputs[0], num_heads, node)
    candidates = [(i, _scores_source(v, f, node)) for i, (v, f) in enumerate(terms) if v.type.dtype != "bool"]
    candidates = [(i, c) for i, c in candidates if c is not None]
    if len(candidates) != 1:
        return None
    index, (q, k, scale, softcap) = candidates[0]
    return q, k, values, terms[:index] + terms[index + 1:], scale, softcap


def _scores_source(value: Value, flat: bool, anchor: Node):
    """The scaled (soft-capped or not) q @ k^T a scores term is: (q, k, scale, softcap) with q and k
    [b, H, s, D] (the 4-D sources of a flat term's operands); or None. A permute k needs is emitted before
    ``anchor``."""
    scale, value = _peel_scalar_factors(value)
    softcap = None
    capped = producer(value, "tanh")
    if capped is not None:
        # Soft-capping (Gemma-2): cap * tanh(inner * qk) with the scalar factors outside (cap) and inside
        # (inner) the tanh; as the op states it, c * tanh(s / c) with c = cap and s = inner * cap * qk.
        if scale is None or scale <= 0:
            return None
        inner, value = _peel_scalar_factors(capped.inputs[0])
        if inner is None:
            return None
        softcap, scale = scale, inner * scale
    qk = producer(value, "matmul")
    if scale is None or qk is None:
        return None
    q, kt = qk.inputs
    if flat:  # q [b * H, s, D] @ k^T [b * H, D, s], k^T a transpose of a [b * H, s, D] view of k
        transposed = producer(kt, "permute")
        if transposed is None or tuple(transposed.attrs["perm"]) != (0, 2, 1):
            return None
        q, k = _unflatten_heads(q), _unflatten_heads(transposed.inputs[0])
        return None if q is None or k is None else (q, k, scale, softcap)
    perm = producer(kt, "permute")
    if perm is None or q.type.rank != 4 or kt.type.rank != 4:
        return None
    # k^T = x.permute(p) means k = x.permute(p with its last two axes swapped); canonicalize composes
    # GPT-2's k.permute(0, 2, 1, 3).transpose(-1, -2) into one permute (0, 2, 3, 1)
    p = tuple(perm.attrs["perm"])
    k_perm = p[:2] + (p[3], p[2])
    k = perm.inputs[0] if k_perm == (0, 1, 2, 3) else \
        anchor.function.emit("permute", perm.inputs[0], perm=k_perm, insert_before=anchor)
    return q, k, scale, softcap


def _is_minus_infinity(value: Value) -> bool:
    """A scalar at or below half of float32's lowest: what masked scores are filled with."""
    fill = scalar_value(value)
    return fill is not None and fill <= np.finfo(np.float32).min / 2


def _peel_scalar_factors(scores: Value):
    """(product of the scalar factors scores is multiplied or divided by, what they multiply), or (None, _)
    when a multiplication or division is not by a scalar."""
    scale = 1.0
    while True:
        scaled = producer(scores, "mul", "div")
        if scaled is None:
            return scale, scores
        pair = operands(scaled, lambda v: scalar_value(v) is not None)
        if pair is None or (scaled.op == "div" and pair[0] is not scaled.inputs[1]):
            return None, scores
        factor = float(scalar_value(pair[0]))
        scale *= factor if scaled.op == "mul" else 1.0 / factor
        scores = pair[1]


def _fuse_one(fn: Function, node: Node, module: Module, max_seq: int, reasons: list) -> bool:
    existing = {id(n) for n in fn.nodes}
    if _try_fuse(fn, node, module, max_seq, reasons):
        return True
    # Matching may have emitted views (a fresh K/V reshape or permute); a failed match leaves the
    # function as it was, so that the pass truthfully reports no change.
    for extra in reversed([n for n in fn.nodes if id(n) not in existing]):
        fn.erase(extra)
    return False


def _try_fuse(fn: Function, node: Node, module: Module, max_seq: int, reasons: list) -> bool:
    if node.op == "sdpa":
        q, k, v = node.inputs[:3]
        biases = [(node.inputs[3], False)] if len(node.inputs) == 4 else []
        causal = node.attrs["is_causal"]
        scale = node.attrs["scale"]
        softcap = None
    else:
        parts = _match_eager(node)
        if parts is None:
            return False
        q, k, v, biases, scale, softcap = parts
        causal = False
    where = f"{format_node(node)}" + (f" ({node.meta['source']})" if node.meta.get("source") else "")
    if q.type.rank != 4:
        reasons.append(f"{where}: q is not [batch, heads, seq, head_dim]")
        return False
    num_heads, head_dim = q.type.shape[1], q.type.shape[3]
    grouped = node.op == "sdpa" and node.attrs["enable_gqa"]
    ks, vs = _kv_source(k, num_heads, grouped), _kv_source(v, num_heads, grouped)
    if ks is None or vs is None or ks[1] != vs[1] or num_heads % ks[1]:
        reasons.append(f"{where}: cannot see how K/V heads map to query heads")
        return False
    window = slopes = None
    if biases:
        proof = prove_bias(biases, num_heads, module, max_seq)
        if proof[0] != "ok":
            reasons.append(f"{where}: {proof[1]}")
            return False
        window, slopes = proof[1], proof[2]
    elif not causal:
        reasons.append(f"{where}: attention without a mask is not causal (bidirectional attention is not "
                       f"supported)")
        return False
    if q.type.shape[2] != ks[0].type.shape[2]:
        reasons.append(f"{where}: query and key lengths differ")
        return False
    fused = fn.add_node("attention", [q, ks[0], vs[0]],
                        {"num_heads": num_heads, "num_kv_heads": ks[1],
                         "scale": float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
                         "window": window, "softcap": softcap, "alibi": slopes},
                        before=node, name="attention", meta=node.meta)
    out = fused.output
    if node.output.type.rank == 3:  # BLOOM's [b * H, s, D] form: the same values, viewed as it expects
        out = fn.emit("reshape", out, shape=node.output.type.shape, insert_before=node)
    fn.replace_all_uses(node.output, out)
    return True


@register_pass("fuse_attention")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites SDPA and eager softmax(q k^T) v with a proven causal/sliding mask into grouped attention."""
    max_seq = module.metadata.get("capture", {}).get("max_seq", options.max_seq_len)
    # the mask is evaluated at lengths the module is valid for (a table it slices may end at its declared limit)
    max_seq = min(max_seq, options.max_seq_len, module.symbol_ranges.get("seq", (1, max_seq))[1])
    reasons: list = []
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op in ("sdpa", "matmul"):
                changed |= _fuse_one(fn, node, module, max_seq, reasons)
    module.metadata["unfused_attention"] = reasons
    return changed
