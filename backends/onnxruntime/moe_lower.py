"""ONNX lowering of ``moe_route`` and ``moe_experts``: ONNX Runtime's com.microsoft ``MoE`` where it computes
the same thing, standard ONNX (TopK, then a Gather of each token's selected experts' weights) elsewhere.

Registered into ``lower.LOWERINGS`` on import. ORT 1.32's CPU ``MoE`` routes by itself (softmax over the
router logits, top-k, optionally renormalised) and runs SwiGLU experts only in the interleaved layout
(swiglu_fusion=1; the [gate; up] layout is refused on the CPU), with activation_alpha=1, activation_beta=0
for plain SiLU: matched a numpy reference to 3.6e-7. It takes a moe_experts whose weights come straight
from a softmax moe_route without groups, bias or scaling (Mixtral, Qwen-MoE), and that route then emits
nothing. Other routings (sigmoid, grouped, scaled: DeepSeek) and GELU experts take the standard path, which
gathers the k selected experts' weights per token: a decode step copies and reads k experts, a prefill k
per token.

``moe_experts_q`` takes the standard path over the quantized stacks: it gathers the selected experts' quantized
blocks, scales and offsets (a decode step reads k experts' blocks in their stored format, never the others),
dequantizes them with standard ops (as embedding_q's lowering does its rows) and multiplies in f32; int8
activations round each matmul's input rows per block of 32 first, as the IR says. (QMoE, ORT's quantized MoE,
routes by itself and takes only integer zero points, and its block-wise 8-bit kernels always quantize the
activations: it computes kiln's offsets-and-float-activations formats only approximately, so it is not used.)
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.moe_ops import split_weights
from kiln.ir.quant_ops import INT4_PER_WORD

from .lower import MS_DOMAIN, lowering
from . import quant_lower

_NEG_BIG = -3.0e38  # below every finite score: experts outside the chosen groups


def _plain_softmax_route(node) -> bool:
    a = node.attrs
    return (node.op == "moe_route" and a["scoring"] == "softmax" and a["num_groups"] == 1 and a["scaling"] == 1.0
            and len(node.inputs) == 1)


def _takes_ort_moe(experts) -> bool:
    """Whether this moe_experts lowers to com.microsoft MoE (routing included)."""
    route = experts.inputs[1].producer
    return (route is not None and experts.inputs[2].producer is route and _plain_softmax_route(route)
            and experts.attrs["activation"] == "silu" and experts.inputs[0].type.dtype == "f32"
            and experts.inputs[3].producer is not None and experts.inputs[3].producer.op == "weight"
            and experts.inputs[4].producer is not None and experts.inputs[4].producer.op == "weight")


@lowering("moe_route")
def _lower_moe_route(ctx, node):
    consumers = [use for out in node.outputs for use in out.users]
    if consumers and all(use.op == "moe_experts" and _takes_ort_moe(use) for use in consumers):
        return [None, None]  # the MoE op routes by itself
    a = node.attrs
    logits = ctx.cast(ctx.input(0), ctx.in_type(0).dtype, "f32")
    scoring = a["scoring"]
    scores = {"softmax": lambda: ctx.add("Softmax", [logits], axis=-1),
              "sigmoid": lambda: ctx.add("Sigmoid", [logits]), "softmax_of_topk": lambda: logits}[scoring]()
    choice = scores
    if len(node.inputs) == 2:
        choice = ctx.add("Add", [scores, ctx.cast(ctx.input(1), ctx.in_type(1).dtype, "f32")])
    experts, groups = ctx.in_type(0).shape[1], a["num_groups"]
    if groups > 1:
        grouped = ctx.add("Reshape", [choice, ctx.const([0, groups, experts // groups], "i64")])
        if a["group_score"] == "max":
            group_value = ctx.add("ReduceMax", [grouped, ctx.const([-1], "i64")], keepdims=0)
        else:
            best_two = ctx.add("TopK", [grouped, ctx.const([2], "i64")], 2, axis=-1)[0]
            group_value = ctx.add("ReduceSum", [best_two, ctx.const([-1], "i64")], keepdims=0)
        chosen = ctx.add("TopK", [group_value, ctx.const([a["topk_groups"]], "i64")], 2, axis=-1)[1]
        one_hot = ctx.add("OneHot", [chosen, ctx.const(groups, "i64"), ctx.const([0.0, 1.0], "f32")], axis=-1)
        kept = ctx.add("ReduceMax", [one_hot, ctx.const([1], "i64")], keepdims=0)  # [T, G]
        kept = ctx.add("Unsqueeze", [kept, ctx.const([-1], "i64")])
        mask = ctx.add("Reshape", [ctx.add("Expand", [kept, ctx.add("Shape", [grouped])]),
                                   ctx.const([0, experts], "i64")])  # 1 for the experts of chosen groups
        choice = ctx.add("Where", [ctx.add("Greater", [mask, ctx.const(0.5, "f32")]), choice,
                                   ctx.const(_NEG_BIG, "f32")])
    ids = ctx.add("TopK", [choice, ctx.const([a["top_k"]], "i64")], 2, axis=-1)[1]
    weights = ctx.add("GatherElements", [scores, ids], axis=-1)
    if scoring == "softmax_of_topk":
        weights = ctx.add("Softmax", [weights], axis=-1)
    if a["normalize"]:
        weights = ctx.add("Div", [weights, ctx.add("ReduceSum", [weights, ctx.const([-1], "i64")], keepdims=1)])
    if a["scaling"] != 1.0:
        weights = ctx.add("Mul", [weights, ctx.const(float(a["scaling"]), "f32")])
    return [weights, ids]


def _interleaved(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, H] with the gate rows then the up rows -> rows gate 0, up 0, gate 1, up 1, ... (MoE's CPU layout)."""
    inter = gate_up.shape[1] // 2
    out = np.empty_like(gate_up)
    out[:, 0::2], out[:, 1::2] = gate_up[:, :inter], gate_up[:, inter:]
    return out


