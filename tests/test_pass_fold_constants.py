"""fold_constants: golden IR for each rule, folded values against numpy, and the cleaned tiny models."""

import numpy as np
import pytest

from kiln.passes import run_pass

from golden import check_cleaned_logits, check_golden, check_unchanged, copy_module
from tiny_models import assert_forward_matches, captured

PASS = "fold_constants"


def test_scalar_arithmetic_becomes_a_constant():
    check_golden(PASS, """
module {
  func @f(%x: f32[4]) -> (f32[4]) {
    %a = constant() {value=2.0, dtype="f32"} : f32[]
    %b = constant() {value=3.0, dtype="f32"} : f32[]
    %s = add(%a, %b) : f32[]
    %r = sqrt(%s) : f32[]
    %y = mul(%x, %r) : f32[4]
    return %y
  }
}
""", f"""
module {{
  func @f(%x: f32[4]) -> (f32[4]) {{
    %r = constant() {{value={float(np.sqrt(np.float32(5.0)))!r}, dtype="f32"}} : f32[]
    %y = mul(%x, %r) : f32[4]
    return %y
  }}
}}
""")


def test_uniform_result_becomes_full():
    check_golden(PASS, """
module {
  func @f(%x: f32[2, 3]) -> (f32[2, 3]) {
    %o = full() {shape=[2, 3], value=1.5, dtype="f32"} : f32[2, 3]
    %c = constant() {value=2, dtype="i64"} : i64[]
    %p = mul(%o, %c) : f32[2, 3]
    %t = permute(%p) {perm=[1, 0]} : f32[3, 2]
    %u = permute(%t) {perm=[1, 0]} : f32[2, 3]
    %y = add(%x, %u) : f32[2, 3]
    return %y
  }
}
""", """
module {
  func @f(%x: f32[2, 3]) -> (f32[2, 3]) {
    %u = full() {shape=[2, 3], value=3.0, dtype="f32"} : f32[2, 3]
    %y = add(%x, %u) : f32[2, 3]
    return %y
  }
}
""")


def test_static_arange_results_become_a_new_weight():
    module = check_golden(PASS, """
module {
  func @f(%x: f32[1, 4]) -> (f32[1, 4]) {
    %r = arange() {end=4} : i64[4]
    %f = cast(%r) {dtype="f32"} : f32[4]
    %h = constant() {value=0.5, dtype="f32"} : f32[]
    %p = pow(%h, %f) : f32[4]
    %v = reshape(%p) {shape=[1, 4]} : f32[1, 4]
    %y = mul(%x, %v) : f32[1, 4]
    return %y
  }
}
""", """
module {
  weight "const.0" : f32[1, 4]
  func @f(%x: f32[1, 4]) -> (f32[1, 4]) {
    %v = weight() {name="const.0"} : f32[1, 4]
    %y = mul(%x, %v) : f32[1, 4]
    return %y
  }
}
""")
    # the cast and the pow became weights on the way; each left the module when its last reader folded
    expected = np.power(np.float32(0.5), np.arange(4, dtype=np.float32))[None]
    assert module.weight_data["const.0"].dtype == np.float32
    np.testing.assert_array_equal(module.weight_data["const.0"], expected)


def test_symbolic_sizes_and_big_tensors_are_left_alone():
    check_unchanged(PASS, """
module {
  func @f(%x: f32[seq, 512]) -> (f32[seq, 512], f32[512, 512]) {
    %r = arange() {end=seq} : i64[seq]
    %c = constant() {value=2, dtype="i64"} : i64[]
    %m = mul(%r, %c) : i64[seq]
    %s = arange() {start=seq, end=seq + 4} : i64[4]
    %s2 = mul(%s, %c) : i64[4]
    %big = full() {shape=[512, 512], value=1.0, dtype="f32"} : f32[512, 512]
    %e = exp(%big) : f32[512, 512]
    return %x, %e
  }
}
""")


