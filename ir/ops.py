"""The op registry: every kiln op declared once with attributes, type rule and numpy reference.

``define_op`` registers an :class:`OpDef`. Passes and backends never compute
shapes themselves; they call :func:`infer_types`. The reference interpreter
calls ``OpDef.reference`` with concrete attributes (symbols substituted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import VerificationError
from .symbolic import SymExpr, evaluate
from .types import TensorType

REQUIRED = object()


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: Callable  # (input_types, attrs, module) -> list[TensorType]
    reference: Callable  # (list[np.ndarray], attrs) -> list[np.ndarray]
    attrs: Mapping[str, Any] = field(default_factory=dict)  # name -> default or REQUIRED
    num_inputs: tuple = (0, None)  # (min, max) ; max None = variadic
    traits: frozenset = frozenset()  # "elementwise", "commutative", "view", "source"
    doc: str = ""


OPS: dict[str, OpDef] = {}


def define_op(name: str, *, infer, reference, attrs=None, inputs=(0, None), traits=(), doc=""):
    if name in OPS:
        raise AssertionError(f"op {name} defined twice")
    if isinstance(inputs, int):
        inputs = (inputs, inputs)
    OPS[name] = OpDef(name, infer, reference, dict(attrs or {}), tuple(inputs), frozenset(traits), doc)
    return OPS[name]


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise VerificationError(f"unknown op {name!r}") from None


def complete_attrs(op: OpDef, attrs: Mapping[str, Any]) -> dict:
    """Fill defaults and reject unknown or missing attributes."""
    unknown = set(attrs) - set(op.attrs)
    if unknown:
        raise VerificationError(f"op {op.name}: unknown attribute(s) {sorted(unknown)}; "
                                f"expected some of {sorted(op.attrs)}")
    out = {}
    for key, default in op.attrs.items():
        if key in attrs:
            out[key] = attrs[key]
        elif default is REQUIRED:
            raise VerificationError(f"op {op.name}: missing attribute {key!r}")
        else:
            out[key] = default
    return out


def infer_types(op_name: str, input_types: Sequence[TensorType], attrs: Mapping[str, Any], module=None) -> list:
    op = get_op(op_name)
    lo, hi = op.num_inputs
    if len(input_types) < lo or (hi is not None and len(input_types) > hi):
        expected = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'n'}"
        raise VerificationError(f"op {op_name}: expected {expected} inputs, found {len(input_types)}")
    full = complete_attrs(op, attrs)
    return list(op.infer(list(input_types), full, module))


def concrete_attrs(attrs: Mapping[str, Any], env: Mapping[str, int]) -> dict:
    """Substitute symbol values into attributes (for running references)."""

    def conv(v):
        if isinstance(v, SymExpr):
            return evaluate(v, env)
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        return v

    return {k: conv(v) for k, v in attrs.items()}


def fail(op: str, message: str) -> VerificationError:
    return VerificationError(f"op {op}: {message}")


# Importing the definitions registers them.
from . import core_ops, llm_ops, mla_ops, moe_ops, quant_mlp_ops, quant_ops  # noqa: E402,F401
