"""fuse_attention: golden IR for SDPA (is_causal, causal / sliding / additive masks), repeat_kv, MQA and eager
softmax(q k^T) v; unproven masks stay unfused with a reason; the rewritten functions agree with the originals
through the interpreter, the attention reference with torch's SDPA, and transformers' eager GPT-2 / Llama fuse fully.
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.ir.errors import ParseError
from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import attention_reference
from kiln.ir.parser import parse_module
from kiln.ir.printer import print_function
from kiln.ir.types import numpy_dtype
from kiln.ir.verifier import verify_module
from kiln.passes import PassManager, run_pass

from golden import CLEANUP, check_golden
from tiny_models import PROMPT_SHAPES, TINY_ARCHS, VOCAB, _COMMON

PASS = "fuse_attention"
# Expected IR keeps the nodes a fusion replaced: the pass only rewires their uses, eliminate_dead_code
# (next in the pipeline) removes them.

QKV = "%q: f32[batch, 4, seq, 16], %k: f32[batch, 4, seq, 16], %v: f32[batch, 4, seq, 16]"
QKV_GQA = "%q: f32[batch, 4, seq, 16], %k: f32[batch, 2, seq, 16], %v: f32[batch, 2, seq, 16]"
QKV_MQA = "%q: f32[batch, 4, seq, 16], %k: f32[batch, 1, seq, 16], %v: f32[batch, 1, seq, 16]"
OUT = "f32[batch, 4, seq, 16]"
FUSED = 'metadata {"unfused_attention": []}'

# The causal mask as transformers builds it: cache positions indexed per batch row, key <= query.
TRANSFORMERS_CAUSAL_MASK = """
    %pos = arange() {end=seq} : i64[seq]
    %row = reshape(%pos) {shape=[1, seq]} : i64[1, seq]
    %cache_position = expand(%row) {shape=[batch, seq]} : i64[batch, seq]
    %b = arange() {end=batch} : i64[batch]
    %bi = reshape(%b) {shape=[batch, 1, 1, 1]} : i64[batch, 1, 1, 1]
    %qi = reshape(%pos) {shape=[1, 1, seq, 1]} : i64[1, 1, seq, 1]
    %ki = reshape(%pos) {shape=[1, 1, 1, seq]} : i64[1, 1, 1, seq]
    %qpos = index(%cache_position, %bi, %qi) : i64[batch, 1, seq, 1]
    %kpos = index(%cache_position, %bi, %ki) : i64[batch, 1, 1, seq]
    %mask = le(%kpos, %qpos) : bool[batch, 1, seq, seq]"""

# key <= query on a [seq, seq] grid: the building block of the smaller masks below
GRID = """
    %pos = arange() {end=seq} : i64[seq]
    %query = reshape(%pos) {shape=[seq, 1]} : i64[seq, 1]
    %key = reshape(%pos) {shape=[1, seq]} : i64[1, seq]
    %causal = le(%key, %query) : bool[seq, seq]"""

ADDITIVE = GRID + """
    %zero = constant() {value=0.0, dtype="f32"} : f32[]
    %lowest = constant() {value=-3.4028234663852886e+38, dtype="f32"} : f32[]
    %mask = where(%causal, %zero, %lowest) : f32[seq, seq]"""


def module_text(params: str, body: str, results: str = OUT, ret: str = "%o", metadata: str = "") -> str:
    return f"""
