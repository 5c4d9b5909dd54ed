"""canonicalize: golden IR for each rule, transposed weights against numpy, and the cleaned tiny models."""

import itertools

import numpy as np
import pytest

from kiln.passes import run_pass

from golden import check_cleaned_logits, check_golden, check_unchanged, copy_module
from tiny_models import assert_forward_matches, captured

PASS = "canonicalize"


def test_no_op_shape_and_dtype_ops_go():
    check_golden(PASS, """
module {
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 8]) {
    %r = reshape(%x) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    %p = permute(%r) {perm=[0, 1, 2]} : f32[batch, seq, 8]
    %c = cast(%p) {dtype="f32"} : f32[batch, seq, 8]
    %e = expand(%c) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    %s = slice(%e) {axis=1, end=seq} : f32[batch, seq, 8]
    %s2 = slice(%s) {axis=-1, end=8} : f32[batch, seq, 8]
    %k = concat(%s2) {axis=2} : f32[batch, seq, 8]
    %y = exp(%k) : f32[batch, seq, 8]
    return %y
  }
}
""", """
module {
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 8]) {
    %y = exp(%x) : f32[batch, seq, 8]
    return %y
  }
}
""")


def test_ops_that_do_something_stay():
    check_unchanged(PASS, """
module {
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, 8, seq], f32[batch, seq, 4], f32[batch, seq, 4], f32[batch, seq, 16], f16[batch, seq, 8], f32[2, batch, seq, 8]) {
    %p = permute(%x) {perm=[0, 2, 1]} : f32[batch, 8, seq]
    %s = slice(%x) {axis=2, end=4} : f32[batch, seq, 4]
    %t = slice(%x) {axis=2, end=8, step=2} : f32[batch, seq, 4]
    %k = concat(%x, %x) {axis=2} : f32[batch, seq, 16]
    %c = cast(%x) {dtype="f16"} : f16[batch, seq, 8]
    %e = expand(%x) {shape=[2, batch, seq, 8]} : f32[2, batch, seq, 8]
    return %p, %s, %t, %k, %c, %e
  }
}
""")


def test_reshape_of_reshape_collapses():
    check_golden(PASS, """
module {
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 2, 2, 2], f32[batch, seq, 8]) {
    %a = reshape(%x) {shape=[batch*seq, 8]} : f32[batch*seq, 8]
    %b = reshape(%a) {shape=[batch, seq, 2, 4]} : f32[batch, seq, 2, 4]
    %c = reshape(%b) {shape=[batch, seq, 2, 2, 2]} : f32[batch, seq, 2, 2, 2]
    %u = reshape(%x) {shape=[batch, seq, 4, 2]} : f32[batch, seq, 4, 2]
    %back = reshape(%u) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    return %c, %back
  }
}
""", """
module {
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 2, 2, 2], f32[batch, seq, 8]) {
    %c = reshape(%x) {shape=[batch, seq, 2, 2, 2]} : f32[batch, seq, 2, 2, 2]
    return %c, %x
  }
}
""")


def test_permute_of_permute_composes():
    # the expected perm is the one numpy agrees with: transposing once by it equals transposing twice
    x = np.arange(24).reshape(2, 3, 4)
    twice = np.transpose(np.transpose(x, (1, 0, 2)), (0, 2, 1))
    (composed,) = [p for p in itertools.permutations(range(3)) if np.array_equal(np.transpose(x, p), twice)]
    assert composed == (1, 2, 0)
    check_golden(PASS, """
module {
  func @f(%x: f32[2, 3, 4]) -> (f32[3, 4, 2], f32[2, 3, 4]) {
    %a = permute(%x) {perm=[1, 0, 2]} : f32[3, 2, 4]
    %b = permute(%a) {perm=[0, 2, 1]} : f32[3, 4, 2]
    %c = permute(%x) {perm=[2, 0, 1]} : f32[4, 2, 3]
    %d = permute(%c) {perm=[1, 2, 0]} : f32[2, 3, 4]
    return %b, %d
  }
}
""", """
module {
  func @f(%x: f32[2, 3, 4]) -> (f32[3, 4, 2], f32[2, 3, 4]) {
    %b = permute(%x) {perm=[1, 2, 0]} : f32[3, 4, 2]
    return %b, %x
  }
}
""")


