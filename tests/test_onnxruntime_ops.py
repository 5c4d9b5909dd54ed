"""ONNX Runtime lowerings op by op: one-node kiln functions lowered to ONNX, checked with onnx.checker,
run by onnxruntime and compared with numpy (the quantized ops with ir.quant_ops.dequantize,
written out here as x @ W.T in float64; paged_attention, run on the padded view the executor feeds,
with the op's numpy reference over the paged pools)."""

import numpy as np
import onnx
import pytest

from kiln.backends.onnxruntime import mla_lower, moe_lower  # noqa: F401  (registers the latent attention and
# MoE lowerings)
from kiln.backends.onnxruntime import quant_lower  # noqa: F401  (registers linear_q / embedding_q)
from kiln.backends.onnxruntime.lower import LOGITS, LOWERINGS, lower_function, make_model
from kiln.passes import run_pass
from kiln.ir.errors import UnsupportedOpError
from kiln.ir.graph import Module
from kiln.ir.ops import OPS
from kiln.ir.quant_ops import dequantize, pack_int4
from kiln.ir.symbolic import SymExpr
from kiln.ir.types import TensorType, dtype_of_numpy

ort = pytest.importorskip("onnxruntime")
BATCH, SEQ = SymExpr.symbol("batch"), SymExpr.symbol("seq")
TOKENS, ROWS = SymExpr.symbol("tokens"), SymExpr.symbol("rows")


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


def run_onnx(module: Module, feeds: dict) -> np.ndarray:
    lowered = lower_function(module, "f")
    for name, array in lowered.initializers.items():
        lowered.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
    model = make_model(lowered.graph)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run([LOGITS], {name: array for name, array in feeds.items() if name in wanted})[0]


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
    """Projections of one activation (q/k/v), merged by the target-neutral merge_sibling_linears pass, lower to
    one MatMulNBits over the stacked weights."""
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
    assert run_pass("merge_sibling_linears", module) is True
    assert sum(node.op == "linear_q" for node in fn.nodes) == 1
    lowered = lower_function(module, "f")
    assert sum(n.op_type == "MatMulNBits" for n in lowered.graph.node) == (2 if bits == 8 else 1)
    xs = rng.standard_normal((3, k)).astype(np.float32)
    ref = xs.astype(np.float64) @ np.concatenate(refs).T
    got = run_onnx(module, {"x": xs})
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _int8_rows(x: np.ndarray) -> np.ndarray:
    """x with each row's blocks of 32 rounded to 127 steps of their largest magnitude (llama.cpp's Q8_0)."""
    blocks = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    return (np.round(blocks / np.where(step > 0, step, 1)) * step).reshape(x.shape)


@pytest.mark.parametrize("bits,group,offsets", [(8, 0, False), (8, 32, False), (4, 32, False), (4, 32, True),
                                                 (4, 64, True), (4, 128, False)])
def test_linear_q_int8_activations_use_accuracy_level_4(bits, group, offsets):
    """activations=int8 in the IR becomes MatMulNBits accuracy_level 4: ONNX Runtime then multiplies
    activations quantized per block of 32, so it is near the int8-activation formula and off the float one."""
    rng = np.random.default_rng(7)
    weights, w = _quant_weights(rng, bits, group, offsets, "f32", 64, 128)
    attrs = {"bits": bits, "group_size": group, "activations": "int8"}
    module = build("linear_q", [("x", TensorType("f32", (BATCH, 128)))], weights, attrs)
    lowered = lower_function(module, "f")
    assert {a.i for n in lowered.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {4}
    x = rng.standard_normal((3, 128)).astype(np.float32)
    ref = _int8_rows(x) @ w.T
    got = run_onnx(module, {"x": x})
    exact = x.astype(np.float64) @ w.T
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()
    assert np.abs(exact - ref).max() > 2e-3 * np.abs(ref).max()  # the check can tell the two apart


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


def test_rope_partial_rotary_both_layouts():
    rng = np.random.default_rng(3)
    inv_freq = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3], [5, 6, 7, 8]], dtype=np.int64)
    for seq_axis, shape in ((2, (2, 3, 4, 16)), (1, (2, 4, 3, 16))):
        sym = tuple(BATCH if i == 0 else SEQ if i == seq_axis else d for i, d in enumerate(shape))
        module = build("rope", [("x", TensorType("f32", sym)), ("positions", TensorType("i64", (BATCH, SEQ)))],
                       {"inv_freq": inv_freq}, {"rotary_dim": 8, "seq_axis": seq_axis, "scaling": 1.0})
        x = rng.standard_normal(shape).astype(np.float32)
        feeds = {"x": x, "positions": positions}
        assert np.abs(run_onnx(module, feeds) - _reference(module, feeds)).max() <= 1e-5


