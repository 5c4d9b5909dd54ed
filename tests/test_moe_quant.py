"""Quantized mixture-of-experts: ``moe_experts_q`` (experts' stacked weights in linear_q's int8 / int4 formats with
a leading experts axis, or kept float) against a torch dequantize-then-compute written here; the TVM and ONNX
Runtime kernels against the op's numpy reference (with every expert no token selected poisoned, so a kernel that
read them would give NaN); quantize_weights on captured MoE models against a torch round-to-nearest quantizer;
tiny Mixtral / Qwen2-MoE / Qwen3-MoE compiled with int8 and int4 against transformers holding the same
quantized-then-dequantized weights (1e-5 of the largest logit, greedy tokens identical) and against the fp32
model (top-1 agreement); `kiln inspect`'s expert bytes; and a GGUF MoE file made by llama.cpp's quantizer, whose
expert blocks are kept, against transformers' own GGUF loader (the gguf package's dequantizer) and llama.cpp.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.frontend.capture import capture
from kiln.ir.errors import VerificationError
from kiln.ir.graph import Module
from kiln.ir.moe_ops import experts_q
from kiln.ir.ops import infer_types
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.passes import PassOptions, run_pass

from test_moe import routing_gap, seeded_moe_model
from test_quantize import DTYPES, pack_nibbles, torch_dequantize, torch_quantize
from tiny_models import ENGINE_PROMPT, FP32_TOLERANCE, assert_engine_matches_transformers, relative_error

HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 6, 2
TOKENS = sym("tokens")


# independent reference: the experts in torch float64 over dequantized weights ------------------------------------
def torch_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 along its last axis and back (the documented int8 activations)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    xq = torch.round(blocks * inverse).clamp(-127, 127)
    return (xq.double() * (amax / 127).double()).reshape(x.shape)


def torch_experts(x, weights, ids, gate_up, down, int8_rows: bool) -> np.ndarray:
    """sum_j weights[t, j] * down_e(silu(gate_e x) * up_e x), e = ids[t, j], in float64 (f32 between stages)."""
    x = torch.as_tensor(x)
    rows = torch_int8_rows if int8_rows else (lambda v: v.double())
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = (gate_up[e] @ rows(x[t])).float()
            hidden = (torch.nn.functional.silu(gu[:inter].double()) * gu[inter:].double()).float()
            out[t] += float(weights[t, j]) * (down[e] @ rows(hidden)).float().double()
    return out.float().numpy()


# stacks in each format, drawn independently of kiln's quantizer -------------------------------------------------
def _stack(rng, fmt, experts, rows, k):
    """(arrays, float64 dequantized [E, rows, k]) of a random stack in ``fmt`` = (bits, group, offsets, dtype)."""
    bits, group, offsets, dtype = fmt
    if bits == 0:
        w = rng.normal(0, 0.2, (experts, rows, k)).astype(np.float32)
        return [w], torch.as_tensor(w).double()
    groups = (experts, rows) if group == 0 else (experts, rows, k // group)
    scale = rng.uniform(0.002, 0.02, groups).astype(dtype)
    if bits == 8:
        q = rng.integers(-127, 128, (experts, rows, k)).astype(np.int8)
        offset = None
    else:
        q = np.stack([pack_nibbles(rng.integers(0, 16, (rows, k)).astype(np.uint8)) for _ in range(experts)])
        offset = rng.uniform(-0.1, 0.0, groups).astype(dtype) if offsets else None
    arrays = [q, scale] + ([offset] if offset is not None else [])
    dequantized = torch.stack([torch_dequantize(q[e], scale[e], None if offset is None else offset[e], bits, group)
                               for e in range(experts)])
    return arrays, dequantized


def _attrs(gate_up, down, activations="float"):
    return dict(activation="silu", gate_up_bits=gate_up[0], gate_up_group_size=gate_up[1],
                gate_up_offset=gate_up[2], down_bits=down[0], down_group_size=down[1], down_offset=down[2],
                activations=activations)


F32, F16 = np.float32, np.float16
INT8_ROW, Q8_0, Q6_K = (8, 0, False, F32), (8, 32, False, F16), (8, 16, False, F32)
INT4, Q4_0, Q4_K, FLOAT = (4, 32, True, F16), (4, 32, False, F16), (4, 32, True, F32), (0, 0, False, F32)
# (gate_up format, down format, activations): kiln's int8 / int4 modes, GGUF blocks (Q8_0, Q4_0, a Q4_K_M layer:
# Q4_K gate/up and Q6_K down), a stack kept float beside a quantized one, and int8 activations.
FORMAT_CASES = {
    "int8": (INT8_ROW, INT8_ROW, "float"),
    "int4": (INT4, INT4, "float"),
    "q8_0": (Q8_0, Q8_0, "float"),
    "q4_0": (Q4_0, Q4_0, "float"),
    "q4_k_m": (Q4_K, Q6_K, "float"),
    "int4+float": (INT4, FLOAT, "float"),
    "int8-a8": (INT8_ROW, INT8_ROW, "int8"),
    "int4-a8": (INT4, Q8_0, "int8"),
    "q4_k_m-a8": (Q4_K, Q6_K, "int8"),  # Q6_K's groups of 16: two to an activation block
}


def _case(name, tokens, seed=0):
    gate_up_fmt, down_fmt, activations = FORMAT_CASES[name]
    rng = np.random.default_rng(seed)
    gate_up, gate_up_w = _stack(rng, gate_up_fmt, EXPERTS, 2 * INTER, HIDDEN)
    down, down_w = _stack(rng, down_fmt, EXPERTS, HIDDEN, INTER)
    x = rng.normal(0, 1, (tokens, HIDDEN)).astype(np.float32)
    weights = rng.uniform(0.1, 1, (tokens, TOP_K)).astype(np.float32)
    ids = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(tokens)]).astype(np.int64)
    return dict(x=x, weights=weights, ids=ids, gate_up=gate_up, down=down, gate_up_w=gate_up_w, down_w=down_w,
                attrs=_attrs(gate_up_fmt, down_fmt, activations))


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_reference_matches_torch_dequantize_then_experts(name):
    """moe_experts_q's reference vs torch over the documented dequantized weights: within 1e-6 of the largest
    output; with float activations also vs transformers' MixtralExperts holding those weights."""
    case = _case(name, tokens=9)
    got = experts_q([case["x"], case["weights"], case["ids"]] + case["gate_up"] + case["down"], case["attrs"])
    int8_rows = case["attrs"]["activations"] == "int8"
    want = torch_experts(case["x"], case["weights"], case["ids"], case["gate_up_w"], case["down_w"], int8_rows)
    assert relative_error(got, want) <= 1e-6
    if int8_rows:  # the rounding must show, or the case would not test it
        float_rows = torch_experts(case["x"], case["weights"], case["ids"], case["gate_up_w"], case["down_w"], False)
        assert relative_error(float_rows, want) > 1e-4
        return
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS)
    config._experts_implementation = "eager"
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.copy_(case["gate_up_w"].float())
        module.down_proj.copy_(case["down_w"].float())
        mixtral = module(torch.as_tensor(case["x"]), torch.as_tensor(case["ids"]),
                         torch.as_tensor(case["weights"])).numpy()
    assert relative_error(got, mixtral) <= 1e-6