def test_cast_of_exact_cast_drops_the_inner_cast():
    check_golden(PASS, """
module {
  func @f(%h: f16[4], %x: f32[4], %i: i32[4], %b: bool[4]) -> (f64[4], f32[4], f32[4], i64[4]) {
    %h32 = cast(%h) {dtype="f32"} : f32[4]
    %h64 = cast(%h32) {dtype="f64"} : f64[4]
    %x64 = cast(%x) {dtype="f64"} : f64[4]
    %xback = cast(%x64) {dtype="f32"} : f32[4]
    %i64 = cast(%i) {dtype="i64"} : i64[4]
    %if = cast(%i64) {dtype="f32"} : f32[4]
    %b8 = cast(%b) {dtype="u8"} : u8[4]
    %bi = cast(%b8) {dtype="i64"} : i64[4]
    return %h64, %xback, %if, %bi
  }
}
""", """
module {
  func @f(%h: f16[4], %x: f32[4], %i: i32[4], %b: bool[4]) -> (f64[4], f32[4], f32[4], i64[4]) {
    %h64 = cast(%h) {dtype="f64"} : f64[4]
    %if = cast(%i) {dtype="f32"} : f32[4]
    %bi = cast(%b) {dtype="i64"} : i64[4]
    return %h64, %x, %if, %bi
  }
}
""")


def test_lossy_inner_casts_stay():
    # f32 -> f16 rounds, i64 -> f32 rounds big ints, f32 -> i32 truncates, bf16 <-> f16 lose range or digits
    check_unchanged(PASS, """
module {
  func @f(%x: f32[4], %i: i64[4], %b: bf16[4]) -> (f32[4], i64[4], f32[4], f32[4]) {
    %h = cast(%x) {dtype="f16"} : f16[4]
    %hx = cast(%h) {dtype="f32"} : f32[4]
    %f = cast(%i) {dtype="f32"} : f32[4]
    %fi = cast(%f) {dtype="i64"} : i64[4]
    %t = cast(%x) {dtype="i32"} : i32[4]
    %tf = cast(%t) {dtype="f32"} : f32[4]
    %bh = cast(%b) {dtype="f16"} : f16[4]
    %bf = cast(%bh) {dtype="f32"} : f32[4]
    return %hx, %fi, %tf, %bf
  }
}
""")


def test_lossless_claims_hold_on_extreme_values():
    import ml_dtypes

    # every value the exactness table calls lossless survives the round trip bit for bit
    f16 = np.array([65504, -65504, 6e-8, 6.1e-5, np.inf, 0.0], np.float16)
    assert np.array_equal(f16.astype(np.float32).astype(np.float16), f16)
    bf16 = np.array([3.3e38, -1e-38, 9.2e-41], ml_dtypes.bfloat16)
    assert np.array_equal(bf16.astype(np.float32).astype(ml_dtypes.bfloat16), bf16)
    u8 = np.arange(256, dtype=np.uint8)
    assert np.array_equal(u8.astype(ml_dtypes.bfloat16).astype(np.uint8), u8)
    i8 = np.arange(-128, 128, dtype=np.int8)
    assert np.array_equal(i8.astype(np.float16).astype(np.int8), i8)
    from kiln.passes.canonicalize import _exact_in
    assert _exact_in("u8", "bf16") and _exact_in("i8", "f16") and _exact_in("i32", "f64")
    assert not _exact_in("i16", "f16") and not _exact_in("i32", "f32") and not _exact_in("u8", "i8")
    assert not _exact_in("f16", "bf16") and not _exact_in("bf16", "f16") and not _exact_in("f32", "i64")


