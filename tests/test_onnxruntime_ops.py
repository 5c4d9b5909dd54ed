"""ONNX Runtime lowerings op by op: one-node kiln functions lowered to ONNX, checked with onnx.checker,
run by onnxruntime and compared with numpy (the quantized ops with ir.quant_ops.dequantize,
written out here as x @ W.T in float64)."""

import numpy as np
import onnx
import pytest

from kiln.backends.onnxruntime import quant_lower  # noqa: F401  (registers linear_q / embedding_q)
from kiln.backends.onnxruntime.lower import LOGITS, LOWERINGS, lower_function, make_model
from kiln.ir.errors import UnsupportedOpError
from kiln.ir.graph import Module
from kiln.ir.ops import OPS
from kiln.ir.quant_ops import dequantize, pack_int4
from kiln.ir.symbolic import SymExpr
from kiln.ir.types import TensorType, dtype_of_numpy

ort = pytest.importorskip("onnxruntime")
BATCH, SEQ = SymExpr.symbol("batch"), SymExpr.symbol("seq")


def build(op: str, inputs: list, weights: dict, attrs: dict, n_outputs: int = 1, keep: int = 0):
    """A module whose @f takes ``inputs`` (name, TensorType) and returns output ``keep`` of one ``op`` node."""
    module = Module()
    for name, array in weights.items():
        module.add_weight(name, array)
    fn = module.add_function("f")
    params = [fn.add_param(name, t) for name, t in inputs]
    operands = params + [fn.emit("weight", name=name) for name in weights]
    node = fn.add_node(op, operands, attrs)
    fn.set_results([node.outputs[keep]])
    return module


def run_onnx(module: Module, feeds: dict, accuracy_level: int = 0) -> np.ndarray:
    lowered = lower_function(module, "f", {"accuracy_level": accuracy_level})
    for name, array in lowered.initializers.items():
        lowered.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
    model = make_model(lowered.graph)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([LOGITS], feeds)[0]


