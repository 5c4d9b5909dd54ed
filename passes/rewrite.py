"""A small pattern-rewrite driver shared by the cleanup passes.

A rule is ``(op name, rewrite, comment)``: ``rewrite(node)`` returns the value
that replaces the node's output, or ``None`` when the pattern does not match.
``apply_rules`` tries the rules on every node until none fires.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from kiln.ir.graph import Function, Module, Node, Value

ANY_OP = "*"  # a rule keyed by "*" is tried on every node after the rules for its op
MAX_SWEEPS = 1000  # far more than any real graph needs; more means two rules undo each other


class Rule(NamedTuple):
    op: str
    rewrite: Callable[[Node], "Value | None"]
    comment: str  # one line: the algebra the rule applies, e.g. "x + 0 -> x"


def apply_rules(module: Module, rules: Sequence) -> bool:
    """Rewrite every function of ``module`` with ``rules`` to a fixed point; True when anything changed."""
    table: dict = {}
    for entry in rules:
        rule = Rule(*entry)
        table.setdefault(rule.op, []).append(rule)
    changed = False
    for fn in module.functions.values():
        changed |= _rewrite_function(fn, table)
    return changed


def _rewrite_function(fn: Function, table: dict) -> bool:
    changed = False
    for _ in range(MAX_SWEEPS):
        fired = False
        erased: set = set()
        for node in list(fn.nodes):
            if id(node) in erased or len(node.outputs) != 1:
                continue
            for rule in table.get(node.op, []) + table.get(ANY_OP, []):
                new = rule.rewrite(node)
                if new is None or new is node.output:
                    continue
                old = node.output
                assert new.type == old.type, (f"rule '{rule.comment}' on {node.op} gave {new.type} "
                                              f"for %{old.name}: {old.type}")
                fn.replace_all_uses(old, new)
                erased |= erase_dead(fn, node)
                fired = True
                break
        if not fired:
            return changed
        changed = True
    raise AssertionError(f"@{fn.name}: rewrite rules still firing after {MAX_SWEEPS} sweeps; "
                         f"two rules undo each other")


def erase_dead(fn: Function, node: Node) -> set:
    """Erase ``node`` if nothing uses it, then the producers that only it used; returns their ids.

    Ops are pure, so a node nobody reads can go. A module weight whose last
    ``weight`` node goes is removed from the module too.
    """
    erased: set = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in erased or any(v.uses or fn.is_result(v) for v in current.outputs):
            continue
        producers = [v.producer for v in current.inputs if v.producer is not None]
        fn.erase(current)
        erased.add(id(current))
        if current.op == "weight":
            drop_weight_if_unused(fn.module, current.attrs["name"])
        stack.extend(producers)
    return erased


def drop_weight_if_unused(module: Module | None, name: str) -> bool:
    """Remove weight ``name`` from ``module`` when no function has a ``weight`` node naming it."""
    if module is None or name not in module.weights:
        return False
    for fn in module.functions.values():
        if any(n.op == "weight" and n.attrs["name"] == name for n in fn.nodes):
            return False
    module.remove_weight(name)
    return True


# small helpers the rule tables share ----------------------------------------------
def emit_before(node: Node, op: str, *inputs: Value, **attrs) -> Value:
    """Emit ``op`` in front of ``node``, named after the value it is about to replace."""
    return node.function.emit(op, *inputs, value_name=node.output.name, insert_before=node, **attrs)


def emit_weight(node: Node, name: str) -> Value:
    """Emit a ``weight`` node for module weight ``name`` in front of ``node``."""
    return node.function.emit("weight", name=name, value_name=name.replace(".", "_"), insert_before=node)


def producer_op(value: Value) -> str | None:
    """The op that produced ``value`` (None for a function parameter)."""
    return value.producer.op if value.producer is not None else None


def only_use(value: Value) -> bool:
    """Whether exactly one node input reads ``value`` and the function does not return it."""
    return len(value.uses) == 1 and not value.function.is_result(value)


def scalar_value(value: Value):
    """The number a ``constant`` or ``full`` node fills ``value`` with, else None."""
    node = value.producer
    if node is None or node.op not in ("constant", "full"):
        return None
    return node.attrs["value"]


def fresh_weight_name(module: Module, base: str) -> str:
    """``base`` if no weight has that name, else ``base.1``, ``base.2``, ..."""
    if base not in module.weights:
        return base
    n = 1
    while f"{base}.{n}" in module.weights:
        n += 1
    return f"{base}.{n}"
