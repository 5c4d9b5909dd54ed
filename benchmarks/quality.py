"""What quantization costs SmolLM2 in quality, measured: the README's quality table.

Each kiln mode (fp32 = the GGUF dequantized, the GGUF's Q4_1 blocks as they are,
int8, int4 in groups of 32 and of 128) scores the same text over the same sliding
windows (kiln.evaluate: every token after the first scored once, up to window - 1
tokens of context). Every quantized mode also runs with int8 activations
(``activations="int8"``: each linear_q's input rows quantized per block of 32, as
llama.cpp does; rows labelled "a8"), each checked against the target of staying
within 1% of fp32's perplexity. Per mode: perplexity, top-1 agreement with fp32 (the fraction
of scored positions whose argmax equals fp32's) and mean KL(fp32 || mode). When
llama-cpp-python is installed, llama.cpp scores the same token ids per window on
the same GGUF; when onnxruntime-genai is installed, so do ONNX Runtime GenAI's own
int4 and int8 models (benchmarks/peers.py builds them from the GGUF, cached).
Models run in lockstep, one window of logits each at a time.

    python benchmarks/quality.py [--text /usr/share/common-licenses/GPL-3] [--window 512] [--stride 256]
        [--max-tokens N] [--modes none gguf int8 int4 int4-g128] [--threads 2] [--recompile]
        [--activations float int8] [--ort-genai int4 int8] [--no-llama-cpp]

Artifacts are cached per mode, activation mode and hash of kiln's Python sources (a changed kiln is recompiled).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402 - benchmarks/peers.py, beside this file

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"  # Debian's base-files: on every machine here
MODE_LABELS = {"none": "kiln fp32 (GGUF dequantized)", "gguf": "kiln gguf (Q4_1 imported)", "int8": "kiln int8",
               "int4": "kiln int4 (g32)", "int4-g128": "kiln int4-g128"}
TARGETS = {"gguf": 0.005, "int8": 0.01}  # perplexity within this fraction of fp32's
A8_TARGET = 0.01  # every int8-activation row: perplexity within 1% of fp32's (issue 11)
LLAMA_CPP = "llama.cpp Q4_1"


def label(mode, activations="float"):
    """The table's name of a kiln row: the mode's label, then "a8" with int8 activations."""
    return MODE_LABELS[mode] + (" a8" if activations == "int8" else "")


def kiln_engine(args, mode, activations="float"):
    import kiln

    suffix = "-a8" if activations == "int8" else ""
    path = os.path.join(args.cache, f"kiln-{kiln.__version__}-{args.code_tag}",
                        f"smollm2-{args.backend}-{args.window}-{mode}{suffix}.kiln")
    if args.recompile or not os.path.exists(os.path.join(path, "manifest.json")):
        print(f"compiling SmolLM2 with quantize={mode} activations={activations}", file=sys.stderr)
        kiln.compile("smollm2", backend=args.backend, quantize=mode, max_seq_len=args.window, max_num_seqs=1,
                     output=path, progress=True, activations=activations,
                     accuracy_gate="warn")  # this benchmark measures quality itself, int4-g128's +44% included
    return kiln.load(path, num_threads=args.threads)


def llama_cpp_logits(args, gguf_path):
    """A logits function over llama.cpp, or None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp row", file=sys.stderr)
        return None
    import numpy as np

    llm = Llama(model_path=gguf_path, logits_all=True, n_ctx=args.window, n_batch=args.window,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def logits(ids):
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    return logits


def ort_genai_logits(args, gguf_path, precision):
    """A logits function over ONNX Runtime GenAI's own model at ``precision``, or None when it is not installed."""
    if peers.ort_genai_version() is None:
        print("onnxruntime-genai is not installed: no ONNX Runtime GenAI rows", file=sys.stderr)
        return None
    engine = peers.OrtGenAIEngine({"model_dir": peers.build_ort_genai(gguf_path, precision), "threads": args.threads})
    return engine.logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=DEFAULT_TEXT, help=f"UTF-8 text to score (default {DEFAULT_TEXT})")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--modes", nargs="+", default=list(MODE_LABELS), choices=list(MODE_LABELS),
                        help="kiln quantize modes; 'none' (fp32) is the reference and always runs")
    parser.add_argument("--backend", default="tvm")
    parser.add_argument("--activations", nargs="+", default=["float", "int8"], choices=["float", "int8"],
                        help="activation modes of the quantized kiln modes (int8: rows labelled a8); "
                             "fp32 always runs with float activations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--ort-genai", nargs="*", default=["int4", "int8"], choices=["int4", "int8", "fp32"],
                        help="ONNX Runtime GenAI models to score when it is installed (nothing after it: none)")
    parser.add_argument("--recompile", action="store_true", help="compile every mode afresh, ignoring the cache")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~/.cache/kiln"), "quality"))
    args = parser.parse_args(argv)

    from kiln.evaluate import encode_text, score_windows, sliding_windows
    from kiln.frontend.sources import default_model_path

    started = time.perf_counter()
    args.code_tag = peers.kiln_code_tag()
    modes = ["none"] + [m for m in args.modes if m != "none"]
    # fp32 has no linear_q, so int8 activations apply to the quantized modes only
    rows = [(mode, act) for mode in modes for act in (["float"] if mode == "none" else args.activations)]
    if ("none", "float") not in rows:
        rows.insert(0, ("none", "float"))
    engines, refused = {}, {}
    for mode, act in rows:
        try:
            engines[(mode, act)] = kiln_engine(args, mode, act)
        except Exception as err:  # noqa: BLE001 - a mode kiln refuses is reported in the table, not fatal
            if mode == "none":
                raise
            refused[(mode, act)] = f"{type(err).__name__}: {err}"
            print(f"kiln refused quantize={mode} activations={act}: {refused[(mode, act)]}", file=sys.stderr)
    compile_seconds = time.perf_counter() - started

    with open(args.text, encoding="utf-8") as f:
        ids = encode_text(engines[("none", "float")], f.read())
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    windows = sliding_windows(len(ids), args.window, args.stride)
    fns = {label(*row): engine.logits for row, engine in engines.items()}
    llama = None if args.no_llama_cpp else llama_cpp_logits(args, default_model_path())
    if llama is not None:
        fns[LLAMA_CPP] = llama
    for precision in args.ort_genai:
        fn = ort_genai_logits(args, default_model_path(), precision)
        if fn is None:
            break
        fns[f"ONNX Runtime GenAI {precision}"] = fn

    def progress(done, total, stats):
        ref = stats[MODE_LABELS["none"]]
        print(f"window {done}/{total}: {ref.tokens} tokens, fp32 perplexity so far {ref.perplexity:.4f}",
              file=sys.stderr)

    score_start = time.perf_counter()
    stats = score_windows(fns, ids, args.window, args.stride, reference=MODE_LABELS["none"], on_window=progress)
    score_seconds = time.perf_counter() - score_start

    fp32 = stats[MODE_LABELS["none"]]
    print(f"SmolLM2-135M-Instruct on {args.text}: {len(ids)} tokens, {fp32.tokens} scored, {len(windows)} windows "
          f"of {args.window} every {args.stride}; {args.threads} threads, {platform.machine()}, "
          f"{os.cpu_count()} cores; backend {args.backend}")
    print()
    print("| model | perplexity | vs fp32 | top-1 agreement with fp32 | mean KL(fp32 ‖ model) | seconds |")
    print("|---|---|---|---|---|---|")
    for name, s in stats.items():
        if name == MODE_LABELS["none"]:
            agree, kl, ratio = "1", "0", "—"
        else:
            kl = f"{s.mean_kl:.5f}" if s.mean_kl >= 1e-4 else f"{s.mean_kl:.1e}"
            agree, ratio = f"{s.top1_agreement:.4f}", f"{s.perplexity / fp32.perplexity - 1:+.2%}"
        print(f"| {name} | {s.perplexity:.4f} | {ratio} | {agree} | {kl} | {s.seconds:.0f} |")
    for row, why in refused.items():
        print(f"| {label(*row)} | refused: {why} | | | | |")
    print()
    for mode, bound in TARGETS.items():
        s = stats.get(MODE_LABELS[mode])
        if s is not None:
            gap = s.perplexity / fp32.perplexity - 1
            print(f"{mode}: perplexity {gap:+.3%} from fp32, target within {bound:.1%}: "
                  f"{'met' if abs(gap) <= bound else 'MISSED'}")
    for mode in modes:
        s = stats.get(label(mode, "int8"))
        if s is None:
            continue
        gap = s.perplexity / fp32.perplexity - 1
        floats = stats.get(label(mode))
        beside = f" ({s.perplexity / floats.perplexity - 1:+.3%} from its float activations)" if floats else ""
        print(f"{label(mode, 'int8')}: perplexity {gap:+.3%} from fp32{beside}; within {A8_TARGET:.0%} of fp32: "
              f"{'yes' if abs(gap) <= A8_TARGET else 'no'}")
    if LLAMA_CPP in stats:  # the peer that quantizes activations to 8 bits too (Q8_1 beside Q4_1 weights)
        print(f"{LLAMA_CPP} (8-bit activations too): perplexity {stats[LLAMA_CPP].perplexity / fp32.perplexity - 1:+.3%} "
              f"from fp32")
    print(f"runtime: {time.perf_counter() - started:.0f} s (loading/compiling {compile_seconds:.0f} s, "
          f"scoring {score_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
