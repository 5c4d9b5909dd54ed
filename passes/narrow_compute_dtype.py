"""Half compute: the f32 graph becomes one computing in f16 or bf16 (``PassOptions.extra["dtype"]``).

Op by op, as transformers and llama.cpp compute a half-precision model:

- **half** (every float operand in the half type, f32 accumulation inside the op's reference and kernels):
  ``linear``, ``matmul``, ``embedding``, ``gated_mlp``, ``rms_norm`` / ``add_rms_norm`` / ``layer_norm``
  (mean and variance in f32; RMSNorm rounds the normalized value to the half type before the weight
  multiplies it, as ``LlamaRMSNorm`` does), ``rope`` (its ``inv_freq`` operand stays f32: the angles, cos and sin are f32,
  rounded to the half type before they multiply x), ``attention`` / ``paged_attention`` (scores, softmax and
  the weighted sum in f32; the cache pools keep the KV-cache dtype).
- **f32** (range or precision: the reductions and transcendental steps of unfused norms, softmax and RoPE
  tables): ``softmax``, ``sdpa``, ``sum``, ``mean``, ``cumsum``, ``exp``, ``log``, ``pow``, ``sqrt``,
  ``rsqrt``, ``reciprocal``, ``sin``, ``cos``, and every op not named here (quantized linears, MoE and latent
  attention compute in f32, their half activations widened, their weights as stored).
- **following** (elementwise ops, views, ``concat``, ``index``, ``select_rows``, ``max`` / ``min``): torch's
  promotion over the operands that are not weights or constants, so f32 flows on from an f32 op until a
  half op narrows it, and a weight or scalar constant takes its reader's dtype (as a Python scalar does).
- **the logits** (each function result) keep their dtype: the ops from the last ``linear`` / ``matmul`` to a
  result compute in f32, that matmul reading f32 activations (the selected rows) against half weights.

A cast from a weight (or constant) to the half type, where every reader of that weight reads the cast,
becomes the weight itself stored in the half type (rounded to nearest even, as ``model.to(dtype)`` does).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Function, Module, Node, Value
from kiln.ir.ops import infer_types
from kiln.ir.types import is_float, numpy_dtype, promote

from .manager import PassOptions, register_pass

HALF_DTYPES = ("f16", "bf16")
# op -> operand positions that are not computed in the half type: None keeps the operand's dtype (the cache
# pools), "f32" widens it (RoPE's inverse frequencies)
HALF_OPS = {"linear": {}, "matmul": {}, "embedding": {}, "gated_mlp": {}, "rms_norm": {}, "add_rms_norm": {},
            "layer_norm": {}, "rope": {2: "f32"}, "attention": {}, "paged_attention": {3: None, 4: None}}
FOLLOWING_OPS = {"add", "sub", "mul", "div", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "neg",
                 "abs", "tanh", "erf", "sigmoid", "silu", "relu", "gelu", "where", "reshape", "permute", "expand",
                 "slice", "concat", "index", "select_rows", "max", "min"}
SOURCES = {"weight", "constant", "full"}  # take their reader's dtype
LOGIT_MATMULS = {"linear", "matmul"}


def _flexible(value: Value) -> bool:
    return value.producer is not None and value.producer.op in SOURCES


def _logit_tail(fn: Function) -> tuple:
    """(ids of the following ops between a result and its last matmul, ids of those matmuls)."""
    tail, matmuls = set(), set()
    for result in fn.results:
        node = result.producer
        while node is not None and is_float(result.type.dtype):
            if node.op in LOGIT_MATMULS:
                matmuls.add(id(node))
                break
            operands = [v for v in node.inputs if is_float(v.type.dtype) and not _flexible(v)]
            if node.op not in FOLLOWING_OPS or len(operands) != 1:
                break
            tail.add(id(node))
            node = operands[0].producer
    return tail, matmuls


def _wanted(node: Node, half: str, tail: set, matmuls: set) -> list:
    """The dtype each operand of ``node`` is computed in (None: as it is)."""
    floats = [is_float(v.type.dtype) for v in node.inputs]
    if node.op in SOURCES or node.op in ("cast", "arange"):
        return [None] * len(floats)
    if id(node) in matmuls:  # the logits: f32 activations, half weights, f32 bias
        return ["f32" if i != 1 else half for i in range(len(floats))]
    if node.op in HALF_OPS:
        pinned = HALF_OPS[node.op]
        return [pinned.get(i, half) if f else None for i, f in enumerate(floats)]
    if node.op in FOLLOWING_OPS:
        if id(node) in tail:
            compute = "f32"
        else:
            fixed = [v.type.dtype for v, f in zip(node.inputs, floats) if f and not _flexible(v)]
            if not fixed:  # weights and constants only: a constant expression, left as it is
                return [None] * len(floats)
            compute = fixed[0]
            for dtype in fixed[1:]:
                compute = promote(compute, dtype)
        return [compute if f else None for f in floats]
    # f32: activations widened; weights and constants stay as stored (a quantized linear's f16 block scales)
    return ["f32" if f and not _flexible(v) else None for v, f in zip(node.inputs, floats)]


def _narrow_function(fn: Function, half: str) -> bool:
    tail, matmuls = _logit_tail(fn)
    results = [r.type.dtype for r in fn.results]
    converted: dict = {}  # (id(value), dtype) -> the value in that dtype
    changed = False

    def convert(value: Value, dtype: str, before: Node) -> Value:
        key = (id(value), dtype)
        if key not in converted:
            converted[key] = fn.add_node("cast", [value], {"dtype": dtype}, before=before).output
        return converted[key]

    for node in list(fn.nodes):
        for position, (value, dtype) in enumerate(zip(node.inputs, _wanted(node, half, tail, matmuls))):
            if dtype is not None and value.type.dtype != dtype:
                node.set_input(position, convert(value, dtype, node))
                changed = True
        types = infer_types(node.op, [v.type for v in node.inputs], node.attrs, fn.module)
        for value, type_ in zip(node.outputs, types):
            if value.type != type_:
                value.type = type_
                changed = True
    for index, (result, dtype) in enumerate(zip(list(fn.results), results)):
        if result.type.dtype != dtype:  # a result no f32 tail reaches: widened back at the end
            cast = fn.add_node("cast", [result], {"dtype": dtype})
            fn.results[index] = cast.output
            changed = True
    return changed


def _fold_source_casts(module: Module, half: str) -> None:
    """cast(weight) -> the weight stored in the half type, where every reader reads that cast; cast(constant or
    full) -> a constant (full) of the half type."""
    uses = module.weight_uses()
    for name, nodes in uses.items():
        readers = [(user, pos) for node in nodes for user, pos in node.output.uses]
        if module.weights[name].dtype == half or not readers or not all(
                user.op == "cast" and user.attrs["dtype"] == half for user, _ in readers) or \
                any(node.function.is_result(node.output) for node in nodes):
            continue
        module.weights[name] = module.weights[name].with_dtype(half)
        if name in module.weight_data:
            module.weight_data[name] = np.asarray(module.weight_data[name]).astype(numpy_dtype(half))
        for node in nodes:
            node.output.type = module.weights[name]
            for user in node.output.users:
                user.function.replace_all_uses(user.output, node.output)
                user.function.erase(user)
    for fn in module.functions.values():
        for node in list(fn.nodes):
            source = node.inputs[0].producer if node.op == "cast" else None
            if source is None or source.op not in ("constant", "full") or not is_float(node.attrs["dtype"]):
                continue
            made = fn.add_node(source.op, [], {**source.attrs, "dtype": node.attrs["dtype"]}, before=node)
            fn.replace_all_uses(node.output, made.output)
            fn.erase(node)
            if not source.output.uses and not fn.is_result(source.output):
                fn.erase(source)


@register_pass("narrow_compute_dtype")
def run(module: Module, options: PassOptions) -> bool:
    """rewrites the f32 graph into one computing in f16 / bf16 (f32 statistics, softmax, RoPE angles, logits)."""
    half = options.extra.get("dtype")
    if half not in HALF_DTYPES:  # "auto", "f32", or no option (a pass run alone): the graph stays f32
        return False
    changed = False
    for fn in module.functions.values():
        changed |= _narrow_function(fn, half)
    if changed:
        _fold_source_casts(module, half)
    return changed
