"""Times one decoded token's expert GEMVs (moe_experts_q, activations=int8) on the TVM CPU backend: the float
kernels on the int8 rows vs the VNNI expert kernel, for a Qwen3-30B-A3B-like expert shape scaled down.

Run: python benchmarks/bench_moe_vnni.py [--threads 2] [--layers 1] [--tokens 1] [--experts 16 --hidden 512
--inter 768 --top-k 2]
Each layer is one moe_experts_q over its own random stacks (the whole op: int8 rows, gate_up, SiLU * up, int8
rows, down, weighted sum); --layers above one chains layers so that their weights outgrow the caches (24 layers
of the default shape, int4: about 35 MB read per token). Prints microseconds per layer and call, median and min
over alternating runs of the two paths (the machine may be shared: compare medians of the same sitting).
"""

import argparse
import os
import sys


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1, help="rows of x: 1 is a decode step, more a prefill")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed runs of each path")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)  # TVM's pool sizes itself when first used

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from kiln.backends.tvm import moe_lower  # noqa: E402
from kiln.backends.tvm.build import TVMFunction  # noqa: E402
from kiln.backends.tvm.lower import cpu_target  # noqa: E402
from kiln.ir.graph import Module  # noqa: E402
from kiln.ir.quant_ops import pack_int4  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402

# (bits, group, offsets, scale dtype) of gate_up and down: kiln's int4 (groups of 32, f16 scale and offset), GGUF
# Q4_0 and Q8_0 blocks, kiln's int8 per row, a GGUF Q4_K_M layer (Q4_K gate_up, Q6_K down: int8 groups of 16)
INT4, Q4_0, Q8_0 = (4, 32, True, np.float16), (4, 32, False, np.float16), (8, 32, False, np.float16)
INT8_ROW, Q4_K, Q6_K = (8, 0, False, np.float32), (4, 32, True, np.float32), (8, 16, False, np.float32)
FORMATS = {"int4 g32+offset": (INT4, INT4), "Q4_0": (Q4_0, Q4_0), "Q8_0": (Q8_0, Q8_0),
           "int8 per row": (INT8_ROW, INT8_ROW), "Q4_K_M": (Q4_K, Q6_K)}


def _stack(rng, fmt, experts, n, k):
    bits, group, offsets, dtype = fmt
    groups = (experts, n) if group == 0 else (experts, n, k // group)
    scale = rng.uniform(0.002, 0.02, groups).astype(dtype)
    if bits == 8:
        return [rng.integers(-127, 128, (experts, n, k)).astype(np.int8), scale]
    q = np.stack([pack_int4(rng.integers(0, 16, (n, k)).astype(np.uint8)) for _ in range(experts)])
    return [q, scale] + ([rng.uniform(-0.1, 0, groups).astype(dtype)] if offsets else [])


def moe_module(formats, args) -> Module:
    """x [tokens, H] through ``args.layers`` moe_experts_q, layer l routed by weights[l] / ids[l]."""
    rng = np.random.default_rng(0)
    module = Module()
    fn = module.add_function("f")
    k = args.top_k
    tokens = args.tokens
    x = fn.add_param("x", TensorType("f32", (tokens, args.hidden)))
    weights = fn.add_param("weights", TensorType("f32", (args.layers, tokens, k)))
    ids = fn.add_param("ids", TensorType("i64", (args.layers, tokens, k)))
    for layer in range(args.layers):
        names = []
        attrs = dict(activation="silu", activations="int8")
        for stack, fmt, n, width in (("gate_up", formats[0], 2 * args.inter, args.hidden),
                                     ("down", formats[1], args.hidden, args.inter)):
            for i, array in enumerate(_stack(rng, fmt, args.experts, n, width)):
                names.append(f"layers.{layer}.{stack}.{i}")
                module.add_weight(names[-1], array)
            attrs.update({f"{stack}_bits": fmt[0], f"{stack}_group_size": fmt[1], f"{stack}_offset": fmt[2]})
        routed = [fn.emit("reshape", fn.emit("slice", v, axis=0, start=layer, end=layer + 1), shape=[tokens, k])
                  for v in (weights, ids)]
        x = fn.emit("moe_experts_q", x, *routed, *[fn.emit("weight", name=n) for n in names], **attrs)
    fn.set_results([x])
    return module


def compiled(formats, args, vnni: bool):
    """The module built for this CPU; without ``vnni`` the lowering is told no op takes the expert kernel."""
    takes_vnni = moe_lower._takes_vnni
    if not vnni:
        moe_lower._takes_vnni = lambda node, target: False
    try:
        function = TVMFunction.from_module(moe_module(formats, args), "f", num_threads=args.threads)
    finally:
        moe_lower._takes_vnni = takes_vnni
    rng = np.random.default_rng(1)
    inputs = [rng.normal(0, 1, (args.tokens, args.hidden)).astype(np.float32),
              np.full((args.layers, args.tokens, args.top_k), 1 / args.top_k, np.float32),
              np.stack([rng.permutation(args.experts)[:args.top_k] for _ in range(args.layers * args.tokens)]
                       ).reshape(args.layers, args.tokens, args.top_k)]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    timer = function._vm.time_evaluator("f", tvm.cpu(), number=20, repeat=5)
    return lambda: np.array(timer(*tensors, *function._weights).results) * 1e6 / args.layers


def main(args):
    if not moe_lower.int8_kernels.has_vnni(cpu_target()):
        sys.exit("this CPU has no AVX512-VNNI: nothing to compare")
    print(f"E={args.experts} H={args.hidden} I={args.inter} top-{args.top_k}, {args.tokens} token(s), "
          f"{args.layers} layer(s), {args.threads} threads: us per layer and call, median [min]")
    for name, formats in FORMATS.items():
        paths = {"float": compiled(formats, args, vnni=False), "vnni": compiled(formats, args, vnni=True)}
        times = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path, run in paths.items():
                times[path].extend(run())
        summary = {path: (float(np.median(t)), float(np.min(t))) for path, t in times.items()}
        print(f"{name:16s} float {summary['float'][0]:7.1f} [{summary['float'][1]:6.1f}]   "
              f"vnni {summary['vnni'][0]:7.1f} [{summary['vnni'][1]:6.1f}]   "
              f"x{summary['float'][0] / summary['vnni'][0]:.2f}")


if __name__ == "__main__":
    main(ARGS)
