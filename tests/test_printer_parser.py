"""Tests for kiln's IR text form: print -> parse -> print is byte-identical, and bad text is refused.

Modules use every registered op, symbolic shapes, awkward weight names and
attribute values; parse errors must name the line they come from.
"""

import json
import math

import numpy as np
import pytest

from kiln.ir.errors import ParseError
from kiln.ir.graph import Module
from kiln.ir.ops import OPS, REQUIRED, define_op
from kiln.ir.parser import parse_attr_value, parse_module
from kiln.ir.printer import format_attr_value, print_module
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify_module

batch, seq = sym("batch"), sym("seq")
tokens, seqs, rows = sym("tokens"), sym("seqs"), sym("rows")
ODD_NAME = 'blk.0."attn" {q,k}: ünï ☃\\n'


def T(dtype, *shape):
    return TensorType(dtype, shape)


def build_every_op_module() -> Module:
    module = Module()
    module.metadata = {
        "config": {"hidden_size": 8, "rope_theta": 10000.0, "eps": 1e-06, "tie": True, "none": None},
        "chat_template": "{% for m in messages %}\n<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}",
        "unicode": "日本語 ☃ \"quoted\" \\ backslash",
        "list": [1, 2.5, [3, [4]], {"a": "}"}],
    }
    module.declare_range("seq", 1, 64)
    module.declare_range("batch", 2, 8)
    module.add_weight("model.embed_tokens.weight", type=T("f32", 32, 8))
    module.add_weight(ODD_NAME, type=T("f32", 8))
    module.add_weight("ln.bias", type=T("f32", 8))
    module.add_weight("fc1.weight", type=T("f32", 16, 8))
    module.add_weight("fc1.bias", type=T("f32", 16))
    module.add_weight("inv_freq", type=T("f32", 2))
    module.add_weight("mlp.gate", type=T("f32", 12, 8))
    module.add_weight("mlp.up", type=T("f32", 12, 8))
    module.add_weight("mlp.down", type=T("f32", 8, 12))
    module.add_weight("emb.qweight", type=T("i8", 32, 8))  # int8 in groups of 4, f16 scales
    module.add_weight("emb.scales", type=T("f16", 32, 2))
    module.add_weight("fc2.qweight", type=T("u32", 4, 1))  # int4: 8 nibbles per word, one group of 8
    module.add_weight("fc2.scales", type=T("f32", 4, 1))
    module.add_weight("fc2.zeros", type=T("f32", 4, 1))
    module.add_weight("router", type=T("f32", 4, 8))  # 4 experts in 2 groups, hidden 8, expert width 6
    module.add_weight("router.bias", type=T("f32", 4))
    module.add_weight("experts.gate_up", type=T("f32", 4, 12, 8))
    module.add_weight("experts.down", type=T("f32", 4, 8, 6))
    module.add_weight("experts.gate_up.q", type=T("i8", 4, 12, 8))  # int8 per row; the down stack stays float
    module.add_weight("experts.gate_up.scales", type=T("f32", 4, 12))
    module.add_weight("mlp_q.gate_up.q", type=T("i8", 12, 8))  # gated_mlp_q: int8 per row, I = 6
    module.add_weight("mlp_q.gate_up.scales", type=T("f32", 12))
    module.add_weight("mlp_q.down.q", type=T("i8", 8, 6))
    module.add_weight("mlp_q.down.scales", type=T("f32", 8))

    fn = module.add_function("forward")
    ids = fn.add_param("input_ids", T("i64", batch, seq))
    x = fn.add_param("x", T("f32", batch, seq, 8))
    mask = fn.add_param("mask", T("bool", seq, seq))
    pos = fn.add_param("positions", T("i64", batch, seq))

    emb = fn.emit("weight", name="model.embed_tokens.weight", value_name="embed.w")
    h = fn.emit("add", fn.emit("embedding", emb, ids), x, value_name="h")
    one = fn.emit("constant", value=1.0, dtype="f32")
    h3 = fn.emit("mul", fn.emit("sub", h, x), h)
    d = fn.emit("div", h3, fn.emit("add", fn.emit("exp", h), one))
    p = fn.emit("pow", h, fn.emit("constant", value=2, dtype="i64"))
    mn = fn.emit("minimum", fn.emit("maximum", h, p), d)
    cmps = {op: fn.emit(op, h, x) for op in ("eq", "ne", "lt", "le", "gt", "ge")}
    logic = fn.emit("or", fn.emit("and", cmps["eq"], cmps["ne"]), fn.emit("not", cmps["lt"]))
    u = mn
    for op in ("neg", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "abs", "erf", "sigmoid",
               "silu", "relu"):
        u = fn.emit(op, u)
    g = fn.emit("gelu", fn.emit("gelu", u, approximate="tanh"))
    half = fn.emit("cast", g, dtype="f16")
    picked = fn.emit("where", logic, h, x)
    consts = [fn.emit("constant", value=v, dtype=dt) for v, dt in
              [(1e-06, "f32"), (math.inf, "f32"), (-math.inf, "f16"), (math.nan, "f32"), (0.1 + 0.2, "f64"),
               (-0.0, "f32"), (1e300, "f64"), (5e-324, "f64"), (-7, "i64"), (True, "bool"), (2**62, "i64")]]
    filled = fn.emit("full", shape=(batch, seq, 1), value=-math.inf, dtype="f32")
    ar1 = fn.emit("arange", start=-3, end=seq + 1)
    ar2 = fn.emit("arange", end=10, step=3, dtype="f32")
    summed = fn.emit("sum", h, axes=(-1,), keepdims=True)
    means = fn.emit("mean", h, axes=(0, 1))
    maxes = fn.emit("max", h, axes=(2,))
    mins = fn.emit("min", ids, axes=(1,))
    sm = fn.emit("softmax", fn.emit("softmax", h), axis=1)
    cs = fn.emit("cumsum", ids, axis=1, dtype="i64")
    flat = fn.emit("reshape", h, shape=(batch * seq, 8))
    flat_t = fn.emit("permute", flat, perm=(1, 0))
    expanded = fn.emit("expand", summed, shape=(batch, seq, 8))
    sliced = fn.emit("slice", h, axis=1, end=seq - 1)
    strided = fn.emit("slice", h, axis=-1, start=1, end=7, step=2)
    joined = fn.emit("concat", h, strided, axis=-1)
    indexed = fn.emit("index", emb, ids)
    scores = fn.emit("matmul", h, fn.emit("permute", h, perm=(0, 2, 1)))
    lin = fn.emit("linear", h, fn.emit("weight", name="fc1.weight"), fn.emit("weight", name="fc1.bias"))
    lin_q = fn.emit("linear_q", h, *(fn.emit("weight", name=f"fc2.{n}") for n in ("qweight", "scales", "zeros")),
                    bits=4, group_size=8)
    emb_q = fn.emit("embedding_q", ids, fn.emit("weight", name="emb.qweight"), fn.emit("weight", name="emb.scales"),
                    bits=8, group_size=4)
    norm_w = fn.emit("weight", name=ODD_NAME)
    ln = fn.emit("layer_norm", h, norm_w, fn.emit("weight", name="ln.bias"), eps=1e-05)
    q = fn.emit("permute", fn.emit("reshape", h, shape=(batch, seq, 2, 4)), perm=(0, 2, 1, 3), value_name="q")
    k = fn.emit("slice", q, axis=1, end=1, value_name="k")
    att1 = fn.emit("sdpa", q, q, q, is_causal=True, scale=0.125)
    att2 = fn.emit("sdpa", q, k, k, mask, enable_gqa=True)
    rms = fn.emit("rms_norm", h, norm_w, eps=1e-06)
    resid = fn.add_node("add_rms_norm", [h, x, norm_w], {"eps": 1e-06}, name="resid")
    roped = fn.emit("rope", q, pos, fn.emit("weight", name="inv_freq"), rotary_dim=4)
    mlp = fn.emit("gated_mlp", h, fn.emit("weight", name="mlp.gate"), fn.emit("weight", name="mlp.up"),
                  fn.emit("weight", name="mlp.down"), activation="silu")
    attn = fn.emit("attention", roped, k, k, num_heads=2, num_kv_heads=1, scale=0.5, window=3)
    tokens_h = fn.emit("reshape", h, shape=(batch * seq, 8))
    routed = fn.add_node("moe_route", [fn.emit("linear", tokens_h, fn.emit("weight", name="router")),
                                       fn.emit("weight", name="router.bias")],
                         {"top_k": 2, "scoring": "sigmoid", "normalize": True, "num_groups": 2, "topk_groups": 1,
                          "group_score": "top2_sum", "scaling": 2.5}, name="routed")
    moe = fn.emit("moe_experts", tokens_h, *routed.outputs, fn.emit("weight", name="experts.gate_up"),
                  fn.emit("weight", name="experts.down"), activation="silu")
    moe_q = fn.emit("moe_experts_q", tokens_h, *routed.outputs, fn.emit("weight", name="experts.gate_up.q"),
                    fn.emit("weight", name="experts.gate_up.scales"), fn.emit("weight", name="experts.down"),
                    activation="silu", activations="float", gate_up_bits=8, gate_up_group_size=0,
                    gate_up_offset=False, down_bits=0, down_group_size=0, down_offset=False)
    mlp_q = fn.emit("gated_mlp_q", h, *(fn.emit("weight", name=f"mlp_q.{w}.{p}") for w in ("gate_up", "down")
                                         for p in ("q", "scales")),
                    activation="gelu_tanh", gate_up_bits=8, gate_up_group_size=0, gate_up_offset=False,
                    gate_up_activations="float", down_bits=8, down_group_size=0, down_offset=False,
                    down_activations="float")
    mla = fn.emit("latent_attention", q, fn.emit("slice", h, axis=2, end=4, value_name="latent"), num_heads=2,
                  scale=0.25, value_dim=3, expanded_k_dim=5, expanded_v_dim=6)
    fn.set_results([g, half, picked, filled, ar1, ar2, means, maxes, mins, sm, cs, flat_t, expanded, sliced, joined,
                    indexed, scores, lin, lin_q, emb_q, ln, att1, att2, rms, *resid.outputs, mlp, mlp_q, attn, moe, moe_q,
                    mla,
                    *consts])

    # the ragged step over named pools (V's head size differs from K's)
    st = module.add_function("step")
    ids = st.add_param("token_ids", T("i64", tokens))
    positions = st.add_param("positions", T("i64", tokens))
    token_seq = st.add_param("token_seq", T("i32", tokens))
    table = st.add_param("page_table", T("i32", seqs, 3))
    logit_rows = st.add_param("logit_rows", T("i64", rows))
    k_pool = st.add_param("k_cache_0", T("f32", 2, 6, 1, 4, 4))
    v_pool = st.add_param("v_cache_0", T("f32", 2, 6, 1, 4, 2))
    x1 = st.emit("reshape", st.emit("embedding", st.emit("weight", name="model.embed_tokens.weight"), ids),
                 shape=(1, tokens, 8), value_name="x1")
    q1 = st.emit("permute", st.emit("reshape", x1, shape=(1, tokens, 2, 4)), perm=(0, 2, 1, 3), value_name="q1")
    k1 = st.emit("slice", q1, axis=1, end=1, value_name="k1")
    v1 = st.emit("slice", k1, axis=3, end=2, value_name="v1")
    pos1 = st.emit("reshape", positions, shape=(1, tokens))
    paged = st.add_node("paged_attention", [q1, k1, v1, k_pool, v_pool, table, pos1, token_seq],
                        {"num_heads": 2, "num_kv_heads": 1, "scale": 0.5, "window": 3, "layer": 4, "index": 1},
                        name="attention_4")
    flat = st.emit("reshape", st.emit("permute", paged.outputs[0], perm=(0, 2, 1, 3)), shape=(1, tokens, 4))
    picked = st.emit("select_rows", flat, logit_rows, value_name="picked")
    st.set_results([st.emit("reshape", picked, shape=(rows, 4), value_name="logits"), *paged.outputs[1:]])

    # DeepSeek's latent attention over its one pool
    ls = module.add_function("latent_step")
    q2 = ls.add_param("q", T("f32", 1, 2, tokens, 4))
    latent = ls.add_param("latent", T("f32", 1, tokens, 4))
    latent_pool = ls.add_param("latent_cache_0", T("f32", 1, 6, 4, 4))
    table2, positions2 = ls.add_param("page_table", T("i32", seqs, 3)), ls.add_param("positions", T("i64", 1, tokens))
    token_seq2 = ls.add_param("token_seq", T("i32", tokens))
    paged_latent = ls.add_node("paged_latent_attention", [q2, latent, latent_pool, table2, positions2, token_seq2],
                               {"num_heads": 2, "scale": 0.5, "value_dim": 2, "expanded_k_dim": 3,
                                "expanded_v_dim": 2, "layer": 0, "index": 0}, name="attention_0")
    ls.set_results(list(paged_latent.outputs))

    dec = module.add_function("decode.step")
    tok = dec.add_param("tok", T("i64", batch, 1))
    w = dec.emit("weight", name="model.embed_tokens.weight")
    dec.set_results([dec.emit("embedding", w, tok, value_name="embedded.0")])
    return module


