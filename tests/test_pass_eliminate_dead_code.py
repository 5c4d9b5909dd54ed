"""eliminate_dead_code: golden IR for each case, and the cleaned tiny models still match transformers."""

import numpy as np
import pytest

from kiln.passes import run_pass

from golden import check_cleaned_logits, check_golden, check_unchanged, copy_module
from tiny_models import assert_forward_matches, captured

PASS = "eliminate_dead_code"


def test_dead_chain_is_removed():
    check_golden(PASS, """
module {
  func @f(%x: f32[2, 3]) -> (f32[2, 3]) {
    %a = exp(%x) : f32[2, 3]
    %b = neg(%a) : f32[2, 3]
    %c = tanh(%b) : f32[2, 3]
    %y = relu(%x) : f32[2, 3]
    return %y
  }
}
""", """
module {
  func @f(%x: f32[2, 3]) -> (f32[2, 3]) {
    %y = relu(%x) : f32[2, 3]
    return %y
  }
}
""")


def test_results_and_their_producers_stay():
    check_unchanged(PASS, """
module {
  func @f(%x: f32[4], %unused: f32[4]) -> (f32[4], f32[4]) {
    %a = exp(%x) : f32[4]
    %b = neg(%a) : f32[4]
    return %a, %b
  }
}
""")


def test_unreferenced_weights_leave_the_module():
    check_golden(PASS, """
module {
  weight "used" : f32[3]
  weight "dead_node" : f32[3]
  weight "never_named" : f32[3]
  func @f(%x: f32[3]) -> (f32[3]) {
    %u = weight() {name="used"} : f32[3]
    %d = weight() {name="dead_node"} : f32[3]
    %prod = mul(%x, %d) : f32[3]
    %y = add(%x, %u) : f32[3]
    return %y
  }
}
""", """
module {
  weight "used" : f32[3]
  func @f(%x: f32[3]) -> (f32[3]) {
    %u = weight() {name="used"} : f32[3]
    %y = add(%x, %u) : f32[3]
    return %y
  }
}
""")


def test_weight_used_by_another_function_stays():
    check_golden(PASS, """
module {
  weight "w" : f32[3]
  func @f(%x: f32[3]) -> (f32[3]) {
    %w = weight() {name="w"} : f32[3]
    return %x
  }
  func @g(%x: f32[3]) -> (f32[3]) {
    %w = weight() {name="w"} : f32[3]
    %y = mul(%x, %w) : f32[3]
    return %y
  }
}
""", """
module {
  weight "w" : f32[3]
  func @f(%x: f32[3]) -> (f32[3]) {
    return %x
  }
  func @g(%x: f32[3]) -> (f32[3]) {
    %w = weight() {name="w"} : f32[3]
    %y = mul(%x, %w) : f32[3]
    return %y
  }
}
""")


def test_nothing_to_do_returns_false_and_keeps_the_text():
    check_unchanged(PASS, """
module {
  weight "w" : f32[8, 4]
  func @f(%x: f32[batch, 4]) -> (f32[batch, 8]) {
    %w = weight() {name="w"} : f32[8, 4]
    %y = linear(%x, %w) : f32[batch, 8]
    return %y
  }
}
""")


def test_alone_on_a_captured_model_keeps_logits():
    module = copy_module(captured("llama"))
    before = len(module.functions["forward"].nodes)
    assert run_pass(PASS, module)
    assert len(module.functions["forward"].nodes) < before
    assert_forward_matches(module, "llama", np.random.default_rng(3).integers(0, 128, size=(2, 5)))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_cleanup_pipeline_keeps_transformers_logits(arch):
    module = check_cleaned_logits(arch)
    assert set(module.weights) == set(module.weight_uses())
