"""Fuse attention: ATen SDPA and eager ``softmax(q @ k^T * scale + mask) @ v`` -> one grouped ``attention`` op.

Soft-capped scores (``cap * tanh(q @ k^T * scale / cap)``, Gemma-2) fuse with the op's ``softcap``.

The K/V head repetition (``repeat_kv``: expand + reshape, or a broadcast
single head) is absorbed, so MHA, GQA and MQA become one op with
``num_heads`` / ``num_kv_heads``. A mask is accepted only when it is proven
causal or sliding-window: its subgraph depends on sequence positions alone, so
it is evaluated and compared with the expected mask for every length from 1 to
256 and at sampled lengths up to the captured maximum (powers of two and their
neighbours, and the maximum itself), for batch 1 and 2. An attention that
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


def _keep_matrix(mask: np.ndarray):
    """Boolean keep-matrix of a bool or additive float mask; None if it has other values."""
    if mask.dtype == np.bool_:
        return mask
    keep = mask == 0
    blocked = mask <= np.finfo(np.float32).min / 2
    if not np.all(keep | blocked):
        return None
    return keep


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


def prove_mask(mask: Value, module: Module, max_seq: int):
    """Returns ("ok", window) with window None for plain causal, or ("fail", reason)."""
    nodes = _backward_slice(mask)
    if nodes is None:
        return "fail", "the mask depends on the input tokens, not only on positions"
    symbols = mask.type.symbols
    if not symbols <= {"batch", "seq"}:
        return "fail", f"the mask depends on unknown sizes {sorted(symbols - {'batch', 'seq'})}"
    _check_evaluation_fits(nodes, max_seq)
    window = "unknown"
    for batch in (1, 2):
        for n in check_lengths(max_seq) if batch == 1 else [1, 2, 7, min(max_seq, 64)]:
            env = {"batch": batch, "seq": n}
            value = _evaluate(nodes, mask, env, module)
            keep = _keep_matrix(value)
            if keep is None:
                return "fail", "the mask holds values other than 0 and -inf"
            full = np.broadcast_to(keep, keep.shape[:-2] + (n, n)) if keep.ndim >= 2 else None
            if full is None or keep.shape[-1] != n:
                return "fail", f"the mask has shape {list(keep.shape)} at length {n}"
            rows = full.reshape(-1, n, n)
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
    return "ok", None if window == "unknown" else window


# rewriting ----------------------------------------------------------------------------
def _match_eager(node: Node):
    """matmul(softmax(S), v) with S = q @ k^T * scale (+ mask | where(mask, ., -inf)) -> parts, or None."""
    soft = producer(node.inputs[0], "softmax", "cast")
    if soft is not None and soft.op == "cast":
        soft = producer(soft.inputs[0], "softmax")
    if soft is None or soft.attrs["axis"] not in (-1, soft.output.type.rank - 1):
        return None
    scores, mask = soft.inputs[0], None
    add = producer(scores, "add")
    if add is not None:
        pair = operands(add, lambda v: producer(v, "matmul", "mul", "div", "tanh") is not None
                        and v.type.dtype != "bool")
        if pair is None:
            return None
        scores, mask = pair
    where = producer(scores, "where")
    if where is not None:
        fill = scalar_value(where.inputs[2])
        if fill is None or fill > np.finfo(np.float32).min / 2:
            return None
        mask = where.inputs[0] if mask is None else None
        if mask is None:
            return None
        scores = where.inputs[1]
    scale, scores = _peel_scalar_factors(scores)
    softcap = None
    capped = producer(scores, "tanh")
    if capped is not None:
        # Soft-capping (Gemma-2): cap * tanh(inner * qk) with the scalar factors outside (cap) and inside
        # (inner) the tanh; as the op states it, c * tanh(s / c) with c = cap and s = inner * cap * qk.
        if scale is None or scale <= 0:
            return None
        inner, scores = _peel_scalar_factors(capped.inputs[0])
        if inner is None:
            return None
        softcap, scale = scale, inner * scale
    if scale is None:
        return None
    qk = producer(scores, "matmul")
    if qk is None:
        return None
    q, kt = qk.inputs
    perm = producer(kt, "permute")
    if perm is None or kt.type.rank != 4:
        return None
    # k^T = x.permute(p) means k = x.permute(p with its last two axes swapped); canonicalize composes
    # GPT-2's k.permute(0, 2, 1, 3).transpose(-1, -2) into one permute (0, 2, 3, 1)
    p = tuple(perm.attrs["perm"])
    k_perm = p[:2] + (p[3], p[2])
    k = perm.inputs[0] if k_perm == (0, 1, 2, 3) else \
        node.function.emit("permute", perm.inputs[0], perm=k_perm, insert_before=node)
    return q, k, node.inputs[1], mask, scale, softcap


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
        mask = node.inputs[3] if len(node.inputs) == 4 else None
        causal = node.attrs["is_causal"]
        scale = node.attrs["scale"]
        softcap = None
    else:
        parts = _match_eager(node)
        if parts is None:
            return False
        q, k, v, mask, scale, softcap = parts
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
    window = None
    if mask is not None:
        status, detail = prove_mask(mask, module, max_seq)
        if status != "ok":
            reasons.append(f"{where}: {detail}")
            return False
        window = detail
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
                         "window": window, "softcap": softcap},
                        before=node, name="attention", meta=node.meta)
    fn.replace_all_uses(node.output, fused.output)
    return True


@register_pass("fuse_attention")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites SDPA and eager softmax(q k^T) v with a proven causal/sliding mask into grouped attention."""
    max_seq = module.metadata.get("capture", {}).get("max_seq", options.max_seq_len)
    max_seq = min(max_seq, options.max_seq_len)
    reasons: list = []
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op in ("sdpa", "matmul"):
                changed |= _fuse_one(fn, node, module, max_seq, reasons)
    module.metadata["unfused_attention"] = reasons
    return changed