def test_every_op_round_trips_byte_identical():
    module = build_every_op_module()
    verify_module(module)
    used = {n.op for fn in module.functions.values() for n in fn.nodes}
    assert used == set(OPS), f"ops missing from the printer test module: {sorted(set(OPS) - used)}"
    text = print_module(module)
    parsed = parse_module(text)
    verify_module(parsed)
    assert print_module(parsed) == text
    assert parsed.metadata == json.loads(json.dumps(module.metadata))
    assert list(parsed.weights) == list(module.weights)
    assert parsed.weights[ODD_NAME] == T("f32", 8)
    for name, fn in module.functions.items():
        other = parsed.functions[name]
        assert [p.name for p in other.params] == [p.name for p in fn.params]
        assert [p.type for p in other.params] == [p.type for p in fn.params]
        assert [r.name for r in other.results] == [r.name for r in fn.results]
        assert len(other.nodes) == len(fn.nodes)
        for a, c in zip(fn.nodes, other.nodes):
            assert (a.op, [v.name for v in a.inputs], [v.type for v in a.outputs]) == \
                   (c.op, [v.name for v in c.inputs], [v.type for v in c.outputs])
            assert a.attrs.keys() == c.attrs.keys()
            for key in a.attrs:
                assert _same(a.attrs[key], c.attrs[key]), (a.op, key, a.attrs[key], c.attrs[key])


