"""gated_mlp_q: a quantized model keeps its MLPs as one op (ir/quant_mlp_ops.py, passes/fuse_quantized_gated_mlp.py).

The op's reference is checked against numpy written here from the formats' definitions (not kiln's dequantizer);
the pass against the IR a quantized tiny Llama compiles to; the backends, which lower the op as its subgraph,
against transformers on the same dequantized weights (float activations) and against the reference
interpreter on the same IR (int8 activations).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import kiln
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.types import TensorType as T
from tiny_models import assert_engine_matches_transformers, build_tiny_model, dequantized_tiny_llama, relative_error


def _int4_with_offsets(rng, rows: int, k: int, group: int = 32):
    """(packed u32 [rows, k / 8], scale [rows, k / group], offset [rows, k / group], the dequantized weight):
    element j of a row in bits 4 * (j % 8) of word j // 8."""
    nibbles = rng.integers(0, 16, size=(rows, k)).astype(np.uint32)
    scale = rng.uniform(0.01, 0.1, size=(rows, k // group)).astype(np.float32)
    offset = rng.uniform(-0.5, 0.0, size=(rows, k // group)).astype(np.float32)
    packed = np.zeros((rows, k // 8), dtype=np.uint32)
    for j in range(8):
        packed |= nibbles[:, j::8] << np.uint32(4 * j)
    dense = nibbles * np.repeat(scale, group, axis=1) + np.repeat(offset, group, axis=1)
    return packed, scale, offset, dense.astype(np.float64)


def _int8_rows(rng, rows: int, k: int):
    q = rng.integers(-127, 128, size=(rows, k)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, size=rows).astype(np.float32)
    return q, scale, q.astype(np.float64) * scale[:, None].astype(np.float64)


def _blocks_of_32(x):
    """x as int8 per block of 32 (scale max|x| / 127, round half to even), back in float: what int8 activations
    multiply by."""
    blocks = x.astype(np.float64).reshape(x.shape[:-1] + (-1, 32))
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = (amax / 127).astype(np.float32).astype(np.float64)
    q = np.clip(np.round(blocks / np.where(scale > 0, scale, 1)), -127, 127)
    return (q * scale).reshape(x.shape)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_reference_is_the_gated_mlp_of_the_dequantized_weights(activations):
    rng = np.random.default_rng(0)
    hidden, inter, out, rows = 64, 96, 64, 3
    gu_q, gu_s, gu_o, gu = _int4_with_offsets(rng, 2 * inter, hidden)
    d_q, d_s, d = _int8_rows(rng, out, inter)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)

    module = Module()
    for name, array in (("gu.q", gu_q), ("gu.s", gu_s), ("gu.o", gu_o), ("d.q", d_q), ("d.s", d_s)):
        module.add_weight(name, array)
    fn = module.add_function("forward")
    xv = fn.add_param("x", T("f32", (rows, hidden)))
    y = fn.emit("gated_mlp_q", xv, *(fn.emit("weight", name=n) for n in ("gu.q", "gu.s", "gu.o", "d.q", "d.s")),
                activation="silu", gate_up_bits=4, gate_up_group_size=32, gate_up_offset=True,
                gate_up_activations=activations, down_bits=8, down_group_size=0, down_offset=False,
                down_activations=activations)
    fn.set_results([y])
    (got,) = run_function(module, "forward", [x])

    a = _blocks_of_32(x) if activations == "int8" else x.astype(np.float64)
    wide = a @ gu.T
    gate, up = wide[:, :inter], wide[:, inter:]
    hidden_act = gate / (1 + np.exp(-gate)) * up
    hidden_act = _blocks_of_32(hidden_act.astype(np.float32)) if activations == "int8" else hidden_act
    want = hidden_act @ d.T
    assert relative_error(got, want) < 1e-5


def _module_text(artifact) -> str:
    with open(os.path.join(artifact.path, "module.kir"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_quantized_tiny_llama_keeps_one_mlp_op_per_layer_and_matches_transformers(backend, tmp_path):
    if backend == "tvm":
        pytest.importorskip("tvm")
    model = build_tiny_model("llama")
    layers = model.config.num_hidden_layers
    artifact = kiln.compile(model, backend=backend, max_seq_len=64, quantize="int4", activations="float",
                            output=tmp_path / "q.kiln")
    text = _module_text(artifact)
    # @step and @step_decode each hold one per layer, and no quantized matmul of the MLP is left outside it:
    # per layer q/k/v (one wide) and o, plus the logits projection
    assert text.count(" = gated_mlp_q(") == 2 * layers
    assert text.count(" = linear_q(") == 2 * (2 * layers + 1)
    assert_engine_matches_transformers(kiln.load(artifact.path), "llama", model=dequantized_tiny_llama("int4"))


def test_int8_activations_compile_to_what_the_interpreter_says(tmp_path):
    """The TVM lowering of the op (its subgraph, VNNI kernels) against the reference backend's interpretation
    of the same IR: the prefill of one prompt."""
    pytest.importorskip("tvm")
    model = build_tiny_model("llama")
    prompt = [5, 17, 99, 3, 42, 7, 64, 2]
    logits = {}
    for backend in ("tvm", "reference"):
        artifact = kiln.compile(model, backend=backend, max_seq_len=64, quantize="int4", activations="int8",
                                output=tmp_path / f"{backend}.kiln")
        assert " = gated_mlp_q(" in _module_text(artifact)
        assert 'gate_up_activations="int8"' in _module_text(artifact)
        logits[backend] = kiln.load(artifact.path).logits(prompt)
    assert relative_error(logits["tvm"], logits["reference"]) < 1e-5