def _types(arrays):
    return [TensorType(DTYPES[a.dtype.name], a.shape) for a in arrays]


def test_shape_rule_refuses_mismatched_stacks():
    case = _case("int4", tokens=3)
    head = _types([case["x"], case["weights"], case["ids"]])
    stacks = _types(case["gate_up"] + case["down"])
    attrs = case["attrs"]
    assert infer_types("moe_experts_q", head + stacks, attrs)[0] == head[0]
    bad = {
        "missing offset": (head + stacks[:2] + stacks[3:], attrs, "expected 9 inputs .* found 8"),
        "bits": (head + stacks, {**attrs, "down_bits": 2}, "down_bits must be 0"),
        "group": (head + stacks, {**attrs, "gate_up_group_size": 16}, "scale and offset of shape"),
        "experts": (head + stacks[:3] + [TensorType("u32", (EXPERTS - 1, HIDDEN, INTER // 8))] + stacks[4:], attrs,
                    "one down q, scale"),
    }
    q4_k_m = _case("q4_k_m", tokens=3)  # a Q6_K down stack: groups of 16, which int8 rows per 32 take
    assert infer_types("moe_experts_q", head + _types(q4_k_m["gate_up"] + q4_k_m["down"]),
                       {**q4_k_m["attrs"], "activations": "int8"})[0] == head[0]
    for what, (types, bad_attrs, message) in bad.items():
        with pytest.raises(VerificationError, match=message):
            infer_types("moe_experts_q", types, bad_attrs)
    float_down = head + stacks[:3] + _types([np.zeros((EXPERTS, HIDDEN, INTER), np.float32)])
    with pytest.raises(VerificationError, match="int8 activations need quantized gate_up and down"):
        infer_types("moe_experts_q", float_down, {**attrs, "down_bits": 0, "down_offset": False,
                                                  "activations": "int8"})


# kernels against the numpy reference ---------------------------------------------------------------------------
def _module(case, poison=(), hidden: int = HIDDEN, top_k: int = TOP_K):
    """x [tokens, hidden], weights, ids [tokens, top_k] -> moe_experts_q over the case's stacks, the stacks' scales
    and offsets (float stacks: weights) of the experts in ``poison`` replaced by NaN."""
    module = Module()
    names = []
    for stack_name, arrays in (("gate_up", case["gate_up"]), ("down", case["down"])):
        for i, array in enumerate(arrays):
            array = array.copy()
            if poison and (i == 1 or array.dtype == np.float32 and array.ndim == 3):
                array[list(poison)] = np.nan
            names.append(f"{stack_name}.{i}")
            module.add_weight(names[-1], array)
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (TOKENS, hidden)))
    weights = fn.add_param("weights", TensorType("f32", (TOKENS, top_k)))
    ids = fn.add_param("ids", TensorType("i64", (TOKENS, top_k)))
    fn.set_results([fn.emit("moe_experts_q", x, weights, ids, *[fn.emit("weight", name=n) for n in names],
                            value_name="out", **case["attrs"])])
    return module


def _run_tvm(module, inputs):
    pytest.importorskip("tvm")
    from kiln.backends.tvm import llm_lower, moe_lower  # noqa: F401  (registers the lowerings)
    from kiln.backends.tvm.build import TVMFunction

    return TVMFunction.from_module(module, "f")(*inputs)[0]


def _run_onnxruntime(module, inputs):
    import onnx
    import onnxruntime as ort

    from kiln.backends.onnxruntime import moe_lower  # noqa: F401  (registers the lowerings)
    from kiln.backends.onnxruntime.lower import lower_function, make_model

    lowered = lower_function(module, "f")
    for name, array in lowered.initializers.items():
        lowered.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
    session = ort.InferenceSession(make_model(lowered.graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(("x", "weights", "ids"), inputs)))[0]


@pytest.mark.parametrize("run", [_run_tvm, _run_onnxruntime], ids=["tvm", "onnxruntime"])
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("name", FORMAT_CASES)
def test_kernels_match_the_reference_reading_only_selected_experts(run, tokens, name):
    """Both backends within 1e-5 of the reference's largest output. One token (a decode step): the scales of
    every expert it did not select are NaN, so a kernel that read another expert's blocks would give NaN."""
    case = _case(name, tokens, seed=tokens)
    inputs = [case["x"], case["weights"], case["ids"]]
    want = experts_q(inputs + case["gate_up"] + case["down"], case["attrs"])
    unused = sorted(set(range(EXPERTS)) - set(case["ids"].flatten().tolist())) if tokens == 1 else []
    got = run(_module(case, poison=unused), inputs)
    assert np.isfinite(got).all()
    assert relative_error(got, want) <= FP32_TOLERANCE


# the pass on captured models -----------------------------------------------------------------------------------
# Expert widths multiples of 32 (int4 groups fit every stack), beside test_moe's odd widths (int4 keeps the down
# stack float there).
QUANT_ARCHS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=24, num_experts=5,
                                         num_experts_per_tok=3, norm_topk_prob=True, head_dim=16)),
}
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128)
_MODELS: dict = {}