def _int4_weight(rng, n, k, group, offsets):
    nibbles = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = (rng.random((n, k // group)) * 0.1 + 0.01).astype(np.float32)
    offset = (rng.standard_normal((n, k // group)) * 0.1).astype(np.float32) if offsets else None
    return pack_int4(nibbles), scale, offset


def _int8_weight(rng, n, k, group):
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    scale = (rng.random((n, k // group) if group else (n,)) * 0.1 + 0.01).astype(np.float32)
    return q, scale, None


QUANT_CASES = [  # bits, group_size, offsets, scale dtype, (N, K)
    (4, 32, False, "f32", (48, 96)),
    (4, 32, True, "f32", (48, 96)),
    (4, 128, True, "f16", (40, 256)),
    (4, 128, False, "f16", (40, 256)),
    (8, 0, False, "f32", (48, 96)),  # per row, K a multiple of 32
    (8, 0, False, "f32", (24, 72)),  # per row, K padded to blocks of 32
    (8, 32, False, "f16", (48, 96)),  # GGUF Q8_0
]


def _quant_weights(rng, bits, group, offsets, scale_dtype, n, k):
    q, scale, offset = _int4_weight(rng, n, k, group, offsets) if bits == 4 else _int8_weight(rng, n, k, group)
    scale = scale.astype(scale_dtype == "f16" and np.float16 or np.float32)
    offset = None if offset is None else offset.astype(scale.dtype)
    weights = {"q": q, "scale": scale}
    if offset is not None:
        weights["offset"] = offset
    return weights, dequantize(q, scale, offset, bits, group)


@pytest.mark.parametrize("bits,group,offsets,scale_dtype,nk", QUANT_CASES)
def test_linear_q_matches_numpy(bits, group, offsets, scale_dtype, nk):
    rng = np.random.default_rng(bits * 100 + group + offsets)
    n, k = nk
    weights, w = _quant_weights(rng, bits, group, offsets, scale_dtype, n, k)
    module = build("linear_q", [("x", TensorType("f32", (BATCH, SEQ, k)))], weights,
                   {"bits": bits, "group_size": group})
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T
    got = run_onnx(module, {"x": x})
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("bits,group,offsets,scale_dtype,nk", [QUANT_CASES[1], QUANT_CASES[4], QUANT_CASES[6]])
def test_sibling_linear_q_fused_into_one_matmul(bits, group, offsets, scale_dtype, nk):
    """Projections of one activation (q/k/v) become one MatMulNBits over the stacked weights, then a Split."""
    rng = np.random.default_rng(11)
    n, k = nk
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (BATCH, k)))
    outs, refs = [], []
    for i, rows in enumerate((n, n // 2, n // 2)):
        weights, w = _quant_weights(rng, bits, group, offsets, scale_dtype, rows, k)
        operands = []
        for key, array in weights.items():
            module.add_weight(f"{key}{i}", array)
            operands.append(fn.emit("weight", name=f"{key}{i}"))
        outs.append(fn.emit("linear_q", x, *operands, bits=bits, group_size=group))
        refs.append(w)
    fn.set_results([fn.emit("concat", *outs, axis=-1)])
    lowered = lower_function(module, "f")
    assert sum(n.op_type == "MatMulNBits" for n in lowered.graph.node) == (2 if bits == 8 else 1)
    xs = rng.standard_normal((3, k)).astype(np.float32)
    ref = xs.astype(np.float64) @ np.concatenate(refs).T
    got = run_onnx(module, {"x": xs})
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_linear_q_int8_accuracy_level_4_is_close():
    """accuracy_level 4 quantizes the activations to int8: close, not exact (the default is 0)."""
    rng = np.random.default_rng(7)
    weights, w = _quant_weights(rng, 8, 0, False, "f32", 64, 128)
    module = build("linear_q", [("x", TensorType("f32", (BATCH, 128)))], weights, {"bits": 8, "group_size": 0})
    x = rng.standard_normal((3, 128)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T
    got = run_onnx(module, {"x": x}, accuracy_level=4)
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("bits,group,offsets,scale_dtype,nk", QUANT_CASES)
def test_embedding_q_matches_numpy(bits, group, offsets, scale_dtype, nk):
    rng = np.random.default_rng(bits * 10 + group + offsets)
    n, k = nk
    weights, w = _quant_weights(rng, bits, group, offsets, scale_dtype, n, k)
    module = build("embedding_q", [("ids", TensorType("i64", (BATCH, SEQ)))], weights,
                   {"bits": bits, "group_size": group})
    ids = rng.integers(0, n, (2, 5)).astype(np.int64)
    ids[0, 0] = n + 3  # out of range: clipped to the last row, as the op's reference does
    got = run_onnx(module, {"ids": ids})
    ref = w[np.clip(ids, 0, n - 1)]
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


# a few non-quantized lowerings whose ONNX form is not one standard op ------------------------
def _reference(module, feeds):
    from kiln.ir.interpreter import run_function

    fn = module.functions["f"]
    return run_function(module, "f", [feeds[p.name] for p in fn.params])[0]


def test_rope_partial_rotary_both_layouts_and_padding_positions():
    rng = np.random.default_rng(3)
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, -1], [5, 6, 7, 8]], dtype=np.int64)  # -1: padding
    for seq_axis, shape in ((2, (2, 3, 4, 16)), (1, (2, 4, 3, 16))):
        sym = tuple(BATCH if i == 0 else SEQ if i == seq_axis else d for i, d in enumerate(shape))
        module = build("rope", [("x", TensorType("f32", sym)), ("positions", TensorType("i64", (BATCH, SEQ)))],
                       {"inv_freq": inv_freq}, {"rotary_dim": 8, "seq_axis": seq_axis, "scaling": 1.0})
        x = rng.standard_normal(shape).astype(np.float32)
        got = run_onnx(module, {"x": x, "positions": positions})
        ref = _reference(module, {"x": x, "positions": np.maximum(positions, 0)})
        assert np.abs(got - ref).max() <= 1e-5


def test_add_rms_norm_returns_sum_and_normed():
    rng = np.random.default_rng(4)
    w = rng.standard_normal(32).astype(np.float32)
    inputs = [("x", TensorType("f32", (BATCH, 32))), ("r", TensorType("f32", (BATCH, 32)))]
    x, r = rng.standard_normal((3, 32)).astype(np.float32), rng.standard_normal((3, 32)).astype(np.float32)
    for keep in (0, 1):
        module = build("add_rms_norm", inputs, {"w": w}, {"eps": 1e-6}, keep=keep)
        got = run_onnx(module, {"x": x, "r": r})
        assert np.abs(got - _reference(module, {"x": x, "r": r})).max() <= 1e-5


@pytest.mark.parametrize("window", [None, 3])
def test_grouped_attention_without_cache(window):
    rng = np.random.default_rng(5)
    inputs = [("q", TensorType("f32", (BATCH, 4, SEQ, 8))), ("k", TensorType("f32", (BATCH, 2, SEQ, 8))),
              ("v", TensorType("f32", (BATCH, 2, SEQ, 8)))]
    module = build("attention", inputs, {}, {"num_heads": 4, "num_kv_heads": 2, "scale": 0.3, "window": window})
    feeds = {"q": rng.standard_normal((2, 4, 6, 8)).astype(np.float32),
             "k": rng.standard_normal((2, 2, 6, 8)).astype(np.float32),
             "v": rng.standard_normal((2, 2, 6, 8)).astype(np.float32)}
    assert np.abs(run_onnx(module, feeds) - _reference(module, feeds)).max() <= 1e-5


def test_index_with_two_index_tensors_in_the_middle():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    module = build("index", [("x", TensorType("f32", (BATCH, 5, 6, 3))), ("i", TensorType("i64", (4,))),
                             ("j", TensorType("i64", (4,)))], {}, {"axis": 1})
    feeds = {"x": x, "i": np.array([0, 4, -1, 2]), "j": np.array([5, 0, 1, -2])}
    assert np.array_equal(run_onnx(module, feeds), _reference(module, feeds))


def test_last_token_with_padding_rows():
    x = np.random.default_rng(8).standard_normal((3, 4, 5)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3], [7, 8, -1, -1], [-1, -1, -1, -1]], dtype=np.int64)
    module = build("last_token", [("x", TensorType("f32", (BATCH, SEQ, 5))),
                                  ("positions", TensorType("i64", (BATCH, SEQ)))], {}, {})
    feeds = {"x": x, "positions": positions}
    got = run_onnx(module, feeds)
    assert np.array_equal(got, _reference(module, feeds))
    assert np.array_equal(got[:, 0], x[[0, 1, 2], [3, 1, 0]])


def test_every_ir_op_has_a_lowering():
    assert sorted(set(OPS) - set(LOWERINGS)) == []


def test_op_without_lowering_is_named(monkeypatch):
    monkeypatch.delitem(LOWERINGS, "rms_norm")
    module = build("rms_norm", [("x", TensorType("f32", (BATCH, 8)))], {"w": np.ones(8, np.float32)},
                   {"eps": 1e-6})
    with pytest.raises(UnsupportedOpError, match=r"op .rms_norm. \(%\w+ in @f\) has no ONNX Runtime lowering"):
        lower_function(module, "f")


def test_dtype_names_cover_kiln_dtypes():
    from kiln.backends.onnxruntime.lower import ONNX_DTYPES
    from kiln.ir.types import DTYPES

    assert sorted(ONNX_DTYPES) == sorted(DTYPES)
    assert dtype_of_numpy(np.float32) in ONNX_DTYPES
