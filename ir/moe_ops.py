"""Mixture-of-experts ops: ``moe_route`` (router logits -> each token's top-k experts and their weights) and
``moe_experts`` (each token's weighted sum of its selected experts' gated MLPs).

Expert weights are stacked per expert as ``[E, N, K]`` (a linear's ``W[N, K]`` per expert), the layout
transformers' fused experts modules keep: ``w_gate_up [E, 2I, H]`` holds the gate rows then the up rows,
``w_down [E, H, I]``. ``moe_experts_q`` takes each stacked weight as ``linear_q``'s ``(q, scale[, offset])``
with one more leading axis of E (see ``quant_ops``), or as a float stack where a weight stays float.
"""

from __future__ import annotations

import numpy as np

from .llm_ops import _ACTIVATIONS, _activation
from .ops import REQUIRED, define_op, fail
from .quant_ops import (ACTIVATION_BLOCK, ACTIVATIONS, check_quantized, dequantize, int8_activations_fit,
                        quantize_activations)
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


def _experts(x, weights, ids, gate_up_of, down_of, inter, activation, rows_of=None):
    """The weighted sum of the selected experts' gated MLPs, per token, in float64 with each stage rounded to
    x's dtype as the unfused graph rounds it. ``gate_up_of(e)`` / ``down_of(e)``: expert e's float64 weights;
    ``rows_of``: what a matmul reads of its input row (int8 activations), None for the row itself."""
    rows_of = rows_of or (lambda row: row.astype(np.float64))
    out = np.zeros(x.shape, dtype=np.float64)
    for token in range(x.shape[0]):
        row = rows_of(x[token])
        for slot in range(ids.shape[1]):
            expert = int(ids[token, slot])
            gate_up = (gate_up_of(expert) @ row).astype(x.dtype)
            hidden = (_activation(gate_up[:inter], activation) * gate_up[inter:]).astype(x.dtype)
            down = (down_of(expert) @ rows_of(hidden)).astype(x.dtype)
            out[token] += float(weights[token, slot]) * down.astype(np.float64)
    return out.astype(x.dtype)


def experts(x, weights, ids, w_gate_up, w_down, activation):
    """moe_experts' reference (float stacked weights)."""
    return _experts(x, weights, ids, lambda e: w_gate_up[e].astype(np.float64),
                    lambda e: w_down[e].astype(np.float64), w_down.shape[2], activation)


define_op("moe_experts", infer=_experts_infer,
          reference=lambda xs, a: [experts(*xs, a["activation"])], attrs={"activation": REQUIRED}, inputs=5,
          doc="x [T, H], weights [T, k], ids [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H]: "
              "sum over j of weights[t, j] * down_e(act(gate_e x) * up_e x) with e = ids[t, j]")


# moe_experts_q: the experts' weights in linear_q's formats -----------------------------------------------
# Each stacked weight (gate_up, then down) is described by three attributes: <w>_bits 0 (a float stack
# [E, N, K], one input), 8 or 4 (linear_q's (q, scale[, offset]) with a leading E axis: 2 inputs, 3 with
# <w>_offset), and <w>_group_size as linear_q's group_size.
QUANTIZED_WEIGHTS = ("gate_up", "down")


def weight_parts(attrs, name: str) -> int:
    """How many inputs stacked weight ``name`` ("gate_up" / "down") of a moe_experts_q takes."""
    if attrs[f"{name}_bits"] == 0:
        return 1
    return 3 if attrs[f"{name}_offset"] else 2


def split_weights(inputs, attrs) -> dict:
    """{"gate_up": its inputs, "down": its inputs} of a moe_experts_q's inputs (x, weights, ids first)."""
    count = weight_parts(attrs, "gate_up")
    return {"gate_up": list(inputs[3:3 + count]), "down": list(inputs[3 + count:])}