def test_elementwise_op_on_a_weight_becomes_a_new_weight():
    w = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    module = check_golden(PASS, """
module {
  weight "norm.weight" : f32[4]
  func @f(%x: f32[batch, 4]) -> (f32[batch, 4]) {
    %w = weight() {name="norm.weight"} : f32[4]
    %one = constant() {value=1.0, dtype="f32"} : f32[]
    %w1 = add(%one, %w) : f32[4]
    %y = mul(%x, %w1) : f32[batch, 4]
    return %y
  }
}
""", """
module {
  weight "norm.weight.add" : f32[4]
  func @f(%x: f32[batch, 4]) -> (f32[batch, 4]) {
    %w1 = weight() {name="norm.weight.add"} : f32[4]
    %y = mul(%x, %w1) : f32[batch, 4]
    return %y
  }
}
""", weights={"norm.weight": w})
    np.testing.assert_array_equal(module.weight_data["norm.weight.add"], w + np.float32(1.0))


def test_weight_still_used_elsewhere_is_kept_and_uniform_weights_stay_weights():
    w = np.ones((3, 2), np.float16)
    module = check_golden(PASS, """
module {
  weight "w" : f16[3, 2]
  func @f(%x: f32[3, 2], %h: f16[3, 2]) -> (f32[3, 2], f16[3, 2]) {
    %w = weight() {name="w"} : f16[3, 2]
    %wf = cast(%w) {dtype="f32"} : f32[3, 2]
    %y = mul(%x, %wf) : f32[3, 2]
    %z = mul(%h, %w) : f16[3, 2]
    return %y, %z
  }
}
""", """
module {
  weight "w" : f16[3, 2]
  weight "w.cast" : f32[3, 2]
  func @f(%x: f32[3, 2], %h: f16[3, 2]) -> (f32[3, 2], f16[3, 2]) {
    %w = weight() {name="w"} : f16[3, 2]
    %wf = weight() {name="w.cast"} : f32[3, 2]
    %y = mul(%x, %wf) : f32[3, 2]
    %z = mul(%h, %w) : f16[3, 2]
    return %y, %z
  }
}
""", weights={"w": w})
    assert module.weight_data["w.cast"].dtype == np.float32
    np.testing.assert_array_equal(module.weight_data["w.cast"], w.astype(np.float32))


def test_weight_without_data_is_not_folded():
    check_unchanged(PASS, """
module {
  weight "w" : f32[4]
  func @f(%x: f32[4]) -> (f32[4]) {
    %w = weight() {name="w"} : f32[4]
    %c = constant() {value=1.0, dtype="f32"} : f32[]
    %w1 = add(%w, %c) : f32[4]
    %y = mul(%x, %w1) : f32[4]
    return %y
  }
}
""")


def test_algebraic_identities():
    check_golden(PASS, """
module {
  func @f(%x: f32[2, 3], %b: bool[2, 3]) -> (f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], bool[2, 3], bool[2, 3]) {
    %zero = constant() {value=0.0, dtype="f32"} : f32[]
    %one = constant() {value=1.0, dtype="f32"} : f32[]
    %zeros = full() {shape=[2, 3], value=0, dtype="f32"} : f32[2, 3]
    %yes = full() {shape=[], value=true, dtype="bool"} : bool[]
    %no = constant() {value=false, dtype="bool"} : bool[]
    %a = add(%x, %zero) : f32[2, 3]
    %a2 = add(%zeros, %a) : f32[2, 3]
    %s = sub(%a2, %zero) : f32[2, 3]
    %m = mul(%one, %s) : f32[2, 3]
    %d = div(%m, %one) : f32[2, 3]
    %p = pow(%d, %one) : f32[2, 3]
    %y1 = exp(%p) : f32[2, 3]
    %y2 = relu(%a) : f32[2, 3]
    %y3 = neg(%s) : f32[2, 3]
    %y4 = tanh(%m) : f32[2, 3]
    %y5 = sin(%d) : f32[2, 3]
    %y6 = cos(%p) : f32[2, 3]
    %l = and(%yes, %b) : bool[2, 3]
    %o = or(%l, %no) : bool[2, 3]
    %y7 = not(%l) : bool[2, 3]
    return %y1, %y2, %y3, %y4, %y5, %y6, %y7, %o
  }
}
""", """
module {
  func @f(%x: f32[2, 3], %b: bool[2, 3]) -> (f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], f32[2, 3], bool[2, 3], bool[2, 3]) {
    %y1 = exp(%x) : f32[2, 3]
    %y2 = relu(%x) : f32[2, 3]
    %y3 = neg(%x) : f32[2, 3]
    %y4 = tanh(%x) : f32[2, 3]
    %y5 = sin(%x) : f32[2, 3]
    %y6 = cos(%x) : f32[2, 3]
    %y7 = not(%b) : bool[2, 3]
    return %y1, %y2, %y3, %y4, %y5, %y6, %y7, %b
  }
}
""")