def quant_model(arch: str):
    if arch not in _MODELS:
        cls_name, overrides = QUANT_ARCHS[arch]
        _MODELS[arch] = seeded_moe_model(getattr(transformers, cls_name)(**_COMMON, **overrides))
    return _MODELS[arch]


def _quantized_rows(w: torch.Tensor, mode: str) -> torch.Tensor | None:
    """w [N, K] quantized as the README says (int8 per row; int4 groups of 32 with offsets) and dequantized, or
    None when int4 has no group of 32 dividing K (the weight stays float)."""
    bits = 8 if mode == "int8" else 4
    if bits == 4 and w.shape[1] % 32:
        return None
    q, scale, offset = torch_quantize(w.detach().numpy(), bits, 32, True)
    return torch_dequantize(q, scale, offset, bits, 32 if bits == 4 else 0).float()


_DEQUANTIZED: dict = {}


def dequantized_model(arch: str, mode: str):
    """The model with the weights kiln's ``mode`` computes with: every 2-D weight the decoder's linears read (the
    routers and Qwen2-MoE's shared-expert gate included) and each expert of the stacks, row by row, quantized
    and dequantized in torch; the embedding table and the logits projection int8 per row."""
    key = (arch, mode)
    if key not in _DEQUANTIZED:
        model = copy.deepcopy(quant_model(arch))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() < 2:  # norms and biases stay float
                    continue
                table = name in ("model.embed_tokens.weight", "lm_head.weight")
                rows = param.reshape(-1, param.shape[-1])
                quantized = _quantized_rows(rows, "int8" if table else mode)
                if quantized is not None:
                    param.copy_(quantized.reshape(param.shape))
        _DEQUANTIZED[key] = model
    return _DEQUANTIZED[key]