def test_rope_on_more_tokens_than_its_tables():
    """A step's flat batch [1, T] may hold more tokens than max_seq_len (the cos/sin tables' length): ORT's
    RotaryEmbedding refuses a sequence longer than its tables, so the lowering hands it [T, 1, H * D]."""
    rng = np.random.default_rng(9)
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    inputs = [("x", TensorType("f32", (1, 2, TOKENS, 16))), ("positions", TensorType("i64", (1, TOKENS)))]
    module = build("rope", inputs, {"inv_freq": inv_freq}, {"rotary_dim": 16, "seq_axis": 2, "scaling": 1.0})
    module.metadata["capture"] = {"max_seq": 8}
    feeds = {"x": rng.standard_normal((1, 2, 20, 16)).astype(np.float32),
             "positions": np.tile(np.arange(5), 4)[None].astype(np.int64)}
    assert np.abs(run_onnx(module, feeds) - _reference(module, feeds)).max() <= 1e-5


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


def test_select_rows_any_rows_in_any_order():
    x = np.random.default_rng(8).standard_normal((1, 6, 5)).astype(np.float32)
    module = build("select_rows", [("x", TensorType("f32", (1, TOKENS, 5))), ("rows", TensorType("i64", (ROWS,)))],
                   {}, {})
    for rows in ([5, 0, 5], [], [2]):
        feeds = {"x": x, "rows": np.array(rows, dtype=np.int64)}
        assert np.array_equal(run_onnx(module, feeds), x[:, rows])


