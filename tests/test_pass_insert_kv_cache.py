"""insert_kv_cache: golden IR for a one-layer forward (RoPE, GQA) and a GPT-2 style one (learned position
embeddings) split into prefill and decode; prefill + batched decode through the cache give the forward's logits;
paged_attention over several calls agrees with torch's SDPA on the whole sequence; unfused attention is refused.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.ir.errors import ConfigError
from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import _paged_attention_ref
from kiln.ir.parser import parse_module
from kiln.passes import run_pass
from kiln.passes.plan_kv_cache import LAYOUT

from golden import check_golden
from kv_harness import empty_cache, generate_logits, page_row

PASS = "insert_kv_cache"

# one layer, one KV head of 8 dims, pages of 4 tokens, 12 tokens a sequence -> 3 pages, 3 sequences -> 9 pages
PLAN = {"budget_bytes": None, "bytes_per_token": 64, "dtype": "f32", "head_dim": 8, "layout": LAYOUT,
        "max_num_seqs": 3, "max_seq_len": 12, "max_tokens": 36, "num_kv_heads": 1, "num_layers": 1, "num_pages": 9,
        "page_size": 4, "pages_per_seq": 3, "total_bytes": 2304}
METADATA = "metadata " + json.dumps({"kv_cache": PLAN, "unfused_attention": []}, sort_keys=True)
CACHE = "f32[1, 2, 9, 1, 4, 8]"

ROPE_WEIGHTS = """
  weight "embed" : f32[32, 16]
  weight "wq" : f32[16, 16]
  weight "wk" : f32[8, 16]
  weight "wv" : f32[8, 16]
  weight "wo" : f32[16, 16]
  weight "inv_freq" : f32[4]"""

# embed, q (2 heads) / k, v (1 head) projections, RoPE on q and k, attention, output projection, residual, logits
PROJECTIONS = """
    %embed = weight() {name="embed"} : f32[32, 16]
    %wq = weight() {name="wq"} : f32[16, 16]
    %wk = weight() {name="wk"} : f32[8, 16]
    %wv = weight() {name="wv"} : f32[8, 16]
    %wo = weight() {name="wo"} : f32[16, 16]
    %inv_freq = weight() {name="inv_freq"} : f32[4]
    %h = embedding(%embed, %input_ids) : f32[batch, seq, 16]
    %q0 = linear(%h, %wq) : f32[batch, seq, 16]
    %q1 = reshape(%q0) {shape=[batch, seq, 2, 8]} : f32[batch, seq, 2, 8]
    %q = permute(%q1) {perm=[0, 2, 1, 3]} : f32[batch, 2, seq, 8]
    %k0 = linear(%h, %wk) : f32[batch, seq, 8]
    %k1 = reshape(%k0) {shape=[batch, seq, 1, 8]} : f32[batch, seq, 1, 8]
    %k = permute(%k1) {perm=[0, 2, 1, 3]} : f32[batch, 1, seq, 8]
    %v0 = linear(%h, %wv) : f32[batch, seq, 8]
    %v1 = reshape(%v0) {shape=[batch, seq, 1, 8]} : f32[batch, seq, 1, 8]
    %v = permute(%v1) {perm=[0, 2, 1, 3]} : f32[batch, 1, seq, 8]"""
ROPE = """
    %qr = rope(%q, %pos_row, %inv_freq) {rotary_dim=8} : f32[batch, 2, seq, 8]
    %kr = rope(%k, %pos_row, %inv_freq) {rotary_dim=8} : f32[batch, 1, seq, 8]"""
OUTPUT = """
    %a1 = permute(%a) {perm=[0, 2, 1, 3]} : f32[batch, seq, 2, 8]
    %a2 = reshape(%a1) {shape=[batch, seq, 16]} : f32[batch, seq, 16]
    %o = linear(%a2, %wo) : f32[batch, seq, 16]
    %r = add(%h, %o) : f32[batch, seq, 16]
    %logits = linear(%r, %embed) : f32[batch, seq, 32]"""
ATTENTION = """
    %a = attention(%qr, %kr, %v) {num_heads=2, num_kv_heads=1, scale=0.35355339059327373} : f32[batch, 2, seq, 8]"""
PAGED = f"""
    %a, %cache = paged_attention(%qr, %kr, %v, %kv_cache, %page_table, %positions) {{num_heads=2, num_kv_heads=1, \
scale=0.35355339059327373, layer=0}} : f32[batch, 2, seq, 8], {CACHE}"""
SEQUENCE_POSITIONS = """
    %pos = arange() {end=seq} : i64[seq]
    %pos_row = reshape(%pos) {shape=[1, seq]} : i64[1, seq]"""

FORWARD_SIGNATURE = "func @forward(%input_ids: i64[batch, seq]) -> (f32[batch, seq, 32])"
PREFILL_SIGNATURE = (f"func @prefill(%input_ids: i64[batch, seq], %positions: i64[batch, seq], %kv_cache: {CACHE}, "
                     f"%page_table: i32[batch, 3]) -> (f32[batch, seq, 32], {CACHE})")


def module_text(weights: str, functions: str, metadata: str = METADATA) -> str:
    return f"""
