"""The IR verifier, kept apart from the IR classes.

``verify_module`` checks, for every function:

1. SSA: every value is defined exactly once (parameters and node outputs),
   names are unique, and every input is defined before the node that uses it
   (no use of a value from another function or of an erased node).
2. Use lists: each value's ``uses`` list equals the (node, position) pairs that
   actually read it.
3. Ops: every node's op is registered, its attributes are exactly the op's
   attributes (no unknown, none missing), and its input count is allowed.
4. Types: re-inferring every node's output types from its input types and
   attributes gives exactly the recorded types (shapes compared symbolically).
5. Results: the function returns at least one value, each defined in it.
6. Weights: every ``weight`` node names a module weight; every weight array
   present is declared and matches its declared dtype and shape.
7. Symbols: every symbol in a node's types or attributes appears in the
   parameter types of its function (no free symbols); every declared symbol
   range is integers 1 <= least <= greatest.

The first violation raises :class:`VerificationError` naming the function,
the node and what was expected versus found.
"""

from __future__ import annotations

from .errors import KilnError, VerificationError
from .graph import Function, Module
from .ops import OPS, infer_types
from .printer import format_node
from .symbolic import SymExpr, check_range, symbols_of
from .types import dtype_of_numpy


def verify_module(module: Module) -> None:
    for symbol, declared in module.symbol_ranges.items():
        try:
            check_range(symbol, *declared)
        except (TypeError, ValueError) as err:
            raise VerificationError(f"declared range of symbol {symbol!r}: {err}") from None
    for name in module.weight_data:
        if name not in module.weights:
            raise VerificationError(f"weight array {name!r} is not declared in the module; "
                                    f"add it with Module.add_weight or drop the array")
    for name, ty in module.weights.items():
        data = module.weight_data.get(name)
        if data is not None:
            try:
                found = dtype_of_numpy(data.dtype)
            except TypeError:
                found = str(data.dtype)
            if tuple(data.shape) != tuple(ty.shape) or found != ty.dtype:
                raise VerificationError(f"weight {name!r}: declared {ty}, array is {found}{list(data.shape)}")
    for fn in module.functions.values():
        if fn.module is not module:
            raise VerificationError(f"@{fn.name}: function does not point back to its module")
        verify_function(fn)


def _attr_symbols(value) -> frozenset:
    if isinstance(value, SymExpr):
        return value.symbols
    if isinstance(value, tuple):
        out = frozenset()
        for v in value:
            out |= _attr_symbols(v)
        return out
    return frozenset()


def verify_function(fn: Function) -> None:
    where = f"@{fn.name}"
    defined: set = set()
    names: set = set()
    bound_symbols = frozenset()
    for p in fn.params:
        if p.producer is not None:
            raise VerificationError(f"{where}: parameter %{p.name} has a producer")
        _define(p, defined, names, where)
        bound_symbols |= p.type.symbols
    for node in fn.nodes:
        here = f"{where}, node `{format_node(node)}`"
        if node.function is not fn:
            raise VerificationError(f"{here}: node belongs to another function")
        if node.op not in OPS:
            raise VerificationError(f"{here}: unknown op {node.op!r}")
        op = OPS[node.op]
        if set(node.attrs) != set(op.attrs):
            raise VerificationError(f"{here}: attributes {sorted(node.attrs)} differ from the op's "
                                    f"{sorted(op.attrs)}")
        for pos, value in enumerate(node.inputs):
            if id(value) not in defined:
                raise VerificationError(f"{here}: input {pos} %{value.name} is not defined before use")
            if (node, pos) not in [(n, p) for n, p in value.uses if n is node]:
                raise VerificationError(f"{here}: %{value.name}'s use list misses this node")
        try:
            expected = infer_types(node.op, [v.type for v in node.inputs], node.attrs, fn.module)
        except KilnError as err:
            raise VerificationError(f"{here}: {err}") from None
        found = [v.type for v in node.outputs]
        if expected != found:
            raise VerificationError(f"{here}: output types expected "
                                    f"{', '.join(map(str, expected))}, found {', '.join(map(str, found))}")
        free = set()
        for t in found:
            free |= t.symbols
        for value in node.attrs.values():
            free |= _attr_symbols(value)
        if free - bound_symbols:
            raise VerificationError(f"{here}: symbols {sorted(free - bound_symbols)} are not bound by the "
                                    f"parameters of {where}")
        for i, out in enumerate(node.outputs):
            if out.producer is not node or out.index != i:
                raise VerificationError(f"{here}: output {i} does not point back to its node")
            _define(out, defined, names, where)
    node_ids = {id(n) for n in fn.nodes}
    for value in fn.values():
        if len({(id(node), pos) for node, pos in value.uses}) != len(value.uses):
            raise VerificationError(f"{where}: %{value.name}'s use list has duplicate entries")
        for node, pos in value.uses:
            if node.function is not fn or id(node) not in node_ids:
                raise VerificationError(f"{where}: %{value.name} is used by a node outside the function")
            if pos >= len(node.inputs) or node.inputs[pos] is not value:
                raise VerificationError(f"{where}: %{value.name}'s use list is stale ({node.op} input {pos})")
    if not fn.results:
        raise VerificationError(f"{where}: returns nothing")
    for r in fn.results:
        if id(r) not in defined:
            raise VerificationError(f"{where}: result %{r.name} is not defined in the function")


def _define(value, defined: set, names: set, where: str) -> None:
    if id(value) in defined:
        raise VerificationError(f"{where}: %{value.name} defined twice")
    if value.name in names:
        raise VerificationError(f"{where}: name %{value.name} used for two values")
    defined.add(id(value))
    names.add(value.name)


__all__ = ["verify_module", "verify_function", "symbols_of"]
