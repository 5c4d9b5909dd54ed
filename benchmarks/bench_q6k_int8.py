"""Times a decode step's GGUF Q6_K linear on the TVM CPU backend: int8 activations (quantize_rows + the VNNI
group-16 kernel) against float activations (the float Q6_K GEMV), and a Q8_0-shaped weight (groups of 32) with
int8 activations beside them.

Run: python benchmarks/bench_q6k_int8.py [--threads 2] [--reps 2000]
Two figures per shape: one weight called again and again (it stays in cache), and a chain of weights larger
than the L3 cache called once each in one VM call (a decode step streams its weights from DRAM), in
microseconds per linear, median of alternating blocks (min in brackets).
"""

import argparse
import os
import statistics
import time


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2000, help="timed calls of the cached form")
    parser.add_argument("--chain-bytes", type=float, default=64.0, help="MiB of weights in the streamed chain")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # before TVM's runtime starts its pool

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from kiln.backends.tvm import int8_kernels, quant_lower  # noqa: E402,F401  (quant_lower registers linear_q)
from kiln.backends.tvm.build import TVMFunction  # noqa: E402
from kiln.backends.tvm.lower import cpu_target  # noqa: E402
from kiln.ir.graph import Module  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402

SHAPES = [(1536, 576), (576, 1536)]  # (N, K): SmolLM2's gate/up and down
FORMATS = [("Q6_K float activations", 16, "float"), ("Q6_K int8 activations", 16, "int8"),
           ("Q8_0-shaped int8 activations", 32, "int8")]


def weights(rng, n, k, group):
    q = rng.integers(-32 if group == 16 else -127, 32 if group == 16 else 128, (n, k)).astype(np.int8)
    scale = (rng.random((n, k // group)) * 1e-2).astype(np.float32)
    return q, scale


def chain_module(n, k, group, activations, count, rng):
    """@f(x [1, K]) -> ``count`` linear_q of x, each over its own weight."""
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (1, k)))
    results = []
    for i in range(count):
        q, scale = weights(rng, n, k, group)
        module.add_weight(f"q{i}", q)
        module.add_weight(f"s{i}", scale)
        results.append(fn.emit("linear_q", x, fn.emit("weight", name=f"q{i}"), fn.emit("weight", name=f"s{i}"),
                               bits=8, group_size=group, activations=activations))
    fn.set_results(results)
    return module


def timed(call, reps: int, rounds: int = 10):
    """Calls of each function in ``call`` timed in alternating blocks: {name: (median, min) seconds}."""
    samples = {name: [] for name in call}
    for fn in call.values():
        fn()
    for _ in range(rounds):
        for name, fn in call.items():
            time.sleep(0.01)
            fn()
            for _ in range(max(1, reps // rounds)):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in samples.items()}


def main():
    target = cpu_target()
    print(f"target {target.attrs.get('mcpu')}, VNNI {int8_kernels.has_vnni(target)}, {ARGS.threads} threads")
    rng = np.random.default_rng(0)
    for n, k in SHAPES:
        x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32))
        chain = max(1, int(ARGS.chain_bytes * 2**20 / (n * k * 1.25)))
        cached, streamed = {}, {}
        for name, group, activations in FORMATS:
            for store, count in ((cached, 1), (streamed, chain)):
                fn = TVMFunction.from_module(chain_module(n, k, group, activations, count, rng), "f",
                                             target=target, num_threads=ARGS.threads)
                store[name] = (lambda f=fn: f._func(x, *f._weights))
        print(f"\nW [{n}, {k}] (N x K), x [1, {k}]; streamed: {chain} weights per call")
        cached_times = timed(cached, ARGS.reps)
        streamed_times = timed(streamed, max(10, ARGS.reps // chain))
        for name, _, _ in FORMATS:
            (cm, cmin), (sm, smin) = cached_times[name], streamed_times[name]
            print(f"  {name:30s} cached {cm * 1e6:7.1f} us [{cmin * 1e6:6.1f}]   "
                  f"streamed {sm / chain * 1e6:7.1f} us per linear [{smin / chain * 1e6:6.1f}]")


if __name__ == "__main__":
    main()