def _check_stack(name: str, parts, attrs, rows, k) -> tuple:
    """(E, N, K) of one stacked weight of a moe_experts_q, checked against linear_q's rule per expert."""
    bits, group = attrs[f"{name}_bits"], attrs[f"{name}_group_size"]
    if bits == 0:
        (w,) = parts
        if w.rank != 3 or not is_float(w.dtype) or (k is not None and w.shape[2] != k) \
                or (rows is not None and w.shape[1] != rows):
            raise fail("moe_experts_q", f"expected a float {name} stack [E, {rows or 'N'}, {k or 'K'}], found {w}")
        return tuple(w.shape)
    if any(p.rank != 3 for p in parts[:1]) or any(p.rank < 2 for p in parts[1:]):
        raise fail("moe_experts_q", f"expected {name} q, scale[, offset] with a leading experts axis, "
                                    f"found {', '.join(map(str, parts))}")
    experts = parts[0].shape[0]
    if any(p.shape[0] != experts for p in parts):
        raise fail("moe_experts_q", f"expected one {name} q, scale[, offset] per expert ({experts}), "
                                    f"found {', '.join(map(str, parts))}")
    per_expert = [TensorType(p.dtype, tuple(p.shape[1:])) for p in parts]
    n, qk = check_quantized("moe_experts_q", per_expert[0], per_expert[1], per_expert[2] if len(parts) == 3 else None,
                            bits, group, k=k)
    if rows is not None and n != rows:
        raise fail("moe_experts_q", f"expected {name} with {rows} rows per expert, found {parts[0]}")
    return experts, n, qk


