"""Add ``prefill_last``: prefill that computes the logits of each sequence's last token only.

Generation needs one row of logits per prompt; ``prefill`` computes them for every position
(perplexity needs those), and for SmolLM2 the 49152-wide output projection is about a fifth
of prefill's work and, at 2048 tokens, 384 MiB of its activations. The pass copies prefill and
moves a ``last_token`` gather up the tail of the graph that works position by position (the final
norm, the logits projection, a soft cap, casts), so that tail runs on one token per sequence.
The KV cache is still written for every token: attention is above the gather.
"""

from __future__ import annotations

from kiln.ir.clone import clone_function
from kiln.ir.graph import Function, Module, Value
from kiln.ir.symbolic import symbols_of

from .manager import PassOptions, register_pass

SOURCE, TARGET = "prefill", "prefill_last"
# Ops that compute each position from that position alone (given operands without a seq axis).
POSITIONWISE = {"linear", "linear_q", "rms_norm", "add_rms_norm", "layer_norm", "add", "sub", "mul", "div",
                "tanh", "cast", "neg", "gelu", "silu", "sigmoid", "exp", "pow", "sqrt", "rsqrt", "clamp",
                "maximum", "minimum"}


def _seq_dims(fn: Function) -> tuple:
    ids = fn.params[0]
    return ids.type.shape[0], ids.type.shape[1]


def _per_position(value: Value, batch, seq) -> bool:
    return value.type.rank >= 2 and value.type.shape[0] == batch and value.type.shape[1] == seq


def _has_seq(value: Value, seq) -> bool:
    return bool(symbols_of(seq) & value.type.symbols) or seq in value.type.shape


def _tail(fn: Function, batch, seq) -> list:
    """The nodes (in order) whose every output is per position and used only by the tail or returned."""
    tail: set = set()
    for node in reversed(fn.nodes):
        if node.op not in POSITIONWISE or not all(_per_position(v, batch, seq) for v in node.outputs):
            continue
        if not all(_per_position(v, batch, seq) or not _has_seq(v, seq) for v in node.inputs):
            continue
        used = [user for v in node.outputs for user, _ in v.uses]
        if not all(id(user) in tail for user in used):
            continue
        if not (used or any(fn.is_result(v) for v in node.outputs)):
            continue
        tail.add(id(node))
    return [n for n in fn.nodes if id(n) in tail]


def add_prefill_last(module: Module) -> Function | None:
    source = module.functions[SOURCE]
    fn = clone_function(module, source, TARGET)
    batch, seq = _seq_dims(fn)
    tail = _tail(fn, batch, seq)
    logits = fn.results[0]
    if not tail or logits.producer is None or id(logits.producer) not in {id(n) for n in tail}:
        del module.functions[TARGET]
        return None
    positions = fn.params[1]
    gathered: dict = {}
    mapping: dict = {}
    for node in tail:
        inputs = []
        for v in node.inputs:
            if id(v) in mapping:
                inputs.append(mapping[id(v)])
            elif _per_position(v, batch, seq):  # the frontier: gather once, before the tail's first node
                if id(v) not in gathered:
                    gathered[id(v)] = fn.emit("last_token", v, positions, insert_before=tail[0])
                inputs.append(gathered[id(v)])
            else:
                inputs.append(v)
        copy = fn.add_node(node.op, inputs, node.attrs, meta=node.meta)
        for old, new in zip(node.outputs, copy.outputs):
            mapping[id(old)] = new
    fn.set_results([mapping.get(id(r), r) for r in fn.results])
    for node in reversed(tail):  # the per-position originals, now unread
        if not any(v.uses for v in node.outputs):
            fn.erase(node)
    return fn


@register_pass("add_prefill_last")
def run(module: Module, options: PassOptions) -> bool:
    """Adds @prefill_last (prefill with logits for each sequence's last token) when @prefill has a per-position tail."""
    if SOURCE not in module.functions or TARGET in module.functions:
        return False
    return add_prefill_last(module) is not None
