"""kiln's TVM kernels (backends/tvm/kernels.py + schedules.py) against numpy references.

Each compiled kernel serves every m of its table (symbolic m); builds are shared by
module-scoped fixtures because a TVM build takes about a second.
"""

import os
import shutil
import subprocess
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tvm = pytest.importorskip("tvm")
from tvm import relax, te, tirx  # noqa: E402

from kiln.backends.tvm import kernels, schedules  # noqa: E402
from kiln.ir.errors import ConfigError  # noqa: E402

ROWS = (1, 3, 17)
RTOL = 1e-5


def _close(out: np.ndarray, ref: np.ndarray):
    # fp32 against a float64 reference: relative to the output's scale, since sums
    # of mixed-sign terms can cancel to values near zero.
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


def _run(fn, *arrays):
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    fn(*tensors)
    return tensors


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------- linear (fp32)

def _linear_func(k, n, row_tile):
    x = te.placeholder((kernels.symbolic_dim(), k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    return kernels.prim_func(x, w, kernels.linear(x, w, row_tile=row_tile))


# (K, N): SmolLM2's q/k projection widths, and a K that is not a multiple of 16.
LINEAR_SHAPES = [(576, 192), (40, 24)]


@pytest.fixture(scope="module", params=LINEAR_SHAPES, ids=lambda s: f"K{s[0]}xN{s[1]}")
def linear_builds(request):
    k, n = request.param
    return k, n, {form: schedules.build_cpu(_linear_func(k, n, row_tile))
                  for form, row_tile in (("gemv", None), ("gemm", 4))}


@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_linear_matches_numpy_for_every_m(linear_builds, form):
    k, n, built = linear_builds
    rng = _rng()
    w = rng.standard_normal((n, k), dtype=np.float32)
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = _run(built[form], x, w, np.zeros((m, n), np.float32))[2].numpy()
        _close(out, x.astype(np.float64) @ w.T.astype(np.float64))


def test_gemm_handles_a_row_count_below_the_tile():
    # 2 rows with a row tile of 4: the padding rows of the only tile are never stored.
    fn = schedules.build_cpu(_linear_func(32, 16, 4))
    rng = _rng(1)
    x = rng.standard_normal((2, 32), dtype=np.float32)
    w = rng.standard_normal((16, 32), dtype=np.float32)
    out = np.full((2, 16), np.nan, np.float32)
    _close(_run(fn, x, w, out)[2].numpy(), x.astype(np.float64) @ w.T.astype(np.float64))


# ------------------------------------------------------------------- int4 / int8 linear

def _pack_int4(nibbles: np.ndarray) -> np.ndarray:
    """numpy packing: 8 nibbles per uint32 along K, element k in bits 4 * (k % 8)."""
    n, k = nibbles.shape
    grouped = nibbles.reshape(n, k // 8, 8).astype(np.uint32)
    return (grouped << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)


def _int4_case(k, n, group, mode, rng):
    nibbles = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scale = (rng.standard_normal((n, k // group)) * 0.1).astype(np.float32)
    extra = rng.uniform(0, 15, (n, k // group)).astype(np.float32)
    expand = lambda a: np.repeat(a.astype(np.float64), group, axis=1)  # noqa: E731
    q = nibbles.astype(np.float64)
    if mode == "zero":
        dense = (q - expand(extra)) * expand(scale)
    elif mode == "offset":
        dense = q * expand(scale) + expand(extra)
    else:
        dense = (q - 8) * expand(scale)
    params = [_pack_int4(nibbles), scale] + ([extra] if mode != "symmetric" else [])
    return params, dense


def _int4_func(k, n, group, mode, row_tile, dequant_stage=False):
    x = te.placeholder((kernels.symbolic_dim(), k), "float32", name="x")
    q = te.placeholder((n, k // 8), "uint32", name="q")
    scale = te.placeholder((n, k // group), "float32", name="scale")
    extra = te.placeholder((n, k // group), "float32", name=mode)
    kwargs = {mode: extra} if mode != "symmetric" else {}
    y = kernels.linear_int4(x, q, scale, group_size=group, row_tile=row_tile,
                            dequant_stage=dequant_stage, **kwargs)
    return kernels.prim_func(x, q, scale, *([extra] if kwargs else []), y)


INT4_CASES = [  # (K, N, group, mode, row_tile)
    (64, 24, 32, "symmetric", None),
    (64, 24, 32, "zero", None),
    (64, 24, 32, "offset", 4),
    (256, 16, 128, "zero", None),
    (256, 16, 128, "symmetric", 4),
]


@pytest.mark.parametrize("k,n,group,mode,row_tile", INT4_CASES)
def test_int4_linear_matches_numpy_dequantize_then_matmul(k, n, group, mode, row_tile):
    fn = schedules.build_cpu(_int4_func(k, n, group, mode, row_tile))
    rng = _rng(2)
    params, dense = _int4_case(k, n, group, mode, rng)
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = _run(fn, x, *params, np.zeros((m, n), np.float32))[-1].numpy()
        _close(out, x.astype(np.float64) @ dense.T)


def test_int4_dequant_stage_form_is_inlined_by_the_cpu_schedule():
    fn = schedules.build_cpu(_int4_func(64, 24, 32, "zero", None, dequant_stage=True))
    rng = _rng(3)
    params, dense = _int4_case(64, 24, 32, "zero", rng)
    x = rng.standard_normal((3, 64), dtype=np.float32)
    out = _run(fn, x, *params, np.zeros((3, 24), np.float32))[-1].numpy()
    _close(out, x.astype(np.float64) @ dense.T)


def test_int4_rejects_k_not_a_multiple_of_the_group():
    x = te.placeholder((kernels.symbolic_dim(), 576), "float32", name="x")
    q = te.placeholder((8, 72), "uint32", name="q")
    scale = te.placeholder((8, 4), "float32", name="scale")
    with pytest.raises(ConfigError, match="group"):
        kernels.linear_int4(x, q, scale, group_size=128)


@pytest.mark.parametrize("row_tile", [None, 4])
def test_int8_linear_matches_numpy(row_tile):
    k, n = 96, 40
    x_t = te.placeholder((kernels.symbolic_dim(), k), "float32", name="x")
    q_t = te.placeholder((n, k), "int8", name="q")
    s_t = te.placeholder((n,), "float32", name="scale")
    fn = schedules.build_cpu(kernels.prim_func(
        x_t, q_t, s_t, kernels.linear_int8(x_t, q_t, s_t, row_tile=row_tile)))
    rng = _rng(4)
    q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    dense = q.astype(np.float64) * scale[:, None].astype(np.float64)
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = _run(fn, x, q, scale, np.zeros((m, n), np.float32))[-1].numpy()
        _close(out, x.astype(np.float64) @ dense.T)


# ----------------------------------------------------------------------------- attention

def _reference_attention(q, keys, values, sm_scale, softcap=None, slope=None):
    """numpy softmax(q k^T * scale) v for one head: q[r, D] (the last r positions), keys/values [t, D], mask via
    -inf; soft-capped scores are c * tanh(s / c); ALiBi adds slope * (key position - query position)."""
    scores = (q.astype(np.float64) @ keys.T.astype(np.float64)) * sm_scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    if slope is not None:
        query = np.arange(len(keys) - len(q), len(keys))[:, None]
        scores = scores + slope * (np.arange(len(keys))[None, :] - query)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs @ values.astype(np.float64)


def _paged_cache(lengths, num_kv_heads, page, dim, rng):
    """Random tokens per sequence scattered over shuffled pages (a fragmented cache)."""
    pages_per_seq = [max(1, -(-n // page)) for n in lengths]
    total = sum(pages_per_seq) + 2
    order = rng.permutation(total)
    table = np.zeros((len(lengths), max(pages_per_seq)), np.int32)
    k_pages = rng.standard_normal((total, num_kv_heads, page, dim), dtype=np.float32)
    v_pages = rng.standard_normal((total, num_kv_heads, page, dim), dtype=np.float32)
    start = 0
    for b, count in enumerate(pages_per_seq):
        table[b, :count] = order[start:start + count]
        start += count

    def tokens(b, pages):  # [Hkv, n, D] of sequence b, in order
        rows = pages[table[b, :pages_per_seq[b]]].transpose(1, 0, 2, 3)
        return rows.reshape(num_kv_heads, -1, dim)[:, :lengths[b]]

    return k_pages, v_pages, table, lambda b: (tokens(b, k_pages), tokens(b, v_pages))


# (heads, kv heads, head dim, page size, soft cap): SmolLM2-135M, plain MHA with small pages, head sizes that are
# not multiples of the kernel's 16 lanes (below one chunk, one chunk and a tail, several and a tail, Phi-2's 80),
# and soft-capped scores (Gemma-2's c * tanh(s / c), c small enough to change every row).
# Then ALiBi biases (BLOOM's slopes for 4 heads: 2^-2, 2^-4, 2^-6, 2^-8), and an f16 cache (read as f32).
ATTENTION_CONFIGS = [(9, 3, 64, 16, None), (4, 4, 32, 8, None), (4, 2, 12, 16, None), (6, 3, 20, 8, None),
                     (2, 1, 40, 16, None), (4, 4, 80, 16, None), (4, 2, 32, 16, 0.7), (4, 4, 16, 8, "alibi"),
                     (9, 3, 64, 16, "f16")]
ALIBI_SLOPES = (0.25, 0.0625, 0.015625, 0.00390625)


@pytest.fixture(scope="module", params=ATTENTION_CONFIGS, ids=lambda c: "H{}_Hkv{}_D{}_P{}_{}".format(*c))
def attention_builds(request):
    heads, kv_heads, dim, page, variant = request.param
    options = ({"alibi": ALIBI_SLOPES} if variant == "alibi" else {"cache_dtype": "float16"} if variant == "f16"
               else {"softcap": variant})
    decode = schedules.build_cpu(kernels.attention_decode_func(heads, kv_heads, dim, page, **options))
    prefill = schedules.build_cpu(kernels.attention_prefill_func(heads, kv_heads, dim, page, **options))
    return request.param, decode, prefill


def _variant(variant):
    """(soft cap, per-head ALiBi slopes) of a config's last field."""
    return (None, ALIBI_SLOPES) if variant == "alibi" else (None if variant == "f16" else variant, (None,) * 16)


def _pages_for(variant, k_pages, v_pages):
    """The pages the kernel reads: f16 copies for an f16 cache (the reference then reads the same rounded values)."""
    if variant != "f16":
        return k_pages, v_pages
    return k_pages.astype(np.float16), v_pages.astype(np.float16)


def test_attention_decode_matches_numpy(attention_builds):
    (heads, kv_heads, dim, page, variant), decode, _ = attention_builds
    softcap, slopes = _variant(variant)
    rng = _rng(5)
    lengths = [1, page, page + 1, 3 * page + 5, 70]
    k_pages, v_pages, table, tokens = _paged_cache(lengths, kv_heads, page, dim, rng)
    if variant == "f16":  # the reference reads the f16-rounded values the kernel reads
        k_pages[:], v_pages[:] = k_pages.astype(np.float16), v_pages.astype(np.float16)
    q = rng.standard_normal((len(lengths), heads, dim), dtype=np.float32)
    k_pages, v_pages = _pages_for(variant, k_pages, v_pages)
    out = _run(decode, q, k_pages, v_pages, table, np.array(lengths, np.int32),
               np.zeros_like(q))[-1].numpy()
    group = heads // kv_heads
    for b in range(len(lengths)):
        keys, values = tokens(b)
        for h in range(heads):
            ref = _reference_attention(q[b, h][None], keys[h // group], values[h // group], dim ** -0.5, softcap,
                                       slopes[h])
            _close(out[b, h], ref[0])


def test_attention_prefill_is_causal_over_packed_sequences(attention_builds):
    (heads, kv_heads, dim, page, variant), _, prefill = attention_builds
    softcap, slopes = _variant(variant)
    rng = _rng(6)
    # Sequence 0: 5 new tokens after 12 cached; sequence 1: 20 new tokens, nothing cached.
    cached, new = [12, 0], [5, 20]
    lengths = [c + n for c, n in zip(cached, new)]
    k_pages, v_pages, table, tokens = _paged_cache(lengths, kv_heads, page, dim, rng)
    if variant == "f16":
        k_pages[:], v_pages[:] = k_pages.astype(np.float16), v_pages.astype(np.float16)
    row_seq = np.repeat(np.arange(2, dtype=np.int32), new)
    row_pos = np.concatenate([np.arange(c, c + n, dtype=np.int32) for c, n in zip(cached, new)])
    q = rng.standard_normal((len(row_seq), heads, dim), dtype=np.float32)
    out = _run(prefill, q, *_pages_for(variant, k_pages, v_pages), table, row_seq, row_pos,
               np.zeros_like(q))[-1].numpy()
    group = heads // kv_heads
    for r, (b, pos) in enumerate(zip(row_seq, row_pos)):
        keys, values = tokens(b)
        for h in range(heads):
            ref = _reference_attention(q[r, h][None], keys[h // group, :pos + 1],
                                       values[h // group, :pos + 1], dim ** -0.5, softcap, slopes[h])
            _close(out[r, h], ref[0])


def test_relax_append_prefill_then_linear_in_one_function():
    """emit_kv_append (in place) + emit_attention_prefill + emit_te(linear) through the VM."""
    heads, kv_heads, dim, page, hidden = 4, 2, 16, 4, 24
    sym = {name: tirx.Var(name, "int64") for name in ("s", "pages", "b", "max_pages")}

    def tensor(name, shape, dtype="float32"):
        return relax.Var(name, relax.TensorType(shape, dtype))

    q = tensor("q", [sym["s"], heads, dim])
    k = tensor("k", [sym["s"], kv_heads, dim])
    v = tensor("v", [sym["s"], kv_heads, dim])
    k_pages = tensor("k_pages", [sym["pages"], kv_heads, page, dim])
    v_pages = tensor("v_pages", [sym["pages"], kv_heads, page, dim])
    table = tensor("page_table", [sym["b"], sym["max_pages"]], "int32")
    row_seq = tensor("row_seq", [sym["s"]], "int32")
    row_pos = tensor("row_pos", [sym["s"]], "int32")
    w_out = tensor("w_out", [hidden, heads * dim])
    bb = relax.BlockBuilder()
    with bb.function("prefill", [q, k, v, k_pages, v_pages, table, row_seq, row_pos, w_out]):
        new_k, new_v = kernels.emit_kv_append(bb, k, v, table, row_seq, row_pos, k_pages, v_pages)
        attn = kernels.emit_attention_prefill(bb, q, new_k, new_v, table, row_seq, row_pos)
        flat = bb.emit(relax.op.reshape(attn, [sym["s"], heads * dim]))
        y = bb.emit_te(kernels.linear, flat, w_out, row_tile=4)
        bb.emit_func_output(y)
    mod = schedules.apply_cpu_schedules(bb.get())
    vm = relax.VirtualMachine(tvm.compile(mod, schedules.cpu_target()), tvm.cpu())

    rng = _rng(7)
    n = 6  # spans two pages, the first of which is physical page 3
    arrays = dict(
        q=rng.standard_normal((n, heads, dim), dtype=np.float32),
        k=rng.standard_normal((n, kv_heads, dim), dtype=np.float32),
        v=rng.standard_normal((n, kv_heads, dim), dtype=np.float32),
        k_pages=np.zeros((4, kv_heads, page, dim), np.float32),
        v_pages=np.zeros((4, kv_heads, page, dim), np.float32),
        table=np.array([[3, 1]], np.int32), row_seq=np.zeros(n, np.int32),
        row_pos=np.arange(n, dtype=np.int32),
        w_out=rng.standard_normal((hidden, heads * dim), dtype=np.float32))
    tensors = {name: tvm.runtime.tensor(a) for name, a in arrays.items()}
    y = vm["prefill"](*tensors.values()).numpy()

    attn = np.zeros((n, heads, dim))
    causal = np.tril(np.ones((n, n), bool))
    for h in range(heads):
        scores = arrays["q"][:, h].astype(np.float64) @ arrays["k"][:, h // 2].T / np.sqrt(dim)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(1, keepdims=True))
        attn[:, h] = (probs / probs.sum(1, keepdims=True)) @ arrays["v"][:, h // 2]
    _close(y, attn.reshape(n, -1) @ arrays["w_out"].T.astype(np.float64))
    # The append wrote the caller's page tensors in place: token 5 is slot 1 of page 1.
    np.testing.assert_array_equal(tensors["k_pages"].numpy()[1, :, 1], arrays["k"][5])
    np.testing.assert_array_equal(tensors["v_pages"].numpy()[3, :, :4].transpose(1, 0, 2),
                                  arrays["v"][:4])


# -------------------------------------------------------------------------- dispatch, misc

def test_apply_cpu_schedules_marks_kernels_and_leaves_other_funcs():
    x = te.placeholder((kernels.symbolic_dim(), 32), "float32", name="x")
    other = kernels.prim_func(x, te.compute(x.shape, lambda i, j: x[i, j] * 2, name="double"))
    mod = tvm.IRModule({"gemv": _linear_func(32, 16, None), "gemm": _linear_func(32, 16, 4),
                        "other": other})
    scheduled = schedules.apply_cpu_schedules(mod)
    for name in ("gemv", "gemm"):
        assert scheduled[name].attrs["tirx.is_scheduled"]
    assert scheduled["other"].same_as(other)


def test_configure_threads_rejects_zero():
    with pytest.raises(ConfigError, match="thread"):
        schedules.configure_threads(0)


def test_configure_threads_sizes_a_fresh_pool_and_refuses_to_grow_it():
    # A fresh interpreter without TVM_NUM_THREADS: the pool would otherwise guess its size.
    script = ("from kiln.backends.tvm import schedules\n"
              "from kiln.ir.errors import ConfigError\n"
              "print(schedules.configure_threads(2))\n"
              "try:\n    schedules.configure_threads(3)\nexcept ConfigError:\n    print('refused')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.split() == ["2", "refused"]


def test_cpu_target_names_the_host_cpu():
    assert str(schedules.cpu_target().attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()


# ------------------------------------------------------------------ CUDA, compile only

NVCC_CASES = [  # (name, PrimFunc builder, arch): symbolic m -> gpu.Matmul, m = 1 -> gpu.GEMV
    ("linear_sym_m", lambda: _linear_func(576, 192, None), "sm_80"),
    ("int4_dequant_stage_sym_m", lambda: _int4_func(576, 192, 32, "zero", None, True), "sm_90"),
]


@pytest.mark.nvcc
@pytest.mark.parametrize("name,build,arch", NVCC_CASES, ids=[c[0] for c in NVCC_CASES])
def test_dlight_cuda_source_compiles_with_nvcc(name, build, arch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    source = schedules.build_cuda_source(build(), arch)
    assert "__global__" in source
    assert len(schedules.compile_cuda_source(source, arch)) > 0


def test_attention_is_cpu_only_for_dlight():
    # Attention comes pre-scheduled for the CPU; the GPU path must say so, not crash.
    with pytest.raises(ConfigError, match="CPU-only"):
        schedules.build_cuda_source(kernels.attention_decode_func(4, 2, 16, 4), "sm_80")


@pytest.mark.parametrize("cache_dtype", ["float32", "float16"])
def test_kv_append_writes_rows_rounded_to_the_cache_dtype(cache_dtype):
    """Row r's K/V land at (page_table[row_seq[r], pos // P] + base, :, pos % P) of the pools, as numpy rounds them
    to the cache's dtype; every other slot is left as it was."""
    kv_heads, dim, page = 2, 12, 4
    rng = _rng(7)
    fn = schedules.build_cpu(kernels.kv_append_func(kv_heads, dim, page, 1, 9, cache_dtype=cache_dtype))
    table = np.array([[3, 0, 5], [1, 2, 4]], np.int32)
    row_seq = np.array([0, 0, 1, 1, 0], np.int32)
    row_pos = np.array([0, 5, 2, 9, 11], np.int32)
    k = rng.standard_normal((5, kv_heads, dim), dtype=np.float32)
    v = rng.standard_normal((5, kv_heads, dim), dtype=np.float32)
    k_pages = rng.standard_normal((16, kv_heads, page, dim)).astype(cache_dtype)
    v_pages = rng.standard_normal((16, kv_heads, page, dim)).astype(cache_dtype)
    expected_k, expected_v = k_pages.copy(), v_pages.copy()
    for r, (seq, pos) in enumerate(zip(row_seq, row_pos)):
        expected_k[1 + table[seq, pos // page], :, pos % page] = k[r].astype(cache_dtype)
        expected_v[9 + table[seq, pos // page], :, pos % page] = v[r].astype(cache_dtype)
    tensors = _run(fn, k, v, table, row_seq, row_pos, k_pages, v_pages)
    np.testing.assert_array_equal(tensors[-2].numpy(), expected_k)
    np.testing.assert_array_equal(tensors[-1].numpy(), expected_v)