module {{{metadata and chr(10) + '  ' + metadata}
  func @f({params}) -> ({results}) {{{body}
    return {ret}
  }}
}}
"""


def random_inputs(fn, env: dict, rng) -> list:
    arrays = []
    for p in fn.params:
        shape = p.type.concrete(env)
        if p.type.dtype in ("i64", "i32"):
            arrays.append(rng.integers(0, VOCAB, size=shape).astype(numpy_dtype(p.type.dtype)))
        else:
            arrays.append(rng.standard_normal(shape).astype(numpy_dtype(p.type.dtype)))
    return arrays


def check_same_results(before_text: str, after, sizes=((1, 1), (2, 5), (1, 9))) -> None:
    """The rewritten module computes what the original text computes (interpreter, random inputs)."""
    before = parse_module(before_text)
    rng = np.random.default_rng(0)
    for batch, seq in sizes:
        inputs = random_inputs(before.functions["f"], {"batch": batch, "seq": seq}, rng)
        expected = run_function(before, "f", inputs)
        got = run_function(after, "f", inputs)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def unfused(text: str) -> list:
    """Run the pass on IR it must not rewrite: no change reported, the function text identical; returns the
    recorded reasons (the module's metadata is the only thing allowed to change)."""
    module = parse_module(text)
    verify_module(module)
    before = [print_function(fn) for fn in module.functions.values()]
    assert run_pass(PASS, module) is False
    verify_module(module)
    assert [print_function(fn) for fn in module.functions.values()] == before
    return module.metadata["unfused_attention"]


# SDPA --------------------------------------------------------------------------------------------------
def test_sdpa_is_causal():
    before = module_text(QKV, f"""
    %o = sdpa(%q, %k, %v) {{is_causal=true}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV, f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.25}} : {OUT}
    %o = sdpa(%q, %k, %v) {{is_causal=true}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_sdpa_keeps_an_explicit_scale():
    before = module_text(QKV, f"""
    %o = sdpa(%q, %k, %v) {{is_causal=true, scale=0.1}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV, f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.1}} : {OUT}
    %o = sdpa(%q, %k, %v) {{is_causal=true, scale=0.1}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_sdpa_with_the_causal_mask_transformers_builds():
    before = module_text(QKV, TRANSFORMERS_CAUSAL_MASK + f"""
    %o = sdpa(%q, %k, %v, %mask) {{scale=0.25}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV, TRANSFORMERS_CAUSAL_MASK + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.25}} : {OUT}
    %o = sdpa(%q, %k, %v, %mask) {{scale=0.25}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_sdpa_with_an_additive_float_mask():
    before = module_text(QKV, ADDITIVE + f"""
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV, ADDITIVE + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.25}} : {OUT}
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_sliding_window_mask_records_the_window(window):
    body = GRID + f"""
    %distance = sub(%query, %key) : i64[seq, seq]
    %w = constant() {{value={window}, dtype="i64"}} : i64[]
    %near = lt(%distance, %w) : bool[seq, seq]
    %mask = and(%causal, %near) : bool[seq, seq]"""
    before = module_text(QKV, body + f"""
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV, body + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.25, window={window}}} : {OUT}
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""", ret="%a", metadata=FUSED))
    # lengths past the window, so rows that lose their first keys are compared too
    check_same_results(before, module, sizes=((1, 1), (2, window + 1), (1, 9)))


# K/V heads -------------------------------------------------------------------------------------------------
REPEAT_KV = """
    %k5 = reshape(%k) {shape=[batch, 2, 1, seq, 16]} : f32[batch, 2, 1, seq, 16]
    %kx = expand(%k5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %kr = reshape(%kx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]
    %v5 = reshape(%v) {shape=[batch, 2, 1, seq, 16]} : f32[batch, 2, 1, seq, 16]
    %vx = expand(%v5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %vr = reshape(%vx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]"""