def test_matmul_with_transposed_weight_becomes_linear():
    check_golden(PASS, """
module {
  weight "w" : f32[16, 8]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
    %w = weight() {name="w"} : f32[16, 8]
    %wt = permute(%w) {perm=[1, 0]} : f32[8, 16]
    %y = matmul(%x, %wt) : f32[batch, seq, 16]
    return %y
  }
}
""", """
module {
  weight "w" : f32[16, 8]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
    %w = weight() {name="w"} : f32[16, 8]
    %y = linear(%x, %w) : f32[batch, seq, 16]
    return %y
  }
}
""")


def test_matmul_with_kn_weight_gets_a_transposed_copy():
    w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    module = check_golden(PASS, """
module {
  weight "conv.weight" : f32[8, 16]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
    %w = weight() {name="conv.weight"} : f32[8, 16]
    %y = matmul(%x, %w) : f32[batch, seq, 16]
    return %y
  }
}
""", """
module {
  weight "conv.weight.T" : f32[16, 8]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 16]) {
    %w = weight() {name="conv.weight.T"} : f32[16, 8]
    %y = linear(%x, %w) : f32[batch, seq, 16]
    return %y
  }
}
""", weights={"conv.weight": w})
    np.testing.assert_array_equal(module.weight_data["conv.weight.T"], w.T)


def test_transposed_copy_is_shared_and_original_kept_while_used():
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    module = check_golden(PASS, """
module {
  weight "w" : f32[8, 16]
  func @prefill(%x: f32[seq, 8]) -> (f32[seq, 16], f32[16]) {
    %w = weight() {name="w"} : f32[8, 16]
    %y = matmul(%x, %w) : f32[seq, 16]
    %row = sum(%w) {axes=[0]} : f32[16]
    return %y, %row
  }
  func @decode(%x: f32[1, 8]) -> (f32[1, 16]) {
    %w = weight() {name="w"} : f32[8, 16]
    %y = matmul(%x, %w) : f32[1, 16]
    return %y
  }
}
""", """
module {
  weight "w" : f32[8, 16]
  weight "w.T" : f32[16, 8]
  func @prefill(%x: f32[seq, 8]) -> (f32[seq, 16], f32[16]) {
    %w = weight() {name="w"} : f32[8, 16]
    %wt = weight() {name="w.T"} : f32[16, 8]
    %y = linear(%x, %wt) : f32[seq, 16]
    %row = sum(%w) {axes=[0]} : f32[16]
    return %y, %row
  }
  func @decode(%x: f32[1, 8]) -> (f32[1, 16]) {
    %wt = weight() {name="w.T"} : f32[16, 8]
    %y = linear(%x, %wt) : f32[1, 16]
    return %y
  }
}
""", weights={"w": w})
    np.testing.assert_array_equal(module.weight_data["w.T"], w.T)
    assert module.weight_data["w"] is w


def test_flattened_conv1d_with_bias_becomes_one_linear():
    # GPT-2: view(-1, K) -> addmm(bias, x, W[K, N]) -> view(b, s, N)
    check_golden(PASS, """
module {
  weight "c_attn.weight" : f32[8, 24]
  weight "c_attn.bias" : f32[24]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 24]) {
    %w = weight() {name="c_attn.weight"} : f32[8, 24]
    %b = weight() {name="c_attn.bias"} : f32[24]
    %flat = reshape(%x) {shape=[batch*seq, 8]} : f32[batch*seq, 8]
    %mm = matmul(%flat, %w) : f32[batch*seq, 24]
    %biased = add(%mm, %b) : f32[batch*seq, 24]
    %y = reshape(%biased) {shape=[batch, seq, 24]} : f32[batch, seq, 24]
    return %y
  }
}
""", """
module {
  weight "c_attn.bias" : f32[24]
  weight "c_attn.weight.T" : f32[24, 8]
  func @f(%x: f32[batch, seq, 8]) -> (f32[batch, seq, 24]) {
    %b = weight() {name="c_attn.bias"} : f32[24]
    %wt = weight() {name="c_attn.weight.T"} : f32[24, 8]
    %y = linear(%x, %wt, %b) : f32[batch, seq, 24]
    return %y
  }
}
""")


