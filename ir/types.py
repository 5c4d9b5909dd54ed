"""Tensor types: a dtype name and a shape of ints or symbolic dims.

Dtypes are short strings (``f32``, ``i64``, ``bool``...) mapped to numpy dtypes
(bf16 through ml_dtypes). Types are frozen values and print as ``f32[batch, seq, 576]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .symbolic import Dim, SymExpr, dim_product, evaluate, is_static, parse_dim, symbols_of

_NUMPY_NAMES = {
    "f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8",
    "u8": "uint8", "u32": "uint32", "bool": "bool",
}
DTYPES = tuple(_NUMPY_NAMES)
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")
INT_DTYPES = ("i64", "i32", "i16", "i8", "u8", "u32")


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NUMPY_NAMES[dtype])


def dtype_of_numpy(dt) -> str:
    dt = np.dtype(dt)
    if dt.name == "bfloat16":
        return "bf16"
    for short, name in _NUMPY_NAMES.items():
        if dt.name == name:
            return short
    raise TypeError(f"numpy dtype {dt} has no kiln dtype")


def itemsize(dtype: str) -> int:
    return numpy_dtype(dtype).itemsize


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def promote(a: str, b: str) -> str:
    """Result dtype of a binary op between tensors (torch-style: floats win, wider wins)."""
    if a == b:
        return a
    order = ["bool", "u8", "i8", "i16", "u32", "i32", "i64", "bf16", "f16", "f32", "f64"]
    if {a, b} == {"bf16", "f16"}:
        return "f32"
    if {a, b} == {"u8", "i8"}:
        return "i16"  # neither holds the other's range
    return max(a, b, key=order.index)


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple  # tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in _NUMPY_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for d in self.shape:
            if not (isinstance(d, SymExpr) or (isinstance(d, int) and not isinstance(d, bool))):
                raise TypeError(f"bad dim {d!r} in shape {self.shape}")
            if isinstance(d, int) and d < 0:
                raise ValueError(f"negative dim {d} in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(is_static(d) for d in self.shape)

    @property
    def symbols(self) -> frozenset:
        out = frozenset()
        for d in self.shape:
            out |= symbols_of(d)
        return out

    def numel(self) -> Dim:
        return dim_product(self.shape)

    def nbytes(self) -> Dim:
        return self.numel() * itemsize(self.dtype)

    def concrete(self, env) -> tuple:
        return tuple(evaluate(d, env) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def parse_type(text: str) -> TensorType:
    from .errors import ParseError

    text = text.strip()
    if not text.endswith("]") or "[" not in text:
        raise ParseError(f"bad tensor type {text!r}; expected e.g. f32[batch, 64]")
    dtype, rest = text.split("[", 1)
    body = rest[:-1].strip()
    dims = [parse_dim(p) for p in _split_top(body)] if body else []
    try:
        return TensorType(dtype.strip(), tuple(dims))
    except (ValueError, TypeError) as err:
        raise ParseError(str(err)) from None


def _split_top(text: str) -> list:
    """Split on commas outside parentheses, brackets, braces and double-quoted strings."""
    parts, depth, start, in_str, escape = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]
