"""Is half-precision compute slower than f32 on this CPU? Decode tok/s of f32, f16 and bf16 artifacts.

kiln offers ``dtype="f16" / "bf16"`` on a CPU backend only where it measured it not slower
(kiln.api.HALF_COMPUTE); this script measures the TVM CPU backend's half graph (pass narrow_compute_dtype)
against f32. Every model and dtype is compiled once; then one process per
model loads all its dtypes and alternates between them, ``--repeats`` rounds of one greedy generation of
``--new-tokens`` tokens each, so every dtype meets the same load on a shared machine. Prints each dtype's best
and median decode (and prefill) tok/s and their ratio to f32.

    python benchmarks/bench_half_cpu.py [--models tiny smollm2] [--dtypes f32 f16 bf16] [--threads 2]
        [--new-tokens 32] [--repeats 12] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_IDS = [1] + [(37 * i + 11) % 120 + 3 for i in range(31)]  # 32 ids inside the tiny vocabulary


def source_of(model: str):
    if model == "smollm2":
        return "smollm2"
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import build_tiny_model  # the tests' tiny Llama (seeded)

    return build_tiny_model("llama")


def compile_all(args, directory: str) -> dict:
    import kiln

    paths = {}
    for model in args.models:
        source = source_of(model)
        for dtype in args.dtypes:
            path = os.path.join(directory, f"{model}-{dtype}.kiln")
            kiln.compile(source, backend=args.backend, quantize="none", max_seq_len=256, max_num_seqs=1,
                         dtype=dtype, output=path, accuracy_gate="warn")
            paths[(model, dtype)] = path
            print(f"compiled {model} {dtype}: {path}", flush=True)
    return paths


def measure(paths: dict, threads: int, new_tokens: int, repeats: int) -> dict:
    """In this process: every artifact of ``paths`` (dtype -> path) loaded, then ``repeats`` rounds of one
    generation each, alternating; per dtype the prefill and decode tok/s of every round."""
    import kiln

    engines = {dtype: kiln.load(path, num_threads=threads, prefix_caching=False) for dtype, path in paths.items()}
    for engine in engines.values():
        engine.generate(PROMPT_IDS[:8], max_new_tokens=4, ignore_eos=True)  # warm-up
    rounds: dict = {dtype: {"prefill_tokens_per_s": [], "decode_tokens_per_s": []} for dtype in engines}
    for _ in range(repeats):
        for dtype, engine in engines.items():
            stats = engine.generate(PROMPT_IDS, max_new_tokens=new_tokens, ignore_eos=True).stats
            for key, values in rounds[dtype].items():
                values.append(stats[key])
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16"], choices=["f32", "f16", "bf16"])
    parser.add_argument("--backend", default="tvm", choices=["tvm"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON {dtype: path}: measure them, print JSON
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker), args.threads, args.new_tokens, args.repeats)))
        return
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-half-") as directory:
        paths = compile_all(args, directory)
        for model in args.models:
            worker = json.dumps({dtype: paths[model, dtype] for dtype in args.dtypes})
            out = subprocess.run([sys.executable, __file__, "--worker", worker, "--threads", str(args.threads),
                                  "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            results[model] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n| model | dtype | decode tok/s best / median ({args.threads} threads) | vs f32 best / median | "
          f"prefill tok/s best / median | vs f32 |")
    print("|---|---|---|---|---|---|")
    for model, rounds in results.items():
        summary = {dtype: {key: (max(values), statistics.median(values)) for key, values in keys.items()}
                   for dtype, keys in rounds.items()}
        base = summary.get("f32")
        for dtype, speed in summary.items():
            decode, prefill = speed["decode_tokens_per_s"], speed["prefill_tokens_per_s"]
            vs = (f"{decode[0] / base['decode_tokens_per_s'][0]:.2f}x / {decode[1] / base['decode_tokens_per_s'][1]:.2f}x"
                  if base else "-")
            vs_prefill = f"{prefill[0] / base['prefill_tokens_per_s'][0]:.2f}x" if base else "-"
            print(f"| {model} | {dtype} | {decode[0]:.1f} / {decode[1]:.1f} | {vs} | {prefill[0]:.0f} / "
                  f"{prefill[1]:.0f} | {vs_prefill} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