def _same(x, y) -> bool:
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    if isinstance(x, tuple):
        return isinstance(y, tuple) and len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and x == 0:
        return type(y) is float and math.copysign(1, x) == math.copysign(1, y)
    return type(x) is type(y) and x == y


def test_printed_form_details():
    text = print_module(build_every_op_module())
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "module {" and lines[-1] == "}"
    assert text.endswith("}\n")
    metadata = [line for line in lines if line.startswith("metadata ")]
    assert len(metadata) == 1  # the multi-line template stays on one line, escaped
    assert json.loads(metadata[0][len("metadata "):])["chat_template"].count("\n") == 3
    assert f"weight {json.dumps(ODD_NAME)} : f32[8]" in lines
    assert "func @forward(%input_ids: i64[batch, seq], %x: f32[batch, seq, 8], %mask: bool[seq, seq], " \
           "%positions: i64[batch, seq]) -> (" in text
    assert "func @step(%token_ids: i64[tokens], %positions: i64[tokens], %token_seq: i32[tokens], " \
           "%page_table: i32[seqs, 3], %logit_rows: i64[rows], %k_cache_0: f32[2, 6, 1, 4, 4], " \
           "%v_cache_0: f32[2, 6, 1, 4, 2]) -> (f32[rows, 4], f32[2, 6, 1, 4, 4], f32[2, 6, 1, 4, 2]) {" in lines
    assert "%attention_4_0, %attention_4_1, %attention_4_2 = paged_attention(%q1, %k1, %v1, %k_cache_0, " \
           "%v_cache_0, %page_table, %" in text
    assert any(line.startswith("%attention_4_0, %attention_4_1, %attention_4_2 = paged_attention(") and
               line.endswith("{num_heads=2, num_kv_heads=1, scale=0.5, window=3, layer=4, index=1} : "
                             "f32[1, 2, tokens, 2], f32[2, 6, 1, 4, 4], f32[2, 6, 1, 4, 2]") for line in lines)
    assert "%picked = select_rows(" in text and any(
        line.startswith("%picked = select_rows(") and line.endswith(", %logit_rows) : f32[1, rows, 4]")
        for line in lines)
    assert "return %logits, %attention_4_1, %attention_4_2" in lines
    assert '%embed.w = weight() {name="model.embed_tokens.weight"} : f32[32, 8]' in lines
    for value in ["1e-06", "inf", "-inf", "nan", "0.30000000000000004", "-0.0", "1e+300", "5e-324", "-7", "true",
                  str(2**62)]:
        assert any(line.endswith(":" + line.split(":")[-1]) and f"{{value={value}, " in line for line in lines), value
    assert any(line.startswith("%q = permute(") and "{perm=[0, 2, 1, 3]}" in line for line in lines)
    assert any("slice(%h) {axis=1, end=seq - 1} : f32[batch, seq - 1, 8]" in line for line in lines)
    assert any("arange() {start=-3, end=seq + 1} : i64[seq + 4]" in line for line in lines)
    assert any("reshape(%h) {shape=[batch*seq, 8]} : f32[batch*seq, 8]" in line for line in lines)
    # attributes equal to the op's default are left out
    assert any(line.endswith("= softmax(%h) : f32[batch, seq, 8]") for line in lines)
    assert any("sdpa(%q, %q, %q) {is_causal=true, scale=0.125}" in line for line in lines)
    assert any(line.startswith("%resid_0, %resid_1 = add_rms_norm(%h, %x, ") for line in lines)
    assert "func @decode.step(%tok: i64[batch, 1]) -> (f32[batch, 1, 8]) {" in lines
    assert "return %embedded.0" in lines


