"""Times kiln's TVM CPU kernels against numpy on SmolLM2-135M shapes, same thread count.

Run: python benchmarks/bench_tvm_kernels.py [--threads 2] [--reps 200]
Prints median microseconds per call (min in brackets) and the TVM / numpy ratio.
"""

import argparse
import os
import statistics
import sys
import time


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200, help="timed calls per kernel (fewer for big ones)")
    parser.add_argument("--skip-tvm-cache", action="store_true",
                        help="skip TVM's own TIRPagedKVCache decode kernel")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # Both thread pools size themselves when first used, so this must precede the imports.
    for var in ("TVM_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import te  # noqa: E402

from kiln.backends.tvm import kernels, schedules  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 9, 3, 64, 49152
PAGE = 16
# (name, K, N) of SmolLM2-135M's matmuls; gate_up is gate and up fused.
MATMULS = [("q_proj/o_proj", HIDDEN, HIDDEN), ("k_proj/v_proj", HIDDEN, KV_HEADS * HEAD_DIM),
           ("gate/up", HIDDEN, INTERMEDIATE), ("gate_up fused", HIDDEN, 2 * INTERMEDIATE),
           ("down", INTERMEDIATE, HIDDEN), ("lm_head", HIDDEN, VOCAB)]
PREFILL_ROWS = 128


def median_us(fn, reps: int, warmup: int = 10) -> tuple[float, float]:
    """(median, min) microseconds of single calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, min(times) * 1e6


def compare_us(tvm_fn, numpy_fn, reps: int, rounds: int = 10):
    """(median, min) microseconds of each function, timed in alternating blocks.

    On a shared machine the load changes from second to second; alternating blocks
    give both sides the same conditions. The pause between blocks lets the other
    library's spinning worker threads go idle first.
    """
    per_round = max(1, reps // rounds)
    samples = ([], [])
    for fn in (tvm_fn, numpy_fn):
        fn()
    for _ in range(rounds):
        for fn, times in zip((tvm_fn, numpy_fn), samples):
            time.sleep(0.02)
            fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return tuple((statistics.median(t) * 1e6, min(t) * 1e6) for t in samples)


def reps_for(flops: float) -> int:
    # ~0.2 s of timing per kernel at ~50 GFLOP/s, capped by --reps.
    return max(10, min(ARGS.reps, int(1e10 / max(flops, 1.0))))


def row(name: str, tvm_time, np_time):
    ratio = tvm_time[0] / np_time[0]
    print(f"{name:<44} {tvm_time[0]:>9.1f} [{tvm_time[1]:>8.1f}] {np_time[0]:>9.1f} "
          f"[{np_time[1]:>8.1f}] {ratio:>6.2f}", flush=True)


def header(title: str):
    print(f"\n{title}\n{'kernel':<44} {'tvm us':>9} {'[min]':>10} {'numpy us':>9} {'[min]':>10} "
          f"{'ratio':>6}")


def _tensors(*arrays):
    return [tvm.runtime.tensor(a) for a in arrays]


def bench_linear(rng):
    header(f"fp32 linear y = x @ W^T, {ARGS.threads} threads "
           f"(decode m=1: GEMV schedule; prefill m={PREFILL_ROWS}: GEMM schedule)")
    for form, row_tile, m in (("decode", None, 1), ("prefill", 4, PREFILL_ROWS)):
        for name, k, n in MATMULS:
            if form == "prefill" and name == "lm_head":
                continue  # kiln computes logits for the last token of each sequence only
            x_t = te.placeholder((kernels.symbolic_dim(), k), "float32", name="x")
            w_t = te.placeholder((n, k), "float32", name="w")
            fn = schedules.build_cpu(kernels.prim_func(x_t, w_t, kernels.linear(x_t, w_t, row_tile)))
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            out = np.empty((m, n), np.float32)
            args = _tensors(x, w, out)
            reps = reps_for(2.0 * m * k * n)
            tvm_time, np_time = compare_us(lambda: fn(*args), lambda: np.matmul(x, w.T, out=out), reps)
            row(f"{form} {name} m={m} {k}x{n}", tvm_time, np_time)


def bench_int4(rng):
    header(f"int4 weight-only GEMV (m=1, dequantize fused) vs numpy fp32 GEMV, {ARGS.threads} threads")
    for group in (32, 128):
        for name, k, n in MATMULS:
            if k % group:
                print(f"{'int4 g%d %s %dx%d' % (group, name, k, n):<44} skipped: K={k} is not a "
                      f"multiple of {group}")
                continue
            x_t = te.placeholder((kernels.symbolic_dim(), k), "float32", name="x")
            q_t = te.placeholder((n, k // 8), "uint32", name="q")
            s_t = te.placeholder((n, k // group), "float32", name="scale")
            z_t = te.placeholder((n, k // group), "float32", name="offset")
            y_t = kernels.linear_int4(x_t, q_t, s_t, group_size=group, offset=z_t)
            fn = schedules.build_cpu(kernels.prim_func(x_t, q_t, s_t, z_t, y_t))
            x = rng.standard_normal((1, k), dtype=np.float32)
            args = _tensors(x, rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32),
                            rng.random((n, k // group), dtype=np.float32),
                            rng.random((n, k // group), dtype=np.float32), np.empty((1, n), np.float32))
            w = rng.standard_normal((n, k), dtype=np.float32)
            out = np.empty((1, n), np.float32)
            reps = reps_for(2.0 * k * n)
            tvm_time, np_time = compare_us(lambda: fn(*args), lambda: np.matmul(x, w.T, out=out), reps)
            row(f"int4 g{group} {name} m=1 {k}x{n} (offset)", tvm_time, np_time)


def numpy_decode_attention(q, k_pages, v_pages, table, lengths, scale):
    """numpy reference implementation kiln would otherwise run: gather pages, GQA matmuls."""
    group = q.shape[1] // k_pages.shape[1]
    out = np.empty_like(q)
    for b, length in enumerate(lengths):
        pages = table[b, :-(-length // PAGE)]
        keys = k_pages[pages].transpose(1, 0, 2, 3).reshape(k_pages.shape[1], -1, HEAD_DIM)[:, :length]
        values = v_pages[pages].transpose(1, 0, 2, 3).reshape(k_pages.shape[1], -1, HEAD_DIM)[:, :length]
        qg = q[b].reshape(k_pages.shape[1], group, HEAD_DIM)
        scores = np.matmul(qg, keys.transpose(0, 2, 1)) * scale
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out[b] = np.matmul(scores, values).reshape(-1, HEAD_DIM)
    return out


def numpy_prefill_attention(q, keys, values, scale):
    """numpy causal attention of one sequence with no cached prefix: q[s, H, D], keys[Hkv, s, D]."""
    group = q.shape[1] // keys.shape[0]
    s = q.shape[0]
    qg = q.transpose(1, 0, 2).reshape(keys.shape[0], group * s, HEAD_DIM)
    scores = np.matmul(qg, keys.transpose(0, 2, 1)).reshape(keys.shape[0], group, s, s) * scale
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    return np.matmul(scores, values[:, None]).reshape(-1, s, HEAD_DIM).transpose(1, 0, 2)


def _tvm_cache_decode():
    """TVM's own CPU decode kernel from TIRPagedKVCache (private module, read-only use)."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    func = _attention_decode_cpu(KV_HEADS, HEADS, HEAD_DIM, "float32", False, {}, PAGE)
    return tvm.compile(tvm.IRModule({"main": func}), schedules.cpu_target())["main"]


def bench_attention(rng):
    header(f"paged GQA attention H={HEADS} Hkv={KV_HEADS} D={HEAD_DIM} page={PAGE}, {ARGS.threads} threads")
    decode = schedules.build_cpu(kernels.attention_decode_func(HEADS, KV_HEADS, HEAD_DIM, PAGE))
    tvm_cache = None if ARGS.skip_tvm_cache else _tvm_cache_decode()
    scale = HEAD_DIM ** -0.5
    for batch, context in ((1, 128), (1, 1024), (4, 1024)):
        pages_per_seq = -(-context // PAGE)
        num_pages = batch * pages_per_seq
        k_pages = rng.standard_normal((num_pages, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float32)
        v_pages = rng.standard_normal((num_pages, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float32)
        table = rng.permutation(num_pages).astype(np.int32).reshape(batch, pages_per_seq)
        lengths = np.full(batch, context, np.int32)
        q = rng.standard_normal((batch, HEADS, HEAD_DIM), dtype=np.float32)
        args = _tensors(q, k_pages, v_pages, table, lengths, np.empty_like(q))
        reps = min(ARGS.reps, 100)
        tvm_time, np_time = compare_us(
            lambda: decode(*args),
            lambda: numpy_decode_attention(q, k_pages, v_pages, table, lengths, scale), reps)
        row(f"decode kiln paged b={batch} ctx={context}", tvm_time, np_time)
        if tvm_cache is not None:
            # Same data in TIRPagedKVCache's layout: pages[n, 2, Hkv, P, D], CSR page table.
            pages = np.stack([k_pages, v_pages], axis=1)
            indptr = np.arange(0, num_pages + 1, pages_per_seq, dtype=np.int32)
            last_len = np.full(batch, context - (pages_per_seq - 1) * PAGE, np.int32)
            zeros = np.zeros(batch, np.int32)
            cache_args = _tensors(q, pages, indptr, table.reshape(-1), last_len, zeros, zeros,
                                  np.empty_like(q), np.empty((batch, HEADS), np.float32))
            call = lambda: tvm_cache(*cache_args, 0, 1.0, 1e4, scale)  # noqa: E731
            call()
            expect = numpy_decode_attention(q, k_pages, v_pages, table, lengths, scale)
            assert np.allclose(cache_args[7].numpy(), expect, atol=1e-4), "TIRPagedKVCache kernel disagrees"
            time.sleep(0.02)
            row(f"decode TVM TIRPagedKVCache b={batch} ctx={context}",
                median_us(call, min(reps, 20), warmup=2), np_time)

    prefill = schedules.build_cpu(kernels.attention_prefill_func(HEADS, KV_HEADS, HEAD_DIM, PAGE))
    for tokens in (128,):
        pages_per_seq = -(-tokens // PAGE)
        k_pages = rng.standard_normal((pages_per_seq, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float32)
        v_pages = rng.standard_normal((pages_per_seq, KV_HEADS, PAGE, HEAD_DIM), dtype=np.float32)
        table = np.arange(pages_per_seq, dtype=np.int32)[None]
        q = rng.standard_normal((tokens, HEADS, HEAD_DIM), dtype=np.float32)
        args = _tensors(q, k_pages, v_pages, table, np.zeros(tokens, np.int32),
                        np.arange(tokens, dtype=np.int32), np.empty_like(q))
        keys = k_pages.transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, HEAD_DIM)[:, :tokens]
        values = v_pages.transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, HEAD_DIM)[:, :tokens]
        reps = min(ARGS.reps, 50)
        tvm_time, np_time = compare_us(
            lambda: prefill(*args), lambda: numpy_prefill_attention(q, keys, values, scale), reps)
        row(f"prefill kiln paged causal s={tokens}", tvm_time, np_time)


def main():
    schedules.configure_threads(ARGS.threads)
    print(f"TVM {tvm.__version__}, numpy {np.__version__}, cpu {tvm.target.codegen.llvm_get_system_cpu()}, "
          f"threads {ARGS.threads}; load average {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    bench_linear(rng)
    bench_int4(rng)
    bench_attention(rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
