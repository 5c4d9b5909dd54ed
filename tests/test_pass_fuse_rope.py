"""fuse_rope: golden IR for full rotary (bhsd from arange, bshd from position ids), partial rotary and a scaled
table; wrong rotations stay; the rewritten functions agree with the originals through the interpreter and the
rope reference agrees with transformers' own rotary embedding and apply_rotary_pos_emb.
"""

import numpy as np
import pytest
import torch

from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import _rope_ref
from kiln.ir.parser import parse_module
from kiln.ir.types import numpy_dtype

from golden import check_golden, check_unchanged

PASS = "fuse_rope"
# Expected IR keeps the nodes a fusion replaced: the pass only rewires their uses, eliminate_dead_code
# (next in the pipeline) removes them.


def inv_freq(rotary_dim: int) -> np.ndarray:
    return (1.0 / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(np.float32)


def tables(width: int, scaling: str = "") -> str:
    """cos/sin [1, 1, seq, width] from arange(seq) * inv_freq, as transformers' rotary embedding builds them."""
    half = width // 2
    text = f"""
    %inv_freq = weight() {{name="inv_freq"}} : f32[{half}]
    %pos = arange() {{end=seq}} : i64[seq]
    %pos3 = reshape(%pos) {{shape=[1, seq, 1]}} : i64[1, seq, 1]
    %posf = cast(%pos3) {{dtype="f32"}} : f32[1, seq, 1]
    %freqs = mul(%posf, %inv_freq) : f32[1, seq, {half}]
    %emb = concat(%freqs, %freqs) {{axis=2}} : f32[1, seq, {width}]
    %cos0 = cos(%emb) : f32[1, seq, {width}]
    %sin0 = sin(%emb) : f32[1, seq, {width}]"""
    if scaling:
        text += f"""
    %attention_scaling = constant() {{value={scaling}, dtype="f32"}} : f32[]
    %cos = mul(%cos0, %attention_scaling) : f32[1, seq, {width}]
    %sin = mul(%attention_scaling, %sin0) : f32[1, seq, {width}]"""
    else:
        text = text.replace("%cos0", "%cos").replace("%sin0", "%sin")
    return text + f"""
    %cos4 = reshape(%cos) {{shape=[1, 1, seq, {width}]}} : f32[1, 1, seq, {width}]
    %sin4 = reshape(%sin) {{shape=[1, 1, seq, {width}]}} : f32[1, 1, seq, {width}]"""


def rotary(x: str, width: int, out: str, shape: str = "batch, 4, seq", lo: str = "lo", hi: str = "hi") -> str:
    """out = x * cos + rotate_half(x) * sin; ``lo``/``hi`` name which half goes where (swap them to break it)."""
    half = width // 2
    ranges = {"lo": f"end={half}", "hi": f"start={half}, end={width}"}
    return f"""
    %{x}_lo = slice(%{x}) {{axis=3, {ranges[lo]}}} : f32[{shape}, {half}]
    %{x}_hi = slice(%{x}) {{axis=3, {ranges[hi]}}} : f32[{shape}, {half}]
    %{x}_neg = neg(%{x}_hi) : f32[{shape}, {half}]
    %{x}_rot = concat(%{x}_neg, %{x}_lo) {{axis=3}} : f32[{shape}, {width}]
    %{x}_cos = mul(%{x}, %cos4) : f32[{shape}, {width}]
    %{x}_sin = mul(%{x}_rot, %sin4) : f32[{shape}, {width}]
    %{out} = add(%{x}_cos, %{x}_sin) : f32[{shape}, {width}]"""


def module_text(params: str, body: str, ret: str, results: str, half: int = 8) -> str:
    return f"""
module {{
  weight "inv_freq" : f32[{half}]
  func @f({params}) -> ({results}) {{{body}
    return {ret}
  }}
}}
"""


X = "%x: f32[batch, 4, seq, 16]"
OUT = "f32[batch, 4, seq, 16]"
FRESH_POSITIONS = """
    %positions = reshape(%pos) {shape=[1, seq]} : i64[1, seq]"""


def check_same_results(before_text: str, after, weights: dict, sizes=((1, 1), (2, 5), (1, 9))) -> None:
    """The rewritten module computes what the original text computes (interpreter, random inputs)."""
    before = parse_module(before_text)
    rng = np.random.default_rng(0)
    for batch, seq in sizes:
        env = {"batch": batch, "seq": seq}
        inputs = []
        for p in before.functions["f"].params:
            shape = p.type.concrete(env)
            if p.type.dtype.startswith("i"):
                inputs.append(rng.integers(0, 4096, size=shape).astype(numpy_dtype(p.type.dtype)))
            else:
                inputs.append(rng.standard_normal(shape).astype(np.float32))
        for e, g in zip(run_function(before, "f", inputs, weights), run_function(after, "f", inputs, weights)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_full_rotary_with_tables_from_arange():
    weights = {"inv_freq": inv_freq(16)}
    body = tables(16) + rotary("x", 16, "o")
    before = module_text(X, body, "%o", OUT)
    expected = body.replace("    %o = add", FRESH_POSITIONS.strip("\n") + """
    %rope = rope(%x, %positions, %inv_freq) {rotary_dim=16} : f32[batch, 4, seq, 16]
    %o = add""")
    module = check_golden(PASS, before, module_text(X, expected, "%rope", OUT), weights=weights)
    check_same_results(before, module, weights)


def test_query_and_key_share_one_table():
    weights = {"inv_freq": inv_freq(16)}
    params = X + ", %k: f32[batch, 2, seq, 16]"
    results = OUT + ", f32[batch, 2, seq, 16]"
    body = tables(16) + rotary("x", 16, "qo") + rotary("k", 16, "ko", shape="batch, 2, seq")
    before = module_text(params, body, "%qo, %ko", results)
    expected = body.replace("    %qo = add", FRESH_POSITIONS.strip("\n") + """
    %q_rope = rope(%x, %positions, %inv_freq) {rotary_dim=16} : f32[batch, 4, seq, 16]
    %qo = add""").replace("    %ko = add", """\
    %k_positions = reshape(%pos) {shape=[1, seq]} : i64[1, seq]
    %k_rope = rope(%k, %k_positions, %inv_freq) {rotary_dim=16} : f32[batch, 2, seq, 16]
    %ko = add""")
    module = check_golden(PASS, before, module_text(params, expected, "%q_rope, %k_rope", results), weights=weights)
    check_same_results(before, module, weights)


def test_bshd_layout_with_int32_position_ids():
    # [batch, seq, heads, dim] with position ids handed in: seq_axis 1, the ids cast to i64
    weights = {"inv_freq": inv_freq(16)}
    params = "%x: f32[batch, seq, 4, 16], %position_ids: i32[batch, seq]"
    out = "f32[batch, seq, 4, 16]"
    body = """
    %inv_freq = weight() {name="inv_freq"} : f32[8]
    %pf = cast(%position_ids) {dtype="f32"} : f32[batch, seq]
    %p3 = reshape(%pf) {shape=[batch, seq, 1]} : f32[batch, seq, 1]
    %freqs = mul(%p3, %inv_freq) : f32[batch, seq, 8]
    %emb = concat(%freqs, %freqs) {axis=2} : f32[batch, seq, 16]
    %cos = cos(%emb) : f32[batch, seq, 16]
    %sin = sin(%emb) : f32[batch, seq, 16]
    %cos4 = reshape(%cos) {shape=[batch, seq, 1, 16]} : f32[batch, seq, 1, 16]
    %sin4 = reshape(%sin) {shape=[batch, seq, 1, 16]} : f32[batch, seq, 1, 16]""" + \
        rotary("x", 16, "o", shape="batch, seq, 4")
    before = module_text(params, body, "%o", out)
    expected = body.replace("    %o = add", """\
    %ids = cast(%position_ids) {dtype="i64"} : i64[batch, seq]
    %rope = rope(%x, %ids, %inv_freq) {rotary_dim=16, seq_axis=1} : f32[batch, seq, 4, 16]
    %o = add""")
    module = check_golden(PASS, before, module_text(params, expected, "%rope", out), weights=weights)
    check_same_results(before, module, weights)


def test_partial_rotary_becomes_one_rope_with_rotary_dim():
    # GPT-NeoX: rope on x[..., :8], x[..., 8:] passed through, concatenated back
    weights = {"inv_freq": inv_freq(8)}
    body = tables(8) + """
    %xr = slice(%x) {axis=3, end=8} : f32[batch, 4, seq, 8]
    %xp = slice(%x) {axis=3, start=8, end=16} : f32[batch, 4, seq, 8]""" + rotary("xr", 8, "ro") + """
    %o = concat(%ro, %xp) {axis=3} : f32[batch, 4, seq, 16]"""
    before = module_text(X, body, "%o", OUT, half=4)
    expected = body.replace("    %ro = add", FRESH_POSITIONS.strip("\n") + """
    %rope_part = rope(%xr, %positions, %inv_freq) {rotary_dim=8} : f32[batch, 4, seq, 8]
    %ro = add""").replace("    %o = concat", """\
    %rope = rope(%x, %positions, %inv_freq) {rotary_dim=8} : f32[batch, 4, seq, 16]
    %o = concat""").replace("concat(%ro, %xp)", "concat(%rope_part, %xp)")
    module = check_golden(PASS, before, module_text(X, expected, "%rope", OUT, half=4), weights=weights)
    check_same_results(before, module, weights)


def test_attention_scaling_of_the_tables_is_recorded():
    weights = {"inv_freq": inv_freq(16)}
    body = tables(16, scaling="0.75") + rotary("x", 16, "o")
    before = module_text(X, body, "%o", OUT)
    expected = body.replace("    %o = add", FRESH_POSITIONS.strip("\n") + """
    %rope = rope(%x, %positions, %inv_freq) {rotary_dim=16, scaling=0.75} : f32[batch, 4, seq, 16]
    %o = add""")
    module = check_golden(PASS, before, module_text(X, expected, "%rope", OUT), weights=weights)
    check_same_results(before, module, weights)


@pytest.mark.parametrize("body", [
    # rotate-half with the halves the wrong way round: concat(-x[..., :8], x[..., 8:])
    tables(16) + rotary("x", 16, "o", lo="hi", hi="lo"),
    # cos and sin swapped
    tables(16).replace("%cos4 = reshape(%cos)", "%cos4 = reshape(%sin)").replace("%sin4 = reshape(%sin)",
                                                                                   "%sin4 = reshape(%cos)")
    + rotary("x", 16, "o"),
    # the rotated half of another tensor
    tables(16) + rotary("x", 16, "o").replace("%x_rot = concat(%x_neg, %x_lo)", "%x_rot = concat(%x_neg, %x_neg)"),
], ids=["wrong_halves", "cos_sin_swapped", "other_tensor"])
def test_wrong_rotations_stay(body):
    check_unchanged(PASS, module_text(X, body, "%o", OUT))


def test_tables_from_a_runtime_frequency_stay():
    # inv_freq handed in at run time instead of a module weight: not a rotary table kiln can rebuild
    params = X + ", %freq: f32[8]"
    body = tables(16).replace('%inv_freq = weight() {name="inv_freq"} : f32[8]', "%inv_freq = neg(%freq) : f32[8]")
    check_unchanged(PASS, module_text(params, body + rotary("x", 16, "o"), "%o", OUT))


# the rope reference against transformers --------------------------------------------------------------------
@pytest.mark.parametrize("rope_parameters,seq_axis", [
    ({"rope_type": "default", "rope_theta": 10000.0}, 2),
    ({"rope_type": "default", "rope_theta": 500.0}, 1),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}, 2),
])
def test_rope_reference_matches_transformers(rope_parameters, seq_axis):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=128,
                         rope_parameters=rope_parameters)
    rotary_emb = LlamaRotaryEmbedding(config)
    rng = np.random.default_rng(0)
    positions = np.stack([np.arange(3, 10), rng.integers(0, 128, size=7)]).astype(np.int64)
    q = rng.standard_normal((2, 4, 7, 16) if seq_axis == 2 else (2, 7, 4, 16)).astype(np.float32)
    cos, sin = rotary_emb(torch.as_tensor(q), torch.as_tensor(positions))
    ref, _ = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(q), cos, sin,
                                  unsqueeze_dim=1 if seq_axis == 2 else 2)
    scaling = float(rotary_emb.attention_scaling)
    if rope_parameters["rope_type"] == "yarn":
        assert scaling != 1.0
    (got,) = _rope_ref([q, positions, rotary_emb.inv_freq.numpy()],
                       {"rotary_dim": 16, "seq_axis": seq_axis, "scaling": scaling})
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_partial_rope_reference_matches_transformers_gpt_neox():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=128)
    rotary_emb = GPTNeoXRotaryEmbedding(config)
    rng = np.random.default_rng(1)
    positions = np.arange(5, dtype=np.int64)[None]
    q = rng.standard_normal((2, 4, 5, 16)).astype(np.float32)
    cos, sin = rotary_emb(torch.as_tensor(q), torch.as_tensor(positions))
    assert cos.shape[-1] == 4
    ref, _ = apply_rotary_pos_emb(torch.as_tensor(q), torch.as_tensor(q), cos, sin)
    (got,) = _rope_ref([q, positions, rotary_emb.inv_freq.numpy()], {"rotary_dim": 4, "seq_axis": 2, "scaling": 1.0})
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
