"""TVM lowerings of the mixture-of-experts ops: ``moe_route`` as one TVMScript kernel (scores, grouped
top-k, top-k by repeated argmax, weights) and ``moe_experts`` as kernels that read the selected experts only.

Registered into ``lower.LOWERINGS`` on import. moe_experts works on (token, slot) rows: row r is slot
r % k of token r // k, and its weights are expert ``ids[r // k, r % k]``'s, indexed inside the GEMV. A
decode step therefore reads k experts' weights per token and never the others; a prefill does the same
per token (no weight reuse across tokens: correct, not yet fast for long prompts).

``moe_experts_q`` runs the same kernels over the experts' quantized stacks (linear_q's formats with a leading
experts axis): the dequantize sits inside the GEMV's reduction, as linear_q's kernels do it, so a decode step
reads the k selected experts' quantized blocks, scales and offsets and nothing else. int8 activations are the
IR's per-32 rounding of each matmul's input rows (int8_kernels.dequantize_rows), multiplied in f32.
"""

from __future__ import annotations

import functools

from tvm import relax, te, tirx
from tvm.script import tirx as T

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.moe_ops import GROUP_SCORES, QUANTIZED_WEIGHTS, SCORINGS, split_weights
from kiln.ir.quant_ops import INT4_PER_WORD

from . import int8_kernels, kernels, schedules
from .llm_lower import _ACTIVATIONS
from .lower import lowering, tvm_dtype

_NEG_BIG = -3.0e38  # below every finite score: marks experts outside the chosen groups


