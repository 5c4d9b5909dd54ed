"""kiln's CUDA paged-attention kernels (backends/tvm/cuda_attention.py) against a numpy reference.

On the CPU: the same TIR with the GPU thread loops run as CPU loops. With nvcc: the CUDA source of
each kernel, and of a whole tiny Llama's prefill + decode, compiles for sm_80 and sm_90. On a GPU:
the real kernels against numpy.
"""

import functools
import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tvm = pytest.importorskip("tvm")

from kiln.backends.tvm import cuda_attention  # noqa: E402
from kiln.backends.tvm.build import build, compile_cuda_source, cuda_source  # noqa: E402
from kiln.ir.errors import ConfigError  # noqa: E402

from golden import copy_module  # noqa: E402
from tiny_models import captured  # noqa: E402

ARCHS = ("sm_80", "sm_90")
RTOL = 1e-5
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit missing)")


def _has_gpu() -> bool:
    return tvm.cuda(0).exist


# ---------------------------------------------------------------------------------- cases
# A case is a paged cache holding a few sequences of a layer plus the queries to run on it.
# Pages are handed out in shuffled order; the unused table entries point at a page of NaNs and the
# slots past each sequence's end (and, with a window, keys older than every query's window) hold
# NaN, so a kernel reading any key it must not see returns NaN.

CONFIGS = {
    # GQA 9/3, head_dim 64 (one tile of 64 keys per step), layer 1 of a two-layer cache: K and V
    # pages of one buffer at k_base = 2 * pages, v_base = 3 * pages.
    "gqa9x3_d64": dict(heads=9, kv_heads=3, dim=64, page=16, layer=1, window=None),
    # MHA 4/4, head_dim 32 (tiles of 32 keys), layer 0.
    "mha4_d32": dict(heads=4, kv_heads=4, dim=32, page=8, layer=0, window=None),
    # a sliding window that starts neither on a page nor on a tile boundary
    "gqa4x2_d32_window13": dict(heads=4, kv_heads=2, dim=32, page=8, layer=0, window=13),
    # a head size below one warp, soft-capped scores (Gemma-2's c * tanh(s / c), c small enough to matter)
    "gqa6x2_d12_softcap": dict(heads=6, kv_heads=2, dim=12, page=8, layer=1, window=None, softcap=0.7),
    # ALiBi biases over a window (BLOOM's slopes for 4 heads)
    "mha4_d16_alibi_window13": dict(heads=4, kv_heads=4, dim=16, page=8, layer=0, window=13,
                                    alibi=(0.25, 0.0625, 0.015625, 0.00390625)),
    # an f16 cache, widened to f32 as it is read and rounded as it is written
    "gqa9x3_d64_f16": dict(heads=9, kv_heads=3, dim=64, page=16, layer=1, window=None, cache_dtype="float16"),
}


def _lengths(page):
    return [1, page, page + 1, 3 * page + 5, 150]


