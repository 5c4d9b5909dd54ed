"""Symbolic dimensions: integer polynomials over named symbols (``batch``, ``seq``).

A dim is a plain ``int`` or a :class:`SymExpr`. Expressions are kept in one
normal form (sorted monomials with non-zero integer coefficients), so equal
expressions compare equal structurally, and a constant expression is always
returned as a plain ``int``. Every symbol is assumed to be a positive integer;
a module may declare a range for a symbol (``seq`` in [1, 2048]: the capture's
maximum length), which the proofs below take as given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import math
from typing import Mapping, Optional, Union

from .errors import ParseError

Monomial = tuple  # sorted tuple of symbol names; a symbol repeated k times is its k-th power


@dataclass(frozen=True)
class SymExpr:
    """A polynomial with integer coefficients: ``terms`` maps monomials to coefficients."""

    terms: tuple  # tuple[tuple[Monomial, int], ...], sorted, no zero coefficient, at least one symbol

    # construction -----------------------------------------------------------
    @staticmethod
    def symbol(name: str) -> "SymExpr":
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad symbol name {name!r}")
        return SymExpr((((name,), 1),))

    @staticmethod
    def _make(terms: Mapping) -> "Dim":
        items = tuple(sorted((m, c) for m, c in terms.items() if c != 0))
        if not any(m for m, _ in items):
            return items[0][1] if items else 0
        return SymExpr(items)

    def _dict(self) -> dict:
        return dict(self.terms)

    # arithmetic ---------------------------------------------------------------
    def __add__(self, other: "Dim") -> "Dim":
        out = self._dict()
        for m, c in _terms(other).items():
            out[m] = out.get(m, 0) + c
        return SymExpr._make(out)

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return SymExpr._make({m: -c for m, c in self.terms})

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-1) * other

    def __rsub__(self, other: "Dim") -> "Dim":
        return (-self) + other

    def __mul__(self, other: "Dim") -> "Dim":
        out: dict = {}
        for m1, c1 in self.terms:
            for m2, c2 in _terms(other).items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return SymExpr._make(out)

    __rmul__ = __mul__

    def __floordiv__(self, other: "Dim") -> "Dim":
        """Exact division by a constant or by a monomial that divides every term."""
        if isinstance(other, int):
            if other == 0 or any(c % other for _, c in self.terms):
                raise ValueError(f"{self} is not divisible by {other}")
            return SymExpr._make({m: c // other for m, c in self.terms})
        if isinstance(other, SymExpr) and len(other.terms) == 1:
            (dm, dc), = other.terms
            out = {}
            for m, c in self.terms:
                rest = list(m)
                for s in dm:
                    if s not in rest:
                        raise ValueError(f"{self} is not divisible by {other}")
                    rest.remove(s)
                if c % dc:
                    raise ValueError(f"{self} is not divisible by {other}")
                out[tuple(rest)] = c // dc
            return SymExpr._make(out)
        raise ValueError(f"{self} is not divisible by {other}")

    # queries ----------------------------------------------------------------
    @property
    def symbols(self) -> frozenset:
        return frozenset(s for m, _ in self.terms for s in m)

    def evaluate(self, env: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms:
            v = c
            for s in m:
                if s not in env:
                    raise KeyError(f"no value for symbol {s!r}")
                v *= int(env[s])
            total += v
        return total

    def substitute(self, env: Mapping[str, "Dim"]) -> "Dim":
        total: Dim = 0
        for m, c in self.terms:
            v: Dim = c
            for s in m:
                v = v * env.get(s, SymExpr.symbol(s))
            total = total + v
        return total

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms, key=lambda t: (-len(t[0]), t[0])):
            body = "*".join(m)
            if not m:
                text = str(abs(c))
            elif abs(c) == 1:
                text = body
            else:
                text = f"{abs(c)}*{body}"
            if not parts:
                parts.append(text if c > 0 else f"-{text}")
            else:
                parts.append(("+ " if c > 0 else "- ") + text)
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"SymExpr({str(self)!r})"


Dim = Union[int, SymExpr]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _terms(d: Dim) -> dict:
    if isinstance(d, SymExpr):
        return d._dict()
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"not a dim: {d!r}")
    return {(): d} if d else {}


def sym(name: str) -> SymExpr:
    return SymExpr.symbol(name)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    return d if isinstance(d, int) else d.evaluate(env)


def substitute(d: Dim, env: Mapping[str, Dim]) -> Dim:
    return d if isinstance(d, int) else d.substitute(env)


def symbols_of(d: Dim) -> frozenset:
    return d.symbols if isinstance(d, SymExpr) else frozenset()


# A symbol's declared values: (least, greatest), both inclusive; a symbol without one is in [1, inf).
Ranges = Optional[Mapping[str, tuple]]


def check_range(name: str, least, greatest) -> tuple:
    """``(least, greatest)`` as a declared range of symbol ``name``, or ValueError: integers with
    1 <= least <= greatest (the proofs rely on every symbol being positive)."""
    if not _NAME.fullmatch(str(name)):
        raise ValueError(f"bad symbol name {name!r}")
    for bound in (least, greatest):
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise ValueError(f"symbol {name}: range bounds must be integers, found {bound!r}")
    if not 1 <= least <= greatest:
        raise ValueError(f"symbol {name}: need 1 <= least <= greatest, found [{least}, {greatest}]")
    return least, greatest


def dim_bounds(d: Dim, ranges: Ranges = None) -> tuple:
    """(least, greatest) value of ``d`` over its symbols' ranges, each possibly infinite (``math.inf``).

    Every symbol is positive, so each monomial grows with each of its symbols: it is least with every symbol
    at its least and greatest with every symbol at its greatest. Summing each term's extreme gives sound
    bounds (exact for a linear ``d``; for ``seq * seq - seq`` they are looser than the truth).
    """
    ranges = ranges or {}
    least = greatest = 0
    for monomial, coeff in _terms(d).items():
        low = high = 1
        for s in monomial:
            s_low, s_high = ranges.get(s, (1, math.inf))
            low, high = low * s_low, high * s_high
        least += coeff * (low if coeff > 0 else high)
        greatest += coeff * (high if coeff > 0 else low)
    return least, greatest


def is_nonnegative(d: Dim, ranges: Ranges = None) -> bool:
    """True when ``d >= 0`` is proven for every value of its symbols (each >= 1, or in its range in
    ``ranges``).

    Without ranges this is: no negative coefficient on a non-constant monomial (the polynomial then grows
    with every symbol, so its least value is at all symbols = 1) and a non-negative value there.
    """
    return dim_bounds(d, ranges)[0] >= 0


def known_ge(a: Dim, b: Dim, ranges: Ranges = None) -> bool:
    """True when ``a >= b`` is proven for all symbol values (positive, or within ``ranges``)."""
    return is_nonnegative(a - b, ranges)


def known_gt(a: Dim, b: Dim, ranges: Ranges = None) -> bool:
    """True when ``a > b`` is proven (dims are integers, so ``a - b - 1 >= 0`` suffices)."""
    return is_nonnegative(a - b - 1, ranges)


def dim_product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


# parsing ----------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*()]))")


def parse_dim(text: str) -> Dim:
    """Parse ``2*seq + 1``-style text into a dim."""
    tokens = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ParseError(f"bad dim expression {text!r} at column {pos}")
        tokens.append(int(m.group(1)) if m.group(1) is not None else (m.group(2) or m.group(3)))
        pos = m.end()
    parser = _DimParser(tokens, text)
    value = parser.expr()
    if parser.i != len(tokens):
        raise ParseError(f"bad dim expression {text!r}")
    return value


class _DimParser:
    def __init__(self, tokens, text):
        self.tokens, self.text, self.i = tokens, text, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> Dim:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Dim:
        value = self.factor()
        while self.peek() in ("*", "//"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            else:
                try:
                    if isinstance(value, int) and isinstance(rhs, int) and (rhs == 0 or value % rhs):
                        raise ValueError(f"{value} is not divisible by {rhs}")
                    if isinstance(value, int) and isinstance(rhs, SymExpr):
                        raise ValueError(f"{value} is not divisible by {rhs}")
                    value = value // rhs
                except ValueError as err:
                    raise ParseError(f"bad dim expression {self.text!r}: {err}") from None
        return value

    def factor(self) -> Dim:
        tok = self.take()
        if tok == "-":
            return -self.factor()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ParseError(f"bad dim expression {self.text!r}: missing ')'")
            return value
        if isinstance(tok, int):
            return tok
        if isinstance(tok, str) and _NAME.fullmatch(tok):
            return SymExpr.symbol(tok)
        raise ParseError(f"bad dim expression {self.text!r}: unexpected {tok!r}")
