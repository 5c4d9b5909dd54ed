"""DeepSeek's multi-head latent attention (MLA): latent_attention's and paged_latent_attention's numpy references
and the TVM lowering (two sequences in shuffled pages, ragged and decode kernels) against torch's attention over
the expanded per-head K/V (the up-projections applied, as transformers does); tiny
DeepSeek-V2 and V3 (odd widths: latent 26 = 20 + rope 6) captured and compiled for the reference and TVM backends
against transformers (prefill and every decode step within 1e-5 of the largest logit, greedy tokens identical);
the cache spec (one latent pool, (kv_lora_rank + rope) * 4 bytes per layer per token); `kiln inspect`'s line;
ONNX Runtime's and an unknown MLA variant's refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.frontend.capture import capture
from kiln.ir.errors import UnsupportedOpError
from kiln.ir.interpreter import run_function
from kiln.ir.kv_cache import KVCacheSpec
from kiln.ir.ops import OPS

from tiny_models import ENGINE_PROMPT, FP32_TOLERANCE, assert_engine_matches_transformers, relative_error

HEADS, NOPE, ROPE, VALUE, RANK = 3, 10, 6, 12, 20
_COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
               num_key_value_heads=HEADS, max_position_embeddings=128, kv_lora_rank=RANK, qk_rope_head_dim=ROPE,
               qk_nope_head_dim=NOPE, v_head_dim=VALUE, n_routed_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, first_k_dense_replace=1)
CONFIGS = {
    # V2: no query compression, complex (interleaved) rotary
    "deepseek_v2": lambda: transformers.DeepseekV2Config(q_lora_rank=None, **_COMMON),
    # V3: compressed query, grouped sigmoid routing, interleaved rotary
    "deepseek_v3": lambda: transformers.DeepseekV3Config(q_lora_rank=24, n_group=2, topk_group=1, **_COMMON),
    # V3 with yarn: DeepSeek's softmax scale gets the yarn mscale, the rotary its attention factor
    "deepseek_v3_yarn": lambda: transformers.DeepseekV3Config(
        q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5},
        **_COMMON),
}
# Router weights x4, as tests/test_moe.py does: transformers' std-0.02 routers put experts within 1e-4 of each
# other on a model this small, where kiln's last-ulp differences could pick another (equally valid) expert.
ROUTER_SCALE = 4.0
NEW_TOKENS = 10
_MODELS: dict = {}


def deepseek(name: str):
    if name not in _MODELS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("mlp.gate.weight"):
                    param.mul_(ROUTER_SCALE)
        _MODELS[name] = model
    return _MODELS[name]


# the ops' references against the expanded attention ---------------------------------------------------------
def _expanded_case(rng, length: int):
    """DeepSeek's per-token pieces and up-projections, and torch's attention over the expanded per-head K/V:
    K_h = [c @ W_UK_h.T, k_pe], V_h = c @ W_UV_h.T (what transformers' expand_kv builds). Returns
    (q' [H, s, L], latent [s, L], W_UV [H, VALUE, RANK], expected output [H, s, VALUE], scale)."""
    q_nope, q_pe = rng.standard_normal((HEADS, length, NOPE)), rng.standard_normal((HEADS, length, ROPE))
    c_kv, k_pe = rng.standard_normal((length, RANK)), rng.standard_normal((length, ROPE))
    w_uk, w_uv = rng.standard_normal((HEADS, NOPE, RANK)) * 0.3, rng.standard_normal((HEADS, VALUE, RANK)) * 0.3
    scale = (NOPE + ROPE) ** -0.5
    t = torch.from_numpy
    keys = torch.cat([t(c_kv) @ t(w_uk).transpose(1, 2), t(k_pe).expand(HEADS, -1, -1)], dim=-1)
    values = t(c_kv) @ t(w_uv).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(torch.cat([t(q_nope), t(q_pe)], dim=-1), keys, values,
                                                                is_causal=True, scale=scale).numpy()
    q_latent = np.concatenate([q_nope @ w_uk, q_pe], axis=-1).astype(np.float32)
    latent = np.concatenate([c_kv, k_pe], axis=-1).astype(np.float32)
    return q_latent, latent, w_uv, expected, scale


def _attrs(scale, **extra):
    return dict(num_heads=HEADS, scale=scale, value_dim=RANK, expanded_k_dim=NOPE + ROPE, expanded_v_dim=VALUE,
                **extra)


def test_latent_attention_reference_is_the_expanded_attention():
    q_latent, latent, w_uv, expected, scale = _expanded_case(np.random.default_rng(0), 9)
    out = OPS["latent_attention"].reference([q_latent[None], latent[None]], _attrs(scale))[0]
    assert out.shape == (1, HEADS, 9, RANK) and out.dtype == np.float32
    assert relative_error(out[0] @ w_uv.transpose(0, 2, 1), expected) <= FP32_TOLERANCE


PAGE_SIZE, PAGES = 4, 10


def _paged_case(seed: int, rows: list):
    """Two sequences in shuffled pages of 4 (sequence 0 of 8 tokens, sequence 1 of 6) and the new tokens ``rows``
    [(sequence, position)], each sequence's earlier tokens already in layer 1 of a two-layer pool. Returns
    (cases, the op's inputs, its attributes)."""
    rng = np.random.default_rng(seed)
    cases = [_expanded_case(rng, 8), _expanded_case(rng, 6)]
    table = np.array([[7, 2, 9], [4, 0, 5]], np.int32)
    pool = np.zeros((2, PAGES, PAGE_SIZE, RANK + ROPE), np.float32)
    for seq, (_, latent, *_) in enumerate(cases):
        for pos in range(min(p for s, p in rows if s == seq)):
            pool[1, table[seq, pos // PAGE_SIZE], pos % PAGE_SIZE] = latent[pos]
    q = np.stack([cases[seq][0][:, pos] for seq, pos in rows], axis=1)[None]
    new = np.stack([cases[seq][1][pos] for seq, pos in rows])[None]
    positions = np.array([[pos for _, pos in rows]], np.int64)
    token_seq = np.array([seq for seq, _ in rows], np.int32)
    return cases, [q, new, pool, table, positions, token_seq], _attrs(cases[0][4], layer=3, index=1)


def _check_paged(cases, rows, out, pool):
    """Each new token's output (V up-projection applied) is the expanded attention over its own sequence, and
    the pool's layer 1 holds its latent at its page and offset; layer 0 is untouched."""
    table = np.array([[7, 2, 9], [4, 0, 5]], np.int32)
    for row, (seq, pos) in enumerate(rows):
        _, latent, w_uv, expected, _ = cases[seq]
        got = np.einsum("hr,hvr->hv", out[0, :, row], w_uv)
        assert relative_error(got, expected[:, pos]) <= FP32_TOLERANCE, (seq, pos)
        np.testing.assert_array_equal(pool[1, table[seq, pos // PAGE_SIZE], pos % PAGE_SIZE], latent[pos])
    np.testing.assert_array_equal(pool[0], 0)


# sequence 0's last 3 tokens after 5 cached and sequence 1's first 6, interleaved; then one decode token each
RAGGED_ROWS = [(1, 0), (0, 5), (1, 1), (1, 2), (0, 6), (1, 3), (0, 7), (1, 4), (1, 5)]
DECODE_ROWS = [(0, 7), (1, 5)]


@pytest.mark.parametrize("rows", [RAGGED_ROWS, DECODE_ROWS], ids=["ragged", "decode"])
def test_paged_latent_attention_reference_writes_the_pool_and_attends_per_sequence(rows):
    cases, inputs, attrs = _paged_case(1, rows)
    out, pool = OPS["paged_latent_attention"].reference(inputs, attrs)
    _check_paged(cases, rows, out, pool)


@pytest.mark.parametrize("rows", [RAGGED_ROWS, DECODE_ROWS], ids=["ragged", "decode"])
def test_tvm_paged_latent_attention_matches_the_expanded_attention(rows):
    """The TVM CPU lowering (latent append, then the paged kernels with the latent pages as K and V) on the same
    batch: the ragged kernel in @step, the decode kernel in @step_decode (one token per sequence)."""
    pytest.importorskip("tvm")
    from kiln.backends.tvm import mla_lower  # noqa: F401  (registers the lowering)
    from kiln.backends.tvm.build import TVMFunction
    from kiln.ir.graph import Module
    from kiln.ir.symbolic import sym
    from kiln.ir.types import TensorType

    cases, inputs, attrs = _paged_case(2, rows)
    name = "step_decode" if rows is DECODE_ROWS else "step"
    module = Module()
    fn = module.add_function(name)
    tokens = sym("tokens")
    types = [("q", ("f32", (1, HEADS, tokens, RANK + ROPE))), ("latent", ("f32", (1, tokens, RANK + ROPE))),
             ("latent_cache_0", ("f32", inputs[2].shape)), ("page_table", ("i32", (sym("seqs"), 3))),
             ("positions", ("i64", (1, tokens))), ("token_seq", ("i32", (tokens,)))]
    params = [fn.add_param(param, TensorType(*t)) for param, t in types]
    fn.set_results(list(fn.add_node("paged_latent_attention", params, attrs).outputs))
    out, pool = TVMFunction.from_module(module, name)(*inputs)
    _check_paged(cases, rows, out, pool)


# capture ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_capture_maps_attention_to_latent_attention(name):
    """transformers' DeepSeek attention becomes one latent_attention per layer (no expanded K/V, no sdpa), and
    the captured forward computes transformers' logits."""
    model = deepseek(name)
    module = capture(model, max_seq=64)
    ops = [node.op for node in module.functions["forward"].nodes]
    assert ops.count("latent_attention") == 2 and "sdpa" not in ops
    ids = np.array([ENGINE_PROMPT])
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).logits.numpy()
    assert relative_error(run_function(module, "forward", [ids])[0], want) <= FP32_TOLERANCE


def test_capture_refuses_an_attention_its_absorbed_form_does_not_match():
    """A latent attention whose kv_b_proj has a bias (not DeepSeek's: the absorbed form drops it) is refused in
    one line naming the module, not captured wrong."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["deepseek_v2"]()).eval()
    proj = model.model.layers[1].self_attn.kv_b_proj
    proj.bias = torch.nn.Parameter(torch.randn(proj.out_features))
    with pytest.raises(UnsupportedOpError, match=r"^cannot capture the latent attention model\.layers\.1\.self_attn "
                                                 r"\(DeepseekV2Attention\): its absorbed form differs") as error:
        capture(model, max_seq=64)
    assert "\n" not in str(error.value)


# the cache and whole models -------------------------------------------------------------------------------
def _compile(name, backend, tmp_path):
    return kiln.compile(deepseek(name), backend=backend, max_seq_len=48, output=tmp_path / "model.kiln")


def test_cache_spec_keeps_one_latent_per_token(tmp_path):
    spec = KVCacheSpec.from_json(_compile("deepseek_v3", "reference", tmp_path).manifest["kv_cache"])
    config = CONFIGS["deepseek_v3"]()
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert [(g.kind, g.layers, g.latent_dim) for g in spec.groups] == [("latent", (0, 1), width)]
    assert spec.bytes_per_token == width * 4 * config.num_hidden_layers
    assert [(p.name, p.shape) for p in spec.pools()] == [("latent_cache_0", (2, spec.num_pages, spec.page_size,
                                                                             width))]


@pytest.mark.parametrize("backend", ["reference", "tvm", "onnxruntime"])
@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_tiny_deepseek_matches_transformers(tmp_path, backend, name):
    if backend == "tvm":
        pytest.importorskip("tvm")
    engine = kiln.load(_compile(name, backend, tmp_path))
    assert_engine_matches_transformers(engine, name, new_tokens=NEW_TOKENS, model=deepseek(name))


def test_yarn_deepseek_matches_transformers(tmp_path):
    model = deepseek("deepseek_v3_yarn")
    assert model.model.layers[0].self_attn.scaling != (NOPE + ROPE) ** -0.5  # the yarn mscale is in play
    engine = kiln.load(_compile("deepseek_v3_yarn", "reference", tmp_path))
    assert_engine_matches_transformers(engine, "deepseek_v3_yarn", new_tokens=NEW_TOKENS, model=model)


def test_inspect_shows_latent_bytes_against_multi_head_attention(tmp_path, capsys):
    from kiln.cli import main

    config = CONFIGS["deepseek_v3"]()
    artifact = _compile("deepseek_v3", "reference", tmp_path)
    assert main(["inspect", str(artifact.path)]) == 0
    layers = config.num_hidden_layers
    latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    # multi-head attention caches per layer and head K (nope + rope) and V
    mha = layers * HEADS * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * 4
    assert (f"latent attention (MLA): 2 layers cache one latent of 26 (20 + rope 6) per token, {latent:,} bytes per "
            f"token; multi-head attention with the same 3 heads (K 16 + V 12) would cache {mha:,} "
            f"({mha / latent:.1f}x)") in capsys.readouterr().out.splitlines()


def test_onnxruntime_keeps_one_shared_buffer_per_latent_layer(tmp_path):
    """GroupQueryAttention with one KV head over the latent (padded from 26 to GroupQueryAttention's multiple of 8):
    one buffer per layer, bound as both K and V."""
    backend = _compile("deepseek_v3", "onnxruntime", tmp_path).manifest["backend_info"]
    assert backend["kv_layers"] == [{"num_kv_heads": 1, "head_dim": 32, "dtype": "f32", "shared": True}] * 2