def test_flattened_linear_after_a_head_merge_reads_the_merged_heads():
    # GPT-2's attention output: [b, s, h, d] -> view [b*s, h*d] -> linear -> view [b, s, N]
    check_golden(PASS, """
module {
  weight "proj" : f32[8, 8]
  func @f(%x: f32[batch, seq, 2, 4]) -> (f32[batch, seq, 8]) {
    %w = weight() {name="proj"} : f32[8, 8]
    %flat = reshape(%x) {shape=[batch*seq, 8]} : f32[batch*seq, 8]
    %l = linear(%flat, %w) : f32[batch*seq, 8]
    %y = reshape(%l) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    return %y
  }
}
""", """
module {
  weight "proj" : f32[8, 8]
  func @f(%x: f32[batch, seq, 2, 4]) -> (f32[batch, seq, 8]) {
    %w = weight() {name="proj"} : f32[8, 8]
    %rows = reshape(%x) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    %y = linear(%rows, %w) : f32[batch, seq, 8]
    return %y
  }
}
""")


def test_bias_on_a_shared_linear_or_an_activation_is_not_folded_in():
    check_unchanged(PASS, """
module {
  weight "w" : f32[4, 8]
  weight "b" : f32[4]
  func @f(%x: f32[seq, 8], %act: f32[4]) -> (f32[seq, 4], f32[seq, 4], f32[seq, 4]) {
    %w = weight() {name="w"} : f32[4, 8]
    %b = weight() {name="b"} : f32[4]
    %l = linear(%x, %w) : f32[seq, 4]
    %lb = add(%l, %b) : f32[seq, 4]
    %m = linear(%x, %w) : f32[seq, 4]
    %ma = add(%m, %act) : f32[seq, 4]
    return %l, %lb, %ma
  }
}
""")


def test_matmul_between_activations_is_not_a_dense_layer():
    check_unchanged(PASS, """
module {
  func @f(%q: f32[batch, 4, seq, 16], %k: f32[batch, 4, seq, 16]) -> (f32[batch, 4, seq, seq]) {
    %kt = permute(%k) {perm=[0, 1, 3, 2]} : f32[batch, 4, 16, seq]
    %s = matmul(%q, %kt) : f32[batch, 4, seq, seq]
    return %s
  }
}
""")


def test_nothing_to_do_returns_false_and_keeps_the_text():
    check_unchanged(PASS, """
module {
  weight "w" : f32[8, 4]
  weight "b" : f32[8]
  func @f(%x: f32[batch, seq, 4]) -> (f32[batch, 8, seq]) {
    %w = weight() {name="w"} : f32[8, 4]
    %b = weight() {name="b"} : f32[8]
    %y = linear(%x, %w, %b) : f32[batch, seq, 8]
    %t = permute(%y) {perm=[0, 2, 1]} : f32[batch, 8, seq]
    return %t
  }
}
""")


def _dense_matmuls(module):
    """matmuls whose right operand is a weight or a view of one (what canonicalize must turn into linear)."""
    found = []
    for node in module.functions["forward"].nodes:
        if node.op != "matmul":
            continue
        rhs = node.inputs[1]
        while rhs.producer is not None and rhs.producer.op in ("permute", "reshape", "cast"):
            rhs = rhs.producer.inputs[0]
        if rhs.producer is not None and rhs.producer.op == "weight":
            found.append(node)
    return found


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_alone_on_a_captured_model_makes_every_dense_layer_linear(arch):
    module = copy_module(captured(arch))
    assert _dense_matmuls(module)
    assert run_pass(PASS, module)
    assert _dense_matmuls(module) == []
    assert_forward_matches(module, arch, np.random.default_rng(3).integers(0, 128, size=(2, 5)))


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_cleanup_pipeline_keeps_transformers_logits(arch):
    module = check_cleaned_logits(arch)
    assert _dense_matmuls(module) == []
    linears = [n for n in module.functions["forward"].nodes if n.op == "linear"]
    assert len(linears) == 9  # 4 per layer (2 layers) + lm_head
    assert all(n.inputs[0].type.rank == 3 for n in linears), "dense layers read unflattened [batch, seq, K]"
