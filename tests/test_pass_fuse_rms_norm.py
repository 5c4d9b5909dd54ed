"""fuse_rms_norm: golden IR for the plain norm, the norm after a residual add (add_rms_norm) and Gemma's (1 + w)
norm after fold_constants; near misses stay; the rewritten functions agree with the originals through the
interpreter, and the rms_norm reference agrees with transformers' LlamaRMSNorm and GemmaRMSNorm.
"""

import numpy as np
import pytest
import torch

from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import _add_rms_norm_ref, _rms_norm
from kiln.ir.parser import parse_module

from golden import check_golden, check_unchanged

PASS = "fuse_rms_norm"
# Expected IR keeps the nodes a fusion replaced: the pass only rewires their uses, eliminate_dead_code
# (next in the pipeline) removes them.
X = "f32[batch, seq, 16]"


def norm(x: str, out: str, weight: str = "%w", axes: str = "[2]", exponent: str = "2.0", weight_first=True) -> str:
    """Llama's RMSNorm of %x into %out: w * (x * rsqrt(mean(x^2, -1) + eps))."""
    product = f"mul({weight}, %{x}_normed)" if weight_first else f"mul(%{x}_normed, {weight})"
    reduced = "f32[batch, seq, 1]" if axes == "[2]" else "f32[batch, 1, 16]"
    return f"""
    %{x}_exponent = constant() {{value={exponent}, dtype="f32"}} : f32[]
    %{x}_squared = pow(%{x}, %{x}_exponent) : {X}
    %{x}_mean = mean(%{x}_squared) {{axes={axes}, keepdims=true}} : {reduced}
    %{x}_eps = constant() {{value=1e-06, dtype="f32"}} : f32[]
    %{x}_variance = add(%{x}_mean, %{x}_eps) : {reduced}
    %{x}_scale = rsqrt(%{x}_variance) : {reduced}
    %{x}_normed = mul(%{x}, %{x}_scale) : {X}
    %{out} = {product} : {X}"""


def module_text(params: str, body: str, ret: str, results: str, weight: str = "w") -> str:
    return f"""
module {{
  weight "{weight}" : f32[16]
  func @f({params}) -> ({results}) {{
    %w = weight() {{name="{weight}"}} : f32[16]{body}
    return {ret}
  }}
}}
"""


def check_same_results(before, after, weights_before: dict, weights_after: dict) -> None:
    """Same results through the interpreter on random inputs scaled like hidden states (tens)."""
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 1), (2, 5), (1, 9)):
        inputs = [(rng.standard_normal((batch, seq, 16)) * 30).astype(np.float32) for _ in before.functions["f"].params]
        expected = run_function(before, "f", inputs, weights_before)
        got = run_function(after, "f", inputs, weights_after)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def weights():
    return {"w": np.random.default_rng(7).standard_normal(16).astype(np.float32)}


@pytest.mark.parametrize("weight_first", [True, False])
def test_plain_rms_norm(weight_first):
    body = norm("x", "y", weight_first=weight_first)
    before = module_text(f"%x: {X}", body, "%y", X)
    expected = body.replace("    %y = mul", f"""\
    %fused = rms_norm(%x, %w) {{eps=1e-06}} : {X}
    %y = mul""")
    module = check_golden(PASS, before, module_text(f"%x: {X}", expected, "%fused", X), weights=weights())
    check_same_results(parse_module(before), module, weights(), weights())


def test_residual_add_becomes_add_rms_norm_and_later_uses_read_the_sum():
    params = f"%x: {X}, %residual: {X}"
    results = f"{X}, {X}, {X}"
    body = f"""
    %s = add(%x, %residual) : {X}""" + norm("s", "y") + f"""
    %next = add(%s, %y) : {X}"""
    before = module_text(params, body, "%y, %next, %s", results)
    expected = body.replace("    %y = mul", f"""\
    %sum, %normed = add_rms_norm(%x, %residual, %w) {{eps=1e-06}} : {X}, {X}
    %y = mul""").replace("%next = add(%s, %y)", "%next = add(%sum, %normed)")
    module = check_golden(PASS, before, module_text(params, expected, "%normed, %next, %sum", results),
                          weights=weights())
    check_same_results(parse_module(before), module, weights(), weights())