def _experts_q_infer(types, attrs, module):
    for name in QUANTIZED_WEIGHTS:
        if attrs[f"{name}_bits"] not in (0, 4, 8):
            raise fail("moe_experts_q", f"{name}_bits must be 0 (float), 4 or 8, found {attrs[f'{name}_bits']}")
    if attrs["activation"] not in _ACTIVATIONS:
        raise fail("moe_experts_q", f"activation must be one of {_ACTIVATIONS}, found {attrs['activation']!r}")
    x, weights, ids = types[:3]
    if x.rank != 2 or not is_float(x.dtype) or not isinstance(x.shape[1], int):
        raise fail("moe_experts_q", f"expected float x [tokens, hidden], found {x}")
    tokens, hidden = x.shape
    if weights.rank != 2 or weights.shape[0] != tokens or ids.shape != weights.shape or not is_float(weights.dtype) \
            or ids.dtype not in ("i64", "i32"):
        raise fail("moe_experts_q", f"expected float weights and integer ids [{tokens}, k], found {weights}, {ids}")
    want = 3 + weight_parts(attrs, "gate_up") + weight_parts(attrs, "down")
    if len(types) != want:
        raise fail("moe_experts_q", f"expected {want} inputs for these weight formats, found {len(types)}")
    parts = split_weights(types, attrs)
    experts, rows, _ = _check_stack("gate_up", parts["gate_up"], attrs, None, hidden)
    if rows % 2:
        raise fail("moe_experts_q", f"expected gate_up with 2I rows (gate then up), found {rows}")
    down_experts, _, _ = _check_stack("down", parts["down"], attrs, hidden, rows // 2)
    if down_experts != experts:
        raise fail("moe_experts_q", f"expected gate_up and down for the same experts, found {experts} and "
                                    f"{down_experts}")
    if attrs["activations"] not in ACTIVATIONS:
        raise fail("moe_experts_q", f"activations must be one of {', '.join(ACTIVATIONS)}, "
                                    f"found {attrs['activations']!r}")
    if attrs["activations"] == "int8" and not int8_activations_fit_experts(hidden, rows // 2, attrs):
        raise fail("moe_experts_q", f"int8 activations need quantized gate_up and down with H={hidden}, I={rows // 2} "
                                    f"multiples of {ACTIVATION_BLOCK} and their groups multiples or divisors of "
                                    f"{ACTIVATION_BLOCK}; use activations=float for these experts")
    return [x]


def int8_activations_fit_experts(hidden: int, inter: int, attrs) -> bool:
    """Whether a moe_experts_q can take int8 activations: both weights quantized, both of their K (H for
    gate_up, I for down) multiples of 32 and groups multiples or divisors of 32 (what linear_q asks of each)."""
    return all(attrs[f"{name}_bits"] and int8_activations_fit(k, attrs[f"{name}_group_size"])
               for name, k in (("gate_up", hidden), ("down", inter)))


def _stack_weight(parts, attrs, name: str):
    """expert -> its float64 weight [N, K] of stacked weight ``name``."""
    bits, group = attrs[f"{name}_bits"], attrs[f"{name}_group_size"]
    if bits == 0:
        return lambda e: parts[0][e].astype(np.float64)
    return lambda e: dequantize(parts[0][e], parts[1][e], parts[2][e] if len(parts) == 3 else None, bits, group)


def _int8_row(row):
    xq, scale = quantize_activations(row[None].astype(np.float32))
    return (xq.astype(np.float64).reshape(scale.shape + (ACTIVATION_BLOCK,)) * scale[..., None]).reshape(-1)


def experts_q(xs, attrs):
    """moe_experts_q's reference: moe_experts' arithmetic over the dequantized weights of the selected experts
    (each row quantized per block of 32 before each matmul with activations=int8, as linear_q's reference)."""
    x, weights, ids = xs[:3]
    parts = split_weights(xs, attrs)
    gate_up_of, down_of = (_stack_weight(parts[name], attrs, name) for name in QUANTIZED_WEIGHTS)
    inter = gate_up_of(0).shape[0] // 2
    return _experts(x, weights, ids, gate_up_of, down_of, inter, attrs["activation"],
                    _int8_row if attrs["activations"] == "int8" else None)


define_op("moe_experts_q", infer=_experts_q_infer, reference=lambda xs, a: [experts_q(xs, a)],
          attrs={"activation": REQUIRED, "gate_up_bits": REQUIRED, "gate_up_group_size": 0, "gate_up_offset": False,
                 "down_bits": REQUIRED, "down_group_size": 0, "down_offset": False, "activations": "float"},
          inputs=(5, 9),
          doc="x [T, H], weights [T, k], ids [T, k], gate_up, down -> [T, H]: moe_experts with each stacked weight "
              "in linear_q's formats plus a leading experts axis (<w>_bits 8 / 4: q, scale[, offset]; 0: a float "
              "stack); activations=int8 quantizes each matmul's input rows per block of 32 first")


def _format(attrs, name: str, dtype: str) -> str:
    """linear_q-style name of a stacked weight's format (quantize_weights' weight_formats keys): int4-g32+offset,
    int8-per-row, ... or the float dtype."""
    bits = attrs[f"{name}_bits"]
    if bits == 0:
        return dtype
    group = attrs[f"{name}_group_size"]
    return f"int{bits}" + (f"-g{group}" if group else "-per-row") + ("+offset" if attrs[f"{name}_offset"] else "")


def expert_reads(function) -> dict | None:
    """What the moe_experts / moe_experts_q of ``function`` hold and read (for ``kiln inspect``): MoE layers,
    top-k, experts, all expert-weight bytes in their stored format (quantized blocks, scales and offsets),
    the bytes one decoded token reads (top-k experts per layer), and {format: stacked weights}, or None."""
    from .types import numpy_dtype

    layers = [node for node in function.nodes if node.op in ("moe_experts", "moe_experts_q")]
    if not layers:
        return None
    total = read = 0
    formats: dict = {}
    for node in layers:
        stacked = sum(int(np.prod(v.type.shape)) * np.dtype(numpy_dtype(v.type.dtype)).itemsize
                      for v in node.inputs[3:])
        experts, top_k = node.inputs[3].type.shape[0], node.inputs[1].type.shape[1]
        total += stacked
        read += stacked * top_k // experts
        if node.op == "moe_experts_q":
            parts = split_weights(node.inputs, node.attrs)
            names = [_format(node.attrs, name, parts[name][0].type.dtype) for name in QUANTIZED_WEIGHTS]
        else:
            names = [v.type.dtype for v in node.inputs[3:]]
        for name in names:
            formats[name] = formats.get(name, 0) + 1
    first = layers[0]
    return {"layers": len(layers), "top_k": first.inputs[1].type.shape[1], "experts": first.inputs[3].type.shape[0],
            "expert_weight_bytes": total, "expert_bytes_per_decoded_token": read, "formats": formats}
