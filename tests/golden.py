"""Golden IR checks for passes: input text -> pass -> printed text versus expected text.

Both sides go through parse + print, and value names are renumbered (%0, %1,
...) so a golden file states structure, not the names a pass happened to pick.
"""

from __future__ import annotations

import difflib

import numpy as np

from kiln.ir.graph import Module
from kiln.ir.parser import parse_module
from kiln.ir.printer import print_module
from kiln.ir.verifier import verify_module
from kiln.passes import PassManager, run_pass


def canonical_text(module: Module) -> str:
    for fn in module.functions.values():
        fn.rename_canonical()
    return print_module(module)


def check_golden(pass_name: str, input_text: str, expected_text: str, *,
                 weights: dict | None = None, expect_changed: bool = True) -> Module:
    """Run ``pass_name`` on ``input_text`` and compare with ``expected_text``; returns the rewritten module.

    ``weights`` gives arrays for some declared weights (passes that compute new
    weights need them). The module is verified before and after the pass.
    """
    module = parse_module(input_text)
    for name, array in (weights or {}).items():
        module.weight_data[name] = np.asarray(array)
    verify_module(module)
    changed = run_pass(pass_name, module)
    verify_module(module)
    found = canonical_text(module)
    expected = canonical_text(parse_module(expected_text))
    if found != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), found.splitlines(),
                                              "expected", f"after {pass_name}", lineterm=""))
        raise AssertionError(f"{pass_name} gave different IR:\n{diff}")
    assert changed == expect_changed, f"{pass_name} reported changed={changed}, expected {expect_changed}"
    return module


def check_unchanged(pass_name: str, text: str) -> None:
    """A pass with nothing to do returns False and leaves the printed text exactly as it was."""
    module = parse_module(text)
    before = print_module(module)
    verify_module(module)
    assert run_pass(pass_name, module) is False, f"{pass_name} reported a change on IR it should leave alone"
    verify_module(module)
    after = print_module(module)
    assert after == before, "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(),
                                                           "before", f"after {pass_name}", lineterm=""))


CLEANUP = ("fold_constants", "canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code")


def copy_module(module: Module) -> Module:
    """A deep copy through the text form (captured modules are cached, so tests must not edit them)."""
    copy = parse_module(print_module(module))
    copy.weight_data = dict(module.weight_data)
    return copy


def cleaned_model(arch: str):
    """(captured module, copy after the four cleanup passes to a fixed point)."""
    from tiny_models import captured

    original = captured(arch)
    module = copy_module(original)
    PassManager([CLEANUP]).run(module)
    return original, module


def check_cleaned_logits(arch: str) -> Module:
    """The cleaned tiny model still gives transformers' logits and has fewer nodes; returns it."""
    from tiny_models import PROMPT_SHAPES, VOCAB, assert_forward_matches

    original, module = cleaned_model(arch)
    rng = np.random.default_rng(0)
    for shape in PROMPT_SHAPES:
        assert_forward_matches(module, arch, rng.integers(0, VOCAB, size=shape))
    before = len(original.functions["forward"].nodes)
    after = len(module.functions["forward"].nodes)
    assert after < before, f"{arch}: {before} nodes before cleanup, {after} after"
    return module