@lowering("moe_experts")
def _lower_moe_experts(ctx, node):
    if _takes_ort_moe(node):
        route = node.inputs[1].producer
        logits = ctx.materialize(ctx.values[id(route.inputs[0])], route.inputs[0].type)
        logits = ctx.cast(logits, route.inputs[0].type.dtype, "f32")
        gate_up_name = ctx.weight_name(3)
        gate_up = ctx.derived(f"{gate_up_name}.interleaved",
                              lambda: _interleaved(ctx.module.weight_data[gate_up_name]))
        return ctx.add("MoE", [ctx.input(0), logits, gate_up, "", ctx.input(4)], domain=MS_DOMAIN,
                       k=int(route.attrs["top_k"]), activation_type="swiglu", swiglu_fusion=1,
                       activation_alpha=1.0, activation_beta=0.0,
                       normalize_routing_weights=int(bool(route.attrs["normalize"])))
    return _gathered_experts(ctx, node, ([3], (0, 0)), ([4], (0, 0)))


def _gathered_experts(ctx, node, gate_up: tuple, down: tuple, int8_rows: bool = False) -> str:
    """Each token's k selected experts' gated MLPs from their gathered weights, weighted and summed.
    ``gate_up`` / ``down``: (the node's input indices of the stack's arrays, its format (bits, group_size))."""
    dtype = ctx.in_type(0).dtype
    if dtype != "f32":
        raise UnsupportedOpError(f"{ctx.where()}: the ONNX Runtime backend runs experts in f32, found {dtype}")
    hidden_size = ctx.in_type(0).shape[1]
    inter = ctx.in_type(3).shape[1] // 2  # gate_up's rows, in every format
    ids = ctx.input(2)
    x = ctx.input(0)
    if int8_rows:
        x = quant_lower.int8_rows(ctx, x, hidden_size)
    x = ctx.add("Unsqueeze", [x, ctx.const([1, 3], "i64")])  # [T, 1, H, 1]
    gate_up = ctx.add("MatMul", [_gathered_weight(ctx, gate_up, ids, 2 * inter, hidden_size), x])  # [T, k, 2I, 1]
    gate, up = ctx.add("Split", [gate_up, ctx.const([inter, inter], "i64")], 2, axis=2)
    if node.attrs["activation"] == "silu":
        act = ctx.add("Mul", [gate, ctx.add("Sigmoid", [gate])])
    else:
        act = ctx.add("Gelu", [gate], approximate="tanh" if node.attrs["activation"] == "gelu_tanh" else "none")
    hidden = ctx.add("Mul", [act, up])  # [T, k, I, 1]
    if int8_rows:
        rows = quant_lower.int8_rows(ctx, ctx.add("Squeeze", [hidden, ctx.const([3], "i64")]), inter)
        hidden = ctx.add("Unsqueeze", [rows, ctx.const([3], "i64")])
    down = ctx.add("MatMul", [_gathered_weight(ctx, down, ids, hidden_size, inter), hidden])
    weights = ctx.add("Unsqueeze", [ctx.cast(ctx.input(1), ctx.in_type(1).dtype, "f32"), ctx.const([2, 3], "i64")])
    weighted = ctx.add("Mul", [down, weights])  # [T, k, H, 1]
    return ctx.add("ReduceSum", [weighted, ctx.const([1, 3], "i64")], keepdims=0)