GEMMA = """
    %one = constant() {value=1.0, dtype="f32"} : f32[]
    %w1 = add(%one, %w) : f32[16]""" + norm("x", "y", weight="%w1", weight_first=False)


def test_gemma_norm_after_fold_constants():
    # Gemma multiplies by (1 + w): fold_constants turns that into a new weight first, then the norm fuses
    w = weights()["w"]
    gemma = module_text(f"%x: {X}", GEMMA, "%y", X, weight="norm")
    folded_body = norm("x", "y", weight_first=False)
    folded = module_text(f"%x: {X}", folded_body, "%y", X, weight="norm.add")
    folded_weights = check_golden("fold_constants", gemma, folded, weights={"norm": w}).weight_data
    np.testing.assert_array_equal(folded_weights["norm.add"], w + np.float32(1.0))
    expected = folded_body.replace("    %y = mul", f"""\
    %fused = rms_norm(%x, %w) {{eps=1e-06}} : {X}
    %y = mul""")
    module = check_golden(PASS, folded, module_text(f"%x: {X}", expected, "%fused", X, weight="norm.add"),
                          weights=folded_weights)
    check_same_results(parse_module(gemma), module, {"norm": w}, folded_weights)


@pytest.mark.parametrize("body", [
    norm("x", "y", axes="[1]"),
    norm("x", "y", exponent="3.0"),
    norm("x", "y").replace("%x_normed = mul(%x, %x_scale)", "%x_normed = mul(%other, %x_scale)"),
    norm("x", "y").replace("%y = mul(%w, %x_normed)", "%y = add(%w, %x_normed)"),
], ids=["mean_over_seq", "cube", "normalises_another_tensor", "weight_added"])
def test_near_misses_stay(body):
    check_unchanged(PASS, module_text(f"%x: {X}, %other: {X}", body, "%y", X))


def test_without_a_weight_multiply_it_stays():
    body = norm("x", "y").split("\n    %y = ")[0]
    check_unchanged(PASS, module_text(f"%x: {X}", body, "%x_normed", X))


# the references against transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rms_norm_reference_matches_transformers(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 16)) * 10).astype(dtype)
    w = rng.standard_normal(16).astype(dtype)
    llama = LlamaRMSNorm(16, eps=1e-6).to(torch.float32 if dtype == np.float32 else torch.float16)
    gemma = GemmaRMSNorm(16, eps=1e-6).to(llama.weight.dtype)
    with torch.no_grad():
        llama.weight.copy_(torch.as_tensor(w))
        gemma.weight.copy_(torch.as_tensor(w))
        ref_llama = llama(torch.as_tensor(x)).numpy()
        ref_gemma = gemma(torch.as_tensor(x)).numpy()
    tol = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(_rms_norm(x, w, 1e-6), ref_llama, rtol=tol, atol=tol)
    # Gemma scales by (1 + w) in float32 and casts once at the end
    folded = (w.astype(np.float32) + np.float32(1.0))
    expected_gemma = _rms_norm(x.astype(np.float32), folded, 1e-6).astype(dtype)
    np.testing.assert_allclose(expected_gemma, ref_gemma, rtol=tol, atol=tol)
    total = (x + x[:, ::-1]).astype(dtype)
    with torch.no_grad():
        ref_total = llama(torch.as_tensor(total)).numpy()
    got_sum, got_norm = _add_rms_norm_ref([x, x[:, ::-1].copy(), w], {"eps": 1e-6})
    np.testing.assert_array_equal(got_sum, total)
    np.testing.assert_allclose(got_norm, ref_total, rtol=tol, atol=tol)
