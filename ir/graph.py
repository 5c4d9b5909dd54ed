"""The kiln graph: SSA values, op nodes, functions and modules.

A :class:`Function` is an ordered list of :class:`Node` s over SSA
:class:`Value` s; a :class:`Module` holds named functions, named weights (types
here, arrays beside them) and JSON metadata (model config, plans). All edits go
through methods that keep use lists right; nobody touches ``uses`` by hand.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .symbolic import SymExpr, check_range
from .types import TensorType, dtype_of_numpy, itemsize

_NAME_OK = re.compile(r"[A-Za-z0-9_.]+")


def freeze_attr(value: Any) -> Any:
    """Normalise an attribute value into an immutable, printable form."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze_attr(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str, SymExpr)):
        return value
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} is not allowed")


class Value:
    """An SSA value: a function parameter or one output of a node."""

    __slots__ = ("name", "type", "producer", "index", "uses", "function")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index
        self.uses: list = []  # list of (Node, input position); result uses are tracked by Function
        self.function: Function | None = None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"

    @property
    def users(self) -> list:
        seen, out = set(), []
        for node, _ in self.uses:
            if id(node) not in seen:
                seen.add(id(node))
                out.append(node)
        return out


class Node:
    """One op application: ``outputs = op(inputs) {attrs}``."""

    __slots__ = ("op", "_inputs", "attrs", "outputs", "function", "meta")

    def __init__(self, op: str, inputs: Sequence[Value], attrs: Mapping[str, Any], output_types: Sequence[TensorType]):
        self.op = op
        self._inputs: list = []
        self.attrs = {k: freeze_attr(v) for k, v in attrs.items()}
        self.outputs = [Value("", t, self, i) for i, t in enumerate(output_types)]
        self.function: Function | None = None
        self.meta: dict = {}  # free-form provenance (source line, module path); not printed
        for v in inputs:
            self._append_input(v)

    def _append_input(self, value: Value) -> None:
        value.uses.append((self, len(self._inputs)))
        self._inputs.append(value)

    @property
    def inputs(self) -> tuple:
        return tuple(self._inputs)

    def set_input(self, position: int, value: Value) -> None:
        old = self._inputs[position]
        old.uses.remove((self, position))
        self._inputs[position] = value
        value.uses.append((self, position))

    def drop_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            v.uses.remove((self, i))
        self._inputs = []

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def attr_key(self) -> tuple:
        return tuple(sorted(self.attrs.items()))

    def __repr__(self) -> str:
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        ins = ", ".join(f"%{v.name}" for v in self._inputs)
        return f"<{outs} = {self.op}({ins}) {self.attrs}>"


class Function:
    """A named entry function: parameters, nodes in execution order, results."""

    def __init__(self, name: str, module: "Module | None" = None):
        self.name = name
        self.module = module
        self.params: list[Value] = []
        self.nodes: list[Node] = []
        self.results: list[Value] = []
        self._names: set = set()
        self._counter = itertools.count()

    # naming -----------------------------------------------------------------
    def fresh_name(self, hint: str = "") -> str:
        hint = re.sub(r"[^A-Za-z0-9_.]", "_", hint) if hint else ""
        if hint and hint not in self._names:
            return hint
        base = hint or "v"
        while True:
            name = f"{base}_{next(self._counter)}" if hint else f"{next(self._counter)}"
            if name not in self._names:
                return name

    def _claim(self, value: Value, hint: str) -> None:
        value.name = self.fresh_name(hint)
        self._names.add(value.name)
        value.function = self

    # building ---------------------------------------------------------------
    def add_param(self, name: str, type: TensorType) -> Value:
        v = Value("", type)
        self._claim(v, name)
        self.params.append(v)
        return v

    def add_node(self, op: str, inputs: Sequence[Value], attrs: Mapping[str, Any] | None = None,
                 name: str = "", output_types: Sequence[TensorType] | None = None,
                 before: Node | None = None, meta: Mapping | None = None) -> Node:
        """Append (or insert before ``before``) a node; output types come from the op's rule."""
        from .ops import complete_attrs, get_op, infer_types

        attrs = complete_attrs(get_op(op), attrs or {})
        if output_types is None:
            output_types = infer_types(op, [v.type for v in inputs], attrs, self.module)
        node = Node(op, inputs, attrs, output_types)
        node.function = self
        if meta:
            node.meta.update(meta)
        for i, v in enumerate(node.outputs):
            self._claim(v, name if len(node.outputs) == 1 or not name else f"{name}_{i}")
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def emit(self, op: str, *inputs: Value, value_name: str = "", insert_before: Node | None = None,
             **attrs) -> Value:
        """Add a single-output node and return its value."""
        return self.add_node(op, inputs, attrs, name=value_name, before=insert_before).output

    def set_results(self, values: Iterable[Value]) -> None:
        self.results = list(values)

    # editing ----------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for node, pos in list(old.uses):
            node.set_input(pos, new)
        self.results = [new if r is old else r for r in self.results]

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for v in node.outputs:
            if v.uses or any(r is v for r in self.results):
                raise AssertionError(f"erasing {node.op} whose output %{v.name} is still used")
        node.drop_inputs()
        self.nodes.remove(node)
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_param(self, param: Value) -> None:
        """Drop a parameter nothing reads any more."""
        if param.uses or self.is_result(param):
            raise AssertionError(f"removing parameter %{param.name} that is still used")
        self.params = [p for p in self.params if p is not param]
        self._names.discard(param.name)

    def is_result(self, value: Value) -> bool:
        return any(r is value for r in self.results)

    def values(self) -> list[Value]:
        return list(self.params) + [v for n in self.nodes for v in n.outputs]

    def rename_canonical(self) -> None:
        """Number node outputs %0, %1, ... in order (params keep their names)."""
        self._names = {p.name for p in self.params}
        self._counter = itertools.count()
        for n in self.nodes:
            for v in n.outputs:
                v.name = self.fresh_name()
                self._names.add(v.name)

    def __repr__(self) -> str:
        return f"<Function {self.name}: {len(self.nodes)} nodes>"


