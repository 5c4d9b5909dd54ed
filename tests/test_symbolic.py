"""Tests for kiln's symbolic dims: normal form, exact division, evaluation, text round trip, proofs.

Values are checked against plain Python integer arithmetic and sympy's expansion,
never against kiln's own output.
"""

import itertools
import math
import random

import pytest
import sympy

from kiln.ir.errors import ParseError
from kiln.ir.symbolic import (SymExpr, check_range, dim_bounds, dim_product, evaluate, is_nonnegative, is_static,
                              known_ge, known_gt, parse_dim, substitute, sym, symbols_of)

n, m, k = sym("n"), sym("m"), sym("k")
SYMBOLS = ("a", "b", "seq")


def random_poly(rng: random.Random):
    """A random polynomial as (kiln dim, sympy expr), built term by term."""
    dim, expr = 0, sympy.Integer(0)
    for _ in range(rng.randint(1, 4)):
        coeff = rng.choice([-7, -3, -2, -1, 1, 1, 2, 5, 12])
        names = [rng.choice(SYMBOLS) for _ in range(rng.randint(0, 3))]
        term, sterm = coeff, sympy.Integer(coeff)
        for name in names:
            term = term * sym(name)
            sterm = sterm * sympy.Symbol(name, positive=True, integer=True)
        dim, expr = dim + term, expr + sterm
    return dim, sympy.expand(expr)


def to_sympy(d):
    return sympy.expand(sympy.sympify(str(d), locals={s: sympy.Symbol(s, positive=True, integer=True)
                                                      for s in SYMBOLS + ("n", "m", "k")}))


# normal form --------------------------------------------------------------------
def test_commutativity_and_distribution():
    assert n + m == m + n
    assert n * m == m * n
    assert (n + m) * (n - m) == n * n - m * m
    assert 3 + n == n + 3
    assert 2 * n == n * 2 == n + n
    assert (n + 1) * (n + 1) == n * n + 2 * n + 1
    assert hash(n * m + 1) == hash(1 + m * n)


def test_cancellation_folds_to_int():
    for expr, expected in [((n + 3) - n, 3), (n - n, 0), (n * m - m * n, 0), ((n + 1) * 2 - 2 * n, 2),
                           ((n + m) * (n - m) - n * n + m * m + 5, 5), (n * 0, 0), (0 * (n + 4), 0)]:
        assert expr == expected
        assert type(expr) is int
    assert 2 * n - n == n
    assert isinstance(n - 1, SymExpr)


def test_exact_division():
    assert (4 * n * m + 6 * n) // (2 * n) == 2 * m + 3
    assert (4 * n + 2) // 2 == 2 * n + 1
    assert (n * n * m) // n == n * m
    assert (-6 * n) // 3 == -2 * n
    result = (12 * n * m) // (4 * n * m)
    assert result == 3 and type(result) is int
    for num, den in [(2 * n + 1, 2), (n + 1, n), (n, 0), (n, n + 1), (n, m), (n * m + m, n), (3 * n, 2 * n)]:
        with pytest.raises(ValueError, match="not divisible"):
            num // den


def test_non_dims_rejected():
    with pytest.raises(TypeError):
        n + True
    with pytest.raises(TypeError):
        n * 1.5
    with pytest.raises(ValueError):
        sym("2x")
    with pytest.raises(ValueError):
        sym("a-b")


# evaluation ---------------------------------------------------------------------
def test_evaluate_and_substitute_against_python():
    rng = random.Random(1)
    for _ in range(200):
        dim, expr = random_poly(rng)
        env = {s: rng.randint(1, 9) for s in SYMBOLS}
        expected = int(expr.subs({sympy.Symbol(s, positive=True, integer=True): v for s, v in env.items()}))
        assert evaluate(dim, env) == expected
        assert substitute(dim, env) == expected
        assert type(substitute(dim, env)) is int


def test_substitute_with_expressions():
    assert (n * m + 1).substitute({"n": 2 * k}) == 2 * k * m + 1
    assert substitute(n * n, {"n": k + 1}) == k * k + 2 * k + 1
    assert substitute(n + m, {"n": 3}) == m + 3
    assert substitute(7, {"n": 3}) == 7
    assert (n - m).substitute({"n": m}) == 0


def test_evaluate_missing_symbol():
    with pytest.raises(KeyError, match="m"):
        evaluate(n * m, {"n": 2})


def test_queries():
    assert symbols_of(n * m + k) == {"n", "m", "k"}
    assert symbols_of(4) == frozenset()
    assert is_static(4) and not is_static(n)
    assert dim_product([2, n, 3, m]) == 6 * n * m
    assert dim_product([]) == 1


# text form ------------------------------------------------------------------------
def test_str_forms():
    assert str(2 * n + 1) == "2*n + 1"
    assert str(1 - n) == "-n + 1"
    assert str(n * m - 3 * n) == "m*n - 3*n"
    assert str(n * n) == "n*n"
    assert str(-2 * n) == "-2*n"


def test_parse_print_round_trip_random():
    rng = random.Random(0)
    for _ in range(300):
        dim, expr = random_poly(rng)
        assert sympy.expand(to_sympy(dim) - expr) == 0
        text = str(dim)
        assert parse_dim(text) == dim
        assert type(parse_dim(text)) is type(dim)


