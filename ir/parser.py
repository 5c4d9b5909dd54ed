"""Parse the text form written by ``printer.print_module`` back into a Module.

Printed types are checked against the op's type rule while parsing, so a text
file whose annotations disagree with the ops is refused with its line number.
"""

from __future__ import annotations

import json
import re

from .errors import KilnError, ParseError
from .graph import Module
from .symbolic import parse_dim
from .types import _split_top, parse_type

_FUNC = re.compile(r"func @([A-Za-z0-9_.]+)\((.*)\) -> \((.*)\) \{$")
_NODE = re.compile(r"(?:(.+?) = )?([A-Za-z_][A-Za-z0-9_.]*)\((.*?)\)(?: (\{.*\}))? : (.*)$")
_WEIGHT = re.compile(r'weight (".*") : (.+)$')
_SYMBOL = re.compile(r"symbol ([A-Za-z_][A-Za-z0-9_]*) in \[(\d+), (\d+)\]$")
_VALUE = re.compile(r"%([A-Za-z0-9_.]+)$")


class _Located(ParseError):
    """A ParseError whose message already names its line."""


def parse_attr_value(text: str):
    text = text.strip()
    if text == "none":
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("["):
        if not text.endswith("]"):
            raise ParseError(f"unterminated list {text!r}")
        body = text[1:-1].strip()
        return tuple(parse_attr_value(p) for p in _split_top_quoted(body)) if body else ()
    try:
        return int(text)
    except ValueError:
        pass
    if text in ("inf", "-inf", "nan") or re.fullmatch(r"-?\d+\.\d*(e[-+]?\d+)?|-?\d+e[-+]?\d+", text):
        return float(text)
    return parse_dim(text)


def parse_attrs(text: str) -> dict:
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ParseError(f"bad attributes {text!r}")
    body = text[1:-1].strip()
    out = {}
    if not body:
        return out
    for part in _split_top_quoted(body):
        key, sep, value = part.partition("=")
        if not sep:
            raise ParseError(f"bad attribute {part!r}; expected key=value")
        out[key.strip()] = parse_attr_value(value)
    return out


def _split_top_quoted(text: str) -> list:
    """Top-level comma-separated parts, empty ones dropped (strings and brackets kept whole)."""
    return [p for p in _split_top(text) if p]


def parse_module(text: str) -> Module:
    module = Module()
    lines = text.splitlines()
    i = 0

    def error(msg: str, lineno: int) -> ParseError:
        return _Located(f"line {lineno + 1}: {msg}: {lines[lineno].strip()!r}" if lineno < len(lines)
                        else f"line {lineno + 1}: {msg}")

    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or lines[i].strip() != "module {":
        raise ParseError("expected 'module {' at the start")
    i += 1
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("//"):
            i += 1
            continue
        if line == "}":
            return module
        try:
            if line.startswith("metadata "):
                module.metadata = json.loads(line[len("metadata "):])
                i += 1
            elif line.startswith("symbol "):
                m = _SYMBOL.match(line)
                if not m:
                    raise error("bad symbol line; expected 'symbol NAME in [LEAST, GREATEST]'", i)
                if m.group(1) in module.symbol_ranges:
                    raise error(f"symbol {m.group(1)} declared twice", i)
                if module.functions:
                    raise error("symbol ranges must come before the functions", i)
                module.declare_range(m.group(1), int(m.group(2)), int(m.group(3)))
                i += 1
            elif line.startswith("weight "):
                m = _WEIGHT.match(line)
                if not m:
                    raise error("bad weight line", i)
                module.add_weight(json.loads(m.group(1)), type=parse_type(m.group(2)))
                i += 1
            elif line.startswith("func "):
                i = _parse_function(module, lines, i, error)
            else:
                raise error("expected metadata, symbol, weight, func or '}'", i)
        except _Located:
            raise
        except (KilnError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise error(str(err), i) from None
    raise ParseError("missing closing '}' of module")


def _parse_function(module: Module, lines: list, i: int, error) -> int:
    m = _FUNC.match(lines[i].strip())
    if not m:
        raise error("bad func header", i)
    fn = module.add_function(m.group(1))
    scope: dict = {}
    for part in _split_top(m.group(2)) if m.group(2).strip() else []:
        name, sep, ty = part.partition(":")
        vm = _VALUE.match(name.strip())
        if not sep or not vm:
            raise error(f"bad parameter {part!r}", i)
        scope[vm.group(1)] = fn.add_param(vm.group(1), parse_type(ty))
        if scope[vm.group(1)].name != vm.group(1):
            raise error(f"duplicate parameter %{vm.group(1)}", i)
    result_types = [parse_type(t) for t in _split_top(m.group(3))] if m.group(3).strip() else []
    i += 1
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
            continue
        if line.startswith("return"):
            names = [p.strip() for p in line[len("return"):].split(",") if p.strip()]
            fn.set_results([_lookup(scope, n, error, i) for n in names])
            if [r.type for r in fn.results] != result_types:
                raise error("returned types differ from the header", i)
            if i + 1 >= len(lines) or lines[i + 1].strip() != "}":
                raise error("expected '}' after return", i + 1)
            return i + 2
        if line == "}":
            raise error(f"missing return at the end of @{fn.name}", i)
        try:
            _parse_node(fn, scope, line, i, error)
        except _Located:
            raise
        except (KilnError, ValueError, TypeError, json.JSONDecodeError) as err:
            # errors from the op registry or type parser get this node's line, not the func header's
            raise error(str(err), i) from None
        i += 1
    raise error("missing return", i - 1)


def _parse_node(fn, scope: dict, line: str, i: int, error) -> None:
    nm = _NODE.match(line)
    if not nm:
        raise error("bad node line", i)
    outs, op, ins, attrs, types = nm.groups()
    inputs = [_lookup(scope, p.strip(), error, i) for p in ins.split(",") if p.strip()]
    printed = [parse_type(t) for t in _split_top(types)] if types.strip() else []
    node = fn.add_node(op, inputs, parse_attrs(attrs) if attrs else {})
    if [v.type for v in node.outputs] != printed:
        found = ", ".join(str(v.type) for v in node.outputs)
        raise error(f"printed type(s) {types} differ from the op's rule ({found})", i)
    out_names = [p.strip() for p in outs.split(",")] if outs else []
    if len(out_names) != len(node.outputs):
        raise error(f"{op} has {len(node.outputs)} outputs, line names {len(out_names)}", i)
    for value, name in zip(node.outputs, out_names):
        vm = _VALUE.match(name)
        if not vm:
            raise error(f"bad value name {name!r}", i)
        if vm.group(1) in scope:
            raise error(f"%{vm.group(1)} defined twice", i)
        fn._names.discard(value.name)
        value.name = vm.group(1)
        fn._names.add(value.name)
        scope[value.name] = value


def _lookup(scope: dict, text: str, error, lineno: int):
    vm = _VALUE.match(text)
    if not vm:
        raise error(f"bad value reference {text!r}", lineno)
    if vm.group(1) not in scope:
        raise error(f"%{vm.group(1)} used before definition", lineno)
    return scope[vm.group(1)]



def parse_metadata(text: str) -> dict:
    """Only the module's metadata (the JSON line after ``module {``), without parsing its functions."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("metadata "):
            try:
                metadata = json.loads(line[len("metadata "):])
            except (ValueError, RecursionError) as err:
                raise ParseError(f"module metadata is not valid JSON ({err})") from None
            if not isinstance(metadata, dict):
                raise ParseError("module metadata is not a JSON object")
            return metadata
        if line.startswith(("weight ", "func ")):
            break
    return {}
