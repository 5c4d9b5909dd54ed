"""TVM lowerings of the mixture-of-experts ops: ``moe_route`` as one TVMScript kernel (scores, grouped
top-k, top-k by repeated argmax, weights) and ``moe_experts`` as kernels that read the selected experts only.

Registered into ``lower.LOWERINGS`` on import. moe_experts works on (token, slot) rows: row r is slot
r % k of token r // k, and its weights are expert ``ids[r // k, r % k]``'s, indexed inside the GEMV. A
decode step therefore reads k experts' weights per token and never the others; a prefill does the same
per token (no weight reuse across tokens: correct, not yet fast for long prompts).

``moe_experts_q`` runs the same kernels over the experts' quantized stacks (linear_q's formats with a leading
experts axis): the dequantize sits inside the GEMV's reduction, as linear_q's kernels do it, so a decode step
reads the k selected experts' quantized blocks, scales and offsets and nothing else.

int8 activations on a CPU with AVX512-VNNI (both stacks int4 or int8 in groups the dense VNNI kernels take: 32,
64, ..., 8 or 16 as GGUF Q6_K, or int8 per row; N a multiple of 4): each stack is repacked at compile time as
int8_kernels.repack lays out a linear's weight, stacked along a leading experts axis (derived weights, read
instead of the originals), each matmul's input rows are quantized by int8_kernels.quantize_rows_func, and
:func:`expert_matmul_func` takes ``vpdpbusd`` over the selected expert's blocks of each (token, slot) row, decode
and prefill alike. Elsewhere the same int8 rows (int8_kernels.dequantize_rows) are multiplied in f32 by the
float kernels.
"""

from __future__ import annotations

import functools

from tvm import relax, te, tirx
from tvm.script import tirx as T

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.moe_ops import GROUP_SCORES, QUANTIZED_WEIGHTS, SCORINGS, split_weights
from kiln.ir.quant_ops import INT4_PER_WORD

from . import int8_kernels, kernels, schedules
from .int8_kernels import ACTIVATION_BLOCK, GROUP_ROWS
from .llm_lower import _ACTIVATIONS
from .lower import DERIVED_WEIGHT_PROVIDERS, _linear_row_tile, lowering, tvm_dtype

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


# int8 activations on VNNI: the selected experts' repacked blocks through vpdpbusd ------------------------------
VNNI_SUFFIXES = (".vnni_q", ".vnni_scale", ".vnni_offset")  # a stack's repacked arrays, after its first weight's name


def _vnni_fits(node) -> bool:
    """Whether both stacks of a moe_experts_q {activations=int8} are in formats the expert kernels take: int8 or
    int4 in groups the dense VNNI kernels take (int8_kernels.fits: multiples of 32, 8 or 16, int8 per row), N a
    multiple of 4 rows."""
    hidden = node.inputs[0].type.shape[1]
    inter = node.inputs[3].type.shape[1] // 2  # gate_up's rows, in every format
    return all(node.attrs[f"{name}_bits"] in (4, 8) and int8_kernels.fits(n, k, node.attrs[f"{name}_group_size"])
               for name, n, k in (("gate_up", 2 * inter, hidden), ("down", hidden, inter)))


def _vnni_names(node) -> dict | None:
    """{stack: the names of its repacked arrays} of a moe_experts_q, or None when a stack is not module weights."""
    names = {}
    for stack, parts in split_weights(node.inputs, node.attrs).items():
        sources = [v.producer.attrs["name"] if v.producer is not None and v.producer.op == "weight" else None
                   for v in parts]
        if None in sources:
            return None
        names[stack] = [sources[0] + suffix for suffix in VNNI_SUFFIXES[:len(parts)]]
    return names


def _takes_vnni(node, target) -> bool:
    return (node.op == "moe_experts_q" and node.attrs["activations"] == "int8" and int8_kernels.has_vnni(target)
            and node.inputs[0].type.dtype == "f32" and _vnni_fits(node) and _vnni_names(node) is not None)