def _paged_cache(rng, cfg, lengths, layers=2):
    """(flat cache [layers * 2 * pages, Hkv, P, D], page_table, k_base, v_base)."""
    page, kv_heads, dim = cfg["page"], cfg["kv_heads"], cfg["dim"]
    need = [(n + page - 1) // page for n in lengths]
    pages = sum(need) + 2
    nan_page = pages - 1
    cache = rng.standard_normal((layers * 2 * pages, kv_heads, page, dim)).astype(cfg.get("cache_dtype", "float32"))
    cache = cache.astype("float32")  # values an f16 cache holds exactly, so the reference reads what the kernel reads
    k_base, v_base = 2 * cfg["layer"] * pages, (2 * cfg["layer"] + 1) * pages
    cache[k_base + nan_page] = np.nan
    cache[v_base + nan_page] = np.nan
    order = rng.permutation(pages - 1)
    table = np.full((len(lengths), max(need) + 1), nan_page, dtype="int32")
    used = 0
    for s, n in enumerate(lengths):
        table[s, :need[s]] = order[used:used + need[s]]
        used += need[s]
        for base in (k_base, v_base):
            for pos in range(n, need[s] * page):
                cache[base + table[s, pos // page], :, pos % page] = np.nan
    return cache, table, k_base, v_base


def _gather(cache, base, table, seq, positions, page):
    return cache[base + table[seq, positions // page], :, positions % page]  # [n, Hkv, D]


def _reference(q, cache, table, k_base, v_base, row_seq, row_pos, cfg):
    """Paged attention in float64: row r sees positions p' of row_seq[r] with 0 <= p' <= row_pos[r]
    and row_pos[r] - p' < window; a row that sees nothing is zeros."""
    heads, group, page, window = cfg["heads"], cfg["heads"] // cfg["kv_heads"], cfg["page"], cfg["window"]
    scale = cfg["dim"] ** -0.5
    out = np.zeros(q.shape, dtype="float64")
    for r, (seq, pos) in enumerate(zip(row_seq, row_pos)):
        if pos < 0:
            continue
        visible = np.arange(pos + 1)
        if window is not None:
            visible = visible[pos - visible < window]
        keys = _gather(cache, k_base, table, seq, visible, page).astype("float64")
        values = _gather(cache, v_base, table, seq, visible, page).astype("float64")
        for h in range(heads):
            scores = keys[:, h // group] @ q[r, h].astype("float64") * scale
            if cfg.get("softcap") is not None:
                scores = cfg["softcap"] * np.tanh(scores / cfg["softcap"])
            if cfg.get("alibi") is not None:
                scores = scores + cfg["alibi"][h] * (visible - pos)
            weights = np.exp(scores - scores.max())
            out[r, h] = weights / weights.sum() @ values[:, h // group]
    return out


def _hide_outside_window(cache, table, k_base, v_base, lengths, cfg):
    """NaN in the keys/values no decode query may read: those older than its window."""
    if cfg["window"] is None:
        return
    for s, n in enumerate(lengths):
        hidden = np.arange(max(n - cfg["window"], 0))
        for base in (k_base, v_base):
            cache[base + table[s, hidden // cfg["page"]], :, hidden % cfg["page"]] = np.nan


def decode_case(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lengths = _lengths(cfg["page"]) + [0]  # a padding entry: no token, zeros out
    cache, table, k_base, v_base = _paged_cache(rng, cfg, lengths)
    _hide_outside_window(cache, table, k_base, v_base, lengths, cfg)
    q = rng.standard_normal((len(lengths), cfg["heads"], cfg["dim"])).astype("float32")
    lengths = np.array(lengths, dtype="int32")
    ref = _reference(q, cache, table, k_base, v_base, range(len(lengths)), lengths - 1, cfg)
    return (k_base, v_base), [q, cache, cache, table, lengths], ref


def prefill_case(cfg, seed=1):
    """Packed rows of two sequences: a 3P+5-token prompt and 5 new tokens after 7 cached ones,
    shuffled, plus a padding row (row_pos -1)."""
    rng = np.random.default_rng(seed)
    page = cfg["page"]
    lengths = [3 * page + 5, 12]
    cache, table, k_base, v_base = _paged_cache(rng, cfg, lengths)
    row_seq = [0] * lengths[0] + [1] * 5 + [0]
    row_pos = list(range(lengths[0])) + list(range(7, 12)) + [-1]
    order = rng.permutation(len(row_seq))
    row_seq = np.array(row_seq, dtype="int32")[order]
    row_pos = np.array(row_pos, dtype="int32")[order]
    q = rng.standard_normal((len(row_seq), cfg["heads"], cfg["dim"])).astype("float32")
    ref = _reference(q, cache, table, k_base, v_base, row_seq, row_pos, cfg)
    return (k_base, v_base), [q, cache, cache, table, row_seq, row_pos], ref


def append_case(cfg, seed=2):
    """K/V rows of two sequences written into layer `layer` of separate K and V pools."""
    rng = np.random.default_rng(seed)
    cache, table, k_base, v_base = _paged_cache(rng, cfg, [3 * cfg["page"] + 5, 12])
    cache = np.nan_to_num(cache, nan=7.0)
    row_seq = np.array([0, 0, 1, 1, 0, 1], dtype="int32")
    row_pos = np.array([0, 3 * cfg["page"] + 4, 7, 8, cfg["page"], 11], dtype="int32")
    k = rng.standard_normal((len(row_seq), cfg["kv_heads"], cfg["dim"])).astype("float32")
    v = rng.standard_normal(k.shape).astype("float32")
    k_pages, v_pages = cache.copy(), cache[::-1].copy()
    expected_k, expected_v = k_pages.copy(), v_pages.copy()
    for r, (seq, pos) in enumerate(zip(row_seq, row_pos)):
        page = table[seq, pos // cfg["page"]]
        expected_k[k_base + page, :, pos % cfg["page"]] = k[r]
        expected_v[v_base + page, :, pos % cfg["page"]] = v[r]
    return (k_base, v_base), [k, v, table, row_seq, row_pos, k_pages, v_pages], (expected_k, expected_v)


# ----------------------------------------------------------------------------- running

def _kernel(kind, cfg, bases, bind_threads):
    k_base, v_base = bases
    if kind == "append":
        return cuda_attention.kv_append_cuda_func(cfg["kv_heads"], cfg["dim"], cfg["page"], k_base, v_base,
                                                  cfg.get("cache_dtype", "float32"),
                                                  bind_threads=bind_threads)
    make = (cuda_attention.attention_decode_cuda_func if kind == "decode"
            else cuda_attention.attention_prefill_cuda_func)
    return make(cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["page"], None, k_base, v_base, cfg["window"],
                cfg.get("softcap"), cfg.get("alibi"), cfg.get("cache_dtype", "float32"), bind_threads=bind_threads)


CASES = {"decode": decode_case, "prefill": prefill_case, "append": append_case}


def _run_and_check(kind, cfg, target, device, bind_threads):
    bases, arrays, expected = CASES[kind](cfg)
    cache_dtype = cfg.get("cache_dtype", "float32")
    if cache_dtype != "float32":  # the pools (two inputs of attention, the last two of append) in the cache's dtype
        pools = (5, 6) if kind == "append" else (1, 2)
        arrays = [a.astype(cache_dtype) if i in pools else a for i, a in enumerate(arrays)]
        if kind == "append":
            expected = tuple(e.astype(cache_dtype) for e in expected)
    func = _kernel(kind, cfg, bases, bind_threads)
    run = build(tvm.IRModule({"main": func}), target)["main"]
    tensors = [tvm.runtime.tensor(a, device) for a in arrays]
    if kind == "append":
        run(*tensors)  # in place: the K and V pools are the last two arguments
        np.testing.assert_array_equal(tensors[-2].numpy(), expected[0])
        np.testing.assert_array_equal(tensors[-1].numpy(), expected[1])
        return
    out = tvm.runtime.tensor(np.full(expected.shape, np.nan, dtype="float32"), device)
    run(*tensors, out)
    got = out.numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))


@pytest.mark.parametrize("kind", ["decode", "prefill", "append"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_matches_numpy_on_cpu(kind, config):
    """The kernel's TIR with its thread loops as CPU loops: exactly what each GPU thread computes."""
    _run_and_check(kind, CONFIGS[config], "cpu", tvm.cpu(), bind_threads=False)


def test_bad_head_config_is_refused():
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        cuda_attention.attention_decode_cuda_func(9, 2, 64, 16)
    with pytest.raises(ConfigError, match="window"):
        cuda_attention.attention_prefill_cuda_func(4, 2, 32, 8, window=0)


# ------------------------------------------------------------------------------- nvcc

@functools.lru_cache(maxsize=None)
def _all_kernels_module() -> "tvm.IRModule":
    """Every kernel of every config in one module (one nvcc run per arch)."""
    funcs = {}
    for name, cfg in CONFIGS.items():
        for kind in CASES:
            bases = (2 * cfg["layer"] * 8, (2 * cfg["layer"] + 1) * 8)
            funcs[f"{kind}_{name}"] = _kernel(kind, cfg, bases, True).with_attr("global_symbol", f"{kind}_{name}")
    return tvm.IRModule(funcs)


@pytest.mark.nvcc
@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_with_nvcc(arch):
    source = cuda_source(_all_kernels_module(), arch)
    for name in (f"{kind}_{config}" for kind in CASES for config in CONFIGS):
        assert f" {name}_kernel(" in source
    assert "__syncthreads()" in source
    assert len(compile_cuda_source(source, arch)) > 0


@functools.lru_cache(maxsize=None)
def _optimized_tiny_llama(quantize=None, activations="float"):
    from kiln.passes.manager import PassManager, PassOptions
    from kiln.passes.pipeline import PIPELINE

    module = copy_module(captured("llama"))
    PassManager(PIPELINE).run(module, PassOptions(max_seq_len=32, max_num_seqs=2, page_size=8,
                                                  extra={"quantize": quantize, "activations": activations}))
    return module


@pytest.mark.nvcc
@needs_nvcc
# About 25 s per arch (lowering, TVM's CUDA build, nvcc on 2 MB of source): sm_90 runs with -m slow.
# activations="int8": CUDA has no integer-dot-product kernels; each linear_q dequantizes its int8 rows
# (int8_kernels.dequantize_rows) before the float kernel, and that must compile too.
@pytest.mark.parametrize("arch,quantize,activations", [
    ("sm_80", None, "float"), ("sm_80", "int4", "float"), ("sm_80", "int4", "int8"),
    pytest.param("sm_90", None, "float", marks=pytest.mark.slow),
    pytest.param("sm_90", "int8", "float", marks=pytest.mark.slow)])
def test_whole_tiny_llama_compiles_with_nvcc(arch, quantize, activations):
    from kiln.backends.tvm import llm_lower, quant_lower  # noqa: F401  (register the fused-op lowerings)
    from kiln.backends.tvm.lower import lower_functions

    module = _optimized_tiny_llama(quantize, activations)
    if activations == "int8":  # the pass marked every linear_q (the tiny Llama's K are multiples of 32)
        marked = [n for fn in module.functions.values() for n in fn.nodes if n.op == "linear_q"]
        assert marked and all(n.attrs["activations"] == "int8" for n in marked)
    irmodule = lower_functions(module, ["step", "step_decode"], f"cuda:{arch}")
    source = cuda_source(irmodule, arch)
    assert "paged_attention_decode" in source and "paged_attention_ragged" in source
    if quantize:  # the dequantize is fused: a quantized kernel and no fp32 weight parameter
        ops = {n.op for n in module.functions["step_decode"].nodes}
        assert {"linear_q", "embedding_q"} <= ops and "linear" not in ops
        assert "linear_int" in source and "embedding_q" in source
    assert ("int8_rows" in source) == (activations == "int8")
    assert len(compile_cuda_source(source, arch)) > 0


# ------------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU (tvm.cuda(0) does not exist)")
@pytest.mark.parametrize("kind", ["decode", "prefill", "append"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_matches_numpy_on_gpu(kind, config):
    _run_and_check(kind, CONFIGS[config], "cuda", tvm.cuda(0), bind_threads=True)