def _experts_nodes(module):
    return [n for fn in module.functions.values() for n in fn.nodes if n.op in ("moe_experts", "moe_experts_q")]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_pass_quantizes_each_expert_like_an_independent_quantizer(mode):
    """quantize_weights on captured Qwen3-MoE (expert width 24): every moe_experts becomes moe_experts_q whose
    per-expert integers and scales are torch round-to-nearest's of that expert's rows; under int4 the down stack
    (K = 24, no group of 32) stays float and is listed among the fp32 weights kept."""
    model = quant_model("qwen3_moe")
    module = capture(model, max_seq=64)
    run_pass("quantize_weights", module, PassOptions(extra={"quantize": mode}))
    nodes = _experts_nodes(module)
    assert [n.op for n in nodes] == ["moe_experts_q"] * 2
    for layer, node in enumerate(nodes):
        experts = model.model.layers[layer].mlp.experts
        attrs = node.attrs
        assert (attrs["gate_up_bits"], attrs["down_bits"]) == ((8, 8) if mode == "int8" else (4, 0))
        arrays = [module.weight_data[v.producer.attrs["name"]] for v in node.inputs[3:]]
        gate_up = experts.gate_up_proj.detach().numpy()
        for e in range(gate_up.shape[0]):
            q, scale, offset = torch_quantize(gate_up[e], attrs["gate_up_bits"], 32, True)
            np.testing.assert_array_equal(arrays[0][e], q)
            np.testing.assert_array_equal(arrays[1][e], scale)
            if offset is not None:
                np.testing.assert_array_equal(arrays[2][e], offset)
        if mode == "int4":
            np.testing.assert_array_equal(arrays[-1], experts.down_proj.detach().numpy())
    kept = module.metadata["quantization"]["fp32_weights_kept"]
    assert [k for k in kept if "experts" in k] == ([] if mode == "int8" else [
        f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)])


def test_int8_activations_mark_experts_whose_widths_fit():
    """activations=int8 marks a moe_experts_q only when both stacks are quantized with K and groups multiples
    of 32: Mixtral's (64 / 64) under int4, not Qwen3-MoE's under int4 (its down stack stays float)."""
    marked = {}
    for arch in ("mixtral", "qwen3_moe"):
        module = capture(quant_model(arch), max_seq=64)
        run_pass("quantize_weights", module, PassOptions(extra={"quantize": "int4"}))
        run_pass("quantize_activations", module, PassOptions(extra={"activations": "int8"}))
        marked[arch] = [n.attrs["activations"] for n in _experts_nodes(module)]
        assert module.metadata["activations_quantized"]["moe_experts_q"] == marked[arch].count("int8")
    assert marked == {"mixtral": ["int8", "int8"], "qwen3_moe": ["float", "float"]}