def repack_stack(bits: int, group_size: int, q, scale, offset) -> list:
    """A stacked weight [E, N, ...] -> int8_kernels.repack's arrays of each expert, stacked: the experts' rows
    are one weight of E * N rows (N a multiple of 4, so no group of four rows spans two experts), and expert
    e's groups of rows are rows e * N / 4 ... of the result's leading axis."""
    experts, n = q.shape[:2]
    flat = [None if a is None else a.reshape((experts * n,) + a.shape[2:]) for a in (q, scale, offset)]
    return int8_kernels.repack(bits, group_size, *flat)


def _vnni_expert_weights(fn, module, target):
    """Provider of derived weights: the repacked stacks of every moe_experts_q the expert kernel runs."""
    claimed, arrays = set(), {}
    for node in fn.nodes:
        if not _takes_vnni(node, target):
            continue
        claimed.add(id(node))
        names = _vnni_names(node)
        for stack, parts in split_weights(node.inputs, node.attrs).items():
            if names[stack][0] in arrays:
                continue
            data = [module.weight_data[v.producer.attrs["name"]] for v in parts]
            packed = repack_stack(node.attrs[f"{stack}_bits"], node.attrs[f"{stack}_group_size"], data[0], data[1],
                                  data[2] if len(data) == 3 else None)
            arrays.update(zip(names[stack], packed))
    return claimed, arrays


DERIVED_WEIGHT_PROVIDERS.append(_vnni_expert_weights)