def _paged_case(rng, chunks, window, heads=4, kv_heads=2, dim=8, page_size=4, max_seq_len=16):
    """A one-node @f over paged_attention for ``chunks`` [(cached, new)] (one sequence each, row = sequence,
    flat tokens interleaved): the module, the reference's feeds (pools holding the cached tokens) and the
    lowered graph's feeds (past buffers holding the same tokens, and the padded view)."""
    from kiln.ir.kv_cache import CacheGroup, KVCacheSpec

    pages_per_seq = max_seq_len // page_size
    spec = KVCacheSpec(page_size, pages_per_seq * len(chunks), "f32",
                       (CacheGroup("kv", (0,), kv_heads, dim, dim, window),), max_seq_len, len(chunks))
    module = Module()
    module.metadata["kv_cache"] = spec.to_json()
    fn = module.add_function("f")
    pool_shape = spec.pools()[0].shape
    params = [fn.add_param(n, TensorType(dt, shape)) for n, dt, shape in (
        ("q", "f32", (1, heads, TOKENS, dim)), ("k", "f32", (1, kv_heads, TOKENS, dim)),
        ("v", "f32", (1, kv_heads, TOKENS, dim)), ("k_cache_0", "f32", pool_shape), ("v_cache_0", "f32", pool_shape),
        ("page_table", "i32", (SymExpr.symbol("seqs"), pages_per_seq)), ("positions", "i64", (1, TOKENS)),
        ("token_seq", "i32", (TOKENS,)))]
    node = fn.add_node("paged_attention", params, {"num_heads": heads, "num_kv_heads": kv_heads, "scale": 0.3,
                                                   "window": window, "layer": 0, "index": 0})
    fn.set_results([node.outputs[0]])
    owner = [row for row, (_, new) in enumerate(chunks) for _ in range(new)]
    order = rng.permutation(len(owner))
    seq = np.asarray(owner, np.int32)[order]
    pos = np.asarray([cached + i for cached, new in chunks for i in range(new)], np.int64)[order]
    count = len(owner)
    q = rng.standard_normal((1, heads, count, dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, kv_heads, count, dim)).astype(np.float32) for _ in range(2))
    history = [rng.standard_normal((2, kv_heads, cached, dim)).astype(np.float32) for cached, _ in chunks]
    table = np.arange(len(chunks) * pages_per_seq, dtype=np.int32).reshape(len(chunks), pages_per_seq)
    pools = [np.zeros(pool_shape, np.float32) for _ in range(2)]
    past = [np.zeros((len(chunks), kv_heads, max_seq_len, dim), np.float32) for _ in range(2)]
    for row, cached in enumerate(history):
        for p in range(cached.shape[2]):
            for which in range(2):
                pools[which][0, table[row, p // page_size], :, p % page_size] = cached[which, :, p]
                past[which][row, :, p] = cached[which, :, p]
    reference = {"q": q, "k": k, "v": v, "k_cache_0": pools[0], "v_cache_0": pools[1], "page_table": table,
                 "positions": pos[None], "token_seq": seq}
    width = max(new for _, new in chunks)
    pad_index = np.zeros((len(chunks), width), np.int64)
    unpad_index = np.zeros(count, np.int64)
    for row in range(len(chunks)):
        tokens = np.flatnonzero(seq == row)[np.argsort(pos[seq == row])]
        pad_index[row] = np.concatenate([tokens, np.full(width - len(tokens), tokens[-1])])
        unpad_index[tokens] = row * width + np.arange(len(tokens))
    seqlens_k = np.asarray([cached + new - 1 for cached, new in chunks], np.int32)
    lowered = {"q": q, "k": k, "v": v, "positions": pos[None], "pad_index": pad_index, "unpad_index": unpad_index,
               "seqlens_k": seqlens_k, "total_sequence_length": np.asarray(seqlens_k.max() + 1, np.int32),
               "past_key_0": past[0], "past_value_0": past[1]}
    return module, reference, lowered


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("chunks", [
    [(0, 5), (0, 3), (0, 1)],  # prompts of three lengths, right-padded to 5
    [(6, 1), (2, 1), (0, 1)],  # one new token each after different cached lengths
    [(7, 4)],  # a continued chunk
], ids=["prompts", "decode", "chunk"])
def test_paged_attention_through_the_padded_view_matches_numpy(chunks, window):
    """GroupQueryAttention on the padded view (the graph gathers q/k/v through pad_index and the output back
    through unpad_index) against the op's numpy reference over the paged pools, for the three batches
    GroupQueryAttention takes; the flat tokens in a shuffled order."""
    module, reference, feeds = _paged_case(np.random.default_rng(len(chunks) + (window or 0)), chunks, window)
    lowered = lower_function(module, "f")
    assert [i.name for i in lowered.graph.input] == ["q", "k", "v", "positions", "pad_index", "unpad_index",
                                                      "seqlens_k", "total_sequence_length", "past_key_0",
                                                      "past_value_0"]
    got = run_onnx(module, feeds)
    assert np.abs(got - _reference(module, reference)).max() <= 1e-5


def test_every_ir_op_has_a_lowering():
    from kiln.ir.quant_mlp_ops import DECOMPOSED_OPS  # rewritten into their subgraphs by lower_function

    assert sorted(set(OPS) - set(LOWERINGS) - set(DECOMPOSED_OPS)) == []


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
