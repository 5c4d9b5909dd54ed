"""Insert the KV cache: the stateless ``forward`` becomes ``step``, one ragged batch over the paged cache.

``step(token_ids[tokens], positions[tokens], token_seq[tokens], page_table[seqs, P], logit_rows[rows],
<pools>) -> (logits[rows, vocab], <pools>)`` (``ir.kv_cache.step_inputs``): the new tokens of any number
of sequences, flat and unpadded, so one call can hold a prefill chunk of one sequence beside decode
tokens of others. The captured ``[batch, seq]`` graph runs as one row (``batch = 1``, ``seq = tokens``):
projections and MLPs see every token at once, and every fused ``attention`` becomes ``paged_attention``,
which writes each token's K (after RoPE) and V into its sequence's pages and attends over that
sequence's cached tokens (``latent_attention`` becomes ``paged_latent_attention`` over one latent
pool). RoPE and learned position embeddings read ``positions`` instead of ``arange(seq)``.
``logit_rows`` selects which tokens' logits are returned (``select_logit_rows`` moves the selection
above the output projection). A copy, ``step_decode``, has the same signature for steps of
one token per sequence, which backends may build with small-row kernels.
"""

from __future__ import annotations

from kiln.ir.clone import clone_function
from kiln.ir.errors import ConfigError
from kiln.ir.graph import Function, Module, Value
from kiln.ir.kv_cache import DECODE_STEP, STEP, KVCacheSpec, check_kv_cache_spec, step_inputs
from kiln.ir.ops import infer_types
from kiln.ir.symbolic import sym

from .manager import PassOptions, register_pass


def _is_sequence_positions(value: Value) -> bool:
    """Whether ``value`` is ``arange(tokens)`` seen through views as [1, tokens]: the positions of a prompt
    that starts at 0, which the ``positions`` input generalises. Anything else computed from arange (an
    offset, a reversal) is left alone, so the surviving-arange check refuses it instead of a silent shift."""
    if value.type.rank != 2 or value.type.shape != (1, sym("tokens")):
        return False
    node = value.producer
    while node is not None and node.op in ("reshape", "expand", "cast"):
        node = node.inputs[0].producer
    return (node is not None and node.op == "arange" and node.attrs["start"] == 0 and node.attrs["step"] == 1
            and node.attrs["end"] == sym("tokens"))


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


def _build_step(module: Module, spec: KVCacheSpec) -> Function:
    forward = module.functions["forward"]
    tokens = sym("tokens")
    fn = clone_function(module, forward, STEP, {"batch": 1, "seq": tokens})
    if len(fn.params) != 1 or fn.params[0].type.shape != (1, tokens):
        raise ConfigError(f"kiln inserts a KV cache into a model whose only input is token ids [batch, seq]; this "
                          f"one takes {', '.join(f'%{p.name}: {p.type}' for p in fn.params)}")
    old_ids = fn.params[0]
    params = {name: fn.add_param(name, t) for name, t in step_inputs(spec)}
    first = fn.nodes[0] if fn.nodes else None
    ids = fn.emit("reshape", params["token_ids"], shape=(1, tokens), insert_before=first)
    if old_ids.type.dtype != "i64":
        ids = fn.emit("cast", ids, dtype=old_ids.type.dtype, insert_before=first)
    fn.replace_all_uses(old_ids, ids)
    fn.remove_param(old_ids)
    positions = fn.emit("reshape", params["positions"], shape=(1, tokens), insert_before=first)
    for node in list(fn.nodes):
        # RoPE tables and learned absolute position embeddings look up the token positions
        if node.op in ("rope", "embedding") and _is_sequence_positions(node.inputs[1]):
            node.set_input(1, positions)
    _retype(fn)
    pools = {name: params[name] for name, _ in step_inputs(spec)[5:]}
    layer = 0
    for node in list(fn.nodes):
        if node.op not in ("attention", "latent_attention"):
            continue
        group, index = spec.locate(layer)
        names = spec.pool_names(layer)
        # attention(q, k, v) reads a K and a V pool; latent_attention(q, latent) one latent pool
        paged = fn.add_node(f"paged_{node.op}", list(node.inputs) + [pools[name] for name in names] +
                            [params["page_table"], positions, params["token_seq"]],
                            {**node.attrs, "layer": layer, "index": index}, before=node, name=f"attention_{layer}",
                            meta=node.meta)
        fn.replace_all_uses(node.output, paged.outputs[0])
        for name, updated in zip(names, paged.outputs[1:]):
            pools[name] = updated
        layer += 1
    logits = fn.results[0]
    if len(fn.results) != 1 or logits.type.rank != 3 or logits.type.shape[:2] != (1, tokens):
        raise ConfigError(f"kiln expects a model returning logits [batch, seq, vocab]; this one returns "
                          f"{', '.join(str(r.type) for r in fn.results)}")
    selected = fn.emit("select_rows", logits, params["logit_rows"])
    flat = fn.emit("reshape", selected, shape=(sym("rows"), logits.type.shape[2]), value_name="logits")
    fn.set_results([flat] + [pools[pool.name] for pool in spec.pools()])
    _dead_code(fn)
    for node in fn.nodes:
        if node.op == "arange" and "tokens" in {s for d in node.output.type.shape for s in getattr(d, "symbols", ())}:
            raise ConfigError("the model computes something from token positions that kiln cannot feed from the "
                              f"KV cache (`arange` over the sequence survives in {node.meta.get('source', 'the graph')})")
    return fn


@register_pass("insert_kv_cache")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites the stateless forward into @step (and @step_decode): one ragged batch over the paged KV cache."""
    if "forward" not in module.functions:
        return False
    _dead_code(module.functions["forward"])
    unfused = [n for n in module.functions["forward"].nodes if n.op == "sdpa"]
    if unfused or module.metadata.get("unfused_attention"):
        reasons = module.metadata.get("unfused_attention") or ["an attention was not recognised"]
        raise ConfigError(f"cannot insert a KV cache: {len(reasons)} attention(s) stayed unfused: {reasons[0]}")
    if "kv_cache" not in module.metadata:
        raise ConfigError("insert_kv_cache needs plan_kv_cache to run first")
    spec = KVCacheSpec.from_json(module.metadata["kv_cache"])
    step = _build_step(module, spec)
    del module.functions["forward"]
    clone_function(module, step, DECODE_STEP, {"tokens": sym("decode_tokens"), "rows": sym("decode_tokens")})
    check_kv_cache_spec(spec, module)  # the cache as inserted: every attention's pools, on every compile
    return True
