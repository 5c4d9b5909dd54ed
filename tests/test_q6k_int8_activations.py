"""GGUF Q6_K weights (int8 in groups of 16, f32 scales) with int8 activations (blocks of 32): the IR's fit rule,
the TVM VNNI kernels for weight groups smaller than an activation block (GEMV and the row-tiled GEMM, int8 and
int4, groups of 16 and 8), their assembly, the path a CPU without VNNI takes, ONNX Runtime's lowering, and a
tiny Llama quantized to Q6_K by llama.cpp compiled with int8 activations.

The numpy reference here is the formula itself, written per activation block: for block b of row i and weight
row j, the integer dot products of the quantized row with the weight's integers over each weight group inside
the block, each times its group's scale, times the block's scale:

    y[i, j] = sum_b s[i, b] * sum_h d[j, (32 / g) b + h] * (xq[i, b, g h : g (h + 1)] . q[j, b, g h : g (h + 1)])
"""

import numpy as np
import pytest
import tvm

import kiln
from kiln.backends.tvm import int8_kernels, quant_lower  # noqa: F401  (quant_lower registers linear_q)
from kiln.backends.tvm.build import TVMFunction, build
from kiln.backends.tvm.lower import cpu_target, lower_function, weight_names
from kiln.ir.errors import VerificationError
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.quant_ops import int8_activations_fit, pack_int4
from kiln.ir.types import TensorType
from kiln.passes import PassOptions, run_pass

from test_gguf_kquant import quantized_gguf  # noqa: F401  (the fixture: llama.cpp's quantizer)
from tiny_models import relative_error

HOST = cpu_target()
VNNI = int8_kernels.has_vnni(HOST)
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX512-VNNI (the VNNI kernels' own checks)")
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})  # AVX2, no AVX-512: the float path


def assembly(executable) -> str:
    return "".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")