module {{
  {metadata}{weights}
{functions}
}}
"""


def function(signature: str, body: str, ret: str) -> str:
    return f"""  {signature} {{{body}
    return {ret}
  }}"""


def split(prefill_body: str, prefill_signature: str = PREFILL_SIGNATURE) -> str:
    """Expected prefill and decode: decode is prefill with every `seq` made 1."""
    prefill = function(prefill_signature, prefill_body, "%logits, %cache")
    decode = prefill.replace("@prefill", "@decode").replace("seq", "1")
    return prefill + "\n" + decode


def random_weights(module) -> dict:
    rng = np.random.default_rng(4)
    out = {}
    for name, ty in module.weights.items():
        out[name] = (rng.standard_normal(ty.shape) * 0.5).astype(np.float32)
    out.pop("inv_freq", None)
    if "inv_freq" in module.weights:
        out["inv_freq"] = (1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    return out


def check_cache_reproduces_forward(forward_text: str, module, weights: dict) -> None:
    """Prefill prompts, then decode three sequences of different lengths together: every position's logits equal
    the stateless forward's logits on the whole sequence (the original function, through the interpreter)."""
    forward = parse_module(forward_text)
    module.weight_data.update(weights)
    rng = np.random.default_rng(9)
    full = [rng.integers(0, 32, size=n) for n in (9, 6, 12)]
    prompts = [full[0][:4], full[1][:1], full[2][:7]]
    steps = [f[len(p):] for f, p in zip(full, prompts)]
    for sequence, logits in zip(full, generate_logits(module, prompts, steps)):
        (expected,) = run_function(forward, "forward", [sequence[None]], weights)
        np.testing.assert_allclose(logits, expected[0], rtol=1e-5, atol=1e-5)


