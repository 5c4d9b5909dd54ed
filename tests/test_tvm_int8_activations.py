"""linear_q {activations=int8} on the TVM CPU backend: the VNNI dot-product kernels (backends/tvm/int8_kernels.py)
against numpy, their assembly, the path a CPU without VNNI takes, and a tiny model against transformers whose
linear layers see the same int8 rows.

The numpy reference here is written from the IR's definition (kiln/ir/quant_ops.py): each row of x rounded per
block of 32 to steps of max|block| / 127, times the dequantized weight.
"""

import numpy as np
import pytest
import tvm

import kiln
from kiln.backends.tvm import int8_kernels, quant_lower  # noqa: F401  (quant_lower registers linear_q)
from kiln.backends.tvm.build import TVMFunction, build
from kiln.backends.tvm.lower import cpu_target, lower_function, weight_names
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.quant_ops import pack_int4
from kiln.ir.types import TensorType

from tiny_models import ENGINE_PROMPT, dequantized_tiny_llama, relative_error, tiny_model

HOST = cpu_target()
VNNI = int8_kernels.has_vnni(HOST)
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX512-VNNI (the VNNI kernels' own checks)")
# AVX2 + FMA + F16C, no AVX-512: the path a CPU without VNNI takes (this CPU runs it too)
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def assembly(executable) -> str:
    """The x86 assembly of a built module's kernels (its imported LLVM module)."""
    return "".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")


def int8_rows(x: np.ndarray) -> np.ndarray:
    blocks = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    return (np.round(blocks / np.where(step > 0, step, 1)) * step).reshape(x.shape)


def quantized_weight(rng, n, k, bits, group, offsets, scale_dtype):
    """(arrays for linear_q, the float64 weight they stand for), written from the op's definition."""
    dt = np.float16 if scale_dtype == "f16" else np.float32
    if bits == 4:
        nibbles = rng.integers(0, 16, (n, k)).astype(np.uint8)
        scale = (rng.random((n, k // group)) * 0.05 + 0.01).astype(dt)
        offset = (rng.standard_normal((n, k // group)) * 0.05).astype(dt) if offsets else None
        s = np.repeat(scale.astype(np.float64), group, axis=1)
        w = nibbles * s + (np.repeat(offset.astype(np.float64), group, axis=1) if offsets else -8 * s)
        return [pack_int4(nibbles), scale] + ([offset] if offsets else []), w
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    scale = (rng.random((n, k // group) if group else (n,)) * 0.05 + 0.01).astype(dt)
    s = np.repeat(scale.astype(np.float64), group, axis=1) if group else scale.astype(np.float64)[:, None]
    return [q, scale], q * s


def linear_q_module(arrays, k, rows, bits, group):
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (rows, k)))
    operands = []
    for i, a in enumerate(arrays):
        module.add_weight(f"w{i}", a)
        operands.append(fn.emit("weight", name=f"w{i}"))
    fn.set_results([fn.emit("linear_q", x, *operands, bits=bits, group_size=group, activations="int8")])
    return module


CASES = [  # n, k, bits, group, offsets, scale dtype, rows (1: the decode form; more: the row-tiled prefill form)
    (64, 128, 4, 32, True, "f16", 1),
    (64, 128, 4, 32, False, "f32", 3),
    (32, 256, 4, 128, True, "f16", 11),
    (64, 192, 4, 64, False, "f16", 1),
    (64, 128, 8, 32, False, "f16", 9),
    (48, 96, 8, 0, False, "f32", 2),
]


@pytest.mark.parametrize("n,k,bits,group,offsets,scale_dtype,rows", CASES)
def test_repacked_layout_holds_the_weight(n, k, bits, group, offsets, scale_dtype, rows):
    arrays, w = quantized_weight(np.random.default_rng(n + k), n, k, bits, group, offsets, scale_dtype)
    packed = int8_kernels.repack(bits, group, *arrays, *([None] if len(arrays) == 2 else []))
    assert packed[1].dtype == arrays[1].dtype  # f16 scales stay f16
    np.testing.assert_array_equal(int8_kernels.unpack_reference(bits, group, packed, n, k), w)


@pytest.mark.parametrize("target", [pytest.param(HOST, id="host", marks=needs_vnni), pytest.param(NO_VNNI, id="no-vnni")])
@pytest.mark.parametrize("n,k,bits,group,offsets,scale_dtype,rows", CASES)
def test_linear_q_int8_activations_match_numpy(target, n, k, bits, group, offsets, scale_dtype, rows):
    rng = np.random.default_rng(n * k + rows)
    arrays, w = quantized_weight(rng, n, k, bits, group, offsets, scale_dtype)
    module = linear_q_module(arrays, k, rows, bits, group)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block has scale 0
    got = TVMFunction.from_module(module, "f", target=target)(x)[0]
    want = int8_rows(x) @ w.T
    assert relative_error(got, want) <= 1e-6
    # ... and the int8 rows matter: the float product is further away than that
    assert relative_error(x.astype(np.float64) @ w.T, want) > 1e-4


@needs_vnni
def test_vnni_kernel_uses_vpdpbusd_and_the_repacked_weights():
    arrays, _ = quantized_weight(np.random.default_rng(0), 64, 128, 4, 32, True, "f16")
    module = linear_q_module(arrays, 128, 1, 4, 32)
    derived: dict = {}
    irmodule = lower_function(module, "f", HOST, derived)
    assert weight_names(irmodule, "f") == ["w0.vnni_q", "w0.vnni_scale", "w0.vnni_offset"]  # not q/scale/offset
    assert [a.dtype for a in derived.values()] == [np.uint32, np.float16, np.float16]
    assert "vpdpbusd" in assembly(build(irmodule, HOST))


def test_without_vnni_the_float_kernels_run_on_int8_rows():
    arrays, _ = quantized_weight(np.random.default_rng(0), 64, 128, 4, 32, True, "f16")
    module = linear_q_module(arrays, 128, 1, 4, 32)
    derived: dict = {}
    irmodule = lower_function(module, "f", NO_VNNI, derived)
    assert derived == {} and weight_names(irmodule, "f") == ["w0", "w1", "w2"]
    asm = assembly(build(irmodule, NO_VNNI))
    assert "vfmadd" in asm and "vpdpbusd" not in asm and "zmm" not in asm  # an AVX2 build, no VNNI


def int8_activation_llama(quantize: str):
    """transformers' tiny Llama with kiln's quantized weights (tiny_models.dequantized_tiny_llama) whose decoder
    linear layers multiply int8 rows of their inputs (per block of 32, the IR's definition): a forward pre-hook
    rounds each input. The embedding / logits table is kiln's int8 per row, its input rounded as well."""
    import copy

    import torch

    model = copy.deepcopy(dequantized_tiny_llama(quantize))  # the cached model stays as it is

    def round_rows(module, inputs):
        (x,) = inputs
        if x.shape[-1] % 32:
            return None
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        step = blocks.abs().amax(dim=-1, keepdim=True) / 127
        rounded = torch.round(blocks / torch.where(step > 0, step, torch.ones_like(step))) * step
        return (rounded.reshape(x.shape),)

    for module in list(model.model.layers.modules()) + [model.lm_head]:
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(round_rows)
    return model


# transformers (with the rounding hook) and kiln compute each activation in a different order, so their values
# differ in the last bits (1e-7); an element within that distance of a rounding midpoint lands one int8 step
# apart, which moves the logits by ~1e-2 in this 64-wide model, and a K/V written at that position carries it
# to every later step. The prompt's logits are compared with transformers (measured: 3e-7; a bound of 1e-5);
# the steps that follow with the IR's numpy reference running the same artifact, which rounds the same values.
PREFILL_TOLERANCE = 1e-5


def test_tiny_llama_with_int8_activations_matches_transformers_and_the_reference(tmp_path):
    import torch

    model = int8_activation_llama("int4")
    options = dict(max_seq_len=48, quantize="int4", activations="int8")
    engine = kiln.load(kiln.compile(tiny_model("llama"), backend="tvm", output=tmp_path / "a8.kiln", **options))
    reference = kiln.load(kiln.compile(tiny_model("llama"), backend="reference", output=tmp_path / "ref.kiln",
                                       **options))
    prompt = list(ENGINE_PROMPT)
    with torch.no_grad():
        rows = model(torch.as_tensor([prompt])).logits[0].numpy()
        floats = dequantized_tiny_llama("int4")(torch.as_tensor([prompt])).logits[0].numpy()
    assert relative_error(rows, floats) > 100 * PREFILL_TOLERANCE  # the check tells int8 rows from float ones
    assert relative_error(engine.logits(prompt), rows) <= PREFILL_TOLERANCE
    got = engine.generate(prompt, max_new_tokens=12, ignore_eos=True, return_logits=True)
    want = reference.generate(prompt, max_new_tokens=12, ignore_eos=True, return_logits=True)
    assert got.token_ids == want.token_ids
    assert relative_error(got.logits, want.logits) <= PREFILL_TOLERANCE


@needs_vnni
@pytest.mark.parametrize("bits,group,offsets", [(8, 32, False), (4, 32, True), (8, 0, False)])
def test_a_tied_embedding_reads_the_repacked_table(bits, group, offsets):
    """embedding_q and the logits linear_q over one table: the table is held once, repacked, and the rows
    gathered from that layout are the table's rows."""
    rng = np.random.default_rng(bits + group)
    n, k = 40, 64
    arrays, w = quantized_weight(rng, n, k, bits, group, offsets, "f16")
    module = Module()
    fn = module.add_function("f")
    ids = fn.add_param("ids", TensorType("i64", (5,)))
    table = []
    for i, a in enumerate(arrays):
        module.add_weight(f"w{i}", a)
        table.append(fn.emit("weight", name=f"w{i}"))
    rows = fn.emit("embedding_q", ids, *table, bits=bits, group_size=group)
    logits = fn.emit("linear_q", rows, *table, bits=bits, group_size=group, activations="int8")
    fn.set_results([rows, logits])
    irmodule = lower_function(module, "f", HOST, {})
    assert all(name.startswith("w0.vnni_") for name in weight_names(irmodule, "f"))
    token_ids = np.array([0, 39, 7, 400, -3])  # out of range ids clip to the table
    got_rows, got_logits = TVMFunction.from_module(module, "f", target=HOST)(token_ids)
    want_rows = w[np.clip(token_ids, 0, n - 1)]
    np.testing.assert_allclose(got_rows, want_rows, rtol=1e-6, atol=1e-6)
    # rows of integers times one scale sit on rounding midpoints (q * 127 / max|q|), where float32 and float64
    # round apart: the logits are checked against the op's numpy reference, which rounds in float32 as kiln does
    assert relative_error(got_logits, run_function(module, "f", [token_ids])[1]) <= 1e-6


def test_inspect_shows_launches_on_the_thread_pool(tmp_path, capsys):
    from kiln.cli import main

    path = kiln.compile(tiny_model("llama"), backend="tvm", max_seq_len=48, quantize="int4", activations="int8",
                        output=tmp_path / "a8.kiln").path
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "quantized linears multiply int8 activations (per block of 32): " in out
    line = next(ln for ln in out.splitlines() if ln.startswith("kernel launches per call"))
    import json
    import os

    backend = json.load(open(os.path.join(path, "manifest.json")))["backend_info"]
    for name, count in backend["kernel_launches"].items():
        pool = backend["parallel_launches"][name]
        assert f"@{name} {count} ({pool} on the thread pool)" in line
        # a decode step is one merged launch per layer, each on the pool (launch_fusion.py); a prefill is not merged
        assert pool == count if name == "step_decode" else 0 < pool < count
    if VNNI:
        assert backend["derived_weights"] and all(".vnni_" in name for name in backend["derived_weights"])
