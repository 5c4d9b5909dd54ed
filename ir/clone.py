"""Copy a function, optionally substituting symbolic dims (``seq -> 1`` makes decode from prefill)."""

from __future__ import annotations

from typing import Mapping

from .graph import Function, Module
from .symbolic import Dim, SymExpr, substitute
from .types import TensorType


def _subst_attr(value, env):
    if isinstance(value, SymExpr):
        return substitute(value, env)
    if isinstance(value, tuple):
        return tuple(_subst_attr(v, env) for v in value)
    return value


def _subst_type(t: TensorType, env) -> TensorType:
    return t.with_shape(tuple(substitute(d, env) for d in t.shape))


def clone_function(module: Module, fn: Function, name: str, dims: Mapping[str, Dim] | None = None) -> Function:
    """Add a copy of ``fn`` named ``name`` to ``module`` with ``dims`` substituted; types are re-inferred."""
    env = dict(dims or {})
    new = module.add_function(name)
    mapping: dict = {}
    for p in fn.params:
        mapping[id(p)] = new.add_param(p.name, _subst_type(p.type, env))
    for node in fn.nodes:
        attrs = {k: _subst_attr(v, env) for k, v in node.attrs.items()}
        hint = node.outputs[0].name if len(node.outputs) == 1 and not node.outputs[0].name.isdigit() else ""
        copy = new.add_node(node.op, [mapping[id(v)] for v in node.inputs], attrs, name=hint, meta=node.meta)
        for old, value in zip(node.outputs, copy.outputs):
            mapping[id(old)] = value
    new.set_results([mapping[id(r)] for r in fn.results])
    return new
