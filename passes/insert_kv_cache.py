"""Insert the KV cache: the stateless ``forward`` becomes ``prefill`` and ``decode`` sharing weights.

Both take ``input_ids[batch, seq]``, ``positions[batch, seq]`` (absolute token
positions, -1 for padding), the paged ``kv_cache`` and ``page_table[batch,
pages_per_seq]``, and return the logits and the updated cache. Every fused
``attention`` becomes ``paged_attention``, which writes the new K (after RoPE)
and V into the cache and attends over the sequence's cached history. RoPE and
learned position embeddings read the ``positions`` input instead of
``arange(seq)``. ``decode`` is ``prefill`` with ``seq = 1``: one token per
sequence, so projections and MLPs do O(1) new work per token.
"""

from __future__ import annotations

from kiln.ir.clone import clone_function
from kiln.ir.errors import ConfigError
from kiln.ir.graph import Function, Module, Value
from kiln.ir.ops import infer_types
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType

from .manager import PassOptions, register_pass
from .plan_kv_cache import check_kv_plan


def _is_sequence_positions(value: Value) -> bool:
    """Whether ``value`` is ``arange(seq)`` seen through views as [1, seq] or [batch, seq]: the positions of a
    prompt that starts at 0, which the ``positions`` input generalises. Anything else computed from arange
    (an offset, a reversal) is left alone, so the surviving-arange check refuses it instead of a silent shift."""
    if value.type.rank != 2 or value.type.shape[1] != sym("seq") or value.type.shape[0] not in (1, sym("batch")):
        return False
    node = value.producer
    while node is not None and node.op in ("reshape", "expand", "cast"):
        node = node.inputs[0].producer
    return (node is not None and node.op == "arange" and node.attrs["start"] == 0 and node.attrs["step"] == 1
            and node.attrs["end"] == sym("seq"))


def _retype(fn: Function) -> None:
    """Re-infer every node's output types after inputs changed shape."""
    for node in fn.nodes:
        types = infer_types(node.op, [v.type for v in node.inputs], node.attrs, fn.module)
        for v, t in zip(node.outputs, types):
            v.type = t


def _dead_code(fn: Function) -> None:
    for node in reversed(list(fn.nodes)):
        if all(not v.uses and not fn.is_result(v) for v in node.outputs):
            fn.erase(node)


def _build_prefill(module: Module, plan: dict) -> Function:
    forward = module.functions["forward"]
    fn = clone_function(module, forward, "prefill")
    batch, seq = sym("batch"), sym("seq")
    positions = fn.add_param("positions", TensorType("i64", (batch, seq)))
    cache = fn.add_param("kv_cache", TensorType(plan["dtype"], (plan["num_layers"], 2, plan["num_pages"],
                                                                 plan["num_kv_heads"], plan["page_size"],
                                                                 plan["head_dim"])))
    page_table = fn.add_param("page_table", TensorType("i32", (batch, plan["pages_per_seq"])))
    for node in list(fn.nodes):
        # RoPE tables and learned absolute position embeddings look up the token positions
        if node.op in ("rope", "embedding") and _is_sequence_positions(node.inputs[1]):
            node.set_input(1, positions)
    _retype(fn)
    layer = 0
    for node in list(fn.nodes):
        if node.op != "attention":
            continue
        q, k, v = node.inputs
        paged = fn.add_node("paged_attention", [q, k, v, cache, page_table, positions],
                            {**node.attrs, "layer": layer}, before=node, name=f"attention_{layer}",
                            meta=node.meta)
        fn.replace_all_uses(node.output, paged.outputs[0])
        cache = paged.outputs[1]
        layer += 1
    fn.set_results(list(fn.results) + [cache])
    _dead_code(fn)
    for node in fn.nodes:
        if node.op == "arange" and "seq" in {s for d in node.output.type.shape for s in getattr(d, "symbols", ())}:
            raise ConfigError("the model computes something from token positions that kiln cannot feed from the "
                              f"KV cache (`arange` over the sequence survives in {node.meta.get('source', 'the graph')})")
    return fn


@register_pass("insert_kv_cache")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites the stateless forward into prefill and decode functions over a paged KV cache."""
    if "forward" not in module.functions:
        return False
    _dead_code(module.functions["forward"])
    unfused = [n for n in module.functions["forward"].nodes if n.op == "sdpa"]
    if unfused or module.metadata.get("unfused_attention"):
        reasons = module.metadata.get("unfused_attention") or ["an attention was not recognised"]
        raise ConfigError(f"cannot insert a KV cache: {len(reasons)} attention(s) stayed unfused: {reasons[0]}")
    plan = module.metadata.get("kv_cache")
    if plan is None:
        raise ConfigError("insert_kv_cache needs plan_kv_cache to run first")
    prefill = _build_prefill(module, plan)
    clone_function(module, prefill, "decode", {"seq": 1})
    del module.functions["forward"]
    check_kv_plan(plan, module)  # the cache as inserted: every attention's region, on every compile
    return True