ATTR_VALUES = [None, True, False, 0, -5, 2**70, -(2**70), 1.5, -2.25, 1e-06, -1e-06, 0.1 + 0.2, -0.0, 1e300, 5e-324,
               math.inf, -math.inf, math.nan, "", "plain", "a,b", "{x}", "[y]", "(z)", 'q"uo\\te', "new\nline\ttab",
               "ünï ☃ 𝄞", "none", "true", "1", "1e5", "key=value", "%v", " : ", (), (1,), (1, 2, 3),
               ((1, 2), (), ((3,),)), (None, True, -1.5, "a,b", ("}", '"')), 2 * seq - 1, batch * seq,
               (batch, seq + 1, 64), ("x", seq)]


@pytest.mark.parametrize("value", ATTR_VALUES, ids=[repr(v) for v in ATTR_VALUES])
def test_attr_value_round_trip(value):
    text = format_attr_value(value)
    assert "\n" not in text
    back = parse_attr_value(text)
    assert _same(value, back), (value, text, back)
    assert format_attr_value(back) == text


@pytest.fixture
def payload_op():
    """A test-only op with one free-form attribute, removed again afterwards."""
    define_op("test_payload", infer=lambda types, attrs, module: [types[0]], reference=lambda xs, a: [xs[0]],
              attrs={"payload": REQUIRED, "tag": "default"}, inputs=1)
    try:
        yield "test_payload"
    finally:
        del OPS["test_payload"]


