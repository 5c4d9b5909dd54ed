"""Select logit rows early: ``select_rows(tail(x), rows)`` -> ``tail(select_rows(x, rows))`` up the per-position tail.

The step returns logits only for ``logit_rows`` (one row per sequence when generating); the output
projection (for SmolLM2 49152 wide, about a fifth of a prefill's work), the final norm, a soft cap and
casts compute each position from that position alone, so they can run after the selection, on the
selected rows only. The KV cache is still written for every token: attention is above the tail.
"""

from __future__ import annotations

from kiln.ir.graph import Function, Module, Node, Value

from .manager import PassOptions, register_pass

# Ops that compute each position from that position alone (given operands without a token axis).
POSITIONWISE = {"linear", "linear_q", "rms_norm", "add_rms_norm", "layer_norm", "add", "sub", "mul", "div",
                "tanh", "cast", "neg", "gelu", "silu", "sigmoid", "exp", "pow", "sqrt", "rsqrt", "clamp",
                "maximum", "minimum"}


def _per_position(value: Value, tokens) -> bool:
    return value.type.rank >= 2 and value.type.shape[0] == 1 and value.type.shape[1] == tokens


def _hoist(fn: Function, select: Node) -> list:
    """Move one select_rows above its operand's producer; returns the new select nodes (none if it stays)."""
    x, rows = select.inputs
    node, tokens = x.producer, x.type.shape[1]
    if node is None or node.op not in POSITIONWISE:
        return []
    if any(user is not select for out in node.outputs for user in out.users) or \
            any(fn.is_result(out) for out in node.outputs):
        return []
    inputs, selects = [], {}
    for v in node.inputs:
        if _per_position(v, tokens):
            if id(v) not in selects:
                selects[id(v)] = fn.add_node("select_rows", [v, rows], before=select)
            inputs.append(selects[id(v)].output)
        elif v.type.symbols & tokens.symbols:
            for made in selects.values():
                fn.erase(made)
            return []
        else:
            inputs.append(v)
    copy = fn.add_node(node.op, inputs, node.attrs, before=select, meta=node.meta)
    fn.replace_all_uses(select.output, copy.outputs[x.index])
    fn.erase(select)
    fn.erase(node)
    return list(selects.values())


def select_logit_rows(fn: Function) -> bool:
    work = [n for n in fn.nodes if n.op == "select_rows"]
    changed = False
    while work:
        moved = _hoist(fn, work.pop())
        changed |= bool(moved)
        work.extend(moved)
    return changed


@register_pass("select_logit_rows")
def run(module: Module, options: PassOptions) -> bool:
    """Moves each step's logit-row selection above the per-position tail (final norm, output projection)."""
    changed = False
    for fn in module.functions.values():
        changed |= select_logit_rows(fn)
    return changed
