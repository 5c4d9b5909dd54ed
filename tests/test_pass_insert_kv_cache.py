"""insert_kv_cache: golden IR for a one-layer forward (RoPE, GQA) and a GPT-2 style one (learned position
embeddings) turned into @step and @step_decode over the paged pools; ragged steps (several sequences, prefill chunks
beside decodes) through the cache give the forward's logits; paged_attention over several calls agrees with
torch's SDPA on the whole sequence; unfused attention is refused.
"""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.ir.errors import ConfigError
from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import _paged_attention_ref
from kiln.ir.parser import parse_module
from kiln.passes import run_pass

from golden import check_golden
from kv_harness import empty_pools, generate_logits, run_step, step_arrays

PASS = "insert_kv_cache"

# one layer, one KV head of 8 dims, pages of 4 tokens, 12 tokens a sequence -> 3 pages, 3 sequences -> 9 pages
SPEC = {"budget_bytes": None, "dtype": "f32", "max_num_seqs": 3, "max_seq_len": 12, "num_pages": 9, "page_size": 4,
        "groups": [{"kind": "kv", "layers": [0], "num_kv_heads": 1, "k_head_dim": 8, "v_head_dim": 8, "window": None}]}
METADATA = "metadata " + json.dumps({"kv_cache": SPEC, "unfused_attention": []}, sort_keys=True)
POOL = "f32[1, 9, 1, 4, 8]"

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
    %a, %kc, %vc = paged_attention(%qr, %kr, %v, %k_cache_0, %v_cache_0, %page_table, %pos_row, %token_seq) \
{{num_heads=2, num_kv_heads=1, scale=0.35355339059327373, layer=0, index=0}} : f32[batch, 2, seq, 8], {POOL}, {POOL}"""
SEQUENCE_POSITIONS = """
    %pos = arange() {end=seq} : i64[seq]
    %pos_row = reshape(%pos) {shape=[1, seq]} : i64[1, seq]"""

FORWARD_SIGNATURE = "func @forward(%input_ids: i64[batch, seq]) -> (f32[batch, seq, 32])"
STEP_SIGNATURE = (f"func @step(%token_ids: i64[seq], %positions: i64[seq], %token_seq: i32[seq], "
                  f"%page_table: i32[seqs, 3], %logit_rows: i64[rows], %k_cache_0: {POOL}, %v_cache_0: {POOL}) "
                  f"-> (f32[rows, VOCAB], {POOL}, {POOL})")
STEP_INPUTS = """
    %input_ids = reshape(%token_ids) {shape=[batch, seq]} : i64[batch, seq]
    %pos_row = reshape(%positions) {shape=[batch, seq]} : i64[batch, seq]"""


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


def split(body: str, vocab: int = 32) -> str:
    """Expected @step and @step_decode from a body written over [batch, seq]: the step runs one flat row (batch
    1, seq = tokens), selects the logit rows and returns them with the pools; @step_decode is the same with
    tokens = rows = decode_tokens."""
    tail = f"""
    %selected = select_rows(%logits, %logit_rows) : f32[batch, rows, {vocab}]
    %flat = reshape(%selected) {{shape=[rows, {vocab}]}} : f32[rows, {vocab}]"""
    step = function(STEP_SIGNATURE.replace("VOCAB", str(vocab)), STEP_INPUTS + body + tail, "%flat, %kc, %vc")
    step = re.sub(r"\bbatch\b", "1", re.sub(r"\bseq\b", "tokens", step))
    decode = re.sub(r"\b(tokens|rows)\]", "decode_tokens]", re.sub(r"\b(tokens|rows)([,\]])", r"decode_tokens\2",
                                                                   step.replace("@step", "@step_decode")))
    return step + "\n" + decode


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
    # RoPE reads the positions input, arange(seq) is gone, attention writes and reads the pools
    expected = module_text(ROPE_WEIGHTS, split(PROJECTIONS + ROPE + PAGED + OUTPUT))
    module = check_golden(PASS, before, expected)
    check_cache_reproduces_forward(before, module, random_weights(module))


def rope_step():
    """(forward text, the module after the pass with random weights, the weights) of the one-layer RoPE model."""
    body = PROJECTIONS + SEQUENCE_POSITIONS + ROPE + ATTENTION + OUTPUT
    before = module_text(ROPE_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"))
    module = parse_module(before)
    weights = random_weights(module)
    module.weight_data.update(weights)
    run_pass(PASS, module)
    return before, module, weights


def test_one_ragged_step_from_zero_gives_each_sequences_forward_logits():
    before, module, weights = rope_step()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 32, size=n) for n in (1, 5, 12)]
    chunks = [(slot, prompt, 0) for slot, prompt in enumerate(prompts)]
    logits, pools = run_step(module, empty_pools(module), chunks, logits="all")
    _, _, _, table, _ = step_arrays(module, chunks)
    row = 0
    for slot, prompt in enumerate(prompts):
        (expected,) = run_function(parse_module(before), "forward", [prompt[None]], weights)
        np.testing.assert_allclose(logits[row:row + len(prompt)], expected[0], rtol=1e-5, atol=1e-5)
        row += len(prompt)
        # the V projection of each token sits at its page and offset (V needs no RoPE: plain numpy)
        v = weights["embed"][prompt] @ weights["wv"].T
        for t in range(len(prompt)):
            np.testing.assert_allclose(pools["v_cache_0"][0, table[slot, t // 4], 0, t % 4], v[t], rtol=1e-5,
                                       atol=1e-6)


def test_prefill_chunks_beside_decodes_give_the_forward_logits():
    """One step holds the second chunk of one prompt, the first chunk of another and a decode of a third."""
    before, module, weights = rope_step()
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 32, size=n) for n in (10, 7, 4))
    pools = empty_pools(module)
    _, pools = run_step(module, pools, [(0, a[:6], 0), (2, c[:3], 0)])
    logits, pools = run_step(module, pools, [(0, a[6:], 6), (1, b[:5], 0), (2, c[3:], 3)], logits="all")
    expected = [run_function(parse_module(before), "forward", [x[None]], weights)[0][0] for x in (a, b, c)]
    np.testing.assert_allclose(logits[:4], expected[0][6:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[4:9], expected[1][:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[9:], expected[2][3:], rtol=1e-5, atol=1e-5)


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
    %a, %kc, %vc = paged_attention(%x, %x, %x, %k_cache_0, %v_cache_0, %page_table, %pos_row, %token_seq) \
{{num_heads=1, num_kv_heads=1, scale=0.35355339059327373, layer=0, index=0}} : f32[batch, 1, seq, 8], {POOL}, {POOL}"""
GPT2_OUTPUT = """
    %a1 = permute(%a) {perm=[0, 2, 1, 3]} : f32[batch, seq, 1, 8]
    %a2 = reshape(%a1) {shape=[batch, seq, 8]} : f32[batch, seq, 8]
    %logits = linear(%a2, %wte) : f32[batch, seq, 32]"""