def test_free_form_attributes_round_trip(payload_op):
    module = Module()
    fn = module.add_function("f")
    v = fn.add_param("x", T("f32", seq))
    for value in ATTR_VALUES:
        v = fn.emit(payload_op, v, payload=value, tag="x}, y={z" if value is None else "default")
    fn.set_results([v])
    text = print_module(module)
    assert text.count('tag="x}, y={z"') == 1 and text.count("tag=") == 1
    parsed = parse_module(text)
    assert print_module(parsed) == text
    for a, c in zip(fn.nodes, parsed.functions["f"].nodes):
        assert _same(a.attrs["payload"], c.attrs["payload"])
        assert a.attrs["tag"] == c.attrs["tag"]


def test_comments_and_blank_lines_are_skipped():
    text = print_module(build_every_op_module())
    lines = text.splitlines()
    noisy = ["", ""] + lines[:1] + ["  // after the module line"] + lines[1:3] + ["", "  // inside", ""] + lines[3:]
    assert print_module(parse_module("\n".join(noisy))) == text


def test_empty_module_and_zero_param_function():
    assert print_module(parse_module("module {\n}\n")) == "module {\n}\n"
    module = Module()
    fn = module.add_function("const")
    fn.set_results([fn.emit("full", shape=(2,), value=0.5, dtype="f32")])
    text = print_module(module)
    assert "func @const() -> (f32[2]) {" in text
    assert print_module(parse_module(text)) == text