def _gathered_weight(ctx, stack: tuple, ids: str, rows: int, width: int) -> str:
    """f32 [T, k, rows, width]: the selected experts' weights of one stack, gathered in their stored format and
    dequantized (linear_q's int8 / int4 formats with a leading experts axis, or a float stack)."""
    indices, (bits, group_size) = stack
    # f16 scales and offsets are widened after the gather: only the selected experts' are read
    gathered = [ctx.cast(ctx.add("Gather", [ctx.input(i), ids], axis=0), ctx.in_type(i).dtype, "f32")
                if n else ctx.add("Gather", [ctx.input(i), ids], axis=0) for n, i in enumerate(indices)]
    if bits == 0:
        return gathered[0]
    if bits == 8:
        values = ctx.add("Cast", [gathered[0]], to=1)  # f32 [T, k, N, K]
    else:
        shifts = ctx.const((4 * np.arange(INT4_PER_WORD)).astype(np.uint32), "u32")
        words = ctx.add("Unsqueeze", [gathered[0], ctx.const([-1], "i64")])
        nibbles = ctx.add("BitwiseAnd", [ctx.add("BitShift", [words, shifts], direction="RIGHT"),
                                         ctx.const(15, "u32")])
        values = ctx.add("Reshape", [ctx.add("Cast", [nibbles], to=1), ctx.const([0, 0, rows, width], "i64")])
        if len(indices) == 2:
            values = ctx.add("Sub", [values, ctx.const(8.0, "f32")])
    scale, offset = gathered[1], gathered[2] if len(indices) == 3 else None
    if group_size:
        values = ctx.add("Reshape", [values, ctx.const([0, 0, rows, width // group_size, group_size], "i64")])
    values = ctx.add("Mul", [values, ctx.add("Unsqueeze", [scale, ctx.const([-1], "i64")])])
    if offset is not None:
        values = ctx.add("Add", [values, ctx.add("Unsqueeze", [offset, ctx.const([-1], "i64")])])
    if group_size:
        values = ctx.add("Reshape", [values, ctx.const([0, 0, rows, width], "i64")])
    return values


@lowering("moe_experts_q")
def _lower_moe_experts_q(ctx, node):
    stacks = {name: (indices, (node.attrs[f"{name}_bits"], node.attrs[f"{name}_group_size"]))
              for name, indices in split_weights(list(range(len(node.inputs))), node.attrs).items()}
    return _gathered_experts(ctx, node, stacks["gate_up"], stacks["down"],
                             int8_rows=node.attrs["activations"] == "int8")
