"""Mixture-of-experts ops: ``moe_route`` (router logits -> each token's top-k experts and their weights) and
``moe_experts`` (each token's weighted sum of its selected experts' gated MLPs).

Expert weights are stacked per expert as ``[E, N, K]`` (a linear's ``W[N, K]`` per expert), the layout
transformers' fused experts modules keep: ``w_gate_up [E, 2I, H]`` holds the gate rows then the up rows,
``w_down [E, H, I]``. A quantized variant takes each stacked weight as ``linear_q``'s ``(q, scale[, offset])``
with one more leading axis of E.
"""

from __future__ import annotations

import numpy as np

from .llm_ops import _ACTIVATIONS, _activation
from .ops import REQUIRED, define_op, fail
from .types import TensorType, is_float

# How router logits become scores. softmax: over all experts, then top-k (Mixtral, Qwen-MoE, DeepSeek-V2);
# sigmoid: per expert, then top-k (DeepSeek-V3); softmax_of_topk: top-k of the logits, then a softmax over
# the k chosen (GPT-OSS, Switch-style routers).
SCORINGS = ("softmax", "sigmoid", "softmax_of_topk")
# How a group of experts is ranked for grouped top-k: its best expert (DeepSeek-V2's group_limited_greedy)
# or the sum of its best two (DeepSeek-V3).
GROUP_SCORES = ("max", "top2_sum")


