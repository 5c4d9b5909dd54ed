"""eliminate_common_subexpressions: golden IR for each case, and the cleaned tiny models still match transformers."""

import numpy as np
import pytest

from kiln.passes import run_pass

from golden import check_cleaned_logits, check_golden, check_unchanged, copy_module
from tiny_models import assert_forward_matches, captured

PASS = "eliminate_common_subexpressions"


def test_equal_nodes_merge_and_their_users_follow():
    check_golden(PASS, """
module {
  func @f(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4]) {
    %a = sub(%x, %y) : f32[4]
    %b = sub(%x, %y) : f32[4]
    %ea = exp(%a) : f32[4]
    %eb = exp(%b) : f32[4]
    return %ea, %eb
  }
}
""", """
module {
  func @f(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4]) {
    %a = sub(%x, %y) : f32[4]
    %ea = exp(%a) : f32[4]
    return %ea, %ea
  }
}
""")


def test_commutative_ops_match_in_either_order():
    check_golden(PASS, """
module {
  func @f(%x: f32[4], %y: f32[4]) -> (f32[4]) {
    %a = add(%x, %y) : f32[4]
    %b = add(%y, %x) : f32[4]
    %m = mul(%y, %a) : f32[4]
    %n = mul(%b, %y) : f32[4]
    %e = eq(%m, %n) : bool[4]
    %z = where(%e, %m, %n) : f32[4]
    return %z
  }
}
""", """
module {
  func @f(%x: f32[4], %y: f32[4]) -> (f32[4]) {
    %a = add(%x, %y) : f32[4]
    %m = mul(%y, %a) : f32[4]
    %e = eq(%m, %m) : bool[4]
    %z = where(%e, %m, %m) : f32[4]
    return %z
  }
}
""")


def test_source_nodes_with_equal_attributes_merge():
    check_golden(PASS, """
module {
  weight "w" : f32[4]
  func @f(%x: f32[seq]) -> (f32[seq], f32[4], f32[3], i64[seq]) {
    %w1 = weight() {name="w"} : f32[4]
    %w2 = weight() {name="w"} : f32[4]
    %ws = add(%w1, %w2) : f32[4]
    %c1 = constant() {value=2.0, dtype="f32"} : f32[]
    %c2 = constant() {value=2.0, dtype="f32"} : f32[]
    %p = mul(%x, %c1) : f32[seq]
    %q = mul(%p, %c2) : f32[seq]
    %f1 = full() {shape=[3], value=1.5, dtype="f32"} : f32[3]
    %f2 = full() {shape=[3], value=1.5, dtype="f32"} : f32[3]
    %fs = sub(%f1, %f2) : f32[3]
    %r1 = arange() {end=seq} : i64[seq]
    %r2 = arange() {end=seq} : i64[seq]
    %rs = add(%r1, %r2) : i64[seq]
    return %q, %ws, %fs, %rs
  }
}
""", """
module {
  weight "w" : f32[4]
  func @f(%x: f32[seq]) -> (f32[seq], f32[4], f32[3], i64[seq]) {
    %w1 = weight() {name="w"} : f32[4]
    %ws = add(%w1, %w1) : f32[4]
    %c1 = constant() {value=2.0, dtype="f32"} : f32[]
    %p = mul(%x, %c1) : f32[seq]
    %q = mul(%p, %c1) : f32[seq]
    %f1 = full() {shape=[3], value=1.5, dtype="f32"} : f32[3]
    %fs = sub(%f1, %f1) : f32[3]
    %r1 = arange() {end=seq} : i64[seq]
    %rs = add(%r1, %r1) : i64[seq]
    return %q, %ws, %fs, %rs
  }
}
""")


def test_values_python_calls_equal_stay_apart():
    # 0.0 == -0.0 in Python, but x * 0.0 and x * -0.0 differ in the sign of their zeros
    check_unchanged(PASS, """
module {
  func @f(%x: f32[4]) -> (f32[4], f32[4], f32[4], f32[4]) {
    %pz = constant() {value=0.0, dtype="f32"} : f32[]
    %nz = constant() {value=-0.0, dtype="f32"} : f32[]
    %a = mul(%x, %pz) : f32[4]
    %b = mul(%x, %nz) : f32[4]
    %r1 = arange() {end=4, dtype="f32"} : f32[4]
    %r2 = arange() {start=1, end=5, dtype="f32"} : f32[4]
    %c = add(%x, %r1) : f32[4]
    %d = add(%x, %r2) : f32[4]
    return %a, %b, %c, %d
  }
}
""")


def test_different_attributes_or_operand_order_do_not_merge():
    check_unchanged(PASS, """
module {
  func @f(%x: f32[2, 3], %y: f32[2, 3]) -> (f32[3, 2], f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3]) {
    %a = sub(%x, %y) : f32[2, 3]
    %b = sub(%y, %x) : f32[2, 3]
    %s1 = softmax(%x) {axis=0} : f32[2, 3]
    %s2 = softmax(%x) : f32[2, 3]
    %t = permute(%x) {perm=[1, 0]} : f32[3, 2]
    %g = gelu(%y) {approximate="tanh"} : f32[2, 3]
    return %t, %a, %b, %s1, %s2
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
    %z = relu(%y) : f32[batch, 8]
    return %z
  }
}
""")


def test_alone_on_a_captured_model_keeps_logits():
    module = copy_module(captured("mistral"))
    before = len(module.functions["forward"].nodes)
    assert run_pass(PASS, module)
    assert len(module.functions["forward"].nodes) < before
    assert_forward_matches(module, "mistral", np.random.default_rng(3).integers(0, 128, size=(2, 6)))


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_cleanup_pipeline_keeps_transformers_logits(arch):
    module = check_cleaned_logits(arch)
    fn = module.functions["forward"]
    names = [n.attrs["name"] for n in fn.nodes if n.op == "weight"]
    assert len(names) == len(set(names)), "each weight is read by one node"
