"""Speculative decoding on SmolLM2 (TVM, CPU): decode tokens/s and acceptance rate without speculation, with
prompt lookup and with SmolLM2 int4 as the draft model, on a summarisation prompt and a free-generation prompt.

Greedy, so each run must give the tokens of the run without speculation (checked and printed). Run:
``python benchmarks/bench_speculative.py [--new-tokens 128] [--k 4]``; artifacts are compiled once into
~/.cache/kiln/bench/speculative.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import kiln

CACHE = os.path.join(os.path.expanduser("~/.cache/kiln/bench"), f"speculative-{kiln.__version__}")
SUMMARISATION = (
    "Article: The printing press, developed by Johannes Gutenberg around 1440, combined a screw press, movable "
    "metal type and oil-based ink into a practical system for producing books. Before his invention, books were "
    "copied by hand, which made them rare and expensive. Within a few decades, printing shops had spread to more "
    "than two hundred cities across Europe, and millions of books were in circulation. The consequences were "
    "enormous: literacy grew, scientific ideas travelled faster, and religious and political debates reached a "
    "far wider audience than ever before.\n\nSummarise the article above in a few sentences, using its own "
    "words.\nSummary: The printing press"
)
FREE = "Once upon a time, in a small village at the edge of a great forest, there lived"


def artifact(quantize: str, max_seq_len: int) -> str:
    path = os.path.join(CACHE, f"smollm2-tvm-{max_seq_len}-{quantize}.kiln")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        kiln.compile("smollm2", backend="tvm", quantize=quantize, max_seq_len=max_seq_len, max_num_seqs=2,
                     output=path, progress=True, accuracy_gate="warn")
    return path


def measure(engine, prompt: str, new_tokens: int, repeats: int) -> dict:
    """The best of ``repeats`` greedy runs (the machine is shared: the fastest is the least disturbed)."""
    best = None
    for _ in range(repeats):
        result = engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        stats = result.stats
        if best is None or stats["decode_tokens_per_s"] > best["tokens_per_s"]:
            drafted = stats["draft_tokens"]
            best = {"tokens": result.token_ids, "tokens_per_s": stats["decode_tokens_per_s"],
                    "decode_steps": stats["decode_steps"],
                    "acceptance": stats["accepted_draft_tokens"] / drafted if drafted else None}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    target = artifact("none", args.max_seq_len)
    draft = artifact("int4", args.max_seq_len)
    modes = {"none": {}, "ngram": {"speculate": "ngram", "num_speculative_tokens": args.k},
             "draft int4": {"draft": draft, "num_speculative_tokens": args.k}}
    rows = []
    for mode, options in modes.items():
        with kiln.load(target, **options) as engine:
            engine.generate("Hello", max_new_tokens=8)  # warm up
            for name, prompt in (("summarisation", SUMMARISATION), ("free generation", FREE)):
                start = time.perf_counter()
                row = measure(engine, prompt, args.new_tokens, args.repeats)
                rows.append({"prompt": name, "mode": mode, **row, "seconds": time.perf_counter() - start})
    baseline = {row["prompt"]: row for row in rows if row["mode"] == "none"}
    print(f"SmolLM2-135M fp32 on TVM (CPU), greedy, {args.new_tokens} new tokens, k={args.k}")
    print(f"{'prompt':<16} {'mode':<11} {'decode tok/s':>12} {'speed-up':>8} {'acceptance':>10} {'steps':>6} "
          f"{'same tokens':>11}")
    for row in rows:
        base = baseline[row["prompt"]]
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        print(f"{row['prompt']:<16} {row['mode']:<11} {row['tokens_per_s']:>12.1f} "
              f"{row['tokens_per_s'] / base['tokens_per_s']:>7.2f}x {acceptance:>10} {row['decode_steps']:>6} "
              f"{str(row['tokens'] == base['tokens']):>11}")
    print(json.dumps([{k: v for k, v in row.items() if k != "tokens"} for row in rows]))


if __name__ == "__main__":
    main()