def test_identities_that_would_change_type_or_value_stay():
    # x ** 2 stays (fusions match it); 0 - x is not x; a wider zero broadcasts; an int x would turn float
    check_unchanged(PASS, """
module {
  func @f(%x: f32[3], %i: i64[3]) -> (f32[3], f32[3], f32[2, 3], f32[3], f32[3]) {
    %zero = constant() {value=0.0, dtype="f32"} : f32[]
    %two = constant() {value=2.0, dtype="f32"} : f32[]
    %one = constant() {value=1.0, dtype="f32"} : f32[]
    %zeros = full() {shape=[2, 3], value=0.0, dtype="f32"} : f32[2, 3]
    %sq = pow(%x, %two) : f32[3]
    %n = sub(%zero, %x) : f32[3]
    %w = add(%x, %zeros) : f32[2, 3]
    %f = mul(%i, %one) : f32[3]
    %r = div(%one, %x) : f32[3]
    return %sq, %n, %w, %f, %r
  }
}
""")


def test_rank0_full_becomes_constant():
    check_golden(PASS, """
module {
  func @f(%x: f32[3]) -> (f32[3]) {
    %h = full() {shape=[], value=0.5, dtype="f32"} : f32[]
    %y = mul(%x, %h) : f32[3]
    return %y
  }
}
""", """
module {
  func @f(%x: f32[3]) -> (f32[3]) {
    %h = constant() {value=0.5, dtype="f32"} : f32[]
    %y = mul(%x, %h) : f32[3]
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
    %h = constant() {value=0.5, dtype="f32"} : f32[]
    %z = mul(%y, %h) : f32[batch, 8]
    return %z
  }
}
""")


def test_alone_on_gemma_folds_one_plus_weight():
    module = copy_module(captured("gemma"))
    assert run_pass(PASS, module)
    fn = module.functions["forward"]
    weight_adds = [n for n in fn.nodes if n.op == "add" and any(v.producer is not None and v.producer.op == "weight"
                                                                 for v in n.inputs)]
    assert weight_adds == []
    original = captured("gemma").weight_data
    folded = module.weight_data["model.norm.weight.add"]
    np.testing.assert_array_equal(folded, original["model.norm.weight"] + np.float32(1.0))
    assert_forward_matches(module, "gemma", np.random.default_rng(3).integers(0, 128, size=(2, 5)))


@pytest.mark.parametrize("arch", ["gemma", "qwen2"])
def test_cleanup_pipeline_keeps_transformers_logits(arch):
    module = check_cleaned_logits(arch)
    sources = ("constant", "full")
    for node in module.functions["forward"].nodes:
        known = [v.producer is not None and v.producer.op in sources for v in node.inputs]
        assert not (known and all(known)), f"{node.op} of constants left unfolded"
    if arch == "gemma":
        assert not any(n.op == "add" and any(v.producer.op == "weight" for v in n.inputs if v.producer)
                       for n in module.functions["forward"].nodes)