@functools.lru_cache(maxsize=None)  # parsing TVMScript costs ~0.1 s; every layer asks for the same shapes
def expert_matmul_func(experts: int, top_k: int, n: int, k: int, bits: int, group_size: int, scale_dtype: str,
                       has_offset: bool, per_slot: bool, ids_dtype: str) -> tirx.PrimFunc:
    """y f32[tokens * k, N]: row r = (token r // k, slot r % k) is its int8 row of x (xq, scale, scaled block
    sums from int8_kernels.quantize_rows_func; x's row r, ``per_slot``, or r // k) times expert
    ids[r // k, r % k]'s weight, read from the stack repacked by :func:`repack_stack`: int8_kernels.matmul_func's
    arithmetic (a group of 32, 64, ... or per row), its group g of four output rows at e * N / 4 + g. A group of
    8 or 16 takes :func:`small_group_expert_func` (quarter sums instead of the scaled block sums)."""
    if 0 < group_size < ACTIVATION_BLOCK:
        return small_group_expert_func(experts, top_k, n, k, bits, group_size, scale_dtype, has_offset, per_slot,
                                       ids_dtype)
    groups, blocks = n // GROUP_ROWS, k // ACTIVATION_BLOCK
    words = 16 if bits == 4 else 32
    per_row = group_size == 0
    zero_point = 0.0 if has_offset else (8.0 if bits == 4 else 128.0)
    sdt = "float16" if scale_dtype == "f16" else "float32"
    stacked = experts * groups
    s_shape = (stacked, GROUP_ROWS) if per_row else (stacked, blocks, GROUP_ROWS)
    o_shape = (stacked, blocks, GROUP_ROWS) if has_offset else s_shape  # no offset: the scale passed twice
    x_per_token = top_k if per_slot else 1
    ahead = max(1, -(-int8_kernels.PREFETCH_BYTES // (blocks * words * 4)))  # groups of the same expert
    lanes = int8_kernels.LANES
    zero = T.Broadcast(tirx.const(0, "int32"), lanes)

    def row_scales(s, at, b):  # f32x4: the four rows' scales of block b (or of the row)
        return T.Cast("float32x4", s[at, T.Ramp(0, 1, 4)] if per_row else s[at, b, T.Ramp(0, 1, 4)])

    def zero_term(s, o, at, b):  # f32x4: what each row adds per unit of the block's scaled sum
        if has_offset:
            return T.Cast("float32x4", o[at, b, T.Ramp(0, 1, 4)])
        return row_scales(s, at, b) * T.Broadcast(tirx.const(-zero_point, "float32"), 4)

    def block_scale(s, at, b, sx_value):  # f32x16 multiplying the block's integer sums
        if per_row:
            return T.Broadcast(sx_value, lanes)
        return int8_kernels._spread(row_scales(s, at, b), 1) * T.Broadcast(sx_value, lanes)

    def finish(s, at, total, c):
        return total * row_scales(s, at, 0) + c if per_row else total + c

    def x_row(r):
        return r if per_slot else r // top_k

    @T.prim_func(private=True)
    def kernel(ids_h: T.handle, xq_h: T.handle, sx_h: T.handle, xs_h: T.handle, q_h: T.handle, s_h: T.handle,
               o_h: T.handle, y_h: T.handle):
        T.func_attr(int8_kernels.SCHEDULED)
        tokens = T.int64()
        ids = T.match_buffer(ids_h, (tokens, top_k), ids_dtype)
        xq = T.match_buffer(xq_h, (tokens * x_per_token, k), "int8")
        sx = T.match_buffer(sx_h, (tokens * x_per_token, blocks), "float32")
        xs = T.match_buffer(xs_h, (tokens * x_per_token, blocks), "float32")
        q = T.match_buffer(q_h, (stacked, blocks, words), "uint32")
        s = T.match_buffer(s_h, s_shape, sdt)
        o = T.match_buffer(o_h, o_shape, sdt)
        y = T.match_buffer(y_h, (tokens * top_k, n), "float32")
        for g in T.parallel(groups):
            acc = T.alloc_buffer((lanes,), "float32", annotations={"disable_lower_builtin": True})
            corr = T.alloc_buffer((GROUP_ROWS,), "float32", annotations={"disable_lower_builtin": True})
            for r in range(tokens * top_k):
                # the row's expert, clamped so a bad id cannot read outside the stack
                first = T.max(T.min(T.Cast("int64", ids[r // top_k, r % top_k]), T.int64(experts - 1)),
                              T.int64(0)) * groups
                row = T.meta_var(x_row(r))
                acc[T.Ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                corr[T.Ramp(0, 1, GROUP_ROWS)] = T.Broadcast(T.float32(0), GROUP_ROWS)
                for b in range(blocks):
                    for line in T.unroll(words // 16):  # the expert's weight lines a few groups ahead
                        T.evaluate(int8_kernels._prefetch(
                            T.address_of(q[first + T.min(g + ahead, groups - 1), b, line * 16])))
                    lo, hi = T.meta_var(int8_kernels._operands(q, first + g, b, bits))
                    isum = T.meta_var(int8_kernels._dot(lo, hi, int8_kernels._broadcast16(xq, row, b * 32),
                                                        int8_kernels._broadcast16(xq, row, b * 32 + 16), zero))
                    acc[T.Ramp(0, 1, lanes)] = (acc[T.Ramp(0, 1, lanes)] + T.Cast("float32x16", isum)
                                                * block_scale(s, first + g, b, sx[row, b]))
                    corr[T.Ramp(0, 1, 4)] = (corr[T.Ramp(0, 1, 4)]
                                             + zero_term(s, o, first + g, b) * T.Broadcast(xs[row, b], 4))
                y[r, T.Ramp(g * 4, 1, 4)] = finish(s, first + g, int8_kernels._fold(acc[T.Ramp(0, 1, lanes)]),
                                                   corr[T.Ramp(0, 1, 4)])

    return kernel


@functools.lru_cache(maxsize=None)
def small_group_expert_func(experts: int, top_k: int, n: int, k: int, bits: int, group_size: int, scale_dtype: str,
                            has_offset: bool, per_slot: bool, ids_dtype: str) -> tirx.PrimFunc:
    """:func:`expert_matmul_func` for a weight group of 8 or 16 (GGUF Q6_K's int8 groups of 16): the arithmetic of
    int8_kernels' small-group kernel (each vpdpbusd lane, 8 elements of a block, takes its own group's scale; the
    zero point is subtracted in int32 from the activations' per-8 sums, quantize_rows_func's ``quarter_sums``)."""
    groups, blocks = n // GROUP_ROWS, k // ACTIVATION_BLOCK
    words = 16 if bits == 4 else 32
    per = ACTIVATION_BLOCK // group_size
    width = GROUP_ROWS * per  # scales of one block for the four rows
    quarters = ACTIVATION_BLOCK // int8_kernels.QUARTER
    zero_point = 0 if has_offset else (8 if bits == 4 else 128)
    sdt = "float16" if scale_dtype == "f16" else "float32"
    stacked = experts * groups
    x_per_token = top_k if per_slot else 1
    ahead = max(1, -(-int8_kernels.PREFETCH_BYTES // (blocks * words * 4)))  # groups of the same expert
    lanes = int8_kernels.LANES

    def lane_values(a, at, b):  # f32x16: the scale (or offset) of each lane's group
        return int8_kernels._spread(T.Cast(f"float32x{width}", a[at, b, T.Ramp(0, 1, width)]), per)

    def quarter_sums(xs, row, b):  # i32x16: the row's sum of xq over quarter t of block b at lane 4r + t
        v = xs[row, T.Ramp(b * quarters, 1, quarters)]
        return T.Shuffle([v, v, v, v], list(range(lanes)))

    def start(xs, row, b):  # the int32 lanes' start: -Z times the quarter sums (no zero point with offsets)
        if zero_point == 0:
            return T.Broadcast(tirx.const(0, "int32"), lanes)
        return quarter_sums(xs, row, b) * T.Broadcast(tirx.const(-zero_point, "int32"), lanes)

    def block_sum(s, o, xs, at, row, b, isum):  # f32x16: the block's lanes before the activations' block scale
        if has_offset:
            return (T.Cast("float32x16", isum) * lane_values(s, at, b)
                    + T.Cast("float32x16", quarter_sums(xs, row, b)) * lane_values(o, at, b))
        return T.Cast("float32x16", isum) * lane_values(s, at, b)

    def x_row(r):
        return r if per_slot else r // top_k

    @T.prim_func(private=True)
    def kernel(ids_h: T.handle, xq_h: T.handle, sx_h: T.handle, xs_h: T.handle, q_h: T.handle, s_h: T.handle,
               o_h: T.handle, y_h: T.handle):
        T.func_attr(int8_kernels.SCHEDULED)
        tokens = T.int64()
        ids = T.match_buffer(ids_h, (tokens, top_k), ids_dtype)
        xq = T.match_buffer(xq_h, (tokens * x_per_token, k), "int8")
        sx = T.match_buffer(sx_h, (tokens * x_per_token, blocks), "float32")
        xs = T.match_buffer(xs_h, (tokens * x_per_token, blocks * quarters), "int32")
        q = T.match_buffer(q_h, (stacked, blocks, words), "uint32")
        s = T.match_buffer(s_h, (stacked, blocks, width), sdt)
        o = T.match_buffer(o_h, (stacked, blocks, width), sdt)  # no offset: the scale passed twice
        y = T.match_buffer(y_h, (tokens * top_k, n), "float32")
        for g in T.parallel(groups):
            acc = T.alloc_buffer((lanes,), "float32", annotations={"disable_lower_builtin": True})
            for r in range(tokens * top_k):
                # the row's expert, clamped so a bad id cannot read outside the stack
                first = T.max(T.min(T.Cast("int64", ids[r // top_k, r % top_k]), T.int64(experts - 1)),
                              T.int64(0)) * groups
                row = T.meta_var(x_row(r))
                acc[T.Ramp(0, 1, lanes)] = T.Broadcast(T.float32(0), lanes)
                for b in range(blocks):
                    ahead_at = T.meta_var(first + T.min(g + ahead, groups - 1))
                    for line in T.unroll(words // 16):  # the expert's weights and scales a few groups ahead
                        T.evaluate(int8_kernels._prefetch(T.address_of(q[ahead_at, b, line * 16])))
                    T.evaluate(int8_kernels._prefetch(T.address_of(s[ahead_at, b, 0])))
                    lo, hi = T.meta_var(int8_kernels._operands(q, first + g, b, bits))
                    isum = T.meta_var(int8_kernels._dot(lo, hi, int8_kernels._broadcast16(xq, row, b * 32),
                                                        int8_kernels._broadcast16(xq, row, b * 32 + 16),
                                                        start(xs, row, b)))
                    acc[T.Ramp(0, 1, lanes)] = (acc[T.Ramp(0, 1, lanes)] + block_sum(s, o, xs, first + g, row, b, isum)
                                                * T.Broadcast(sx[row, b], lanes))
                y[r, T.Ramp(g * 4, 1, 4)] = int8_kernels._fold(acc[T.Ramp(0, 1, lanes)])

    return kernel


def _vnni_gemv(ctx, node, stack: str, ids, x, rows: int, width: int, per_slot: bool, small: bool):
    """The int8 rows of x [m, width] (m: tokens, or tokens * k ``per_slot``), then the expert kernel over stack
    ``stack``'s repacked arrays: f32 [tokens * k, rows]."""
    experts = node.inputs[3].type.shape[0]
    top_k = int(ids.ty.shape[1])
    blocks = width // ACTIVATION_BLOCK
    m = x.ty.shape.values[0]
    group_size = node.attrs[f"{stack}_group_size"]
    quarter_sums = 0 < group_size < ACTIVATION_BLOCK  # the small-group kernel's per-8 sums of xq
    sums = (relax.TensorType([m, width // int8_kernels.QUARTER], "int32") if quarter_sums
            else relax.TensorType([m, blocks], "float32"))
    quantize = ctx.bb.add_func(int8_kernels.quantize_rows_func(width, not small, quarter_sums), "quantize_rows")
    parts = ctx.emit(relax.call_tir(quantize, [x], [relax.TensorType([m, width], "int8"),
                                                    relax.TensorType([m, blocks], "float32"), sums]))
    xq, sx, xs = (ctx.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    weights = [ctx.weights[name] for name in _vnni_names(node)[stack]]
    if len(weights) == 2:
        weights.append(weights[1])  # no offset: the kernel takes the scale in its place
    scale_dtype = split_weights(node.inputs, node.attrs)[stack][1].type.dtype
    func = expert_matmul_func(experts, top_k, rows, width, node.attrs[f"{stack}_bits"], group_size, scale_dtype,
                              bool(node.attrs[f"{stack}_offset"]), per_slot, ids.ty.dtype)
    gvar = ctx.bb.add_func(func, f"moe_{stack}_vnni")
    count = ids.ty.shape.values[0] * top_k
    return ctx.emit(relax.call_tir(gvar, [ids, xq, sx, xs] + weights, relax.TensorType([count, rows], "float32")))


def _emit_experts(ctx, node, x, weights, ids, gate_up: list, down: list, formats: dict, int8_rows: bool):
    """The selected experts' gated MLPs, weighted and summed per token."""
    x_type = ctx.in_type(0)
    hidden_size = int(x_type.shape[1])
    top_k = int(ctx.in_type(1).shape[1])
    inter = int(ctx.in_type(3).shape[1]) // 2  # gate_up's rows in every format (its arrays may be repacked)
    vnni = _takes_vnni(node, ctx.target)
    small = _linear_row_tile(x_type.shape[0]) is None  # a decode step's rows: quantized on the calling thread
    if vnni:
        gate_up = _vnni_gemv(ctx, node, "gate_up", ids, x, 2 * inter, hidden_size, per_slot=False, small=small)
    else:
        if int8_rows:
            x = ctx.emit_te(int8_kernels.dequantize_rows, x, name="int8_rows")
        gate_up = _selected_gemv(ctx, "moe_gate_up", ids, x, gate_up, formats["gate_up"], 2 * inter, hidden_size,
                                 per_slot=False)
    gate = ctx.emit(relax.op.strided_slice(gate_up, axes=[1], begin=[0], end=[inter]))
    up = ctx.emit(relax.op.strided_slice(gate_up, axes=[1], begin=[inter], end=[2 * inter]))
    hidden = ctx.emit(relax.op.multiply(ctx.emit(_ACTIVATIONS[node.attrs["activation"]](gate)), up))
    if vnni:
        down = _vnni_gemv(ctx, node, "down", ids, hidden, hidden_size, inter, per_slot=True, small=small)
    else:
        if int8_rows:
            hidden = ctx.emit_te(int8_kernels.dequantize_rows, hidden, name="int8_rows")
        down = _selected_gemv(ctx, "moe_down", ids, hidden, down, formats["down"], hidden_size, inter,
                              per_slot=True)
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