def int8_blocks(x: np.ndarray) -> tuple:
    """(xq int64 [rows, K / 32, 32], s float64 [rows, K / 32]): the IR's int8 rows, computed as it states them
    (f32: s = max|x| / 127, xq = clip(rint(x * (127 / max|x|)), -127, 127); an all-zero block is zeros)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1)
    xq = np.zeros(blocks.shape, np.int64)
    for i, b in zip(*np.nonzero(amax)):
        inverse = np.float32(127) / amax[i, b]
        xq[i, b] = np.clip(np.rint(blocks[i, b] * inverse), -127, 127)
    return xq, (amax / np.float32(127)).astype(np.float64)


def formula(x: np.ndarray, ints: np.ndarray, scale: np.ndarray, offset, group: int) -> np.ndarray:
    """y [rows, N] by the formula in the module docstring: ``ints`` the weight's integers [N, K] (int8: q;
    int4: the nibbles, their zero point 8 unless there are offsets), ``scale`` / ``offset`` [N, K / group]."""
    xq, s = int8_blocks(x)
    rows, blocks = s.shape
    n = ints.shape[0]
    per = 32 // group
    d = scale.astype(np.float64).reshape(n, blocks, per)
    m = None if offset is None else offset.astype(np.float64).reshape(n, blocks, per)
    w = ints.astype(np.int64).reshape(n, blocks, per, group)
    a = xq.reshape(rows, blocks, per, group)
    dots = np.einsum("ibhe,jbhe->ijbh", a, w)  # exact integer dot products per group
    y = np.einsum("ib,jbh,ijbh->ij", s, d, dots.astype(np.float64))
    if m is not None:  # w = nibble * d + m: the offset meets the group's sum of xq
        y += np.einsum("ib,jbh,ibh->ij", s, m, a.sum(axis=-1).astype(np.float64))
    return y


def q6_k_weight(rng, n, k):
    """A Q6_K-shaped weight as kiln imports it: q = 6-bit values - 32 in [-32, 31], f32 scales d * sc per 16
    (sc a signed 8-bit sub-block scale, d one f16 per 256)."""
    q = rng.integers(-32, 32, (n, k)).astype(np.int8)
    d = rng.random((n, k // 256)).astype(np.float16).astype(np.float32) * np.float32(1e-3)
    sc = rng.integers(-128, 128, (n, k // 16)).astype(np.float32)
    return q, (np.repeat(d, 16, axis=1) * sc).astype(np.float32)


def weight(rng, n, k, bits, group, offsets, scale_dtype):
    """(arrays for linear_q, the integers, scale, offset) of a random weight; Q6_K's shape for int8 g16 f32."""
    dt = np.float16 if scale_dtype == "f16" else np.float32
    if bits == 8:
        if group == 16 and scale_dtype == "f32":
            q, scale = q6_k_weight(rng, n, k)
        else:
            q = rng.integers(-128, 128, (n, k)).astype(np.int8)
            scale = (rng.random((n, k // group)) * 0.05 + 0.01).astype(dt)
        return [q, scale], q, scale, None
    nibbles = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = (rng.random((n, k // group)) * 0.05 + 0.01).astype(dt)
    offset = (rng.standard_normal((n, k // group)) * 0.05).astype(dt) if offsets else None
    ints = nibbles.astype(np.int64) - (0 if offsets else 8)
    return [pack_int4(nibbles), scale] + ([offset] if offsets else []), ints, scale, offset


def linear_q_module(arrays, k, rows, bits, group, activations="int8"):
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (rows, k)))
    operands = []
    for i, a in enumerate(arrays):
        module.add_weight(f"w{i}", a)
        operands.append(fn.emit("weight", name=f"w{i}"))
    fn.set_results([fn.emit("linear_q", x, *operands, bits=bits, group_size=group, activations=activations)])
    return module


def activations(rng, rows, k):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block has scale 0
    x[-1, 32:64] *= 1e3  # a block whose scale dwarfs its neighbours'
    return x


# --- the IR --------------------------------------------------------------------------------------------------

def test_fit_rule_takes_groups_dividing_or_multiples_of_32():
    assert all(int8_activations_fit(256, g) for g in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256))
    assert not any(int8_activations_fit(96, g) for g in (3, 12, 24, 48))  # groups straddling two blocks
    assert not int8_activations_fit(48, 16)  # K not a multiple of 32


def test_reference_is_the_formula_and_the_rounding_shows():
    rng = np.random.default_rng(0)
    arrays, ints, scale, _ = weight(rng, 24, 256, 8, 16, False, "f32")
    module = linear_q_module(arrays, 256, 3, 8, 16)
    x = activations(rng, 3, 256)
    got = run_function(module, "f", [x])[0]
    want = formula(x, ints, scale, None, 16)
    assert relative_error(got, want) <= 1e-6
    # the rounding of x shows (the float product is further away), and so does each group's own scale: one
    # scale per 32 (the pair's mean) is further away still
    w = ints * np.repeat(scale.astype(np.float64), 16, 1)
    assert relative_error(x.astype(np.float64) @ w.T, want) > 1e-4
    merged = np.repeat(scale.reshape(24, -1, 2).mean(-1), 2, 1)
    assert relative_error(formula(x, ints, merged, None, 16), want) > 1e-2


def test_pass_marks_q6_k_linears_and_the_verifier_refuses_groups_that_straddle_blocks():
    rng = np.random.default_rng(1)
    arrays, *_ = weight(rng, 8, 256, 8, 16, False, "f32")
    module = linear_q_module(arrays, 256, 2, 8, 16, activations="float")
    assert run_pass("quantize_activations", module, PassOptions(extra={"activations": "int8"})) is True
    assert next(n for n in module.functions["f"].nodes if n.op == "linear_q").attrs["activations"] == "int8"
    assert module.metadata["activations_quantized"] == {"mode": "int8", "linear_q": 1, "kept_float": 0}
    q = rng.integers(-8, 8, (8, 96)).astype(np.int8)
    with pytest.raises(VerificationError, match="or the group a divisor of 32"):
        linear_q_module([q, np.ones((8, 2), np.float32)], 96, 2, 8, 48)


# --- the TVM kernels -----------------------------------------------------------------------------------------

CASES = [  # n, k, bits, group, offsets, scale dtype, rows (up to 8: the decode GEMV; more: the 8-row GEMM tile)
    (64, 256, 8, 16, False, "f32", 1),  # Q6_K
    (64, 256, 8, 16, False, "f32", 11),  # Q6_K, a prefill with a partial row tile
    (32, 512, 8, 16, False, "f16", 1),
    (48, 128, 8, 8, False, "f32", 9),
    (64, 128, 4, 16, False, "f16", 1),
    (32, 256, 4, 16, True, "f32", 3),
    (32, 128, 4, 8, True, "f16", 1),
]


@pytest.mark.parametrize("n,k,bits,group,offsets,scale_dtype,rows", CASES)
def test_repacked_layout_holds_the_weight(n, k, bits, group, offsets, scale_dtype, rows):
    arrays, ints, scale, offset = weight(np.random.default_rng(n + k + group), n, k, bits, group, offsets,
                                         scale_dtype)
    packed = int8_kernels.repack(bits, group, *arrays, *([None] if len(arrays) == 2 else []))
    assert [a.dtype for a in packed[1:]] == [a.dtype for a in arrays[1:]]  # scales stay in their dtype
    assert packed[1].shape == (n // 4, k // 32, 4 * 32 // group)
    w = ints * np.repeat(scale.astype(np.float64), group, 1)
    if offset is not None:
        w += np.repeat(offset.astype(np.float64), group, 1)
    np.testing.assert_array_equal(int8_kernels.unpack_reference(bits, group, packed, n, k), w)


TARGETS = [pytest.param(HOST, id="host", marks=needs_vnni), pytest.param(NO_VNNI, id="no-vnni")]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,k,bits,group,offsets,scale_dtype,rows", CASES)
def test_small_group_kernels_match_the_formula(target, n, k, bits, group, offsets, scale_dtype, rows):
    rng = np.random.default_rng(n * k + rows + group)
    arrays, ints, scale, offset = weight(rng, n, k, bits, group, offsets, scale_dtype)
    module = linear_q_module(arrays, k, rows, bits, group)
    x = activations(rng, rows, k)
    got = TVMFunction.from_module(module, "f", target=target)(x)[0]
    assert relative_error(got, formula(x, ints, scale, offset, group)) <= 1e-6


@needs_vnni
@pytest.mark.parametrize("rows", [1, 16])
def test_q6_k_kernel_uses_vpdpbusd_and_the_repacked_weights(rows):
    arrays, *_ = weight(np.random.default_rng(0), 64, 256, 8, 16, False, "f32")
    module = linear_q_module(arrays, 256, rows, 8, 16)
    derived: dict = {}
    irmodule = lower_function(module, "f", HOST, derived)
    assert weight_names(irmodule, "f") == ["w0.vnni_q", "w0.vnni_scale"]  # not q / scale
    assert [(a.dtype, a.shape) for a in derived.values()] == [(np.uint32, (16, 8, 32)), (np.float32, (16, 8, 8))]
    text = irmodule.script()
    assert "linear_q_vnni_int8" in text and "quantize_rows" in text
    assert "vpdpbusd" in assembly(build(irmodule, HOST))


def test_without_vnni_the_float_kernels_run_on_int8_rows():
    arrays, *_ = weight(np.random.default_rng(0), 64, 256, 8, 16, False, "f32")
    module = linear_q_module(arrays, 256, 1, 8, 16)
    derived: dict = {}
    irmodule = lower_function(module, "f", NO_VNNI, derived)
    assert derived == {} and weight_names(irmodule, "f") == ["w0", "w1"]
    asm = assembly(build(irmodule, NO_VNNI))
    assert "vpdpbusd" not in asm and "zmm" not in asm


@pytest.mark.parametrize("group", [4, 2])
def test_groups_below_8_take_the_float_path_on_int8_rows(group):
    """A group of 4 or 2 fits the IR's rule but not the kernels' lanes (8 elements each): int8 rows, f32."""
    rng = np.random.default_rng(group)
    arrays, ints, scale, offset = weight(rng, 16, 64, 8, group, False, "f32")
    module = linear_q_module(arrays, 64, 2, 8, group)
    derived: dict = {}
    lower_function(module, "f", HOST, derived)
    assert derived == {}
    x = activations(rng, 2, 64)
    got = TVMFunction.from_module(module, "f", target=HOST)(x)[0]
    assert relative_error(got, formula(x, ints, scale, offset, group)) <= 1e-6


@needs_vnni
def test_a_tied_q6_k_embedding_reads_the_repacked_table():
    """embedding_q and the logits linear_q over one Q6_K table: the rows gathered from the repacked layout
    (scales per 16) are the table's rows."""
    rng = np.random.default_rng(7)
    n, k = 40, 256
    arrays, ints, scale, _ = weight(rng, n, k, 8, 16, False, "f32")
    module = Module()
    fn = module.add_function("f")
    ids = fn.add_param("ids", TensorType("i64", (5,)))
    table = []
    for i, a in enumerate(arrays):
        module.add_weight(f"w{i}", a)
        table.append(fn.emit("weight", name=f"w{i}"))
    rows = fn.emit("embedding_q", ids, *table, bits=8, group_size=16)
    logits = fn.emit("linear_q", rows, *table, bits=8, group_size=16, activations="int8")
    fn.set_results([rows, logits])
    irmodule = lower_function(module, "f", HOST, {})
    assert all(name.startswith("w0.vnni_") for name in weight_names(irmodule, "f"))
    token_ids = np.array([0, 39, 7, 400, -3])
    got_rows, got_logits = TVMFunction.from_module(module, "f", target=HOST)(token_ids)
    want_rows = ints * np.repeat(scale.astype(np.float64), 16, 1)
    want_rows = want_rows[np.clip(token_ids, 0, n - 1)]
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-6, atol=1e-9)
    assert relative_error(got_logits, formula(got_rows, ints, scale, None, 16)) <= 1e-6


# --- ONNX Runtime --------------------------------------------------------------------------------------------

ORT_CASES = [(8, 16, False, "f32"), (8, 8, False, "f16"), (4, 16, False, "f16"), (4, 16, True, "f32")]


@pytest.mark.parametrize("bits,group,offsets,scale_dtype", ORT_CASES)
def test_onnxruntime_splits_small_groups_into_block_32_matmuls(bits, group, offsets, scale_dtype):
    """MatMulNBits at accuracy_level 4 rounds x per weight block, so the lowering gives it blocks of 32: one
    MatMulNBits per position of a group inside the 32 (its groups' integers and scales, the others zero). ONNX
    Runtime then rounds x per 32 as the IR says; a single block-16 MatMulNBits (per-16 rounding) would be
    about 4e-3 off, which the bound tells apart. With offsets their term reads the group sums of the same
    int8 rows (standard ops), not of x."""
    from kiln.backends.onnxruntime.lower import lower_function as lower_onnx

    from test_onnxruntime_ops import BATCH, build, run_onnx

    rng = np.random.default_rng(group + bits)
    n, k = 48, 256
    arrays, ints, scale, offset = weight(rng, n, k, bits, group, offsets, scale_dtype)
    module = build("linear_q", [("x", TensorType("f32", (BATCH, k)))], {f"w{i}": a for i, a in enumerate(arrays)},
                   {"bits": bits, "group_size": group, "activations": "int8"})
    lowered = lower_onnx(module, "f")
    matmuls = [node for node in lowered.graph.node if node.op_type == "MatMulNBits"]
    assert len(matmuls) == 32 // group
    for node in matmuls:
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["accuracy_level"], attrs["block_size"], attrs["bits"]) == (4, 32, bits)
    x = activations(rng, 3, k)
    got = run_onnx(module, {"x": x})
    want = formula(x, ints, scale, offset, group)
    assert relative_error(got, want) <= 1e-5
    per_16 = x.astype(np.float64).reshape(3, -1, 16)
    step = np.abs(per_16).max(-1, keepdims=True) / 127
    rows_16 = (np.round(per_16 / np.where(step > 0, step, 1)) * step).reshape(x.shape)
    w = ints * np.repeat(scale.astype(np.float64), group, 1)
    assert relative_error(rows_16 @ w.T, want) > 1e-3


# --- a tiny Llama quantized to Q6_K by llama.cpp -------------------------------------------------------------

def compiled_q6_k(quantized_gguf, tmp_path, backend):
    path = quantized_gguf("Q6_K")
    artifact = kiln.compile(path, backend=backend, max_seq_len=64, max_num_seqs=1, activations="int8",
                            output=tmp_path / f"q6_k-{backend}.kiln")
    return path, artifact, kiln.load(artifact.path)


def compiled_module(artifact):
    from kiln.ir.parser import parse_module

    with open(f"{artifact.path}/module.kir") as f:
        return parse_module(f.read())


# The prompt's logits: TVM's kernels, ONNX Runtime's and the IR's numpy reference (the reference backend running
# the same IR) round the same int8 rows, computed in a different order; an element within 1e-7 of a rounding
# midpoint would land one step apart (test_tvm_int8_activations.py says why 1e-5 holds). Measured: TVM 3.7e-7
# from the reference and 6.5e-7 from transformers, ONNX Runtime 1.7e-6 and 1.8e-6; the rounding itself moves
# the logits by 1.4%.
TOLERANCE = 1e-5


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_q6_k_llama_with_int8_activations_matches_the_reference_and_transformers(quantized_gguf, tmp_path,
                                                                                   backend):
    """Every linear of a Q6_K file (int8 groups of 16) takes int8 activations in the compiled IR, and the
    backend's logits are the IR's (the reference backend's numpy) and transformers' with each linear's input
    rounded per 32, and far from the float-activation logits."""
    from test_gguf_kquant import PROMPT, tensor_types, transformers_reference

    from kiln.frontend.gguf_model import hf_tensor_name

    path, artifact, engine = compiled_q6_k(quantized_gguf, tmp_path, backend)
    module = compiled_module(artifact)
    nodes = [node for fn in module.functions.values() for node in fn.nodes if node.op == "linear_q"]
    assert nodes and all((n.attrs["bits"], n.attrs["group_size"], n.attrs["activations"]) == (8, 16, "int8")
                         for n in nodes)
    assert module.metadata["activations_quantized"]["kept_float"] == 0
    if backend == "tvm" and VNNI:
        assert all(".vnni_" in name for name in artifact.manifest["backend_info"]["derived_weights"])
    got = engine.logits(PROMPT)
    _, _, reference = compiled_q6_k(quantized_gguf, tmp_path, "reference")
    assert relative_error(got, reference.logits(PROMPT)) <= TOLERANCE
    steps = engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)  # decode: the GEMV
    want = reference.generate(PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)
    assert steps.token_ids == want.token_ids
    assert relative_error(steps.logits, want.logits) <= TOLERANCE
    linears = {hf_tensor_name(name)[:-len(".weight")] for name in tensor_types(path) if name != "token_embd.weight"}
    rounded = transformers_reference(path, round_inputs_of=linears)
    assert relative_error(got, rounded) <= TOLERANCE
    assert relative_error(rounded, transformers_reference(path)) > 100 * TOLERANCE  # the rounding shows