def _route_infer(types, attrs, module):
    logits = types[0]
    if logits.rank != 2 or not is_float(logits.dtype):
        raise fail("moe_route", f"expected float logits [tokens, experts], found {logits}")
    experts = logits.shape[1]
    top_k, groups, top_groups = attrs["top_k"], attrs["num_groups"], attrs["topk_groups"]
    if not isinstance(experts, int):
        raise fail("moe_route", f"expected a fixed number of experts, found {experts}")
    if attrs["scoring"] not in SCORINGS:
        raise fail("moe_route", f"scoring must be one of {SCORINGS}, found {attrs['scoring']!r}")
    if attrs["group_score"] not in GROUP_SCORES:
        raise fail("moe_route", f"group_score must be one of {GROUP_SCORES}, found {attrs['group_score']!r}")
    if not (isinstance(groups, int) and groups >= 1 and experts % groups == 0 and 1 <= top_groups <= groups):
        raise fail("moe_route", f"num_groups must divide the {experts} experts and 1 <= topk_groups <= num_groups, "
                                f"found num_groups={groups} topk_groups={top_groups}")
    if not (isinstance(top_k, int) and 1 <= top_k <= experts // groups * top_groups):
        raise fail("moe_route", f"top_k must be in [1, {experts // groups * top_groups}], found {top_k}")
    if len(types) == 2 and (types[1].shape != (experts,) or not is_float(types[1].dtype)):
        raise fail("moe_route", f"correction bias must be float [{experts}], found {types[1]}")
    tokens = logits.shape[0]
    return [TensorType("f32", (tokens, top_k)), TensorType("i64", (tokens, top_k))]


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _top(values, count):
    """Indices of the ``count`` largest along the last axis, largest first (ties: lower index first)."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :count]


def route(logits, correction_bias=None, *, top_k, scoring="softmax", normalize=False, num_groups=1,
          topk_groups=1, group_score="max", scaling=1.0):
    """(weights f32 [T, k], ids i64 [T, k]) for router logits [T, E], in float64 (see the op's doc)."""
    x = logits.astype(np.float64)
    scores = {"softmax": lambda: _softmax(x), "sigmoid": lambda: 1.0 / (1.0 + np.exp(-x)),
              "softmax_of_topk": lambda: x}[scoring]()
    choice = scores if correction_bias is None else scores + correction_bias.astype(np.float64)
    if num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, num_groups, experts // num_groups)
        best = -np.sort(-grouped, axis=-1)
        group_value = best[..., 0] if group_score == "max" else best[..., 0] + best[..., 1]
        kept = np.zeros((tokens, num_groups), dtype=bool)
        np.put_along_axis(kept, _top(group_value, topk_groups), True, axis=-1)
        choice = np.where(np.repeat(kept, experts // num_groups, axis=-1), choice, -np.inf)
    ids = _top(choice, top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)
    if scoring == "softmax_of_topk":
        weights = _softmax(weights)
    if normalize:
        weights = weights / np.sum(weights, axis=-1, keepdims=True)
    return (weights * scaling).astype(np.float32), ids.astype(np.int64)


def _route_ref(xs, attrs):
    return list(route(xs[0], xs[1] if len(xs) == 2 else None, **attrs))


define_op("moe_route", infer=_route_infer, reference=_route_ref,
          attrs={"top_k": REQUIRED, "scoring": "softmax", "normalize": False, "num_groups": 1, "topk_groups": 1,
                 "group_score": "max", "scaling": 1.0},
          inputs=(1, 2),
          doc="router logits [T, E] (+ a correction bias [E] that steers the choice only) -> weights f32 [T, k], "
              "ids i64 [T, k]: scores by `scoring`; with num_groups > 1 only the experts of the topk_groups best "
              "groups (ranked by group_score) compete; the top_k scores (plus bias) win; their scores, "
              "divided by their sum when `normalize`, times `scaling`, are the weights")


def _experts_infer(types, attrs, module):
    x, weights, ids, w_gate_up, w_down = types
    if attrs["activation"] not in _ACTIVATIONS:
        raise fail("moe_experts", f"activation must be one of {_ACTIVATIONS}, found {attrs['activation']!r}")
    if x.rank != 2 or not is_float(x.dtype):
        raise fail("moe_experts", f"expected float x [tokens, hidden], found {x}")
    tokens, hidden = x.shape
    if weights.rank != 2 or weights.shape[0] != tokens or ids.shape != weights.shape or not is_float(weights.dtype) \
            or ids.dtype not in ("i64", "i32"):
        raise fail("moe_experts", f"expected float weights and integer ids [{tokens}, k], found {weights}, {ids}")
    if w_gate_up.rank != 3 or w_down.rank != 3 or w_gate_up.shape[2] != hidden or w_down.shape[0] != w_gate_up.shape[0] \
            or w_down.shape[1] != hidden or w_gate_up.shape[1] != 2 * w_down.shape[2]:
        raise fail("moe_experts", f"expected w_gate_up [E, 2I, {hidden}] and w_down [E, {hidden}, I], "
                                  f"found {w_gate_up}, {w_down}")
    return [x]


def experts(x, weights, ids, w_gate_up, w_down, activation):
    """The weighted sum of the selected experts' gated MLPs, per token, in float64 with each stage rounded
    to x's dtype as the unfused graph rounds it."""
    inter = w_down.shape[2]
    out = np.zeros(x.shape, dtype=np.float64)
    for token in range(x.shape[0]):
        row = x[token].astype(np.float64)
        for slot in range(ids.shape[1]):
            expert = int(ids[token, slot])
            gate_up = (w_gate_up[expert].astype(np.float64) @ row).astype(x.dtype)
            hidden = (_activation(gate_up[:inter], activation) * gate_up[inter:]).astype(x.dtype)
            down = (w_down[expert].astype(np.float64) @ hidden.astype(np.float64)).astype(x.dtype)
            out[token] += float(weights[token, slot]) * down.astype(np.float64)
    return out.astype(x.dtype)


define_op("moe_experts", infer=_experts_infer,
          reference=lambda xs, a: [experts(*xs, a["activation"])], attrs={"activation": REQUIRED}, inputs=5,
          doc="x [T, H], weights [T, k], ids [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H]: "
              "sum over j of weights[t, j] * down_e(act(gate_e x) * up_e x) with e = ids[t, j]")


def expert_reads(function) -> dict | None:
    """What the moe_experts of ``function`` hold and read (for ``kiln inspect``): MoE layers, top-k, experts,
    all expert-weight bytes, and the bytes one decoded token reads (top-k experts per layer), or None."""
    from .types import numpy_dtype

    layers = [node for node in function.nodes if node.op == "moe_experts"]
    if not layers:
        return None
    total = read = 0
    for node in layers:
        stacked = sum(int(np.prod(v.type.shape)) * np.dtype(numpy_dtype(v.type.dtype)).itemsize
                      for v in node.inputs[3:])
        experts, top_k = node.inputs[3].type.shape[0], node.inputs[1].type.shape[1]
        total += stacked
        read += stacked * top_k // experts
    first = layers[0]
    return {"layers": len(layers), "top_k": first.inputs[1].type.shape[1], "experts": first.inputs[3].type.shape[0],
            "expert_weight_bytes": total, "expert_bytes_per_decoded_token": read}