def test_learned_position_embeddings_read_the_positions_input():
    body = GPT2_TOKENS + SEQUENCE_POSITIONS + """
    %pe = embedding(%wpe, %pos_row) : f32[1, seq, 8]""" + GPT2_REST + GPT2_ATTENTION + GPT2_OUTPUT
    before = module_text(GPT2_WEIGHTS, function(FORWARD_SIGNATURE, body, "%logits"))
    expected = module_text(GPT2_WEIGHTS, split(GPT2_TOKENS + """
    %pe = embedding(%wpe, %pos_row) : f32[batch, seq, 8]""" + GPT2_REST + GPT2_PAGED + GPT2_OUTPUT))
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
    %pe = embedding(%wpe, %pos_row) : f32[batch, seq, 8]""" + token_type + rest + GPT2_PAGED + GPT2_OUTPUT))
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
    metadata = "metadata " + json.dumps({"kv_cache": SPEC, "unfused_attention": [reason]}, sort_keys=True)
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
    module = parse_module(module_text(ROPE_WEIGHTS, split(PROJECTIONS + ROPE + PAGED + OUTPUT)))
    assert run_pass(PASS, module) is False


# paged attention over several calls against torch ------------------------------------------------------------
def paged(q, k, v, pools, page_table, positions, token_seq, attrs):
    out, k_pool, v_pool = _paged_attention_ref([q, k, v, *pools, page_table, positions[None], token_seq], attrs)
    return out, (k_pool, v_pool)


def sdpa_reference(q, k, v, window, scale=0.3):
    length = q.shape[2]
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = key <= query if window is None else (key <= query) & (query - key < window)
    return F.scaled_dot_product_attention(torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v), attn_mask=mask,
                                          scale=scale, enable_gqa=True).numpy()


@pytest.mark.parametrize("chunks,window", [((5, 1, 1, 2), None), ((1,) * 7, None), ((4, 3, 1), 3), ((2, 6), 2)])
def test_paged_attention_over_calls_matches_torch_sdpa(chunks, window):
    heads, kv_heads, dim, page_size = 4, 2, 8, 3
    length = sum(chunks)
    rng = np.random.default_rng(length)
    q = rng.standard_normal((1, heads, length, dim)).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float32)
    pools = tuple(np.zeros((2, 8, kv_heads, page_size, dim), np.float32) for _ in range(2))
    page_table = np.array([[6, 1, 4, 0]], np.int32)  # pages out of order, so the lookup is exercised
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "scale": 0.3, "window": window, "layer": 3, "index": 1}
    outputs, start = [], 0
    for n in chunks:
        positions = np.arange(start, start + n, dtype=np.int64)
        out, pools = paged(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n], pools,
                           page_table, positions, np.zeros(n, np.int32), attrs)
        outputs.append(out)
        start += n
    got = np.concatenate(outputs, axis=2)
    assert not pools[0][0].any() and not pools[1][0].any()  # index 0 of the pools untouched
    np.testing.assert_allclose(got, sdpa_reference(q, k, v, window), rtol=1e-5, atol=1e-6)


def test_paged_attention_of_interleaved_sequences_matches_torch_sdpa_per_sequence():
    """One call over tokens of two sequences, interleaved, each after a cached prefix of its own."""
    heads, kv_heads, dim, page_size = 4, 1, 8, 2
    rng = np.random.default_rng(7)
    lengths, cached = (7, 5), (3, 4)
    qkv = [[rng.standard_normal((1, h, n, dim)).astype(np.float32) for h in (heads, kv_heads, kv_heads)]
           for n in lengths]
    pools = tuple(np.zeros((1, 10, kv_heads, page_size, dim), np.float32) for _ in range(2))
    page_table = np.array([[9, 2, 5, 0], [1, 8, 3, 0]], np.int32)
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "scale": 0.3, "window": None, "layer": 0, "index": 0}
    for s in range(2):  # the cached prefixes
        n = cached[s]
        _, pools = paged(*(x[:, :, :n] for x in qkv[s]), pools, page_table[s:s + 1], np.arange(n),
                         np.zeros(n, np.int32), attrs)
    order = [(0, 3), (1, 4), (0, 4), (0, 5), (0, 6)]  # (sequence, position) of each new token
    take = [[qkv[s][i][:, :, [p]] for s, p in order] for i in range(3)]
    out, pools = paged(*(np.concatenate(t, axis=2) for t in take), pools, page_table,
                       np.array([p for _, p in order]), np.array([s for s, _ in order], np.int32), attrs)
    for s in range(2):
        ref = sdpa_reference(*qkv[s], None)
        for t, (seq, p) in enumerate(order):
            if seq == s:
                np.testing.assert_allclose(out[0, :, t], ref[0, :, p], rtol=1e-5, atol=1e-6)
