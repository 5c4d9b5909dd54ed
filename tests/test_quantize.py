"""Weight-only quantization: the linear_q op, the quantize_weights pass, and TVM's fused int8 / int4 kernels.

linear_q's numpy reference is checked against a torch dequantize-then-matmul written
here; the pass's integers and scales against a torch round-to-nearest quantizer written
here; a tiny llama compiled through TVM against the numpy interpreter of the artifact's
own module.kir (the same quantized math, independent kernels) and against transformers fp32.
"""

import os

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ConfigError, VerificationError
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.ops import OPS, infer_types
from kiln.ir.types import TensorType
from kiln.passes import PassOptions, run_pass

from tiny_models import tiny_model

PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


# independent reference: packing, dequantizing and quantizing in torch ---------------
def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """u8[N, K] -> u32[N, K / 8], element k in bits 4 * (k % 8) of word k // 8 (the documented layout)."""
    n, k = nibbles.shape
    words = np.zeros((n, k // 8), dtype=np.int64)
    for i in range(8):
        words |= nibbles[:, i::8].astype(np.int64) << (4 * i)
    return words.astype(np.uint32)


def _per_element(a, group_size, k) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float32)).double()
    return t[:, None] if t.dim() == 1 else t[:, torch.arange(k) // group_size]


def torch_dequantize(q, scale, offset, bits, group_size) -> torch.Tensor:
    """The documented formats: int8 q * scale; int4 nibble * scale + offset, or (nibble - 8) * scale."""
    if bits == 8:
        return torch.as_tensor(q).double() * _per_element(scale, group_size, q.shape[1])
    words = torch.as_tensor(q.astype(np.int64))
    k = words.shape[1] * 8
    cols = torch.arange(k)
    nibbles = ((words[:, cols // 8] >> (4 * (cols % 8))) & 15).double()
    if offset is None:
        return (nibbles - 8.0) * _per_element(scale, group_size, k)
    return nibbles * _per_element(scale, group_size, k) + _per_element(offset, group_size, k)


def torch_quantize(w: np.ndarray, bits: int, group_size: int, zero_points: bool):
    """Round-to-nearest: int8 per row (absmax / 127, f32 scale); int4 per group with f16 scales, absmax / 7
    (symmetric) or [min, max] in 15 steps from an f16 offset = min."""
    t = torch.as_tensor(w, dtype=torch.float32)
    if bits == 8:
        scale = t.abs().amax(dim=1) / 127
        scale[scale == 0] = 1
        return torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8).numpy(), scale.numpy(), None
    n, k = t.shape
    g = t.reshape(n, k // group_size, group_size)
    if zero_points:
        offset = g.amin(dim=2).half()
        scale = (g.amax(dim=2) - offset.float()) / 15
        scale[scale == 0] = 1
        scale = scale.half()
        nibbles = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    else:
        scale = g.abs().amax(dim=2) / 7
        scale[scale == 0] = 1
        scale = scale.half()
        offset = None
        nibbles = torch.round(g / scale.float()[..., None]).clamp(-8, 7) + 8
    packed = pack_nibbles(nibbles.reshape(n, k).to(torch.uint8).numpy())
    return packed, scale.numpy(), None if offset is None else offset.numpy()


# the op ----------------------------------------------------------------------------
OP_CASES = [  # (bits, group_size, offsets, scale dtype, x shape, N)
    (8, 0, False, np.float32, (3, 64), 24),
    (8, 0, False, np.float32, (2, 5, 96), 16),
    (8, 32, False, np.float16, (2, 64), 8),  # GGUF Q8_0
    (4, 32, False, np.float32, (1, 64), 40),
    (4, 32, True, np.float16, (2, 3, 128), 8),  # GGUF Q4_1
    (4, 32, False, np.float16, (3, 64), 8),  # GGUF Q4_0
    (4, 128, False, np.float32, (4, 256), 16),
    (4, 128, True, np.float32, (1, 1, 256), 24),
]
DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8", "uint32": "u32", "int64": "i64"}


def _random_quantized(rng, bits, group, offsets, dtype, k, n):
    groups = (n,) if group == 0 else (n, k // group)
    scale = rng.uniform(0.001, 0.02, groups).astype(dtype)
    if bits == 8:
        return rng.integers(-127, 128, (n, k)).astype(np.int8), scale, None
    q = pack_nibbles(rng.integers(0, 16, (n, k)).astype(np.uint8))
    offset = rng.uniform(-0.1, 0.0, groups).astype(dtype) if offsets else None
    return q, scale, offset


def _types(arrays):
    return [TensorType(DTYPES[a.dtype.name], a.shape) for a in arrays]


@pytest.mark.parametrize("bits,group,offsets,dtype,x_shape,n", OP_CASES)
def test_linear_q_reference_matches_torch_dequantize_then_matmul(bits, group, offsets, dtype, x_shape, n):
    rng = np.random.default_rng(bits * 1000 + group + offsets)
    k = x_shape[-1]
    q, scale, offset = _random_quantized(rng, bits, group, offsets, dtype, k, n)
    x = rng.standard_normal(x_shape).astype(np.float32)
    inputs = [x, q, scale] + ([offset] if offset is not None else [])
    attrs = {"bits": bits, "group_size": group}
    assert infer_types("linear_q", _types(inputs), attrs) == [TensorType("f32", x_shape[:-1] + (n,))]
    got = OPS["linear_q"].reference(inputs, attrs)[0]
    expected = (torch.as_tensor(x).double() @ torch_dequantize(q, scale, offset, bits, group).T).float().numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,group,offsets,dtype,x_shape,n", OP_CASES[2:6])
def test_embedding_q_reference_gathers_dequantized_rows(bits, group, offsets, dtype, x_shape, n):
    rng = np.random.default_rng(17 + bits)
    k = x_shape[-1]
    q, scale, offset = _random_quantized(rng, bits, group, offsets, dtype, k, n)
    ids = np.array([[0, n - 1, 3], [n + 5, 2, 2]], dtype=np.int64)  # n + 5: clipped to the last row
    inputs = [ids, q, scale] + ([offset] if offset is not None else [])
    attrs = {"bits": bits, "group_size": group}
    assert infer_types("embedding_q", _types(inputs), attrs) == [TensorType("f32", (2, 3, k))]
    got = OPS["embedding_q"].reference(inputs, attrs)[0]
    table = torch_dequantize(q, scale, offset, bits, group)
    expected = table[torch.as_tensor(np.minimum(ids, n - 1))].float().numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("types,attrs,message", [
    ([("f32", (2, 64)), ("i8", (8, 64)), ("f32", (8,))], {"bits": 4, "group_size": 32}, "int4 expects"),
    ([("f32", (2, 64)), ("i8", (8, 32)), ("f32", (8,))], {"bits": 8}, "expected q for K=64"),
    ([("f32", (2, 64)), ("i8", (8, 64)), ("f32", (8,)), ("f32", (8,))], {"bits": 8}, "no offset"),
    ([("f32", (2, 64)), ("i8", (8, 64)), ("f32", (8,))], {"bits": 8, "group_size": 32}, "scale of shape"),
    ([("f32", (2, 64)), ("u32", (8, 8)), ("f32", (8, 2))], {"bits": 4, "group_size": 48}, "group_size"),
    ([("f32", (2, 64)), ("u32", (8, 8)), ("f32", (8, 2)), ("f32", (8, 3))], {"bits": 4, "group_size": 32},
     "offset of shape"),
    ([("f32", (2, 64)), ("u32", (8, 8)), ("f16", (8, 2)), ("f32", (8, 2))], {"bits": 4, "group_size": 32},
     "same dtype"),
    ([("f32", (2, 64)), ("u32", (8, 8)), ("i32", (8, 2))], {"bits": 4, "group_size": 32}, "f32 or f16"),
    ([("f32", (2, 64)), ("u32", (8, 8)), ("f32", (8, 2))], {"bits": 3, "group_size": 32}, "bits must be"),
])
def test_linear_q_shape_rule_refuses_mismatches(types, attrs, message):
    with pytest.raises(VerificationError, match=message):
        infer_types("linear_q", [TensorType(d, s) for d, s in types], attrs)


# the pass --------------------------------------------------------------------------
HIDDEN, INTERMEDIATE, VOCAB = 128, 96, 16


def _small_module(rows=3, tied=False):
    """h = embedding(W_emb, ids); in = linear(h, W_in, b_in); gated_mlp(in, Wg, Wu, Wd);
    logits = linear(., W_out) (W_emb itself when tied), returned."""
    rng = np.random.default_rng(7)
    weights = {"w_emb": (VOCAB, HIDDEN), "w_in": (HIDDEN, HIDDEN), "b_in": (HIDDEN,), "w_gate": (INTERMEDIATE, HIDDEN),
               "w_up": (INTERMEDIATE, HIDDEN), "w_down": (HIDDEN, INTERMEDIATE), "w_out": (VOCAB, HIDDEN)}
    if tied:
        del weights["w_out"]
    arrays = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in weights.items()}
    arrays["w_gate"][3] = 0.0  # an all-zero row must survive (scale 0 would divide by zero)
    module = Module()
    for name, array in arrays.items():
        module.add_weight(name, array.copy())
    fn = module.add_function("forward")
    ids = fn.add_param("ids", TensorType("i64", (rows,)))
    w = {name: fn.emit("weight", name=name) for name in arrays}
    h = fn.emit("embedding", w["w_emb"], ids)
    hidden = fn.emit("linear", h, w["w_in"], w["b_in"])
    mlp = fn.emit("gated_mlp", hidden, w["w_gate"], w["w_up"], w["w_down"], activation="silu")
    fn.set_results([fn.emit("linear", mlp, w["w_emb" if tied else "w_out"])])
    return module, arrays


def _reference_forward(ids, weight, tied=False):
    """The module's math in torch float64 from the given (dequantized) weights."""
    t = weight("w_emb")[torch.as_tensor(ids)]
    hidden = t @ weight("w_in").T + weight("b_in")
    mlp = (torch.nn.functional.silu(hidden @ weight("w_gate").T) * (hidden @ weight("w_up").T)) @ weight("w_down").T
    return (mlp @ weight("w_emb" if tied else "w_out").T).numpy()


IDS = np.array([3, 0, 15], dtype=np.int64)


@pytest.mark.parametrize("mode,zero_points,quantize_embedding", [
    ("int8", True, True), ("int4", False, False), ("int4", True, False), ("int4-g128", True, False),
    ("int4", True, True), ("int8", True, False),
])
def test_pass_quantizes_like_an_independent_quantizer(mode, zero_points, quantize_embedding):
    module, arrays = _small_module()
    bits, group = {"int8": (8, 0), "int4": (4, 32), "int4-g128": (4, 128)}[mode]
    options = PassOptions(extra={"quantize": mode, "quantize_zero_points": zero_points,
                                 "quantize_embedding": quantize_embedding})
    assert run_pass("quantize_weights", module, options)  # verifies the module before and after
    fn = module.functions["forward"]
    # int4-g128: W_down's K = 96 holds no group of 128 (nor 64), so it takes groups of 32.
    linears = {"w_in", "w_gate", "w_up", "w_down"}
    per_row = {"w_emb", "w_out"} if quantize_embedding else set()  # int8, one scale per row
    quantized = linears | per_row
    ops = [n.op for n in fn.nodes if n.op not in ("weight",)]
    assert "gated_mlp" not in ops
    assert ops.count("linear_q") == len(quantized - {"w_emb"})
    assert ops.count("linear") == 5 - len(quantized - {"w_emb"})  # five dense layers, gate and up included
    assert ops.count("embedding_q") == (1 if quantize_embedding else 0)
    for name in arrays:
        assert (name in module.weights) == (name not in quantized), name  # no fp32 copy of a quantized weight
    dequantized = {}
    for name in quantized:
        b, g = (8, 0) if name in per_row else (bits, 32 if name == "w_down" and group == 128 else group)
        q, scale, offset = torch_quantize(arrays[name], b, g, zero_points)
        np.testing.assert_array_equal(module.weight_data[f"{name}.qweight"], q)
        np.testing.assert_array_equal(module.weight_data[f"{name}.scales"], scale)
        assert module.weight_data[f"{name}.scales"].dtype == (np.float32 if b == 8 else np.float16)
        if offset is not None:
            np.testing.assert_array_equal(module.weight_data[f"{name}.offsets"], offset)
        else:
            assert f"{name}.offsets" not in module.weights
        dequantized[name] = torch_dequantize(q, scale, offset, b, g)
        # round-to-nearest: every weight within half a step of its original (plus the f16 rounding of
        # an offset, at most 2^-11 of it)
        step = _per_element(scale, g, arrays[name].shape[1])
        slack = 1e-7 if offset is None else _per_element(np.abs(offset.astype(np.float32)), g,
                                                         arrays[name].shape[1]) * 2.0 ** -11 + 1e-7
        assert ((dequantized[name] - torch.as_tensor(arrays[name]).double()).abs() <= step / 2 + slack).all()
    got = run_function(module, "forward", [IDS])[0]
    expected = _reference_forward(
        IDS, lambda n: dequantized[n] if n in dequantized else torch.as_tensor(arrays[n]).double())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    meta = module.metadata["quantization"]
    assert (meta["mode"], meta["quantized_ops"]) == (mode, len(quantized))
    assert meta["weight_bytes_after"] < meta["weight_bytes_before"]


def test_a_tied_table_is_quantized_once_for_the_lookup_and_the_logits():
    module, arrays = _small_module(tied=True)
    assert run_pass("quantize_weights", module, PassOptions(extra={"quantize": "int4"}))
    fn = module.functions["forward"]
    reads = sorted(n.attrs["name"] for n in fn.nodes if n.op == "weight" and n.attrs["name"].startswith("w_emb"))
    assert reads == ["w_emb.qweight", "w_emb.qweight", "w_emb.scales", "w_emb.scales"]
    assert "w_emb" not in module.weights
    q, scale, _ = torch_quantize(arrays["w_emb"], 8, 0, False)
    np.testing.assert_array_equal(module.weight_data["w_emb.qweight"], q)


def test_offsets_reproduce_a_weight_already_on_a_16_level_grid():
    """A GGUF Q4_1-style source (w = d * n + m per group of 32, n in 0..15, both ends used, d and m f16)
    comes back exact."""
    from kiln.passes.quantize_weights import quantize_int4

    rng = np.random.default_rng(11)
    rows, k = 6, 128
    nibbles = rng.integers(0, 16, (rows, k // 32, 32))
    nibbles[..., 0], nibbles[..., 1] = 0, 15
    step = rng.uniform(0.001, 0.01, (rows, k // 32, 1)).astype(np.float16).astype(np.float32)
    low = rng.uniform(-0.1, 0.02, (rows, k // 32, 1)).astype(np.float16).astype(np.float32)
    w = (nibbles * step + low).astype(np.float32).reshape(rows, k)
    qw = quantize_int4(w, 32, zero_points=True)
    restored = torch_dequantize(qw.q, qw.scale, qw.offset, 4, 32).numpy()
    np.testing.assert_allclose(restored, w, rtol=0, atol=1e-6)


def test_pass_is_a_no_op_without_quantize_and_refuses_unknown_modes():
    module, _ = _small_module()
    assert not run_pass("quantize_weights", module, PassOptions())
    assert not run_pass("quantize_weights", module, PassOptions(extra={"quantize": "none"}))
    assert "w_in" in module.weights and "quantization" not in module.metadata
    with pytest.raises(ConfigError, match="int4-g128"):
        run_pass("quantize_weights", module, PassOptions(extra={"quantize": "int3"}))
    with pytest.raises(ConfigError, match="GGUF"):
        run_pass("quantize_weights", module, PassOptions(extra={"quantize": "gguf"}))


def test_compile_refuses_bad_quantize_arguments():
    with pytest.raises(ConfigError, match="quantize must be"):
        kiln.compile("smollm2", backend="reference", quantize="int2")  # refused before anything loads
    with pytest.raises(ConfigError, match="not a GGUF file"):
        kiln.compile(tiny_model("llama"), backend="reference", quantize="gguf")


# through TVM ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode,zero_points,rows,ids", [
    ("int8", True, 3, IDS),  # GEMV form
    ("int4", False, "seq", np.arange(13) % VOCAB),  # row-tiled GEMM form (prefill), a partial last tile
    ("int4-g128", True, 1, IDS[:1]),
])
def test_tvm_kernels_compute_the_quantized_module(mode, zero_points, rows, ids):
    """The fused dequantize + matmul kernels vs the numpy interpreter of the same quantized module."""
    pytest.importorskip("tvm")
    from kiln.backends.tvm import quant_lower  # noqa: F401  (registers the linear_q lowering)
    from kiln.backends.tvm.build import TVMFunction
    from kiln.ir.symbolic import sym

    module, _ = _small_module(sym(rows) if isinstance(rows, str) else rows)
    run_pass("quantize_weights", module, PassOptions(extra={"quantize": mode, "quantize_zero_points": zero_points}))
    ids = np.asarray(ids, dtype=np.int64)
    expected = run_function(module, "forward", [ids])[0]
    got = TVMFunction.from_module(module, "forward")(ids)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# end to end through TVM ----------------------------------------------------------------
def _compare(tmp_path, mode, **options):
    """TVM artifact vs the numpy interpreter on its own module.kir, and vs transformers fp32.

    Returns (TVM-vs-interpreter error, TVM-vs-transformers error), both relative to the largest logit.
    """
    from kiln.backends.reference.executor import load_executor

    model = tiny_model("llama")
    options = {"activations": "float", **options}
    artifact = kiln.compile(model, backend="tvm", quantize=mode, max_seq_len=48, output=tmp_path / "model.kiln",
                            **options)
    manifest = artifact.manifest
    assert manifest["options"]["quantize"] == mode and manifest["quantization"]["mode"] == mode
    compiled = kiln.load(artifact)
    interpreted = kiln.load(artifact)
    interpreted.executor = load_executor(interpreted.info)
    ours = compiled.generate(PROMPT, max_new_tokens=4, ignore_eos=True, return_logits=True)
    numpy_ref = interpreted.generate(PROMPT, max_new_tokens=4, ignore_eos=True, return_logits=True)
    assert ours.token_ids == numpy_ref.token_ids
    kernel_error = np.abs(ours.logits - numpy_ref.logits).max() / np.abs(numpy_ref.logits).max()
    prefill, prefill_ref = compiled.logits(PROMPT), interpreted.logits(PROMPT)
    kernel_error = max(kernel_error, np.abs(prefill - prefill_ref).max() / np.abs(prefill_ref).max())
    with torch.no_grad():
        hf = model(torch.as_tensor([PROMPT])).logits[0].numpy()
    return kernel_error, np.abs(prefill - hf).max() / np.abs(hf).max()


# Measured (tiny llama, random init std 0.02): TVM vs interpreter ~3e-7 for both;
# vs transformers fp32 ~0.009 (int8) and ~0.12 (int4 g32) of the largest logit.
@pytest.mark.slow
def test_tvm_int4_matches_the_interpreted_quantized_module(tmp_path):
    kernel_error, model_error = _compare(tmp_path, "int4")
    assert kernel_error <= 1e-5
    assert model_error <= 0.25


@pytest.mark.slow
@pytest.mark.parametrize("mode,options,model_tolerance", [
    ("int8", {}, 0.03),
    ("int4", {"quantize_zero_points": False}, 0.25),
    ("int4-g128", {}, 0.25),
])
def test_tvm_quantized_modes_match_the_interpreted_quantized_module(tmp_path, mode, options, model_tolerance):
    kernel_error, model_error = _compare(tmp_path, mode, **options)
    assert kernel_error <= 1e-5
    assert model_error <= model_tolerance


# artifact size ---------------------------------------------------------------------------
def test_int4_artifact_weights_take_under_a_fifth_of_fp32(tmp_path):
    """A llama whose weights are mostly linear layers (vocab 32, hidden 256); the reference backend
    writes the same weights.safetensors as TVM without building kernels."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sizes = {}
    for mode in ("none", "int4"):
        artifact = kiln.compile(model, backend="reference", quantize=mode, max_seq_len=32,
                                output=tmp_path / mode / "model.kiln")
        sizes[mode] = os.path.getsize(os.path.join(artifact.path, "weights.safetensors"))
    assert sizes["int4"] < sizes["none"] / 5


@pytest.mark.parametrize("k,group,expected", [(576, 128, 64), (1536, 128, 128), (96, 128, 32), (576, 32, 32),
                                              (40, 32, None)])
def test_int4_group_falls_back_to_a_size_that_divides_the_row(k, group, expected):
    from kiln.passes.quantize_weights import fitting_group

    assert fitting_group(k, group) == expected


@pytest.mark.slow
def test_smollm2_int4_artifact_weights_take_under_a_fifth_of_fp32(tmp_path):
    """Measured: int4 0.177 of the fp32 bytes (538 MB), int4-g128 0.163, gguf (Q4_1 + Q8_0 table) 0.180."""
    fp32_bytes = 538_060_160  # 134,515,040 parameters x 4 bytes
    for mode in ("int4", "int4-g128"):
        # sizes only: int4-g128 fails the accuracy gate on SmolLM2 (top-1 48%, KL 0.93: too aggressive)
        artifact = kiln.compile("smollm2", backend="reference", quantize=mode, max_seq_len=64,
                                output=tmp_path / mode / "model.kiln", accuracy_gate="off")
        assert artifact.manifest["quantization"]["fp32_weights_kept"] == []
        assert artifact.manifest["quantization"]["weight_bytes_before"] == fp32_bytes
        assert os.path.getsize(os.path.join(artifact.path, "weights.safetensors")) < fp32_bytes / 5, mode


# op by op through TVM: every format of linear_q / embedding_q vs the op's numpy reference -----------
def _single_op_module(op, first_type, arrays, attrs):
    module = Module()
    for name, array in zip(("q", "scale", "offset"), arrays):
        module.add_weight(name, array)
    fn = module.add_function("forward")
    first = fn.add_param("x", first_type)
    weights = [fn.emit("weight", name=n) for n in ("q", "scale", "offset")[:len(arrays)]]
    fn.set_results([fn.emit(op, first, *weights, **attrs)])
    return module


def _has_gpu() -> bool:
    try:
        from kiln.backends.tvm.executor import import_tvm

        return bool(import_tvm().cuda(0).exist)
    except Exception:  # noqa: BLE001 - no TVM or no driver: no GPU
        return False


TARGETS = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not _has_gpu(), reason="no CUDA GPU (tvm.cuda(0) does not exist)")])]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits,group,offsets,dtype,x_shape,n", OP_CASES)
def test_tvm_linear_q_matches_its_numpy_reference(bits, group, offsets, dtype, x_shape, n, target):
    pytest.importorskip("tvm")
    from kiln.backends.tvm import quant_lower  # noqa: F401  (registers the quantized lowerings)
    from kiln.backends.tvm.build import TVMFunction
    from kiln.ir.symbolic import sym

    rng = np.random.default_rng(31 + bits + group)
    k = x_shape[-1]
    arrays = [a for a in _random_quantized(rng, bits, group, offsets, dtype, k, n) if a is not None]
    attrs = {"bits": bits, "group_size": group}
    # rows symbolic: the GEMV form for a few rows and the row-tiled GEMM form for many, one build
    module = _single_op_module("linear_q", TensorType("f32", (sym("rows"), k)), arrays, attrs)
    fn = TVMFunction.from_module(module, "forward", target=target)
    for rows in (1, 3, 13):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        expected = OPS["linear_q"].reference([x] + arrays, attrs)[0]
        np.testing.assert_allclose(fn(x)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits,group,offsets,dtype,x_shape,n", OP_CASES[2:6])
def test_tvm_embedding_q_matches_its_numpy_reference(bits, group, offsets, dtype, x_shape, n, target):
    pytest.importorskip("tvm")
    from kiln.backends.tvm import quant_lower  # noqa: F401
    from kiln.backends.tvm.build import TVMFunction

    rng = np.random.default_rng(41 + bits)
    arrays = [a for a in _random_quantized(rng, bits, group, offsets, dtype, x_shape[-1], n) if a is not None]
    attrs = {"bits": bits, "group_size": group}
    ids = np.array([[0, n - 1, 3], [n + 5, 2, 2]], dtype=np.int64)
    module = _single_op_module("embedding_q", TensorType("i64", ids.shape), arrays, attrs)
    got = TVMFunction.from_module(module, "forward", target=target)(ids)[0]
    np.testing.assert_array_equal(got, OPS["embedding_q"].reference([ids] + arrays, attrs)[0])