def test_parse_forms():
    assert parse_dim("  2 * (seq + 1) - seq ") == sym("seq") + 2
    assert parse_dim("batch*seq") == sym("batch") * sym("seq")
    assert parse_dim("-(n - 4)") == 4 - n
    assert parse_dim("(4*n + 8) // 4") == n + 2
    assert parse_dim("(n*m) // m") == n
    assert parse_dim("17") == 17
    assert parse_dim("n - n") == 0


@pytest.mark.parametrize("text", ["", "n +", "(n", "n)", "2 3", "n$", "3n", "n * * m", "(2*n + 1) // 2",
                                  "n // m", "6 // 0", "6 // n", "7 // 2", "n // (n + 1)", "+", "()"])
def test_parse_errors(text):
    with pytest.raises(ParseError, match="dim expression"):
        parse_dim(text)


# proofs -------------------------------------------------------------------------
def test_proofs_and_non_proofs():
    # symbols are >= 1
    assert is_nonnegative(n - 1) and not is_nonnegative(n - 2)
    assert is_nonnegative(0) and is_nonnegative(5) and not is_nonnegative(-1)
    assert is_nonnegative(n * m + 3 * k - 4)
    assert not is_nonnegative(-n + 5)
    assert known_ge(n + 1, n) and known_gt(n + 1, n)
    assert known_ge(n, n) and not known_gt(n, n)
    assert known_ge(n, 1) and not known_gt(n, 1)
    assert known_gt(n, 0)
    assert known_ge(2 * n, n + 1) and not known_gt(2 * n, n + 1)
    assert not known_ge(n, m) and not known_ge(m, n)
    assert known_ge(3, 2) and known_gt(3, 2) and not known_gt(2, 2) and not known_ge(1, 2)
    assert known_ge(n * m, 1)
    # true but outside the simple proof rule: must report "not proven", never a wrong proof
    assert not known_ge(n * n, n)


def test_proofs_are_sound_random():
    rng = random.Random(2)
    proven = 0
    for _ in range(300):
        a, _ = random_poly(rng)
        b, _ = random_poly(rng)
        checks = [(known_ge(a, b), lambda x, y: x >= y), (known_gt(a, b), lambda x, y: x > y),
                  (is_nonnegative(a - b), lambda x, y: x - y >= 0)]
        for ok, relation in checks:
            if not ok:
                continue
            proven += 1
            for values in itertools.product([1, 2, 5], repeat=len(SYMBOLS)):
                env = dict(zip(SYMBOLS, values))
                assert relation(evaluate(a, env), evaluate(b, env)), (a, b, env)
    assert proven > 20


# declared ranges ------------------------------------------------------------------
def test_a_declared_range_proves_a_table_slice_in_bounds():
    """MPT slices the last seq rows of a 128-row ALiBi table: start 128 - seq >= 0 holds for seq <= 128 only."""
    seq = sym("seq")
    assert not known_ge(128 - seq, 0)
    assert known_ge(128 - seq, 0, {"seq": (1, 48)}) and known_ge(128 - seq, 0, {"seq": (1, 128)})
    assert not known_ge(128 - seq, 0, {"seq": (1, 129)})
    assert known_gt(128 - seq, 0, {"seq": (1, 127)}) and not known_gt(128 - seq, 0, {"seq": (1, 128)})
    assert dim_bounds(128 - seq, {"seq": (1, 48)}) == (80, 127)
    # a symbol without a declared range is still only known to be >= 1
    assert not known_ge(128 - seq - n, 0, {"seq": (1, 48)})
    assert known_ge(128 - seq - n, 0, {"seq": (1, 48), "n": (1, 80)})
    assert dim_bounds(n * seq - 2 * n, {"seq": (3, 5)}) == (-math.inf, math.inf)
    assert dim_bounds(n * seq - 2 * n, {"seq": (3, 5), "n": (2, 4)}) == (6 - 8, 20 - 4)


def test_range_proofs_are_sound_random():
    """Every proof under random ranges holds at every value of every symbol in its range (checked by
    enumeration), and the bounds contain every value."""
    rng = random.Random(5)
    proven = 0
    for _ in range(300):
        a, _ = random_poly(rng)
        b, _ = random_poly(rng)
        ranges = {}
        for name in SYMBOLS:
            least = rng.randint(1, 4)
            ranges[name] = (least, least + rng.randint(0, 3))
        least, greatest = dim_bounds(a, ranges)
        for values in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges.values())):
            assert least <= evaluate(a, dict(zip(ranges, values))) <= greatest
        for ok, relation in [(known_ge(a, b, ranges), lambda x, y: x >= y),
                             (known_gt(a, b, ranges), lambda x, y: x > y)]:
            if not ok:
                continue
            proven += 1
            for values in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges.values())):
                env = dict(zip(ranges, values))
                assert relation(evaluate(a, env), evaluate(b, env)), (a, b, env)
    assert proven > 50


@pytest.mark.parametrize("name,least,greatest,message", [
    ("seq", 0, 4, "1 <= least <= greatest"),
    ("seq", 5, 4, "1 <= least <= greatest"),
    ("seq", 1, 4.5, "must be integers"),
    ("seq", True, 4, "must be integers"),
    ("2x", 1, 4, "bad symbol name"),
])
def test_bad_ranges_refused(name, least, greatest, message):
    with pytest.raises(ValueError, match=message):
        check_range(name, least, greatest)
