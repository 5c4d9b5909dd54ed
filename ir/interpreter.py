"""Reference interpreter: runs a kiln function with each op's numpy reference.

Slow and simple on purpose; it is the semantics every pass and backend is
checked against.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import KilnError
from .graph import Function, Module
from .ops import OPS, concrete_attrs
from .symbolic import SymExpr, evaluate
from .types import dtype_of_numpy, numpy_dtype


def bind_symbols(fn: Function, arrays: Sequence[np.ndarray]) -> dict:
    """Solve symbol values from the concrete shapes of the inputs."""
    if len(arrays) != len(fn.params):
        raise KilnError(f"@{fn.name} takes {len(fn.params)} inputs, got {len(arrays)}")
    env: dict = {}
    pending = []
    for p, a in zip(fn.params, arrays):
        if len(a.shape) != p.type.rank:
            raise KilnError(f"@{fn.name} input %{p.name}: expected rank {p.type.rank} ({p.type}), "
                            f"got shape {list(a.shape)}")
        for d, n in zip(p.type.shape, a.shape):
            if isinstance(d, SymExpr) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1:
                name = d.terms[0][0][0]
                if n < 1:
                    # the symbolic proofs (slice bounds, arange lengths) assume every symbol is >= 1
                    raise KilnError(f"@{fn.name} input %{p.name}: symbol {name} would be {n}, symbols must be "
                                    f">= 1 (got shape {list(a.shape)} for {p.type})")
                if env.setdefault(name, int(n)) != int(n):
                    raise KilnError(f"@{fn.name}: symbol {name} is {env[name]} and {n} in different inputs")
                declared = fn.module.symbol_ranges.get(name) if fn.module is not None else None
                if declared is not None and not declared[0] <= n <= declared[1]:
                    # shape proofs (slice bounds) took the declared range as given
                    raise KilnError(f"@{fn.name} input %{p.name}: symbol {name} would be {n}, the module is "
                                    f"valid for {name} in [{declared[0]}, {declared[1]}] (got shape "
                                    f"{list(a.shape)} for {p.type})")
            else:
                pending.append((p, a, d, n))
    for p, a, d, n in pending:
        try:
            value = evaluate(d, env)
        except KeyError:
            raise KilnError(f"@{fn.name} input %{p.name}: dim {d} of {p.type} cannot be solved from the input "
                            f"shapes; give some input a plain dim for each of its symbols") from None
        if value != n:
            raise KilnError(f"@{fn.name} input %{p.name}: expected {p.type} (dim {d} = {value}), "
                            f"got shape {list(a.shape)}")
    return env


def run_function(module: Module, name: str, inputs: Sequence[np.ndarray],
                 weights: Mapping[str, np.ndarray] | None = None) -> list:
    """Run ``@name`` on numpy inputs; returns the list of result arrays."""
    fn = module.functions[name]
    weights = module.weight_data if weights is None else weights
    arrays = [np.asarray(a) for a in inputs]
    env = bind_symbols(fn, arrays)
    values: dict = {}
    for p, a in zip(fn.params, arrays):
        if dtype_of_numpy(a.dtype) != p.type.dtype:
            raise KilnError(f"@{fn.name} input %{p.name}: expected {p.type.dtype}, got {a.dtype}")
        values[id(p)] = a
    last_use = {}
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            last_use[id(v)] = i
    keep = {id(r) for r in fn.results}
    for i, node in enumerate(fn.nodes):
        if node.op == "weight":
            name = node.attrs["name"]
            if name not in weights:
                raise KilnError(f"@{fn.name}: weight {name!r} has no array; pass it in weights= or load it first")
            array, declared = np.asarray(weights[name]), node.output.type
            if tuple(array.shape) != declared.concrete(env) or array.dtype != numpy_dtype(declared.dtype):
                raise KilnError(f"@{fn.name}: weight {name!r} is declared {declared}, its array is "
                                f"{array.dtype}{list(array.shape)}")
            outs = [array]
        else:
            args = [values[id(v)] for v in node.inputs]
            outs = OPS[node.op].reference(args, concrete_attrs(node.attrs, env))
        for v, out in zip(node.outputs, outs):
            expected = v.type.concrete(env)
            if tuple(out.shape) != expected or dtype_of_numpy(out.dtype) != v.type.dtype:
                raise AssertionError(f"@{fn.name}: {node.op} reference gave {out.dtype}{list(out.shape)} "
                                     f"for %{v.name}: {v.type} = {list(expected)}")
            values[id(v)] = out
        for v in node.inputs:
            if last_use.get(id(v)) == i and id(v) not in keep:
                values.pop(id(v), None)
    return [values[id(r)] for r in fn.results]