@functools.lru_cache(maxsize=None)
def route_func(experts: int, top_k: int, scoring: str, normalize: bool, num_groups: int, topk_groups: int,
               group_score: str, scaling: float) -> tirx.PrimFunc:
    """moe_route for logits f32 [tokens, experts] and a bias f32 [experts] (zeros when the op has none)."""
    assert scoring in SCORINGS and group_score in GROUP_SCORES
    size = experts // num_groups
    softmax_all, sigmoid, softmax_chosen = (scoring == s for s in SCORINGS)
    grouped, top2 = num_groups > 1, group_score == "top2_sum"
    k = top_k

    @T.macro
    def pick(values: T.Buffer, taken: T.Buffer, count: T.int64, best: T.Buffer, chosen: T.Buffer):
        # chosen[0] = the lowest index of the largest values[i] not yet taken (torch.topk's order on ties)
        chosen[0] = T.int64(-1)
        for i in T.serial(count):
            if taken[i] == 0:
                if chosen[0] < 0 or values[i] > best[0]:
                    best[0] = values[i]
                    chosen[0] = i
        taken[chosen[0]] = 1

    @T.prim_func(private=True, s_tir=True)
    def moe_route(logits_h: T.handle, bias_h: T.handle, weights_h: T.handle, ids_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, kernels.CPU_ONLY: True})
        tokens = T.int64()
        logits = T.match_buffer(logits_h, (tokens, experts), "float32")
        bias = T.match_buffer(bias_h, (experts,), "float32")
        weights = T.match_buffer(weights_h, (tokens, k), "float32")
        ids = T.match_buffer(ids_h, (tokens, k), "int64")
        for t in T.serial(tokens):  # E x k compares per token: cheaper on the calling thread
            with T.sblock("moe_route"):
                T.reads(logits[0:tokens, 0:experts], bias[0:experts])
                T.writes(weights[0:tokens, 0:k], ids[0:tokens, 0:k])
                scores = T.sblock_alloc_buffer((experts,), "float32")
                choice = T.sblock_alloc_buffer((experts,), "float32")
                taken = T.sblock_alloc_buffer((experts,), "int32")
                group_value = T.sblock_alloc_buffer((num_groups,), "float32")
                group_taken = T.sblock_alloc_buffer((num_groups,), "int32")
                stat = T.sblock_alloc_buffer((2,), "float32")
                best = T.sblock_alloc_buffer((1,), "float32")
                chosen = T.sblock_alloc_buffer((1,), "int64")
                if softmax_all:
                    stat[0] = logits[t, 0]
                    for e in T.serial(experts):
                        stat[0] = T.max(stat[0], logits[t, e])
                    stat[1] = T.float32(0)
                    for e in T.serial(experts):
                        scores[e] = T.exp(logits[t, e] - stat[0])
                        stat[1] = stat[1] + scores[e]
                    for e in T.serial(experts):
                        scores[e] = scores[e] / stat[1]
                if sigmoid:
                    for e in T.serial(experts):
                        scores[e] = T.float32(1) / (T.float32(1) + T.exp(-logits[t, e]))
                if softmax_chosen:
                    for e in T.serial(experts):
                        scores[e] = logits[t, e]
                for e in T.serial(experts):
                    choice[e] = scores[e] + bias[e]
                    taken[e] = 0
                if grouped:
                    for g in T.serial(num_groups):
                        stat[0] = T.float32(_NEG_BIG)  # best and second best of the group
                        stat[1] = T.float32(_NEG_BIG)
                        for m in T.serial(size):
                            if choice[g * size + m] > stat[0]:
                                stat[1] = stat[0]
                                stat[0] = choice[g * size + m]
                            elif choice[g * size + m] > stat[1]:
                                stat[1] = choice[g * size + m]
                        if top2:
                            group_value[g] = stat[0] + stat[1]
                        else:
                            group_value[g] = stat[0]
                        group_taken[g] = 0
                    for _ in T.serial(topk_groups):
                        pick(group_value, group_taken, num_groups, best, chosen)
                    for e in T.serial(experts):
                        if group_taken[e // size] == 0:
                            taken[e] = 1  # outside the chosen groups: never picked
                for j in T.serial(k):
                    pick(choice, taken, experts, best, chosen)
                    ids[t, j] = chosen[0]
                    weights[t, j] = scores[chosen[0]]
                if softmax_chosen:
                    stat[0] = weights[t, 0]
                    for j in T.serial(k):
                        stat[0] = T.max(stat[0], weights[t, j])
                    for j in T.serial(k):
                        weights[t, j] = T.exp(weights[t, j] - stat[0])
                if normalize or softmax_chosen:
                    stat[1] = T.float32(0)
                    for j in T.serial(k):
                        stat[1] = stat[1] + weights[t, j]
                    for j in T.serial(k):
                        weights[t, j] = weights[t, j] / stat[1]
                for j in T.serial(k):
                    weights[t, j] = weights[t, j] * T.float32(scaling)

    return moe_route


@lowering("moe_route")
def _lower_moe_route(ctx, node, inputs):
    if not ctx.is_cpu:
        raise UnsupportedOpError("moe_route: the TVM backend routes experts on the CPU only so far; "
                                 "compile for target cpu or use --backend onnxruntime")
    logits_type = ctx.in_type(0)
    tokens, experts = logits_type.shape
    logits = ctx.cast(inputs[0], logits_type.dtype, "f32")
    if len(inputs) == 2:
        bias = ctx.cast(inputs[1], ctx.in_type(1).dtype, "f32")
    else:
        bias = relax.const(0.0, "float32")
        bias = ctx.emit(relax.op.full([experts], bias, "float32"))
    a = node.attrs
    func = route_func(experts, a["top_k"], a["scoring"], bool(a["normalize"]), a["num_groups"], a["topk_groups"],
                      a["group_score"], float(a["scaling"]))
    gvar = ctx.bb.add_func(func, "moe_route")
    shape = [ctx.dim(tokens), a["top_k"]]
    routed = ctx.emit(relax.call_tir(gvar, [logits, bias], [relax.TensorType(shape, "float32"),
                                                             relax.TensorType(shape, "int64")]))
    return [ctx.emit(relax.TupleGetItem(routed, 0)), ctx.emit(relax.TupleGetItem(routed, 1))]


def _expert_of(ids, row, top_k: int, experts: int):
    """The expert of (token, slot) row ``row``, clamped so a bad id cannot read outside the weights."""
    expert = ids[row // top_k, row % top_k].astype("int64")
    return tirx.max(tirx.min(expert, tirx.IntImm("int64", experts - 1)), tirx.IntImm("int64", 0))


def _stacked_weight(parts, bits: int, group_size: int):
    """(expert, row, column) -> the f32 element of a stacked weight: a float stack [E, N, K], or linear_q's
    int8 / int4 format with a leading experts axis (scale and offset per row or per group, f32 or f16)."""
    def group_value(table, e, j, c):
        value = table[e, j] if len(table.shape) == 2 else table[e, j, c // group_size]
        return value if value.dtype == "float32" else value.astype("float32")

    if bits == 0:
        return lambda e, j, c: parts[0][e, j, c].astype("float32")
    if bits == 8:
        return lambda e, j, c: parts[0][e, j, c].astype("float32") * group_value(parts[1], e, j, c)

    def int4(e, j, c):
        shift = (c % INT4_PER_WORD * 4).astype("uint32")
        nibble = ((parts[0][e, j, c // INT4_PER_WORD] >> shift) & tirx.const(15, "uint32")).astype("float32")
        if len(parts) == 3:
            return nibble * group_value(parts[1], e, j, c) + group_value(parts[2], e, j, c)
        return (nibble - tirx.const(8.0, "float32")) * group_value(parts[1], e, j, c)

    return int4


def _selected_gemv(ctx, name: str, ids, x, stack: list, fmt: tuple, rows: int, width: int, per_slot: bool):
    """y[r, n] = sum_c x[row, c] * w[expert of row r, n, c] in f32 over the (token, slot) rows r, x's row
    being r (``per_slot``) or its token r // k, w the stacked weight ``stack`` (its arrays) in format
    ``fmt`` = (bits, group_size): the GEMV schedule on the CPU, the dequantize inside the reduction."""
    experts = int(stack[0].ty.shape[0])
    top_k = int(ids.ty.shape[1])
    bits, group_size = fmt

    def x_row(r):
        return r if per_slot else r // top_k

    def te_gemv(ids, x, *parts):
        weight = _stacked_weight(parts, bits, group_size)
        c = te.reduce_axis((0, width), name="c")
        return te.compute(
            (ids.shape[0] * top_k, rows),
            lambda r, j: te.sum(x[x_row(r), c].astype("float32")
                                * weight(_expert_of(ids, r, top_k, experts), j, c), axis=c),
            name=name)

    if not ctx.is_cpu:
        return ctx.emit_te(te_gemv, ids, x, *stack, name=name)
    # A fresh token count: the step's own (batch * seq) is an expression a PrimFunc cannot bind from a shape.
    tokens = kernels.symbolic_dim("tokens")
    x_rows = tokens * top_k if per_slot else tokens
    placeholders = [te.placeholder((tokens, top_k), ids.ty.dtype, name="ids"),
                    te.placeholder((x_rows, width), x.ty.dtype, name="x")]
    placeholders += [te.placeholder([int(d) for d in part.ty.shape], part.ty.dtype, name=f"w{i}")
                     for i, part in enumerate(stack)]
    func = schedules.schedule_gemv(kernels.prim_func(*placeholders, te_gemv(*placeholders)), name)
    gvar = ctx.bb.add_func(func.without_attr("global_symbol"), name)  # private: each layer's name is unique
    count = ids.ty.shape.values[0] * top_k
    return ctx.emit(relax.call_tir(gvar, [ids, x] + list(stack), relax.TensorType([count, rows], "float32")))


def _emit_experts(ctx, node, x, weights, ids, gate_up: list, down: list, formats: dict, int8_rows: bool):
    """The selected experts' gated MLPs, weighted and summed per token."""
    x_type = ctx.in_type(0)
    hidden_size = int(x_type.shape[1])
    top_k = int(ctx.in_type(1).shape[1])
    inter = int(gate_up[0].ty.shape[1]) // 2
    if int8_rows:
        x = ctx.emit_te(int8_kernels.dequantize_rows, x, name="int8_rows")
    gate_up = _selected_gemv(ctx, "moe_gate_up", ids, x, gate_up, formats["gate_up"], 2 * inter, hidden_size,
                             per_slot=False)
    gate = ctx.emit(relax.op.strided_slice(gate_up, axes=[1], begin=[0], end=[inter]))
    up = ctx.emit(relax.op.strided_slice(gate_up, axes=[1], begin=[inter], end=[2 * inter]))
    hidden = ctx.emit(relax.op.multiply(ctx.emit(_ACTIVATIONS[node.attrs["activation"]](gate)), up))
    if int8_rows:
        hidden = ctx.emit_te(int8_kernels.dequantize_rows, hidden, name="int8_rows")
    down = _selected_gemv(ctx, "moe_down", ids, hidden, down, formats["down"], hidden_size, inter, per_slot=True)
    out_dtype = tvm_dtype(x_type.dtype)

    def te_combine(down, weights):
        slot = te.reduce_axis((0, top_k), name="slot")
        summed = te.compute((weights.shape[0], down.shape[1]), lambda t, n: te.sum(
            weights[t, slot].astype("float32") * down[t * top_k + slot, n], axis=slot), name="moe_combine")
        if out_dtype == "float32":
            return summed
        return te.compute(summed.shape, lambda *i: summed[i].astype(out_dtype), name="moe_combine_cast")

    return ctx.emit_te(te_combine, down, weights, name="moe_combine")


@lowering("moe_experts")
def _lower_moe_experts(ctx, node, inputs):
    x, weights, ids, w_gate_up, w_down = inputs
    return _emit_experts(ctx, node, x, weights, ids, [w_gate_up], [w_down], {"gate_up": (0, 0), "down": (0, 0)},
                         int8_rows=False)


@lowering("moe_experts_q")
def _lower_moe_experts_q(ctx, node, inputs):
    if ctx.in_type(0).dtype != "f32":
        raise UnsupportedOpError(f"moe_experts_q: the TVM quantized expert kernels take f32 activations, found "
                                 f"{ctx.in_type(0)} at %{node.output.name}; compile the model in f32")
    stacks = split_weights(inputs, node.attrs)
    formats = {name: (node.attrs[f"{name}_bits"], node.attrs[f"{name}_group_size"]) for name in QUANTIZED_WEIGHTS}
    return _emit_experts(ctx, node, inputs[0], inputs[1], inputs[2], stacks["gate_up"], stacks["down"], formats,
                         int8_rows=node.attrs["activations"] == "int8")
