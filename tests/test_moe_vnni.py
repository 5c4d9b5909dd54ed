"""moe_experts_q {activations=int8} on a VNNI CPU: the expert kernel (backends/tvm/moe_lower.py, vpdpbusd over the
selected experts' repacked blocks) and the op's lowering against a numpy statement of the IR's semantics written
here, the kernel's assembly, a CPU without VNNI, and tiny Mixtral / Qwen3-MoE / Qwen2-MoE compiled with int4 and
int8 activations against the numpy interpreter of their own module.

The numpy statement: each input row of a matmul rounded per block of 32 (v = x * (127 / max|block|) in f32,
xq = rint(v) clipped to +-127, read as xq * max|block| / 127), times each selected expert's weight dequantized from
its stored integers, scales and offsets.

Comparing whole models across two implementations of int8 activations needs care: an element whose v lies within
the implementations' float noise (a few f32 ulps) of a rounding midpoint may round one int8 step apart, moving the
logits by about 1e-3 of the largest. Tiny random models make that common: transformers initializes RMSNorm weights
to 1, so the first layer's rows are the int8 embedding's integers times one factor, and an entry half its block's
largest lands on v = 63.5 exactly (what put the int4 Qwen2-MoE 3e-3 away from the interpreter, see
test_qwen2_moe_gap_was_one_exact_int8_tie). The model tests here therefore draw their norm weights, and check the
run's rounding and routing margins before comparing at 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

tvm = pytest.importorskip("tvm")

import kiln  # noqa: E402
from kiln.backends.tvm import int8_kernels, moe_lower  # noqa: E402
from kiln.backends.tvm.build import TVMFunction  # noqa: E402
from kiln.backends.tvm.lower import cpu_target, lower_function  # noqa: E402
from kiln.ir import moe_ops, quant_ops  # noqa: E402
from kiln.ir.symbolic import sym  # noqa: E402

from test_moe import seeded_moe_model  # noqa: E402
from test_moe_quant import _module as moe_quant_module  # noqa: E402
from tiny_models import ENGINE_PROMPT, FP32_TOLERANCE, relative_error  # noqa: E402

HOST = cpu_target()
VNNI = int8_kernels.has_vnni(HOST)
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX512-VNNI (the expert kernel's own checks)")
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})  # AVX2: the path a CPU without VNNI takes
TOKENS = sym("tokens")


# the numpy statement ----------------------------------------------------------------------------------------------
def int8_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x [m, K] as a matmul with int8 activations reads them (float64)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    safe = np.where(amax > 0, amax, np.float32(1))
    v = blocks * np.where(amax > 0, np.float32(127) / safe, np.float32(0))
    xq = np.clip(np.rint(v), -127, 127)
    return (xq.astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(x.shape)


def random_stack(rng, fmt, experts, n, k):
    """(arrays as moe_experts_q stores them, float64 weights [E, N, K]) drawn from integers: fmt = (bits, group,
    offsets, scale dtype)."""
    bits, group, offsets, dtype = fmt
    scale_shape = (experts, n) if group == 0 else (experts, n, k // group)
    scale = rng.uniform(0.002, 0.02, scale_shape).astype(dtype)
    per_element = (np.repeat(scale.astype(np.float64), group, axis=2) if group
                   else np.repeat(scale.astype(np.float64)[..., None], k, axis=2))
    if bits == 8:
        q = rng.integers(-127, 128, (experts, n, k)).astype(np.int8)
        return [q, scale], q * per_element
    nibbles = rng.integers(0, 16, (experts, n, k)).astype(np.uint32)
    words = (nibbles.reshape(experts, n, k // 8, 8) << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)
    if not offsets:
        return [words, scale], (nibbles - 8.0) * per_element
    offset = rng.uniform(-0.1, 0.0, scale_shape).astype(dtype)
    return [words, scale, offset], nibbles * per_element + np.repeat(offset.astype(np.float64), group, axis=2)


def numpy_experts(x, weights, ids, gate_up, down, poisoned=()):
    """sum_j weights[t, j] * down_e(silu(gate_e x) * up_e x) with int8 rows before each matmul, e = ids[t, j]."""
    inter = gate_up.shape[1] // 2
    out = np.zeros(x.shape, np.float64)
    rows = int8_rows(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            assert e not in poisoned
            gu = (gate_up[e] @ rows[t]).astype(np.float32)
            hidden = (gu[:inter] / (1 + np.exp(-gu[:inter].astype(np.float64))) * gu[inter:]).astype(np.float32)
            out[t] += float(weights[t, j]) * (down[e] @ int8_rows(hidden[None])[0]).astype(np.float32)
    return out


F16, F32 = np.float16, np.float32
INT4, Q4_0, Q4_G128 = (4, 32, True, F16), (4, 32, False, F16), (4, 128, True, F32)
Q8_0, INT8_ROW = (8, 32, False, F16), (8, 0, False, F32)
Q4_K, Q6_K, INT4_G16, INT8_G8 = (4, 32, True, F32), (8, 16, False, F32), (4, 16, True, F16), (8, 8, False, F16)
FORMATS = {  # gate_up, down: kiln's int4 (groups of 32 with f16 offsets), GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0 blocks
    # (Q5_0 arrives as int8 groups of 32), kiln's int8 per row, wide groups, two formats in one op, a Q4_K_M layer
    # (Q4_K gate_up, Q6_K down: int8 groups of 16), and int4 / int8 groups of 16 / 8
    "int4": (INT4, INT4), "q4_0": (Q4_0, Q4_0), "q8_0": (Q8_0, Q8_0), "int8": (INT8_ROW, INT8_ROW),
    "int4-g128": (Q4_G128, Q4_G128), "int4+q8_0": (INT4, Q8_0), "q4_k_m": (Q4_K, Q6_K),
    "int4-g16+int8-g8": (INT4_G16, INT8_G8),
}
EXPERTS, HIDDEN, INTER, TOP_K = 6, 128, 256, 2


def _case(name, tokens, seed):
    rng = np.random.default_rng(seed)
    gate_up_fmt, down_fmt = FORMATS[name]
    gate_up, gate_up_w = random_stack(rng, gate_up_fmt, EXPERTS, 2 * INTER, HIDDEN)
    down, down_w = random_stack(rng, down_fmt, EXPERTS, HIDDEN, INTER)
    x = rng.normal(0, 1, (tokens, HIDDEN)).astype(np.float32)
    weights = rng.uniform(0.1, 1, (tokens, TOP_K)).astype(np.float32)
    ids = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(tokens)]).astype(np.int64)
    attrs = dict(activation="silu", activations="int8")
    for stack, fmt in (("gate_up", gate_up_fmt), ("down", down_fmt)):
        attrs.update({f"{stack}_bits": fmt[0], f"{stack}_group_size": fmt[1], f"{stack}_offset": fmt[2]})
    return dict(x=x, weights=weights, ids=ids, gate_up=gate_up, down=down, gate_up_w=gate_up_w, down_w=down_w,
                attrs=attrs)


def _poison(arrays, experts):
    """The stack's arrays with the scales of ``experts`` NaN: a kernel that read those experts would give NaN."""
    arrays = [a.copy() for a in arrays]
    arrays[1][list(experts)] = np.nan
    return arrays