# parse errors ------------------------------------------------------------------------------
BASE = """module {
  weight "w" : f32[4, 4]
  func @f(%x: f32[n, 4]) -> (f32[n, 4]) {
    %w = weight() {name="w"} : f32[4, 4]
    %y = linear(%x, %w) : f32[n, 4]
    return %y
  }
}
"""


def _with_line(lineno: int, new: str | None) -> str:
    lines = BASE.splitlines()
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


def test_base_text_parses():
    assert print_module(parse_module(BASE)) == BASE


@pytest.mark.parametrize("lineno,new,message", [
    (5, "    %y = frobnicate(%x, %w) : f32[n, 4]", "unknown op 'frobnicate'"),
    (5, "    %y = linear(%x, %z) : f32[n, 4]", "%z used before definition"),
    (5, "    %y = linear(%x, %w) : f32[n, 5]", "differ from the op's rule"),
    (5, "    %y = linear(%x, %w) : f16[n, 4]", "differ from the op's rule"),
    (5, "    %w = linear(%x, %w) : f32[n, 4]", "%w defined twice"),
    (5, "    %x = linear(%x, %w) : f32[n, 4]", "%x defined twice"),
    (5, "    %y = linear(%x, %w) : f99[n, 4]", "unknown dtype 'f99'"),
    (5, "    %y = linear(%x, %w) : f32[n +, 4]", "bad dim expression"),
    (5, "    %y = linear(%x, %w) {alpha=2} : f32[n, 4]", "unknown attribute"),
    (5, "    %y = linear(%x) : f32[n, 4]", "expected 2..3 inputs"),
    (5, "    %y = linear(%x, %w)", "bad node line"),
    (5, "    %y, %z = linear(%x, %w) : f32[n, 4]", "linear has 1 outputs, line names 2"),
    (5, "    %y = linear(%x, w) : f32[n, 4]", "bad value reference"),
    (4, '    %w = weight() {name="v"} : f32[4, 4]', "no weight named 'v'"),
    (4, '    %w = weight() {name} : f32[4, 4]', "expected key=value"),
    (4, '    %w = weight() : f32[4, 4]', "missing attribute 'name'"),
    (6, None, "missing return"),
    (6, "    return %y, %x", "returned types differ"),
    (6, "    return %q", "%q used before definition"),
    (7, "  ", "expected '}' after return"),
    (3, "  func @f(%x: f32[n, 4], %x: f32[4]) -> (f32[n, 4]) {", "duplicate parameter %x"),
    (3, "  func @f(%x: g32[n, 4]) -> (f32[n, 4]) {", "unknown dtype"),
    (3, "  func f(%x: f32[n, 4]) -> (f32[n, 4]) {", "bad func header"),
    (3, "  func @f(%x: f32[n, 4]) -> f32[n, 4] {", "bad func header"),
    (2, '  weight "w" f32[4, 4]', "bad weight line"),
    (2, '  weight "w" : f32[4, -4]', "negative dim -4"),
    (2, "  metadata {broken", "metadata"),
    (2, "  blah", "expected metadata, symbol, weight, func or '}'"),
])
def test_parse_error_names_the_line(lineno, new, message):
    text = _with_line(lineno, new)
    with pytest.raises(ParseError) as info:
        parse_module(text)
    err = str(info.value)
    assert err.startswith(f"line {lineno}: "), err
    assert message in err, err
    assert "\n" not in err


