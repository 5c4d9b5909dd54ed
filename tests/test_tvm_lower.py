"""TVM lowering: every core op against kiln's numpy interpreter at two symbol values
from one compiled module, the captured tiny models against transformers, the CUDA
path through nvcc (no GPU needed), and the refusal of an op with no lowering.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("tvm")

from kiln.backends.tvm import lower as tvm_lower  # noqa: E402
from kiln.backends.tvm.build import TVMFunction, build, compile_cuda_source, cuda_source  # noqa: E402
from kiln.ir.errors import KilnError, UnsupportedOpError  # noqa: E402
from kiln.ir.graph import Module  # noqa: E402
from kiln.ir.interpreter import run_function  # noqa: E402
from kiln.ir.ops import OPS, define_op  # noqa: E402
from kiln.ir.symbolic import sym  # noqa: E402
from kiln.ir.types import TensorType, numpy_dtype  # noqa: E402

B, S = sym("batch"), sym("seq")
# Two bindings of the symbols, both run on ONE compiled module.
ENVS = ({"batch": 2, "seq": 3}, {"batch": 1, "seq": 7})

WEIGHTS = {
    "w_lin": (24, 16), "b_lin": (24,), "w_small": (5, 16), "table": (11, 6), "ln_w": (16,), "ln_b": (16,),
    "row": (8,), "w_half": (6, 32),
}

CASES: dict = {}  # name -> (build(fn, *params) -> results, [(type, kind), ...])


def case(name, *inputs):
    """inputs: (TensorType, kind) with kind "normal", "positive", "bool" or ("int", lo, hi)."""

    def register(build_fn):
        assert name not in CASES
        CASES[name] = (build_fn, inputs)
        return build_fn

    return register


def f32(*shape):
    return TensorType("f32", shape)


def i64(*shape):
    return TensorType("i64", shape)


def boolean(*shape):
    return TensorType("bool", shape)


N = "normal"


# elementwise binaries, with broadcasting and dtype promotion --------------------------
for _op in ("add", "sub", "mul", "div", "maximum", "minimum"):
    case(f"{_op}_f32", (f32(B, S, 4), N), (f32(S, 1), N))(
        lambda fn, x, y, op=_op: [fn.emit(op, x, y)])
for _op in ("add", "sub", "mul", "maximum", "minimum"):
    case(f"{_op}_i64", (i64(B, S), ("int", -9, 9)), (i64(1, S), ("int", -9, 9)))(
        lambda fn, x, y, op=_op: [fn.emit(op, x, y)])
case("add_promote", (f32(B, S), N), (i64(S), ("int", -5, 5)))(lambda fn, x, y: [fn.emit("add", x, y)])
case("pow_tensor", (f32(B, S), "positive"), (f32(B, S), N))(lambda fn, x, y: [fn.emit("pow", x, y)])


@case("pow_constant", (f32(B, S, 3), N))
def _pow_constant(fn, x):
    two = fn.emit("constant", value=2.0, dtype="f32")
    half = fn.emit("constant", value=0.5, dtype="f32")
    return [fn.emit("pow", x, two), fn.emit("pow", fn.emit("abs", x), half)]


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    case(f"{_op}_i64", (i64(B, S), ("int", -3, 3)), (i64(S), ("int", -3, 3)))(
        lambda fn, x, y, op=_op: [fn.emit(op, x, y)])
    case(f"{_op}_f32", (f32(B, S), N), (f32(B, 1), N))(lambda fn, x, y, op=_op: [fn.emit(op, x, y)])
for _op in ("and", "or"):
    case(f"{_op}_bool", (boolean(B, S), "bool"), (boolean(S), "bool"))(
        lambda fn, x, y, op=_op: [fn.emit(op, x, y)])

# unaries -------------------------------------------------------------------------------
for _op in ("neg", "exp", "sin", "cos", "tanh", "abs", "erf", "sigmoid", "silu", "relu"):
    case(f"{_op}", (f32(B, S, 5), N))(lambda fn, x, op=_op: [fn.emit(op, x)])
for _op in ("log", "sqrt", "rsqrt", "reciprocal"):
    case(f"{_op}", (f32(B, S, 5), "positive"))(lambda fn, x, op=_op: [fn.emit(op, x)])
case("neg_i64", (i64(B, S), ("int", -9, 9)))(lambda fn, x: [fn.emit("neg", x), fn.emit("abs", x)])
case("not", (boolean(B, S), "bool"))(lambda fn, x: [fn.emit("not", x)])
case("gelu_none", (f32(B, S, 5), N))(lambda fn, x: [fn.emit("gelu", x, approximate="none")])
case("gelu_tanh", (f32(B, S, 5), N))(lambda fn, x: [fn.emit("gelu", x, approximate="tanh")])


@case("cast", (f32(B, S), N), (i64(B, S), ("int", -4, 4)), (boolean(S), "bool"))
def _cast(fn, x, i, flag):
    scaled = fn.emit("mul", x, fn.emit("constant", value=3.0, dtype="f32"))
    return [fn.emit("cast", scaled, dtype="i64"), fn.emit("cast", x, dtype="f16"), fn.emit("cast", i, dtype="f32"),
            fn.emit("cast", flag, dtype="f32"), fn.emit("cast", x, dtype="bool"), fn.emit("cast", i, dtype="i32")]


@case("where", (f32(B, S), N), (f32(S), N), (i64(B, 1), ("int", -3, 3)))
def _where(fn, x, y, i):
    cond = fn.emit("gt", x, y)
    ninf = fn.emit("constant", value=-math.inf, dtype="f32")
    return [fn.emit("where", cond, x, i), fn.emit("where", cond, y, ninf)]


# sources --------------------------------------------------------------------------------
@case("sources", (f32(B, S), N))
def _sources(fn, x):
    full = fn.emit("full", shape=(B, S + 1), value=1.5, dtype="f32")
    ones = fn.emit("full", shape=(), value=True, dtype="bool")
    return [fn.emit("arange", end=S), fn.emit("arange", start=1, end=S + 2, dtype="i32"),
            fn.emit("arange", start=2, end=11, step=3, dtype="f32"), full,
            fn.emit("and", ones, fn.emit("gt", x, fn.emit("constant", value=0, dtype="f32"))),
            fn.emit("add", x, fn.emit("constant", value=7, dtype="i64"))]


@case("weights", (f32(B, 8), N))
def _weights(fn, x):
    return [fn.emit("mul", x, fn.emit("weight", name="row"))]


# reductions --------------------------------------------------------------------------------
for _op in ("sum", "mean", "max", "min"):
    case(f"{_op}", (f32(B, S, 6), N))(lambda fn, x, op=_op: [
        fn.emit(op, x, axes=(2,)), fn.emit(op, x, axes=(-2,), keepdims=True), fn.emit(op, x, axes=(0, 2))])
case("sum_bool", (boolean(B, S), "bool"))(lambda fn, x: [fn.emit("sum", x, axes=(1,))])
case("max_i64", (i64(B, S), ("int", -50, 50)))(lambda fn, x: [fn.emit("max", x, axes=(1,), keepdims=True)])
case("softmax", (f32(B, S, 6), N))(lambda fn, x: [fn.emit("softmax", x, axis=-1), fn.emit("softmax", x, axis=1)])
case("cumsum", (boolean(B, S), "bool"), (f32(B, S), N))(lambda fn, x, y: [
    fn.emit("cumsum", x, axis=1, dtype="i64"), fn.emit("cumsum", y, axis=-1, dtype="f32")])


# shape ops --------------------------------------------------------------------------------
@case("reshape_permute_expand", (f32(B, S, 4), N), (f32(S, 1), N))
def _shapes(fn, x, y):
    flat = fn.emit("reshape", x, shape=(B * S, 4))
    split = fn.emit("reshape", flat, shape=(B, S, 2, 2))
    perm = fn.emit("permute", split, perm=(2, 0, 3, 1))
    expanded = fn.emit("expand", y, shape=(B, S, 3))
    return [flat, perm, expanded, fn.emit("reshape", x, shape=(B, 4 * S))]


@case("slice", (f32(B, S), N), (f32(B, S + 2, 6), N))
def _slice(fn, first, x):
    # `first` binds seq; x's length is only an expression of it
    return [fn.emit("slice", x, axis=1, start=1, end=S + 1), fn.emit("slice", x, axis=1, start=S, end=S + 2),
            fn.emit("slice", x, axis=-1, start=1, end=6, step=2), fn.emit("slice", x, axis=0, start=0, end=B),
            fn.emit("slice", first, axis=1, start=S - 1, end=S)]


@case("concat", (f32(B, S, 3), N), (f32(B, 1, 3), N))
def _concat(fn, x, y):
    joined = fn.emit("concat", y, x, axis=1)  # relax spells this length `1 + seq`
    tail = fn.emit("slice", joined, axis=1, start=1, end=S + 1)
    return [joined, fn.emit("sub", tail, x), fn.emit("concat", x, x, y, axis=-2), fn.emit("concat", x, axis=0)]


@case("index", (f32(B, S, 5), N), (i64(4), ("int", -5, 5)), (i64(B, 1), ("int", 0, 1)),
      (i64(1, S), ("int", -2, 2)))
def _index(fn, x, i, rows, cols):
    return [fn.emit("index", x, i, axis=2), fn.emit("index", x, rows, cols, axis=0),
            fn.emit("index", x, cols, rows, axis=1)]


@case("index_mask_pattern", (i64(B, S), ("int", 0, 9)))
def _index_mask(fn, pos):
    # the pattern torch's causal-mask code leaves in every captured model
    b = fn.emit("reshape", fn.emit("arange", end=B), shape=(B, 1, 1, 1))
    q = fn.emit("reshape", fn.emit("arange", end=S), shape=(1, 1, S, 1))
    k = fn.emit("reshape", fn.emit("arange", end=S), shape=(1, 1, 1, S))
    return [fn.emit("le", fn.emit("index", pos, b, k), fn.emit("index", pos, b, q))]


case("embedding", (i64(B, S), ("int", 0, 11)))(
    lambda fn, ids: [fn.emit("embedding", fn.emit("weight", name="table"), ids)])


# linear algebra, normalisation, attention -----------------------------------------------
case("matmul", (f32(B, S, 16), N), (f32(16, 5), N))(lambda fn, a, b: [fn.emit("matmul", a, b)])
case("matmul_batched", (f32(B, 2, S, 4), N), (f32(B, 2, 4, S), N))(lambda fn, a, b: [fn.emit("matmul", a, b)])
case("matmul_broadcast", (f32(B, 1, S, 4), N), (f32(3, 4, 2), N))(lambda fn, a, b: [fn.emit("matmul", a, b)])


@case("matmul_gram", (f32(B, S, 4), N), (f32(B, S, 4), N))
def _gram(fn, x, y):
    # x @ x^T (one variable on both sides) and x @ y^T
    return [fn.emit("matmul", x, fn.emit("permute", x, perm=(0, 2, 1))),
            fn.emit("matmul", x, fn.emit("permute", y, perm=(0, 2, 1)))]


@case("linear", (f32(B, S, 16), N), (f32(B, 16), N), (f32(3, 16), N))
def _linear(fn, x, rows, few):
    w, bias, small = (fn.emit("weight", name=n) for n in ("w_lin", "b_lin", "w_small"))
    return [fn.emit("linear", x, w, bias), fn.emit("linear", x, small), fn.emit("linear", rows, w),
            fn.emit("linear", few, w, bias)]


@case("linear_input_weight", (f32(S, 8), N), (f32(3, 8), N))
def _linear_input_weight(fn, x, w):
    return [fn.emit("linear", x, w)]


@case("linear_f64", (TensorType("f64", (B, S, 8)), N), (TensorType("f64", (3, 8)), N),
      (TensorType("f64", (3,)), N))
def _linear_f64(fn, x, w, bias):
    # not f32: the generic NT kernel instead of kiln's CPU kernel
    return [fn.emit("linear", x, w, bias), fn.emit("linear", fn.emit("slice", x, axis=1, start=0, end=1), w)]


@case("linear_half", (TensorType("f16", (B, S, 32)), N), (TensorType("bf16", (S, 32)), N))
def _linear_half(fn, x, y):
    # half inputs: f32 accumulation, then rounding (the reference rounds the f64 result)
    wx = fn.emit("cast", fn.emit("weight", name="w_half"), dtype="f16")
    wy = fn.emit("cast", fn.emit("weight", name="w_half"), dtype="bf16")
    return [fn.emit("linear", x, wx), fn.emit("linear", y, wy)]


case("layer_norm", (f32(B, S, 16), N))(lambda fn, x: [fn.emit(
    "layer_norm", x, fn.emit("weight", name="ln_w"), fn.emit("weight", name="ln_b"), eps=1e-5)])


@case("sdpa_causal", (f32(B, 4, S, 8), N), (f32(B, 4, S, 8), N), (f32(B, 4, S, 8), N), (f32(1, 4, S, 8), N))
def _sdpa_causal(fn, q, k, v, shared):
    return [fn.emit("sdpa", q, k, v, is_causal=True), fn.emit("sdpa", q, k, v, scale=0.3),
            fn.emit("sdpa", q, shared, shared, is_causal=True), fn.emit("sdpa", q, q, q)]


@case("sdpa_bool_mask", (f32(B, 4, S, 8), N), (f32(B, 4, S + 1, 8), N), (f32(B, 4, S + 1, 8), N),
      (boolean(B, 1, S, S + 1), "bool"))
def _sdpa_bool(fn, q, k, v, mask):
    # keep key 0 visible so no row is fully masked (torch gives NaN there)
    first = fn.emit("lt", fn.emit("reshape", fn.emit("arange", end=S + 1), shape=(1, 1, 1, S + 1)),
                    fn.emit("constant", value=1, dtype="i64"))
    return [fn.emit("sdpa", q, k, v, fn.emit("or", mask, first))]


@case("sdpa_float_mask_gqa", (f32(B, 4, S, 8), N), (f32(B, 2, S, 8), N), (f32(B, 2, S, 8), N),
      (f32(1, 1, S, S), N))
def _sdpa_gqa(fn, q, k, v, mask):
    return [fn.emit("sdpa", q, k, v, mask, enable_gqa=True, scale=0.5),
            fn.emit("sdpa", q, k, v, is_causal=True, enable_gqa=True)]


# --------------------------------------------------------------------------------------------
def _make_input(t: TensorType, kind, env, rng) -> np.ndarray:
    shape = t.concrete(env)
    if kind == "bool":
        return rng.random(shape) < 0.5
    if isinstance(kind, tuple):
        _, lo, hi = kind
        return rng.integers(lo, hi, shape).astype(numpy_dtype(t.dtype))
    values = rng.standard_normal(shape)
    if kind == "positive":
        values = np.abs(values) + 0.1
    return values.astype(numpy_dtype(t.dtype))


def _op_module() -> Module:
    module = Module()
    rng = np.random.default_rng(1)
    for name, shape in WEIGHTS.items():
        module.add_weight(name, rng.standard_normal(shape).astype(np.float32))
    for name, (build_fn, specs) in CASES.items():
        fn = module.add_function(name)
        params = [fn.add_param(f"x{i}", t) for i, (t, _) in enumerate(specs)]
        fn.set_results(build_fn(fn, *params))
    return module


@pytest.fixture(scope="module")
def compiled_ops():
    module = _op_module()
    irmodule = tvm_lower.lower_functions(module, list(CASES))
    return module, irmodule, build(irmodule, "cpu")


def _assert_close(got: np.ndarray, want: np.ndarray, what: str):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind == "f" or want.dtype == numpy_dtype("bf16"):
        tol = {np.dtype(np.float16): 2e-3, numpy_dtype("bf16"): 1.6e-2}.get(want.dtype, 2e-5)
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol,
                                   equal_nan=True, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_interpreter(compiled_ops, name):
    module, irmodule, executable = compiled_ops
    run = TVMFunction(executable, name, tvm_lower.weight_names(irmodule, name), module.weight_data)
    _, specs = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for env in ENVS:
        inputs = [_make_input(t, kind, env, rng) for t, kind in specs]
        want = run_function(module, name, inputs)
        got = run(*inputs)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{name} result {i} at {env}")


def test_every_core_op_has_a_lowering_and_a_case():
    core = {name for name, op in OPS.items() if op.infer.__module__.endswith("core_ops")}
    assert core - set(tvm_lower.LOWERINGS) == set()
    module = _op_module()
    tested = {n.op for fn in module.functions.values() for n in fn.nodes}
    assert core - tested == set()


def test_weights_follow_inputs_in_recorded_order(compiled_ops):
    module, irmodule, _ = compiled_ops
    func = irmodule["linear"]
    assert int(func.attrs["num_input"]) == 3
    assert tvm_lower.weight_names(irmodule, "linear") == ["w_lin", "b_lin", "w_small"]
    assert [p.name for p in func.params[3:]] == ["w_lin", "b_lin", "w_small"]


def test_symbols_are_shared_int64_vars(compiled_ops):
    _, irmodule, _ = compiled_ops
    params = irmodule["sdpa_bool_mask"].params
    batch = params[0].ty.shape.values[0]
    assert all(p.ty.shape.values[0].same_as(batch) for p in params)
    assert batch.ty.dtype == "int64" and batch.name == "batch"


def test_tvm_function_checks_inputs_and_weights(compiled_ops):
    module, irmodule, executable = compiled_ops
    names = tvm_lower.weight_names(irmodule, "linear")
    run = TVMFunction(executable, "linear", names, module.weight_data)
    assert run.num_inputs == 3
    with pytest.raises(KilnError, match="expected 3 input arrays, found 1"):
        run(np.zeros((1, 1, 16), np.float32))
    with pytest.raises(KilnError, match="w_small"):
        TVMFunction(executable, "linear", names, {n: module.weight_data[n] for n in names[:2]})


def test_configure_threads_before_and_after_tvm_import():
    script = (
        "import sys\n"
        "from kiln.backends.tvm.build import configure_threads\n"
        "assert configure_threads(2) == 2 and 'tvm' not in sys.modules\n"
        "import tvm\n"
        "assert tvm.runtime.num_threads() == 2\n"
        "assert configure_threads(1) == 1 == tvm.runtime.num_threads()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# no lowering: refused while lowering, not at run time --------------------------------------
def test_op_without_lowering_raises_at_lowering_time():
    if "test_tvm_no_lowering" not in OPS:
        define_op("test_tvm_no_lowering", infer=lambda types, attrs, module: [types[0]],
                  reference=lambda xs, attrs: [xs[0]], inputs=1)
    module = Module()
    fn = module.add_function("main")
    x = fn.add_param("x", f32(B, 4))
    fn.set_results([fn.emit("test_tvm_no_lowering", fn.emit("exp", x), value_name="odd")])
    with pytest.raises(UnsupportedOpError, match="test_tvm_no_lowering.*%odd.*@main"):
        tvm_lower.lower_function(module, "main")


# captured tiny models against transformers -------------------------------------------------
FAST_ARCHS = ("llama", "gpt2")
SLOW_ARCHS = ("mistral", "qwen2", "phi3", "gemma", "falcon", "gpt_neox")


def _check_tiny_model(name, target="cpu"):
    from tiny_models import FP32_TOLERANCE, VOCAB, captured, reference_logits

    run = TVMFunction.from_module(captured(name), "forward", target=target)
    rng = np.random.default_rng(3)
    for shape in ((2, 7), (1, 13)):
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        want = reference_logits(name, ids)
        (got,) = run(ids)
        assert got.shape == want.shape
        err = np.abs(got - want).max()
        assert err <= FP32_TOLERANCE * np.abs(want).max(), f"{name} {shape}: max error {err}"


@pytest.mark.parametrize("name", FAST_ARCHS)
def test_tiny_model_matches_transformers(name):
    _check_tiny_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_ARCHS)
def test_tiny_model_matches_transformers_slow(name):
    _check_tiny_model(name)


# CUDA: generate source without a GPU and prove it compiles --------------------------------
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit missing)")


def _small_cuda_module() -> Module:
    module = Module()
    rng = np.random.default_rng(2)
    module.add_weight("w", rng.standard_normal((32, 16)).astype(np.float32))
    fn = module.add_function("main")
    x = fn.add_param("x", f32(B, S, 16))
    h = fn.emit("linear", x, fn.emit("weight", name="w"))
    q = fn.emit("permute", fn.emit("reshape", h, shape=(B, S, 2, 16)), perm=(0, 2, 1, 3))
    attn = fn.emit("sdpa", q, fn.emit("neg", q), q, is_causal=True)
    fn.set_results([fn.emit("softmax", fn.emit("gelu", attn, approximate="tanh"), axis=-1)])
    return module


@pytest.mark.nvcc
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_with_nvcc(arch):
    source = cuda_source(tvm_lower.lower_function(_small_cuda_module(), "main", f"cuda:{arch}"), arch)
    assert "__global__" in source and "NT_matmul" in source
    assert len(compile_cuda_source(source, arch)) > 0


def _has_gpu() -> bool:
    import tvm

    return tvm.cuda(0).exist


@pytest.mark.cuda
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU (tvm.cuda(0) does not exist)")
@pytest.mark.parametrize("name", FAST_ARCHS)
def test_tiny_model_on_gpu_matches_transformers(name):
    _check_tiny_model(name, target="cuda")


@pytest.mark.nvcc
@pytest.mark.slow
@needs_nvcc
def test_tiny_model_cuda_source_compiles_with_nvcc():
    from tiny_models import captured

    source = cuda_source(tvm_lower.lower_function(captured("llama"), "forward", "cuda:sm_80"), "sm_80")
    assert len(compile_cuda_source(source, "sm_80")) > 0
