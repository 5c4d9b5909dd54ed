"""int8 activations as an IR attribute: linear_q {activations=int8}, its numpy reference, the pass that sets it,
and the printer / verifier (the TVM kernels are checked in test_tvm_vnni.py, ONNX Runtime in
test_onnxruntime_ops.py)."""

import numpy as np
import pytest

from kiln.ir.errors import VerificationError
from kiln.ir.graph import Module
from kiln.ir.interpreter import run_function
from kiln.ir.parser import parse_module
from kiln.ir.printer import print_module
from kiln.ir.quant_ops import pack_int4
from kiln.ir.types import TensorType
from kiln.passes import PassOptions, run_pass


def _rows_int8(x: np.ndarray) -> np.ndarray:
    """Independent formula: each row's blocks of 32 rounded to steps of max|block| / 127."""
    out = np.empty(x.shape, np.float64)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            block = x[r, b:b + 32].astype(np.float64)
            step = np.abs(block).max() / 127
            out[r, b:b + 32] = 0 if step == 0 else np.round(block / step) * step
    return out


def _module(k, n, bits, group, offsets, activations, scale_dtype="f16"):
    rng = np.random.default_rng(3)
    module = Module()
    if bits == 4:
        nibbles = rng.integers(0, 16, (n, k)).astype(np.uint8)
        scale = (rng.random((n, k // group)) * 0.05 + 0.01).astype(scale_dtype.replace("f", "float"))
        offset = (rng.standard_normal((n, k // group)) * 0.05).astype(scale.dtype) if offsets else None
        w = nibbles.astype(np.float64) * np.repeat(scale.astype(np.float64), group, 1)
        w += np.repeat(offset.astype(np.float64), group, 1) if offsets else -8 * np.repeat(scale.astype(np.float64), group, 1)
        arrays = [pack_int4(nibbles), scale] + ([offset] if offsets else [])
    else:
        q = rng.integers(-127, 128, (n, k)).astype(np.int8)
        scale = (rng.random((n, k // group) if group else (n,)) * 0.05 + 0.01).astype(scale_dtype.replace("f", "float"))
        w = q.astype(np.float64) * (np.repeat(scale.astype(np.float64), group, 1) if group else scale[:, None])
        arrays = [q, scale]
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (3, k)))
    operands = []
    for i, a in enumerate(arrays):
        module.add_weight(f"w{i}", a)
        operands.append(fn.emit("weight", name=f"w{i}"))
    fn.set_results([fn.emit("linear_q", x, *operands, bits=bits, group_size=group, activations=activations)])
    return module, w


@pytest.mark.parametrize("bits,group,offsets", [(4, 32, True), (4, 32, False), (4, 64, True), (8, 32, False),
                                                (8, 0, False)])
def test_reference_is_int8_rows_times_weight(bits, group, offsets):
    module, w = _module(128, 24, bits, group, offsets, "int8")
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32)
    x[1, 32:64] = 0  # an all-zero block quantizes to zeros
    got = run_function(module, "f", [x])[0]
    ref = _rows_int8(x) @ w.T
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    exact = x.astype(np.float64) @ w.T
    assert np.abs(exact - ref).max() > 1e-3 * np.abs(ref).max()  # int8 rows differ from float ones


def test_pass_marks_linear_q_that_fit_and_printer_round_trips():
    module, _ = _module(128, 24, 4, 32, True, "float")
    assert run_pass("quantize_activations", module, PassOptions(extra={"activations": "float"})) is False
    assert run_pass("quantize_activations", module, PassOptions(extra={"activations": "int8"})) is True
    node = next(n for n in module.functions["f"].nodes if n.op == "linear_q")
    assert node.attrs["activations"] == "int8"
    assert module.metadata["activations_quantized"] == {"mode": "int8", "linear_q": 1, "kept_float": 0}
    text = print_module(module)
    assert 'activations="int8"' in text
    assert print_module(parse_module(text)) == text


def test_pass_keeps_float_where_k_is_not_a_multiple_of_32():
    module, _ = _module(48, 8, 8, 0, False, "float")
    assert run_pass("quantize_activations", module, PassOptions(extra={"activations": "int8"})) is False
    assert module.metadata["activations_quantized"]["kept_float"] == 1


def test_verifier_refuses_int8_activations_that_do_not_fit():
    with pytest.raises(VerificationError, match="multiples of 32"):
        _module(48, 8, 8, 0, False, "int8")
    with pytest.raises(VerificationError, match="activations must be one of"):
        _module(64, 8, 8, 0, False, "int4")