def test_format_2_paged_attention_is_refused_with_its_line():
    """IR printed before the KV-cache spec (one kv_cache [layers, 2, pages, kv_heads, page, head_dim], six inputs)
    does not parse: the line is named; so is a step that reads a pool of the wrong shape."""
    old = "\n".join([
        "module {",
        "  func @prefill(%q: f32[1, 2, seq, 4], %kv_cache: f32[2, 2, 6, 1, 4, 4], %page_table: i32[1, 3], "
        "%positions: i64[1, seq]) -> (f32[1, 2, seq, 4]) {",
        "    %k = slice(%q) {axis=1, end=1} : f32[1, 1, seq, 4]",
        "    %a_0, %a_1 = paged_attention(%q, %k, %k, %kv_cache, %page_table, %positions) {num_heads=2, "
        "num_kv_heads=1, scale=0.5, layer=1} : f32[1, 2, seq, 4], f32[2, 2, 6, 1, 4, 4]",
        "    return %a_0",
        "  }",
        "}",
        ""])
    with pytest.raises(ParseError, match=r"^line 4: op paged_attention: missing attribute 'index'"):
        parse_module(old)
    with pytest.raises(ParseError, match=r"^line 4: op paged_attention: expected 8 inputs, found 6"):
        parse_module(old.replace("layer=1}", "layer=1, index=1}"))
    text = print_module(build_every_op_module())
    bad = text.replace("%v_cache_0: f32[2, 6, 1, 4, 2]", "%v_cache_0: f32[2, 6, 1, 8, 2]", 1)
    assert bad != text
    lineno = next(i for i, line in enumerate(bad.splitlines(), 1) if "= paged_attention(" in line)
    with pytest.raises(ParseError, match=rf"^line {lineno}: .*k_pool and v_pool differ"):
        parse_module(bad)


TABLE_SLICE = """module {
  symbol seq in [1, 16]
  func @f(%x: f32[seq, 4], %t: f32[16, 4]) -> (f32[seq, 4]) {
    %tail = slice(%t) {axis=0, start=-seq + 16, end=16} : f32[seq, 4]
    %y = add(%x, %tail) : f32[seq, 4]
    return %y
  }
}
"""


def test_symbol_ranges_round_trip_and_prove_a_slice():
    """A slice of the last seq rows of a 16-row table is in bounds only because seq <= 16 is declared."""
    module = parse_module(TABLE_SLICE)
    assert module.symbol_ranges == {"seq": (1, 16)}
    assert print_module(module) == TABLE_SLICE
    with pytest.raises(ParseError, match=r"^line 3: .*op slice: need 0 <= start <= end <= dim.*\(assuming seq >= 1\)"):
        parse_module(TABLE_SLICE.replace("  symbol seq in [1, 16]\n", ""))
    with pytest.raises(ParseError, match=r"^line 4: .*\(assuming seq in \[1, 17\]\)"):
        parse_module(TABLE_SLICE.replace("[1, 16]", "[1, 17]"))


@pytest.mark.parametrize("line,message", [
    ("  symbol seq in [0, 16]", "need 1 <= least <= greatest"),
    ("  symbol seq in [9, 8]", "need 1 <= least <= greatest"),
    ("  symbol seq in 1..16", "bad symbol line"),
    ("  symbol 2seq in [1, 16]", "bad symbol line"),
])
def test_bad_symbol_lines_name_the_line(line, message):
    with pytest.raises(ParseError, match=rf"^line 2: .*{message}"):
        parse_module(TABLE_SLICE.replace("  symbol seq in [1, 16]", line))


def test_symbol_declared_twice_or_after_a_function_is_refused():
    lines = TABLE_SLICE.splitlines()
    with pytest.raises(ParseError, match=r"^line 3: symbol seq declared twice"):
        parse_module("\n".join(lines[:2] + lines[1:2] + lines[2:]) + "\n")
    with pytest.raises(ParseError, match=r"^line 8: symbol ranges must come before the functions"):
        parse_module("\n".join(lines[:7] + ["  symbol batch in [1, 2]"] + lines[7:]) + "\n")


def test_duplicate_function_names_the_line():
    text = BASE.replace("}\n}\n", "}\n" + "\n".join(BASE.splitlines()[2:7]) + "\n}\n")
    with pytest.raises(ParseError, match=r"^line 8: function @f already exists"):
        parse_module(text)


def test_structure_errors():
    with pytest.raises(ParseError, match="expected 'module {'"):
        parse_module("func @f() -> () {\n}\n")
    with pytest.raises(ParseError, match="expected 'module {'"):
        parse_module("")
    with pytest.raises(ParseError, match="missing closing '}'"):
        parse_module(BASE.rstrip().rsplit("\n", 1)[0])
    with pytest.raises(ParseError, match="missing return"):
        parse_module("\n".join(BASE.splitlines()[:5]))


def test_parsed_module_runs_like_the_original():
    from kiln.ir.interpreter import run_function

    parsed = parse_module(BASE)
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 7
    parsed.weight_data["w"] = w
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    (y,) = run_function(parsed, "f", [x])
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6)