def test_repeat_kv_is_absorbed_into_fewer_kv_heads():
    before = module_text(QKV_GQA, REPEAT_KV + f"""
    %o = sdpa(%q, %kr, %vr) {{is_causal=true}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV_GQA, REPEAT_KV + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=2, scale=0.25}} : {OUT}
    %o = sdpa(%q, %kr, %vr) {{is_causal=true}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_repeat_kv_of_an_unsqueezed_input_gets_a_fresh_view():
    params = ("%q: f32[batch, 4, seq, 16], %k5: f32[batch, 2, 1, seq, 16], %v5: f32[batch, 2, 1, seq, 16]")
    body = """
    %kx = expand(%k5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %kr = reshape(%kx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]
    %vx = expand(%v5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %vr = reshape(%vx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]"""
    before = module_text(params, body + f"""
    %o = sdpa(%q, %kr, %vr) {{is_causal=true}} : {OUT}""")
    module = check_golden(PASS, before, module_text(params, """
    %kx = expand(%k5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %k = reshape(%k5) {shape=[batch, 2, seq, 16]} : f32[batch, 2, seq, 16]
    %kr = reshape(%kx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]
    %vx = expand(%v5) {shape=[batch, 2, 2, seq, 16]} : f32[batch, 2, 2, seq, 16]
    %v = reshape(%v5) {shape=[batch, 2, seq, 16]} : f32[batch, 2, seq, 16]
    %vr = reshape(%vx) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]""" + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=2, scale=0.25}} : {OUT}
    %o = sdpa(%q, %kr, %vr) {{is_causal=true}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_sdpa_enable_gqa_groups_heads_itself():
    before = module_text(QKV_GQA, f"""
    %o = sdpa(%q, %k, %v) {{is_causal=true, enable_gqa=true}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV_GQA, f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=2, scale=0.25}} : {OUT}
    %o = sdpa(%q, %k, %v) {{is_causal=true, enable_gqa=true}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_mqa_single_head_broadcast_by_expand():
    body = """
    %kx = expand(%k) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]
    %vx = expand(%v) {shape=[batch, 4, seq, 16]} : f32[batch, 4, seq, 16]"""
    before = module_text(QKV_MQA, body + f"""
    %o = sdpa(%q, %kx, %vx) {{is_causal=true}} : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV_MQA, body + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=1, scale=0.25}} : {OUT}
    %o = sdpa(%q, %kx, %vx) {{is_causal=true}} : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_mqa_single_head_broadcast_by_sdpa_itself():
    # Falcon's multi-query attention hands the one K/V head straight to SDPA, which broadcasts it
    before = module_text(QKV_MQA, ADDITIVE + f"""
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""")
    module = check_golden(PASS, before, module_text(QKV_MQA, ADDITIVE + f"""
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=1, scale=0.25}} : {OUT}
    %o = sdpa(%q, %k, %v, %mask) : {OUT}""", ret="%a", metadata=FUSED))
    check_same_results(before, module)


# eager softmax(q k^T * scale + mask) v ---------------------------------------------------------------------
def eager_body(scores: str, kt: str = "%kt = permute(%k) {perm=[0, 1, 3, 2]} : f32[batch, 4, 16, seq]") -> str:
    return f"""
    {kt}
    %s = matmul(%q, %kt) : f32[batch, 4, seq, seq]{scores}
    %p = softmax(%scaled_masked) {{axis=3}} : f32[batch, 4, seq, seq]
    %o = matmul(%p, %v) : {OUT}"""


EAGER_FORMS = {
    # Llama: scores * scaling + additive mask
    "mul_then_add": ADDITIVE + """
    %scaling = constant() {value=0.25, dtype="f32"} : f32[]
    %scaled = mul(%s, %scaling) : f32[batch, 4, seq, seq]
    %scaled_masked = add(%scaled, %mask) : f32[batch, 4, seq, seq]""",
    # GPT-2: scores / sqrt(head_dim), mask added on the left
    "div_then_add": ADDITIVE + """
    %root = constant() {value=4.0, dtype="f32"} : f32[]
    %scaled = div(%s, %root) : f32[batch, 4, seq, seq]
    %scaled_masked = add(%mask, %scaled) : f32[batch, 4, seq, seq]""",
    # older transformers: where(causal, scores, finfo.min), scaled twice
    "where": GRID + """
    %half = constant() {value=0.5, dtype="f32"} : f32[]
    %scaled0 = mul(%s, %half) : f32[batch, 4, seq, seq]
    %scaled = mul(%half, %scaled0) : f32[batch, 4, seq, seq]
    %lowest = constant() {value=-3.4028234663852886e+38, dtype="f32"} : f32[]
    %scaled_masked = where(%causal, %scaled, %lowest) : f32[batch, 4, seq, seq]""",
}


@pytest.mark.parametrize("form", sorted(EAGER_FORMS))
def test_eager_attention(form):
    before = module_text(QKV, eager_body(EAGER_FORMS[form]))
    body = eager_body(EAGER_FORMS[form])
    fused = body.replace("    %o = matmul", f"    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, "
                                             f"scale=0.25}} : {OUT}\n    %o = matmul")
    module = check_golden(PASS, before, module_text(QKV, fused, ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_eager_attention_with_the_key_transposes_composed():
    # GPT-2: k.permute(0, 2, 1, 3).transpose(-1, -2) reaches fuse_attention as one permute (0, 2, 3, 1)
    params = "%q: f32[batch, 4, seq, 16], %k_heads: f32[batch, seq, 4, 16], %v: f32[batch, 4, seq, 16]"
    kt = "%kt = permute(%k_heads) {perm=[0, 2, 3, 1]} : f32[batch, 4, 16, seq]"
    before = module_text(params, eager_body(EAGER_FORMS["div_then_add"], kt))
    fused = eager_body(EAGER_FORMS["div_then_add"], kt).replace("    %o = matmul", f"""\
    %k = permute(%k_heads) {{perm=[0, 2, 1, 3]}} : f32[batch, 4, seq, 16]
    %a = attention(%q, %k, %v) {{num_heads=4, num_kv_heads=4, scale=0.25}} : {OUT}
    %o = matmul""")
    module = check_golden(PASS, before, module_text(params, fused, ret="%a", metadata=FUSED))
    check_same_results(before, module)


def test_eager_attention_over_repeat_kv():
    before = module_text(QKV_GQA, REPEAT_KV + eager_body(
        EAGER_FORMS["mul_then_add"], "%kt = permute(%kr) {perm=[0, 1, 3, 2]} : f32[batch, 4, 16, seq]")
        .replace("matmul(%p, %v)", "matmul(%p, %vr)"))
    module = parse_module(before)
    assert run_pass(PASS, module) is True
    (fused,) = [n for n in module.functions["f"].nodes if n.op == "attention"]
    assert [v.name for v in fused.inputs] == ["q", "k", "v"]
    assert fused.attrs == {"num_heads": 4, "num_kv_heads": 2, "scale": 0.25, "window": None,
                           "softcap": None, "alibi": None}
    check_same_results(before, module)


# transformers' eager models ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def eager_model(arch: str):
    import transformers

    cls_name, overrides = TINY_ARCHS[arch]
    kwargs = dict(overrides) if arch == "gpt2" else {**_COMMON, **overrides}
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@functools.lru_cache(maxsize=None)
def eager_captured(arch: str):
    from kiln.frontend.capture import capture

    return capture(eager_model(arch), max_seq=64)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_eager_attention_fuses_and_keeps_logits(arch):
    from golden import copy_module

    module = copy_module(eager_captured(arch))
    assert any(n.op == "softmax" for n in module.functions["forward"].nodes)
    PassManager([CLEANUP, PASS, "eliminate_dead_code"]).run(module)
    nodes = module.functions["forward"].nodes
    assert module.metadata["unfused_attention"] == []
    assert sum(n.op == "attention" for n in nodes) == 2  # two layers
    assert not any(n.op in ("softmax", "matmul", "sdpa") for n in nodes)
    rng = np.random.default_rng(0)
    for shape in PROMPT_SHAPES:
        ids = rng.integers(0, VOCAB, size=shape)
        with torch.no_grad():
            ref = eager_model(arch)(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
        (got,) = run_function(module, "forward", [ids])
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (arch, shape)


# left alone, with a reason --------------------------------------------------------------------------------
def test_mask_from_the_input_tokens_stays_unfused():
    # a padding mask derived from input_ids: it changes with the tokens, so no compile-time proof exists
    params = "%ids: i64[batch, seq], " + QKV
    body = GRID + f"""
    %pad = constant() {{value=0, dtype="i64"}} : i64[]
    %real = ne(%ids, %pad) : bool[batch, seq]
    %keys = reshape(%real) {{shape=[batch, 1, 1, seq]}} : bool[batch, 1, 1, seq]
    %mask = and(%causal, %keys) : bool[batch, 1, seq, seq]
    %o = sdpa(%q, %k, %v, %mask) : {OUT}"""
    (reason,) = unfused(module_text(params, body))
    assert reason.startswith("%o = sdpa(") and "depends on the input tokens" in reason


def test_non_causal_mask_stays_unfused():
    body = f"""
    %mask = full() {{shape=[seq, seq], value=true, dtype="bool"}} : bool[seq, seq]
    %o = sdpa(%q, %k, %v, %mask) : {OUT}"""
    (reason,) = unfused(module_text(QKV, body))
    assert reason.endswith("the mask differs from a causal mask at length 2")


def test_future_looking_mask_stays_unfused():
    body = f"""
    %pos = arange() {{end=seq}} : i64[seq]
    %query = reshape(%pos) {{shape=[seq, 1]}} : i64[seq, 1]
    %key = reshape(%pos) {{shape=[1, seq]}} : i64[1, seq]
    %mask = ge(%key, %query) : bool[seq, seq]
    %o = sdpa(%q, %k, %v, %mask) : {OUT}"""
    (reason,) = unfused(module_text(QKV, body))
    assert "the mask differs from" in reason and reason.endswith("at length 2")


def test_mask_with_other_values_stays_unfused():
    body = GRID + f"""
    %zero = constant() {{value=0.0, dtype="f32"}} : f32[]
    %bias = constant() {{value=-1.0, dtype="f32"}} : f32[]
    %mask = where(%causal, %zero, %bias) : f32[seq, seq]
    %o = sdpa(%q, %k, %v, %mask) : {OUT}"""
    (reason,) = unfused(module_text(QKV, body))
    assert "differs from a causal mask" in reason


# ALiBi: a causal mask plus slope_h * key position for head h (slopes 0.125 * (h + 1)), added up before SDPA.
def alibi_body(bias_of_key: str = "%kf") -> str:
    return ADDITIVE + f"""
    %heads = arange() {{end=4}} : i64[4]
    %hf = cast(%heads) {{dtype="f32"}} : f32[4]
    %one = constant() {{value=1.0, dtype="f32"}} : f32[]
    %h1 = add(%hf, %one) : f32[4]
    %eighth = constant() {{value=0.125, dtype="f32"}} : f32[]
    %slope = mul(%h1, %eighth) : f32[4]
    %slope3 = reshape(%slope) {{shape=[4, 1, 1]}} : f32[4, 1, 1]
    %kf = cast(%key) {{dtype="f32"}} : f32[1, seq]
    %kf2 = mul(%kf, %kf) : f32[1, seq]
    %bias = mul(%slope3, {bias_of_key}) : f32[4, 1, seq]
    %total = add(%mask, %bias) : f32[4, seq, seq]
    %o = sdpa(%q, %k, %v, %total) : {OUT}"""


def test_alibi_biases_fuse_with_their_slopes():
    before = module_text(QKV, alibi_body())
    module = parse_module(before)
    assert run_pass(PASS, module) is True
    (fused,) = [n for n in module.functions["f"].nodes if n.op == "attention"]
    assert fused.attrs["alibi"] == pytest.approx((0.125, 0.25, 0.375, 0.5), rel=1e-7)
    assert fused.attrs["window"] is None
    check_same_results(before, module)


def test_a_bias_not_linear_in_the_key_position_stays_unfused():
    (reason,) = unfused(module_text(QKV, alibi_body("%kf2")))
    assert "neither a mask nor linear" in reason


# MPT: the slopes times key positions -127..0 in a 128-column table, its last seq columns added to the eager scores,
# then masked_fill(masked, -inf) with masked = not causal. The slice is in bounds only for seq <= 128.
MPT_SCORES = GRID + """
    %heads = arange() {end=4} : i64[4]
    %hf = cast(%heads) {dtype="f32"} : f32[4]
    %one = constant() {value=1.0, dtype="f32"} : f32[]
    %h1 = add(%hf, %one) : f32[4]
    %eighth = constant() {value=0.125, dtype="f32"} : f32[]
    %slope = mul(%h1, %eighth) : f32[4]
    %slope3 = reshape(%slope) {shape=[4, 1, 1]} : f32[4, 1, 1]
    %columns = arange() {start=-127, end=1} : i64[128]
    %columns_f = cast(%columns) {dtype="f32"} : f32[128]
    %table = mul(%slope3, %columns_f) : f32[4, 1, 128]
    %alibi = slice(%table) {axis=2, start=-seq + 128, end=128} : f32[4, 1, seq]
    %quarter = constant() {value=0.25, dtype="f32"} : f32[]
    %scaled = mul(%s, %quarter) : f32[batch, 4, seq, seq]
    %biased = add(%scaled, %alibi) : f32[batch, 4, seq, seq]
    %masked = not(%causal) : bool[seq, seq]
    %lowest = constant() {value=-3.4028234663852886e+38, dtype="f32"} : f32[]
    %scaled_masked = where(%masked, %lowest, %biased) : f32[batch, 4, seq, seq]"""


def test_mpt_alibi_table_slice_and_masked_fill_fuse_with_their_slopes():
    before = module_text(QKV, eager_body(MPT_SCORES), metadata="symbol seq in [1, 48]")
    module = parse_module(before)
    assert run_pass(PASS, module) is True
    (fused,) = [n for n in module.functions["f"].nodes if n.op == "attention"]
    assert fused.attrs["alibi"] == pytest.approx((0.125, 0.25, 0.375, 0.5), rel=1e-7)
    assert fused.attrs["window"] is None and fused.attrs["scale"] == 0.25
    check_same_results(before, module, sizes=((1, 1), (2, 5), (1, 9), (1, 48)))


def test_the_mpt_table_slice_needs_the_declared_length_range():
    with pytest.raises(ParseError, match="op slice: need 0 <= start <= end <= dim"):
        parse_module(module_text(QKV, eager_body(MPT_SCORES)))
    with pytest.raises(ParseError, match="op slice: need 0 <= start <= end <= dim"):
        parse_module(module_text(QKV, eager_body(MPT_SCORES), metadata="symbol seq in [1, 129]"))


@pytest.mark.parametrize("text", [
    module_text(QKV, f"""
    %o = sdpa(%q, %k, %v) : {OUT}"""),
    module_text(QKV, """
    %kt = permute(%k) {perm=[0, 1, 3, 2]} : f32[batch, 4, 16, seq]
    %s = matmul(%q, %kt) : f32[batch, 4, seq, seq]
    %p = softmax(%s) {axis=3} : f32[batch, 4, seq, seq]""" + f"""
    %o = matmul(%p, %v) : {OUT}"""),
], ids=["sdpa", "eager"])
def test_attention_without_mask_or_is_causal_stays_unfused(text):
    (reason,) = unfused(text)
    assert "without a mask is not causal" in reason


def test_failed_match_leaves_no_fresh_views_behind():
    # K would need a fresh [b, 2, s, 16] view, but V has 4 heads: nothing may be left half-built
    params = "%q: f32[batch, 4, seq, 16], %k5: f32[batch, 2, 1, seq, 16], %v: f32[batch, 4, seq, 16]"
    (reason,) = unfused(module_text(params, f"""
    %kx = expand(%k5) {{shape=[batch, 2, 2, seq, 16]}} : f32[batch, 2, 2, seq, 16]
    %kr = reshape(%kx) {{shape=[batch, 4, seq, 16]}} : f32[batch, 4, seq, 16]
    %o = sdpa(%q, %kr, %v) {{is_causal=true}} : {OUT}"""))
    assert "cannot see how K/V heads map to query heads" in reason


def test_cross_attention_lengths_stay_unfused():
    params = "%q: f32[batch, 4, seq, 16], %k: f32[batch, 4, 8, 16], %v: f32[batch, 4, 8, 16]"
    (reason,) = unfused(module_text(params, """
    %o = sdpa(%q, %k, %v) {is_causal=true} : f32[batch, 4, seq, 16]"""))
    assert "query and key lengths differ" in reason


def test_softmax_on_another_axis_is_not_attention():
    assert unfused(module_text(QKV, """
    %kt = permute(%k) {perm=[0, 1, 3, 2]} : f32[batch, 4, 16, seq]
    %s = matmul(%q, %kt) : f32[batch, 4, seq, seq]
    %p = softmax(%s) {axis=2} : f32[batch, 4, seq, seq]""" + f"""
    %o = matmul(%p, %v) : {OUT}""")) == []


# the attention reference against torch -------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads,seq,window", [(4, 4, 7, None), (4, 2, 9, None), (6, 2, 9, 3), (4, 1, 5, 2)])
def test_attention_reference_matches_torch_sdpa(heads, kv_heads, seq, window):
    rng = np.random.default_rng(seq + heads)
    q = rng.standard_normal((heads, seq, 16)).astype(np.float32)
    k = rng.standard_normal((kv_heads, seq, 16)).astype(np.float32)
    v = rng.standard_normal((kv_heads, seq, 16)).astype(np.float32)
    positions = np.arange(seq)
    got = attention_reference(q, k, v, positions, positions, 0.25, window)
    # torch: K/V heads repeated the way transformers' repeat_kv does it, causal band from tril/triu
    rep = heads // kv_heads
    kt = torch.as_tensor(k).repeat_interleave(rep, dim=0)[None]
    vt = torch.as_tensor(v).repeat_interleave(rep, dim=0)[None]
    if window is None:
        ref = F.scaled_dot_product_attention(torch.as_tensor(q)[None], kt, vt, is_causal=True, scale=0.25)
    else:
        ones = torch.ones(seq, seq, dtype=torch.bool)
        band = torch.tril(ones) & torch.triu(ones, diagonal=-(window - 1))
        ref = F.scaled_dot_product_attention(torch.as_tensor(q)[None], kt, vt, attn_mask=band, scale=0.25)
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=1e-5, atol=1e-6)