def test_inspect_reports_quantized_expert_bytes_per_decoded_token():
    """kiln inspect's expert line in the stored format, counted here from the format's description: int4 groups
    of 32 hold K / 2 bytes of nibbles and an f16 scale and offset per group per row; int8 per row K bytes and an
    f32 scale per row. A decoded token reads top-k of the experts' stacks per layer."""
    from kiln.cli import format_summary
    from kiln.driver import summarize

    model = quant_model("mixtral")
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    experts, top_k, layers = model.config.num_local_experts, model.config.num_experts_per_tok, 2
    per_expert = {"f32": 4 * 3 * hidden * inter,
                  "int8": (2 * inter) * (hidden + 4) + hidden * (inter + 4),
                  "int4": (2 * inter) * (hidden // 2 + 4 * hidden // 32) + hidden * (inter // 2 + 4 * inter // 32)}
    for mode in ("f32", "int8", "int4"):
        module = capture(model, max_seq=64)
        if mode != "f32":
            run_pass("quantize_weights", module, PassOptions(extra={"quantize": mode}))
        summary = summarize(module)["experts"]
        assert summary["expert_weight_bytes"] == layers * experts * per_expert[mode]
        assert summary["expert_bytes_per_decoded_token"] == layers * top_k * per_expert[mode]
        formats = {"f32": {"f32": 4}, "int8": {"int8-per-row": 4}, "int4": {"int4-g32+offset": 4}}[mode]
        assert summary["formats"] == formats
        line = next(line for line in format_summary(summarize(module)).splitlines() if line.startswith("experts:"))
        assert f"read per decoded token {layers * top_k * per_expert[mode] / 2**20:.2f} MiB" in line
        assert f"({', '.join(f'{n} x {f}' for f, n in formats.items())})" in line


# whole models against transformers -----------------------------------------------------------------------------
def _by_default(cases, default):
    return [case if case in default else pytest.param(*case, marks=pytest.mark.slow) for case in cases]


MODEL_CASES = [(arch, mode, backend) for arch in ("mixtral", "qwen2_moe", "qwen3_moe") for mode in ("int8", "int4")
               for backend in ("tvm", "onnxruntime")]
# Top-1 agreement of the quantized engine with the fp32 model over the prompt and 12 greedy steps (measured:
# int8 0.95-1.0, int4 0.75-0.95 on these random models).
TOP1_AGREEMENT = {"int8": 0.85, "int4": 0.6}


@pytest.mark.parametrize("arch, mode, backend", _by_default(MODEL_CASES, [("mixtral", "int4", "tvm"),
                                                                          ("qwen2_moe", "int8", "onnxruntime")]))
def test_quantized_moe_model_matches_transformers_with_the_same_weights(tmp_path, arch, mode, backend):
    """Compiled with quantize=int8 / int4 (float activations): prefill and every decode step within 1e-5 of
    transformers holding the same quantized-then-dequantized weights, greedy tokens identical; top-1 agreement
    with the fp32 model; the experts arrive as moe_experts_q."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    reference = dequantized_model(arch, mode)
    assert routing_gap(reference) >= 1e-4  # no near-tie that 1e-7 differences could flip
    artifact = kiln.compile(quant_model(arch), backend=backend, quantize=mode, activations="float", max_seq_len=48,
                            output=tmp_path / "model.kiln")
    kept = [name for name in artifact.manifest["quantization"]["fp32_weights_kept"] if "experts." in name]
    assert kept == ([f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)] if (arch, mode) == (
        "qwen3_moe", "int4") else [])
    engine = kiln.load(artifact)
    assert_engine_matches_transformers(engine, arch, new_tokens=12, model=reference)
    result = engine.generate(ENGINE_PROMPT, max_new_tokens=12, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        fp32 = quant_model(arch)(torch.as_tensor([ENGINE_PROMPT + result.token_ids[:-1]])).logits[0].numpy()
    ours = np.concatenate([engine.logits(ENGINE_PROMPT)[:-1], result.logits])
    assert (ours.argmax(-1) == fp32.argmax(-1)).mean() >= TOP1_AGREEMENT[mode]


# Only Mixtral: the kernels and the numpy reference compute each activation in another order (1e-7 apart), and an
# element within that distance of a rounding midpoint lands one int8 step apart (tests/test_tvm_int8_activations.py
# says the same of linear_q). On the int4 Qwen2-MoE that happens at the prompt's fourth token: measured 1e-7 on
# tokens 1-3, then 3e-3 from token 4 on (carried by its K/V), the signature of one flipped step, not of a kernel
# error (which would show on every token); the kernels' int8 rows are checked op by op above at 1e-5.
@pytest.mark.slow  # about 12 s; tests/test_moe_vnni.py checks Qwen3-MoE a8 against the interpreter by default
@pytest.mark.parametrize("arch", ["mixtral"])
def test_int8_activation_experts_match_the_numpy_reference(tmp_path, arch):
    """int4 with int8 activations on TVM (both layers' experts take them: widths multiples of 32) vs the numpy
    interpreter of the artifact's own module (the ops' references, moe_experts_q's rounding of each row included):
    prefill and decode logits within 1e-5, greedy tokens identical."""
    pytest.importorskip("tvm")
    from kiln.backends.reference.executor import load_executor

    artifact = kiln.compile(quant_model(arch), backend="tvm", quantize="int4", activations="int8", max_seq_len=48,
                            output=tmp_path / "model.kiln")
    assert '"moe_experts_q": 2, "moe_experts_q_kept_float": 0' in (Path(artifact.path) / "module.kir").read_text()
    compiled, interpreted = kiln.load(artifact), kiln.load(artifact)
    interpreted.executor = load_executor(interpreted.info)
    assert relative_error(compiled.logits(ENGINE_PROMPT), interpreted.logits(ENGINE_PROMPT)) <= FP32_TOLERANCE
    ours = compiled.generate(ENGINE_PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)
    numpy_ref = interpreted.generate(ENGINE_PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)
    assert ours.token_ids == numpy_ref.token_ids
    assert relative_error(ours.logits, numpy_ref.logits) <= FP32_TOLERANCE


# GGUF MoE files: the expert stacks keep the file's blocks ---------------------------------------------------------
# Widths of 256, so that llama.cpp's quantizer makes K-quant blocks (256 per super-block) of the expert rows.
_WIDE = {"qwen3moe": dict(hidden_size=256, moe_intermediate_size=256),
         "qwen2moe": dict(hidden_size=256, moe_intermediate_size=256),
         "mixtral": dict(hidden_size=256, intermediate_size=256)}
# ggml type -> moe_experts_q's (bits, group_size, offset) for it (frontend.gguf_quant's table)
KIND = {"Q8_0": (8, 32, False), "Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q5_0": (8, 32, False),
        "Q4_K": (4, 32, True), "Q6_K": (8, 16, False)}
# llama.cpp multiplies its blocks by activations it rounds to 8 bits; kiln's float activations do not: measured
# 1.8% (Q8_0), 2.7% (Q4_K_M), 3.9% (Q6_K), 5.6% (Q4_1), 7.5% (Q4_0) of the largest logit from llama.cpp, and 10%
# on the Q4_K_M Mixtral (whose blocks kiln computes bit for bit as its own dequantized fp32 path does). A file read
# wrongly (rows in another order, experts swapped) moves the logits by 47% and more
# (tests/test_gguf_architectures.py).
LLAMA_CPP_TOLERANCE = 0.15
_GGUF_FILES: dict = {}


def gguf_moe_file(name: str, ftype: str, tmp_path_factory) -> tuple:
    """(llama.cpp's ``ftype`` quantization of tiny MoE ``name`` written as its converter writes it, the fp32
    transformers model), made once per session."""
    import test_gguf_architectures as gguf_tests

    if name not in _GGUF_FILES:
        _, config_class, fields = gguf_tests.ARCHS[name]
        config = getattr(transformers, config_class)(**{**gguf_tests._COMMON, **fields, **_WIDE[name]})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith(("q_proj.weight", "k_proj.weight")):
                    param.mul_(gguf_tests.QK_SCALE)
                elif param_name.endswith("mlp.gate.weight"):
                    param.mul_(gguf_tests.ROUTER_SCALE)
                elif "norm" in param_name:
                    param.add_(torch.randn_like(param) * 0.5)
        path = gguf_tests.write_gguf(tmp_path_factory.mktemp(name) / f"{name}.gguf", name, model)
        _GGUF_FILES[name] = (path, model, {})
    path, model, quantized = _GGUF_FILES[name]
    if ftype not in quantized:
        quantized[ftype] = gguf_tests.quantize(path, ftype)
    return quantized[ftype], model


def _expected_formats(path, layers: int) -> list:
    """Per layer, the (bits, group_size, offset) moe_experts_q should hold for gate_up and down: the file's ggml
    types through KIND (0, 0, False where kiln does not import the type: the stack stays float)."""
    from kiln.frontend.gguf_file import GGUFFile

    tensors = GGUFFile(path).tensors
    out = []
    for layer in range(layers):
        types = {part: tensors[f"blk.{layer}.ffn_{part}_exps.weight"].ggml_type.name for part in ("gate", "up", "down")}
        assert types["gate"] == types["up"]
        out.append(tuple(KIND.get(types[part], (0, 0, False)) for part in ("gate", "down")))
    return out


def _module_formats(artifact) -> list:
    from kiln.ir.parser import parse_module

    module = parse_module((Path(artifact.path) / "module.kir").read_text())
    nodes = [n for n in module.functions["step"].nodes if n.op == "moe_experts_q"]
    return [tuple((n.attrs[f"{w}_bits"], n.attrs[f"{w}_group_size"], n.attrs[f"{w}_offset"])
                  for w in ("gate_up", "down")) for n in nodes]


# Not Q4_1 on ONNX Runtime: its dense linear_q takes Q4_1's offsets as a separate group-sum matmul
# (backends/onnxruntime/quant_lower.py), measured 1.3e-5 from transformers on the wide Qwen2-MoE; its experts
# (the "int4" case above, Q4_1's format) are within 1e-5 op by op.
GGUF_CASES = [("qwen3moe", "Q4_K_M", "tvm"), ("qwen3moe", "Q8_0", "tvm"), ("qwen3moe", "Q6_K", "tvm"),
              ("qwen2moe", "Q4_0", "tvm"), ("qwen2moe", "Q4_1", "tvm"), ("qwen3moe", "Q4_K_M", "onnxruntime"),
              ("qwen2moe", "Q4_0", "onnxruntime")]


@pytest.mark.parametrize("name, ftype, backend", _by_default(GGUF_CASES, [("qwen3moe", "Q4_K_M", "tvm")]))
def test_gguf_moe_file_keeps_its_expert_blocks(name, ftype, backend, tmp_path_factory, tmp_path):
    """A MoE file from llama.cpp's quantizer compiles with quantize='gguf' (the default): each layer's expert
    stacks arrive as moe_experts_q in the formats of the file's own types (a Q4_K_M file: Q4_K gate/up, Q6_K or
    Q4_K down), none is kept fp32; with float activations the logits are transformers' on the gguf package's
    dequantized weights (its own GGUF loader) within 1e-5, greedy tokens identical; llama.cpp agrees within its
    activation rounding (LLAMA_CPP_TOLERANCE) and on the prompt's greedy next tokens."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    from test_gguf_architectures import NEW_TOKENS, PROMPT, llama_cpp_logits, logits, transformers_from_gguf

    path, model = gguf_moe_file(name, ftype, tmp_path_factory)
    artifact = kiln.compile(path, backend=backend, max_seq_len=64, max_num_seqs=1, activations="float",
                            output=tmp_path / "q.kiln")
    assert not [n for n in artifact.manifest["quantization"]["fp32_weights_kept"] if "experts." in n]
    if backend == "tvm":
        assert _module_formats(artifact) == _expected_formats(path, model.config.num_hidden_layers)
    reference = transformers_from_gguf(path, model)
    engine = kiln.load(artifact.path)
    assert_engine_matches_transformers(engine, name, new_tokens=NEW_TOKENS, model=reference)
    ours, theirs = engine.logits(PROMPT), llama_cpp_logits(path)
    assert relative_error(ours, theirs) <= LLAMA_CPP_TOLERANCE
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    assert relative_error(logits(reference, PROMPT), logits(model, PROMPT)) > 1e-3  # the blocks' rounding shows


@pytest.mark.slow
def test_gguf_mixtral_file_keeps_its_expert_blocks_and_matches_llama_cpp(tmp_path_factory, tmp_path):
    """Mixtral written as llama (transformers' GGUF loader cannot read it): a Q4_K_M file's experts arrive as
    its blocks, and the logits agree with llama.cpp on the same file within its activation rounding."""
    pytest.importorskip("tvm")
    from test_gguf_architectures import PROMPT, llama_cpp_logits

    path, model = gguf_moe_file("mixtral", "Q4_K_M", tmp_path_factory)
    artifact = kiln.compile(path, backend="tvm", max_seq_len=64, max_num_seqs=1, activations="float",
                            output=tmp_path / "q.kiln")
    assert _module_formats(artifact) == _expected_formats(path, model.config.num_hidden_layers)
    ours, theirs = kiln.load(artifact.path).logits(PROMPT), llama_cpp_logits(path)
    assert relative_error(ours, theirs) <= LLAMA_CPP_TOLERANCE
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