class Module:
    """Named functions, named weights, JSON metadata, and the declared ranges of its symbols."""

    def __init__(self):
        self.functions: dict[str, Function] = {}
        self.weights: dict[str, TensorType] = {}
        self.weight_data: dict[str, np.ndarray] = {}
        self.metadata: dict[str, Any] = {}
        # symbol -> (least, greatest): the values the module is valid for (the capture's batch and length
        # limits); shape proofs take them as given and the interpreter refuses inputs outside them
        self.symbol_ranges: dict[str, tuple] = {}

    def declare_range(self, symbol: str, least: int, greatest: int) -> None:
        self.symbol_ranges[symbol] = check_range(symbol, least, greatest)

    def add_function(self, name: str) -> Function:
        if name in self.functions:
            raise ValueError(f"function @{name} already exists")
        fn = Function(name, self)
        self.functions[name] = fn
        return fn

    def add_weight(self, name: str, array: np.ndarray | None = None, type: TensorType | None = None) -> TensorType:
        if name in self.weights:
            raise ValueError(f"weight {name!r} already exists")
        if type is None:
            type = TensorType(dtype_of_numpy(array.dtype), tuple(int(d) for d in array.shape))
        self.weights[name] = type
        if array is not None:
            self.weight_data[name] = array
        return type

    def remove_weight(self, name: str) -> None:
        self.weights.pop(name)
        self.weight_data.pop(name, None)

    def weight_uses(self) -> dict:
        uses: dict = {}
        for fn in self.functions.values():
            for n in fn.nodes:
                if n.op == "weight":
                    uses.setdefault(n.attrs["name"], []).append(n)
        return uses

    def parameter_count(self, exclude: Iterable[str] = ()) -> int:
        """Elements of the weights at their logical shapes, as the source model counts them: a quantized
        weight (the q, scale and offset a ``linear_q`` / ``embedding_q`` / ``gated_mlp_q`` reads) counts as its [N, K], its
        packing, scales and offsets as nothing; each weight once, however many ops read it. ``exclude``:
        names that are no parameter of the source (buffers such as RoPE frequencies)."""
        from .quant_mlp_ops import WEIGHTS, split_inputs

        counts = {name: int(np.prod(t.shape)) if t.shape else 1 for name, t in self.weights.items()}
        for fn in self.functions.values():
            for node in fn.nodes:
                if node.op in ("linear_q", "embedding_q"):
                    quantized = [(node.inputs[1:], node.attrs["bits"])]
                elif node.op == "gated_mlp_q":
                    parts = split_inputs(node.inputs, node.attrs)[1:]
                    quantized = [(part, node.attrs[f"{name}_bits"]) for name, part in zip(WEIGHTS, parts)]
                else:
                    continue
                for inputs, bits in quantized:
                    producers = [v.producer for v in inputs]
                    if not all(p is not None and p.op == "weight" for p in producers):
                        continue
                    names = [p.attrs["name"] for p in producers]
                    q = self.weights[names[0]]
                    # an i8 element holds one int8 value, a u32 eight int4 values
                    counts[names[0]] = q.shape[0] * q.shape[1] * itemsize(q.dtype) * 8 // bits
                    counts.update(dict.fromkeys(names[1:], 0))
        excluded = set(exclude)
        return sum(count for name, count in counts.items() if name not in excluded)

    def parameter_bytes(self) -> int:
        return sum(int(t.nbytes()) for t in self.weights.values())

    def __repr__(self) -> str:
        return f"<Module functions={list(self.functions)} weights={len(self.weights)}>"
