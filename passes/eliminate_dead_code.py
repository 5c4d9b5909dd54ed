"""Dead-code elimination: drop nodes nothing reads and weights nothing names.

Every kiln op is pure, so a node whose outputs are neither used nor returned
can go. This is a backwards sweep rather than a rule table: liveness is global.
"""

from __future__ import annotations

from kiln.ir.graph import Module

from .manager import register_pass


@register_pass("eliminate_dead_code")
def run(module: Module, options) -> bool:
    """rewrites a module with unused nodes and unreferenced weights into one without them."""
    changed = False
    for fn in module.functions.values():
        # Walking backwards erases a whole dead chain in one sweep: users die before their producers.
        for node in reversed(list(fn.nodes)):
            if any(v.uses or fn.is_result(v) for v in node.outputs):
                continue
            fn.erase(node)
            changed = True
    referenced = set(module.weight_uses())
    for name in [w for w in module.weights if w not in referenced]:
        module.remove_weight(name)
        changed = True
    return changed