def _module(case, unused=()):
    """The op over the case's stacks, with the scales and offsets of the ``unused`` experts NaN: a kernel that read
    those experts would give NaN (test_moe_quant's module builder at this file's sizes)."""
    return moe_quant_module(case, unused, hidden=HIDDEN, top_k=TOP_K)


def _compile_kernel(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)


# the expert kernel ------------------------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("per_slot", [False, True], ids=["rows-per-token", "rows-per-slot"])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("fmt", [INT4, Q4_0, Q4_G128, Q8_0, INT8_ROW, Q6_K, INT4_G16, INT8_G8],
                         ids=["int4", "q4_0", "int4-g128", "q8_0", "int8-per-row", "q6_k", "int4-g16", "int8-g8"])
def test_expert_kernel_matches_numpy(fmt, tokens, per_slot):
    """quantize_rows then the expert kernel, for random weights and ids: row r = (token r // k, slot r % k) is
    int8_rows(x's row) @ W[ids[r // k, r % k]].T within 1e-5 of the largest output; with one token the scales
    of every expert it did not select are NaN."""
    rng = np.random.default_rng(tokens * 2 + per_slot)
    n, k = 64, 128
    arrays, w = random_stack(rng, fmt, EXPERTS, n, k)
    ids = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(tokens)]).astype(np.int64)
    unused = sorted(set(range(EXPERTS)) - set(ids.flatten().tolist())) if tokens == 1 else []
    packed = moe_lower.repack_stack(fmt[0], fmt[1], *_poison(arrays, unused), *([None] * (3 - len(arrays))))
    x = rng.normal(0, 1, (tokens * TOP_K if per_slot else tokens, k)).astype(np.float32)

    small_group = 0 < fmt[1] < 32  # its kernel takes the per-8 sums of xq
    quantize = _compile_kernel(int8_kernels.quantize_rows_func(k, False, small_group))["main"]
    kernel = _compile_kernel(moe_lower.expert_matmul_func(EXPERTS, TOP_K, n, k, fmt[0], fmt[1],
                                                          "f16" if fmt[3] is F16 else "f32", fmt[2], per_slot,
                                                          "int64"))["main"]
    sums = np.zeros((len(x), k // 8), np.int32) if small_group else np.zeros((len(x), k // 32), np.float32)
    parts = [tvm.runtime.tensor(a) for a in (x, np.zeros(x.shape, np.int8), np.zeros((len(x), k // 32), np.float32),
                                             sums)]
    quantize(*parts)
    weights = [tvm.runtime.tensor(a) for a in packed + ([packed[1]] if len(packed) == 2 else [])]
    y = tvm.runtime.tensor(np.zeros((tokens * TOP_K, n), np.float32))
    kernel(tvm.runtime.tensor(ids), *parts[1:], *weights, y)

    rows = int8_rows(x)
    want = np.stack([w[ids[r // TOP_K, r % TOP_K]] @ rows[r if per_slot else r // TOP_K]
                     for r in range(tokens * TOP_K)])
    got = y.numpy()
    assert np.isfinite(got).all()
    assert relative_error(got, want) <= FP32_TOLERANCE


@needs_vnni
@pytest.mark.parametrize("bits, group", [(4, 32), (8, 16)])
def test_expert_kernel_assembly_has_vpdpbusd(bits, group):
    func = moe_lower.expert_matmul_func(EXPERTS, TOP_K, 64, 128, bits, group, "f16", bits == 4, False, "int64")
    assert "vpdpbusd" in _compile_kernel(func).mod.inspect_source("asm")


@needs_vnni
def test_repacked_stack_is_each_expert_repacked():
    """repack_stack's arrays, expert e's groups of rows at e * N / 4: each expert's slice is int8_kernels.repack
    of that expert's weight alone (so the kernel's indexing reads the right expert)."""
    rng = np.random.default_rng(3)
    for fmt in (INT4, Q8_0, INT8_ROW, Q6_K):
        arrays, _ = random_stack(rng, fmt, EXPERTS, 16, 64)
        stacked = moe_lower.repack_stack(fmt[0], fmt[1], *arrays, *([None] * (3 - len(arrays))))
        for e in range(EXPERTS):
            alone = int8_kernels.repack(fmt[0], fmt[1], *[a[e] for a in arrays], *([None] * (3 - len(arrays))))
            for got, want in zip(stacked, alone):
                np.testing.assert_array_equal(got[e * 4:(e + 1) * 4], want)


# the op's lowering ------------------------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("tokens", [1, 7], ids=["decode", "prefill"])
@pytest.mark.parametrize("name", FORMATS)
def test_lowered_experts_match_numpy_on_vnni(name, tokens):
    """moe_experts_q {activations=int8} lowered for this CPU: both stacks repacked (derived weights, the originals
    no parameter), the result within 1e-5 of the numpy statement; a decode step reads only its experts."""
    case = _case(name, tokens, seed=tokens)
    unused = sorted(set(range(EXPERTS)) - set(case["ids"].flatten().tolist())) if tokens == 1 else []
    module = _module(case, unused)
    derived: dict = {}
    lowered = lower_function(module, "f", HOST, derived)
    assert sorted(derived) == sorted(f"{stack}.0{suffix}" for stack in ("gate_up", "down")
                                     for suffix in moe_lower.VNNI_SUFFIXES[:len(case[stack])])
    kernels = {gv.name_hint for gv in lowered.functions}
    assert {"moe_gate_up_vnni", "moe_down_vnni"} <= kernels
    got = TVMFunction.from_module(module, "f")(case["x"], case["weights"], case["ids"])[0]
    want = numpy_experts(case["x"], case["weights"], case["ids"], case["gate_up_w"], case["down_w"], unused)
    assert np.isfinite(got).all()
    assert relative_error(got, want) <= FP32_TOLERANCE


def test_cpu_without_vnni_keeps_float_kernels_on_the_same_rows():
    """For an AVX2 target nothing is repacked and the float kernels multiply the same int8 rows (this CPU runs
    AVX2 code too): within 1e-5 of the numpy statement."""
    case = _case("int4+q8_0", tokens=3, seed=11)
    module = _module(case)
    derived: dict = {}
    lowered = lower_function(module, "f", NO_VNNI, derived)
    assert derived == {}
    assert not {"moe_gate_up_vnni", "moe_down_vnni"} & {gv.name_hint for gv in lowered.functions}
    got = TVMFunction.from_module(module, "f", target=NO_VNNI)(case["x"], case["weights"], case["ids"])[0]
    want = numpy_experts(case["x"], case["weights"], case["ids"], case["gate_up_w"], case["down_w"])
    assert relative_error(got, want) <= FP32_TOLERANCE


# whole models against the interpreter of their own module ---------------------------------------------------------
# The smallest distance of an int8-rounded activation from a rounding midpoint, relative to |v|, for the comparison
# at 1e-5 to be sound: about 8 f32 ulps (the compiled and interpreted activations differ by a few ulps).
MIN_ROUNDING_GAP = 1e-6
MIN_ROUTING_GAP = 1e-4  # as test_moe: no near-tie between a chosen expert and the best unchosen one
NEW_TOKENS = 6
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128)
# Expert widths multiples of 32, so that int4 groups fit both stacks and both take int8 activations (the Mixtral
# and Qwen2-MoE of test_moe_quant; a Qwen3-MoE with 32-wide experts).
ARCHS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=5,
                                         num_experts_per_tok=3, norm_topk_prob=True, head_dim=16)),
}


def tiny_model(arch: str, drawn_norms: bool):
    """A tiny random ``arch`` (test_moe's seeded draw), with its RMSNorm weights drawn in [0.5, 1.5] instead of
    transformers' ones when ``drawn_norms``."""
    cls_name, overrides = ARCHS[arch]
    model = seeded_moe_model(getattr(transformers, cls_name)(**_COMMON, **overrides))
    if drawn_norms:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model


def interpreted_run(monkeypatch, engine, prompt, new_tokens: int = NEW_TOKENS) -> dict:
    """The interpreter's prefill logits and greedy run, and its margins: the smallest relative distance of an
    int8-rounded activation from a midpoint, and the smallest routing gap (softmax routers)."""
    rounding, routing = [], []
    quantize, route = quant_ops.quantize_activations, moe_ops.route

    def recording_quantize(x):
        blocks = x.astype(np.float32).reshape(-1, x.shape[-1] // 32, 32)
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        v = (blocks * np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)).astype(np.float64)
        rounding.append(float((np.abs(np.abs(v - np.floor(v)) - 0.5) / np.maximum(np.abs(v), 1)).min()))
        return quantize(x)

    def recording_route(logits, *args, **attrs):
        top = np.sort(moe_ops._softmax(logits.astype(np.float64)), axis=-1)[:, ::-1]
        routing.append(float((top[:, attrs["top_k"] - 1] - top[:, attrs["top_k"]]).min()))
        return route(logits, *args, **attrs)

    with monkeypatch.context() as patch:
        patch.setattr(quant_ops, "quantize_activations", recording_quantize)
        patch.setattr(moe_ops, "quantize_activations", recording_quantize)
        patch.setattr(moe_ops, "route", recording_route)
        logits = engine.logits(prompt)
        result = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, return_logits=True)
    return dict(logits=logits, result=result, rounding_gap=min(rounding), routing_gap=min(routing))


def _engines(model, tmp_path):
    from kiln.backends.reference.executor import load_executor

    artifact = kiln.compile(model, backend="tvm", quantize="int4", activations="int8", max_seq_len=48,
                            output=tmp_path / "model.kiln")
    compiled, interpreted = kiln.load(artifact), kiln.load(artifact)
    interpreted.executor = load_executor(interpreted.info)
    return artifact, compiled, interpreted


def _prompt_with_margins(monkeypatch, interpreted, vocab: int):
    """The first of ENGINE_PROMPT and seven drawn prompts whose interpreted run keeps both margins, with its run."""
    rng = np.random.default_rng(0)
    candidates = [ENGINE_PROMPT] + [rng.integers(1, vocab, len(ENGINE_PROMPT)).tolist() for _ in range(7)]
    for prompt in candidates:
        run = interpreted_run(monkeypatch, interpreted, prompt)
        if run["rounding_gap"] >= MIN_ROUNDING_GAP and run["routing_gap"] >= MIN_ROUTING_GAP:
            return prompt, run
    raise AssertionError(f"no prompt of {len(candidates)} keeps every int8 activation {MIN_ROUNDING_GAP} from a "
                         f"rounding midpoint and the routing {MIN_ROUTING_GAP} from a tie; draw other prompts")


@needs_vnni
# about 10 s each: Qwen3-MoE by default, Mixtral and Qwen2-MoE (shared expert) with -m slow
@pytest.mark.parametrize("arch", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen3_moe",
                                  pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_int4_int8_activation_models_match_the_interpreter(monkeypatch, tmp_path, arch):
    """quantize=int4, activations=int8 on this CPU: both layers' experts run the expert kernel (their stacks are
    derived weights); on a prompt whose run keeps the margins, the prefill logits and every decode step within
    1e-5 of the numpy interpreter of the artifact's own module, greedy tokens identical. Qwen2-MoE adds the
    shared expert, whose gate_up, sigmoid gate and the router are one merged linear_q (133 rows: float kernels on
    the int8 rows) beside the expert kernel."""
    model = tiny_model(arch, drawn_norms=True)
    artifact, compiled, interpreted = _engines(model, tmp_path)
    assert interpreted.executor.module.metadata["activations_quantized"]["moe_experts_q"] == 2
    derived = set(artifact.manifest["backend_info"]["derived_weights"])
    for layer in range(2):
        for stack in ("gate_up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{stack}.qweight.vnni_q" in derived
    prompt, run = _prompt_with_margins(monkeypatch, interpreted, model.config.vocab_size)
    assert relative_error(compiled.logits(prompt), run["logits"]) <= FP32_TOLERANCE
    ours = compiled.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
    assert ours.token_ids == run["result"].token_ids
    assert relative_error(ours.logits, run["result"].logits) <= FP32_TOLERANCE


@pytest.mark.slow  # about 9 s
def test_qwen2_moe_gap_was_one_exact_int8_tie(monkeypatch, tmp_path):
    """The int4 Qwen2-MoE of test_moe_quant (RMSNorm weights 1) with int8 activations came out 3e-3 from the
    interpreter from prompt position 3 on. The cause is one activation on a rounding midpoint: position 3's
    first-layer row is an int8 embedding row times one factor, and an entry exactly half its block's largest gives
    v = -63.5 in numpy (rint: -64), while TVM's RMSNorm, a few ulps from numpy's, gives -63.499996 (-63). With
    that one element rounded either way, the interpreter's prefill logits are TVM's within 1e-5 at every position,
    so no kernel computes anything else; the two roundings alone are 1e-3 apart."""
    artifact, compiled, interpreted = _engines(tiny_model("qwen2_moe", drawn_norms=False), tmp_path)
    quantize = quant_ops.quantize_activations
    ties = []

    def rounding_ties(direction):
        def quantize_ties(x):
            blocks = x.astype(np.float32).reshape(x.shape[:-1] + (-1, 32))
            amax = np.abs(blocks).max(axis=-1, keepdims=True)
            v = blocks * np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
            tie = np.abs(v - np.floor(v)) == 0.5
            ties.append((int(tie.sum()), v[tie].tolist(), (2 * blocks[tie] == np.broadcast_to(amax, v.shape)[tie]
                                                            * np.sign(blocks[tie])).tolist()))
            xq, scale = quantize(x)
            if direction == "toward zero":
                xq = np.where(tie.reshape(x.shape), np.trunc(v).reshape(x.shape), xq).astype(np.int8)
            return xq, scale
        return quantize_ties

    logits = {}
    for direction in ("numpy", "toward zero"):
        ties.clear()
        with monkeypatch.context() as patch:
            patch.setattr(quant_ops, "quantize_activations", rounding_ties(direction))
            logits[direction] = interpreted.logits(ENGINE_PROMPT)
        assert [t for t in ties if t[0]] == [(1, [-63.5], [True])]  # one tie: an entry half its block's largest
    ours = compiled.logits(ENGINE_PROMPT)
    assert relative_error(logits["numpy"], logits["toward zero"]) > 1e-3
    assert min(relative_error(ours, logits[d]) for d in logits) <= FP32_TOLERANCE