def test_one_layer_with_rope_and_grouped_attention():
    body = PROJECTIONS + SEQUENCE_POSITIONS + ROPE + ATTENTION + OUTPUT
    before = module_text(ROPE_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"))
    # RoPE reads the positions input, arange(seq) is gone, attention writes and reads the cache
    expected = module_text(ROPE_WEIGHTS, split(PROJECTIONS + ROPE.replace("%pos_row", "%positions") + PAGED + OUTPUT))
    module = check_golden(PASS, before, expected)
    check_cache_reproduces_forward(before, module, random_weights(module))


def test_prefill_from_zero_gives_the_forward_logits_at_every_batch_size():
    body = PROJECTIONS + SEQUENCE_POSITIONS + ROPE + ATTENTION + OUTPUT
    before = module_text(ROPE_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"))
    module = parse_module(before)
    weights = random_weights(module)
    module.weight_data.update(weights)
    run_pass(PASS, module)
    rng = np.random.default_rng(2)
    for batch, seq in ((1, 1), (2, 5), (3, 12)):
        ids = rng.integers(0, 32, size=(batch, seq))
        positions = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        table = np.stack([page_row(PLAN, slot) for slot in range(batch)])
        logits, cache = run_function(module, "prefill", [ids, positions, empty_cache(PLAN), table])
        (expected,) = run_function(parse_module(before), "forward", [ids], weights)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        # the V projection of each token sits at its page and offset (V needs no RoPE: plain numpy)
        h = weights["embed"][ids]
        v = h @ weights["wv"].T
        for b in range(batch):
            for t in range(seq):
                page = table[b, t // 4]
                np.testing.assert_allclose(cache[0, 1, page, 0, t % 4], v[b, t], rtol=1e-5, atol=1e-6)


GPT2_WEIGHTS = """
  weight "wte" : f32[32, 8]
  weight "wpe" : f32[16, 8]"""
GPT2_TOKENS = """
    %wte = weight() {name="wte"} : f32[32, 8]
    %wpe = weight() {name="wpe"} : f32[16, 8]
    %tok = embedding(%wte, %input_ids) : f32[batch, seq, 8]"""
GPT2_REST = """
    %h = add(%tok, %pe) : f32[batch, seq, 8]
    %h1 = reshape(%h) {shape=[batch, seq, 1, 8]} : f32[batch, seq, 1, 8]
    %x = permute(%h1) {perm=[0, 2, 1, 3]} : f32[batch, 1, seq, 8]"""
GPT2_ATTENTION = """
    %a = attention(%x, %x, %x) {num_heads=1, num_kv_heads=1, scale=0.35355339059327373} : f32[batch, 1, seq, 8]"""
GPT2_PAGED = f"""
    %a, %cache = paged_attention(%x, %x, %x, %kv_cache, %page_table, %positions) {{num_heads=1, num_kv_heads=1, \
scale=0.35355339059327373, layer=0}} : f32[batch, 1, seq, 8], {CACHE}"""
GPT2_OUTPUT = """
    %a1 = permute(%a) {perm=[0, 2, 1, 3]} : f32[batch, seq, 1, 8]
    %a2 = reshape(%a1) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    %logits = linear(%a2, %wte) : f32[batch, seq, 32]"""


def test_learned_position_embeddings_read_the_positions_input():
    body = GPT2_TOKENS + SEQUENCE_POSITIONS + """
    %pe = embedding(%wpe, %pos_row) : f32[1, seq, 8]""" + GPT2_REST + GPT2_ATTENTION + GPT2_OUTPUT
    before = module_text(GPT2_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"))
    expected = module_text(GPT2_WEIGHTS, split(GPT2_TOKENS + """
    %pe = embedding(%wpe, %positions) : f32[batch, seq, 8]""" + GPT2_REST + GPT2_PAGED + GPT2_OUTPUT))
    module = check_golden(PASS, before, expected)
    check_cache_reproduces_forward(before, module, random_weights(module))


def test_an_embedding_of_a_constant_index_keeps_its_index():
    # a token-type embedding of constant type 1 does not depend on input_ids, yet it is not a position lookup
    token_type = """
    %wtt = weight() {name="wtt"} : f32[2, 8]
    %one = full() {shape=[batch, seq], value=1, dtype="i64"} : i64[batch, seq]
    %tt = embedding(%wtt, %one) : f32[batch, seq, 8]"""
    weights = GPT2_WEIGHTS + """
  weight "wtt" : f32[2, 8]"""
    rest = GPT2_REST.replace("%h = add(%tok, %pe)", "%h0 = add(%tok, %pe) : f32[batch, seq, 8]\n"
                             "    %h = add(%h0, %tt)")
    body = GPT2_TOKENS + SEQUENCE_POSITIONS + """
    %pe = embedding(%wpe, %pos_row) : f32[1, seq, 8]""" + token_type + rest + GPT2_ATTENTION + GPT2_OUTPUT
    before = module_text(weights, function(FORWARD_SIGNATURE, body, "%logits"))
    expected = module_text(weights, split(GPT2_TOKENS + """
    %pe = embedding(%wpe, %positions) : f32[batch, seq, 8]""" + token_type + rest + GPT2_PAGED + GPT2_OUTPUT))
    module = check_golden(PASS, before, expected)
    check_cache_reproduces_forward(before, module, random_weights(module))


SHIFTED = SEQUENCE_POSITIONS + """
    %two = constant() {value=2, dtype="i64"} : i64[]
    %shifted = add(%pos_row, %two) : i64[1, seq]"""


@pytest.mark.parametrize("body", [
    GPT2_TOKENS + SHIFTED + """
    %pe = embedding(%wpe, %shifted) : f32[1, seq, 8]""" + GPT2_REST + GPT2_ATTENTION + GPT2_OUTPUT,
    GPT2_TOKENS + SHIFTED + """
    %pe = embedding(%wpe, %pos_row) : f32[1, seq, 8]""" + GPT2_REST + """
    %inv_freq = weight() {name="inv_freq"} : f32[4]
    %xr = rope(%x, %shifted, %inv_freq) {rotary_dim=8} : f32[batch, 1, seq, 8]""" +
    GPT2_ATTENTION.replace("attention(%x, %x, %x)", "attention(%xr, %xr, %x)") + GPT2_OUTPUT,
], ids=["embedding", "rope"])
def test_positions_with_an_offset_are_refused_not_dropped(body):
    # OPT looks positions up at arange(seq) + 2: feeding the bare positions would silently shift every lookup
    weights = GPT2_WEIGHTS + """
  weight "inv_freq" : f32[4]"""
    module = parse_module(module_text(weights, function(FORWARD_SIGNATURE, body, "%logits")))
    with pytest.raises(ConfigError, match="cannot feed from the KV cache"):
        run_pass(PASS, module)


# refusals ----------------------------------------------------------------------------------------------------
def test_unfused_attention_is_refused_with_its_reason():
    reason = "%o = sdpa(%q, %k, %v) : f32[batch, 1, seq, 8]: attention without a mask is not causal"
    metadata = "metadata " + json.dumps({"kv_cache": PLAN, "unfused_attention": [reason]}, sort_keys=True)
    body = GPT2_TOKENS + SEQUENCE_POSITIONS + """
    %pe = embedding(%wpe, %pos_row) : f32[1, seq, 8]""" + GPT2_REST + """
    %a = sdpa(%x, %x, %x) : f32[batch, 1, seq, 8]""" + GPT2_OUTPUT
    module = parse_module(module_text(GPT2_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"), metadata))
    with pytest.raises(ConfigError) as err:
        run_pass(PASS, module)
    assert str(err.value).startswith(f"cannot insert a KV cache: 1 attention(s) stayed unfused: {reason}")
    assert set(module.functions) == {"forward"}


def test_missing_plan_is_refused():
    body = PROJECTIONS + SEQUENCE_POSITIONS + ROPE + ATTENTION + OUTPUT
    module = parse_module(module_text(ROPE_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"),
                                      metadata='metadata {"unfused_attention": []}'))
    with pytest.raises(ConfigError, match="needs plan_kv_cache to run first"):
        run_pass(PASS, module)


def test_without_forward_nothing_happens():
    module = parse_module(module_text(ROPE_WEIGHTS, function(
        PREFILL_SIGNATURE, PROJECTIONS + ROPE.replace("%pos_row", "%positions") + PAGED + OUTPUT, "%logits, %cache")))
    assert run_pass(PASS, module) is False


# paged attention over several calls against torch ------------------------------------------------------------
@pytest.mark.parametrize("chunks,window", [((5, 1, 1, 2), None), ((1,) * 7, None), ((4, 3, 1), 3), ((2, 6), 2)])
def test_paged_attention_over_calls_matches_torch_sdpa(chunks, window):
    heads, kv_heads, dim, page_size = 4, 2, 8, 3
    length = sum(chunks)
    rng = np.random.default_rng(length)
    q = rng.standard_normal((1, heads, length, dim)).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float32)
    cache = np.zeros((2, 2, 8, kv_heads, page_size, dim), np.float32)
    page_table = np.array([[6, 1, 4, 0]], np.int32)  # pages out of order, so the lookup is exercised
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "scale": 0.3, "window": window, "layer": 1}
    outputs, start = [], 0
    for n in chunks:
        positions = np.arange(start, start + n, dtype=np.int64)[None]
        out, cache = _paged_attention_ref([q[:, :, start:start + n], k[:, :, start:start + n],
                                           v[:, :, start:start + n], cache, page_table, positions], attrs)
        outputs.append(out)
        start += n
    got = np.concatenate(outputs, axis=2)
    assert not cache[0].any()  # layer 0 untouched
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = key <= query if window is None else (key <= query) & (query - key < window)
    ref = F.scaled_dot_product_attention(torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), attn_mask=mask,
                                         scale=0.3, enable_gqa=True)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
