"""merge_sibling_linears: golden IR for q/k/v-style fp32 linears (with biases) and quantized gate/up linears merged
into one wide op and slices, with outputs equal to numpy's projections; what does not merge (other activations,
other formats, computed weights) stays as it was."""

import numpy as np

from kiln.ir.interpreter import run_function
from kiln.ir.parser import parse_module
from kiln.ir.quant_ops import dequantize
from kiln.passes import run_pass
from kiln.passes.quantize_weights import quantize_int4

from golden import check_golden, check_unchanged

PASS = "merge_sibling_linears"

QKV = """
module {
  weight "wq" : f32[8, 16]
  weight "wk" : f32[4, 16]
  weight "wv" : f32[4, 16]
  weight "bq" : f32[8]
  weight "bk" : f32[4]
  weight "bv" : f32[4]
  func @f(%x: f32[tokens, 16]) -> (f32[tokens, 8], f32[tokens, 4], f32[tokens, 4]) {
    %wq = weight() {name="wq"} : f32[8, 16]
    %bq = weight() {name="bq"} : f32[8]
    %q = linear(%x, %wq, %bq) : f32[tokens, 8]
    %wk = weight() {name="wk"} : f32[4, 16]
    %bk = weight() {name="bk"} : f32[4]
    %k = linear(%x, %wk, %bk) : f32[tokens, 4]
    %wv = weight() {name="wv"} : f32[4, 16]
    %bv = weight() {name="bv"} : f32[4]
    %v = linear(%x, %wv, %bv) : f32[tokens, 4]
    return %q, %k, %v
  }
}
"""

QKV_MERGED = """
module {
  weight "wq|wk|wv" : f32[16, 16]
  weight "bq|bk|bv" : f32[16]
  func @f(%x: f32[tokens, 16]) -> (f32[tokens, 8], f32[tokens, 4], f32[tokens, 4]) {
    %w = weight() {name="wq|wk|wv"} : f32[16, 16]
    %b = weight() {name="bq|bk|bv"} : f32[16]
    %y = linear(%x, %w, %b) : f32[tokens, 16]
    %q = slice(%y) {axis=1, start=0, end=8} : f32[tokens, 8]
    %k = slice(%y) {axis=1, start=8, end=12} : f32[tokens, 4]
    %v = slice(%y) {axis=1, start=12, end=16} : f32[tokens, 4]
    return %q, %k, %v
  }
}
"""


def test_fp32_projections_with_biases_merge_and_give_numpys_outputs():
    rng = np.random.default_rng(0)
    shapes = {"wq": (8, 16), "wk": (4, 16), "wv": (4, 16), "bq": (8,), "bk": (4,), "bv": (4,)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    module = check_golden(PASS, QKV, QKV_MERGED, weights=weights)
    assert set(module.weights) == {"wq|wk|wv", "bq|bk|bv"}  # the parts left with their last reader
    x = rng.standard_normal((5, 16)).astype(np.float32)
    got = run_function(module, "f", [x])
    for out, name in zip(got, "qkv"):
        want = x.astype(np.float64) @ weights[f"w{name}"].T.astype(np.float64) + weights[f"b{name}"]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


GATE_UP = """
module {
  weight "g.q" : u32[12, 4]
  weight "g.s" : f16[12, 1]
  weight "g.o" : f16[12, 1]
  weight "u.q" : u32[12, 4]
  weight "u.s" : f16[12, 1]
  weight "u.o" : f16[12, 1]
  func @f(%x: f32[tokens, 32]) -> (f32[tokens, 12]) {
    %gq = weight() {name="g.q"} : u32[12, 4]
    %gs = weight() {name="g.s"} : f16[12, 1]
    %go = weight() {name="g.o"} : f16[12, 1]
    %gate = linear_q(%x, %gq, %gs, %go) {bits=4, group_size=32} : f32[tokens, 12]
    %uq = weight() {name="u.q"} : u32[12, 4]
    %us = weight() {name="u.s"} : f16[12, 1]
    %uo = weight() {name="u.o"} : f16[12, 1]
    %up = linear_q(%x, %uq, %us, %uo) {bits=4, group_size=32} : f32[tokens, 12]
    %a = silu(%gate) : f32[tokens, 12]
    %h = mul(%a, %up) : f32[tokens, 12]
    return %h
  }
}
"""


def test_quantized_gate_and_up_merge_into_one_linear_q():
    rng = np.random.default_rng(1)
    weights, dense = {}, {}
    for name in ("g", "u"):
        w = rng.standard_normal((12, 32)).astype(np.float32)
        quantized = quantize_int4(w, 32)
        weights.update({f"{name}.q": quantized.q, f"{name}.s": quantized.scale, f"{name}.o": quantized.offset})
        dense[name] = dequantize(quantized.q, quantized.scale, quantized.offset, 4, 32)
    module = parse_module(GATE_UP)
    module.weight_data.update(weights)
    assert run_pass(PASS, module) is True
    ops = [n.op for n in module.functions["f"].nodes]
    assert ops.count("linear_q") == 1 and ops.count("slice") == 2
    assert module.weights["g.q|u.q"].shape == (24, 4)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    (got,) = run_function(module, "f", [x])
    gate, up = (x.astype(np.float64) @ dense[n].T.astype(np.float64) for n in "gu")
    np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-5)


def test_what_does_not_share_an_activation_or_a_format_stays():
    # two activations; and on one activation a linear beside a linear_q (different formats)
    text = GATE_UP.replace("%up = linear_q(%x,", "%up = linear_q(%y,").replace(
        "func @f(%x: f32[tokens, 32])", "func @f(%x: f32[tokens, 32], %y: f32[tokens, 32])")
    check_unchanged(PASS, text)
    mixed = GATE_UP.replace('%up = linear_q(%x, %uq, %us, %uo) {bits=4, group_size=32}',
                            '%up = linear_q(%x, %uq, %us) {bits=4, group_size=32}')
    check_unchanged(PASS, mixed)
