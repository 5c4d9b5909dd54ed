"""Text form of kiln IR; ``parser.parse_module`` reads it back exactly.

    module {
      metadata {"config": {...}}
      symbol seq in [1, 2048]
      weight "lm_head.weight" : f32[49152, 576]
      func @forward(%input_ids: i64[batch, seq]) -> (f32[batch, seq, 49152]) {
        %w = weight {name="lm_head.weight"} : f32[49152, 576]
        %logits = linear(%h, %w) : f32[batch, seq, 49152]
        return %logits
      }
    }

Attributes equal to their op's default are not printed.
"""

from __future__ import annotations

import json
import math

from .graph import Function, Module, Node
from .ops import OPS
from .symbolic import SymExpr


def format_attr_value(value) -> str:
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, SymExpr):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr_value(v) for v in value) + "]"
    raise TypeError(f"cannot print attribute {value!r}")


def format_attrs(node: Node) -> str:
    op = OPS.get(node.op)
    defaults = op.attrs if op else {}
    items = []
    for key, value in node.attrs.items():
        if key in defaults and _same_value(defaults[key], value):
            continue
        items.append(f"{key}={format_attr_value(value)}")
    return " {" + ", ".join(items) + "}" if items else ""


def _same_value(a, b) -> bool:
    return type(a) is type(b) and a == b


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    ins = ", ".join(f"%{v.name}" for v in node.inputs)
    types = ", ".join(str(v.type) for v in node.outputs)
    lhs = f"{outs} = " if node.outputs else ""
    return f"{lhs}{node.op}({ins}){format_attrs(node)} : {types}"


def print_function(fn: Function, indent: str = "") -> str:
    params = ", ".join(f"%{p.name}: {p.type}" for p in fn.params)
    rets = ", ".join(str(r.type) for r in fn.results)
    lines = [f"{indent}func @{fn.name}({params}) -> ({rets}) {{"]
    for node in fn.nodes:
        lines.append(f"{indent}  {format_node(node)}")
    lines.append(f"{indent}  return " + ", ".join(f"%{r.name}" for r in fn.results))
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = ["module {"]
    if module.metadata:
        lines.append("  metadata " + json.dumps(module.metadata, sort_keys=True))
    for symbol, (least, greatest) in sorted(module.symbol_ranges.items()):
        lines.append(f"  symbol {symbol} in [{least}, {greatest}]")
    for name, ty in module.weights.items():
        lines.append(f"  weight {json.dumps(name)} : {ty}")
    for fn in module.functions.values():
        lines.append(print_function(fn, "  "))
    lines.append("}")
    return "\n".join(lines) + "\n"
