"""Speed, memory and quality of kiln beside its peers on SmolLM2, in one sitting.

Every engine gets the same prompt ids (about 130 tokens), generates 128 new tokens
greedily with the same thread count, and runs in a process of its own, so its peak
resident memory (VmHWM) is its own. Each engine then scores the same token ids of a
text (the first 2,048 of the GPL-3; sliding windows of 512 tokens every 256, each
token after the first scored once) in another process of its own: speed is printed
beside quality. Peers run when installed: ONNX Runtime GenAI (its own int4 and int8
models, built by its model builder from a transformers checkpoint of the GGUF and
cached in ~/.cache/kiln/bench), llama.cpp (llama-cpp-python on the same Q4_1 GGUF)
and transformers eager (LlamaForCausalLM with the same weights in fp32). Prints
every kiln row's ratio to each peer.

    python benchmarks/bench_generate.py [--threads 2] [--new-tokens 128] [--repeats 2]
        [--backend tvm onnxruntime] [--quantize none int8 int4 gguf]   (one kiln row per pair; --backend with
                                                                       nothing after it: no kiln rows)
        [--activations float int8]                                     (kiln rows per activation mode)
        [--peers ort-genai-int4 ort-genai-int8 llama.cpp transformers] [--skip PEER ...]
        [--no-ppl] [--ppl-tokens 2048] [--window 512] [--stride 256] [--text FILE] [--json OUT]
        [--prompt-tokens N --max-seq-len M]                            (prefill of the text's first N ids)
        [--prepare-only]                                               (compile and build, measure nothing)

kiln's artifacts are cached per hash of kiln's Python sources, so a changed kiln is recompiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402 - benchmarks/peers.py, beside this file

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "a screw press, movable metal type and oil-based ink into a practical system for producing books. "
    "Before his invention, books were copied by hand, which made them rare and expensive. Within a few "
    "decades, printing shops had spread to more than two hundred cities across Europe, and millions of "
    "books were in circulation. The consequences were enormous: literacy grew, scientific ideas travelled "
    "faster, and religious and political debates reached a far wider audience than ever before. Explain "
    "in a few paragraphs why this invention mattered so much, and what it changed for ordinary people."
)
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
PEERS = ["ort-genai-int4", "ort-genai-int8", "llama.cpp", "transformers"]
EXTRA_PEERS = ["ort-genai-fp32"]  # only when asked for: checks the GenAI path against transformers
PEER_NAMES = {"ort-genai-int4": "ORT GenAI int4", "ort-genai-int8": "ORT GenAI int8", "ort-genai-fp32": "ORT GenAI fp32",
              "llama.cpp": "llama.cpp Q4_1", "transformers": "transformers eager fp32"}
KILN_BACKEND_NAMES = {"tvm": "TVM", "onnxruntime": "ORT"}


def kiln_artifact(args, backend, quantize, activations="float"):
    """The compiled artifact of one kiln row (compiled here, in the parent, once; cached per kiln source)."""
    import kiln

    suffix = ("-a8" if activations == "int8" else "") + ("-kv16" if args.kv_cache_dtype == "f16" else "")
    path = os.path.join(peers.CACHE, f"kiln-{kiln.__version__}-{args.code_tag}",
                        f"smollm2-{backend}-{args.max_seq_len}-{quantize}{suffix}.kiln")
    if args.recompile or not os.path.exists(os.path.join(path, "manifest.json")):
        options = {"activations": activations, "accuracy_gate": "warn",  # quality is measured here too
                   "kv_cache_dtype": args.kv_cache_dtype}
        kiln.compile("smollm2", backend=backend, quantize=quantize, max_seq_len=args.max_seq_len,
                     max_num_seqs=1, output=path, progress=True, **options)
    return path


def peer_spec(args, peer, gguf_path):
    """What a worker needs to load ``peer``, or None (with a line saying why) when it is not installed."""
    if peer.startswith("ort-genai-"):
        if peers.ort_genai_version() is None:
            print(f"{PEER_NAMES[peer]}: onnxruntime-genai is not installed (pip install onnxruntime-genai onnx-ir)")
            return None
        return {"engine": "ort-genai", "model_dir": peers.build_ort_genai(gguf_path, peer.rsplit("-", 1)[1])}
    if peer == "llama.cpp":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
            return None
        return {"engine": "llama.cpp", "gguf": gguf_path, "n_ctx": args.max_seq_len}
    if peer == "transformers":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            print("transformers: not installed")
            return None
        return {"engine": "transformers", "gguf": gguf_path}
    raise ValueError(peer)


def text_ids(bundle, path, limit):
    """The text's token ids as kiln encodes them (BOS first when the tokenizer adds one), the first ``limit``."""
    with open(path, encoding="utf-8") as f:
        ids = bundle.tokenizer().encode(f.read()).ids
    if bundle.add_bos_token and bundle.bos_token_id is not None and (not ids or ids[0] != bundle.bos_token_id):
        ids = [bundle.bos_token_id] + ids
    return ids[:limit]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per engine; the fastest decode is kept")
    parser.add_argument("--backend", nargs="*", default=["tvm", "onnxruntime"], choices=["tvm", "onnxruntime"],
                        help="kiln backends to measure (none: no kiln rows)")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "int4", "gguf"],
                        choices=["none", "int8", "int4", "int4-g128", "gguf"],
                        help="kiln weight quantization modes to measure (one row per backend and mode)")
    parser.add_argument("--activations", nargs="+", default=["float", "int8"], choices=["float", "int8"],
                        help="activations of kiln's quantized rows, one row per mode (int8: per block of 32, integer "
                             "dot products; ONNX Runtime's accuracy_level 4)")
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS + EXTRA_PEERS,
                        help="peers to measure (when installed); nothing after it: no peers")
    parser.add_argument("--skip", nargs="*", default=[], choices=PEERS + EXTRA_PEERS + ["ort-genai"],
                        help="peers to leave out")
    parser.add_argument("--max-seq-len", type=int, default=512, help="kiln's compiled maximum; llama.cpp's n_ctx")
    parser.add_argument("--kv-cache-dtype", default="f32", choices=["f32", "f16"],
                        help="kiln's KV-cache dtype (llama.cpp keeps an f16 cache by default)")
    parser.add_argument("--no-ppl", action="store_true", help="speed and memory only")
    parser.add_argument("--prompt-tokens", type=int, help="prompt with the text's first N token ids instead of the "
                                                               "126-token chat prompt (prefill at length N)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help=f"text scored for perplexity (default {DEFAULT_TEXT})")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="score the text's first N token ids")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--recompile", action="store_true", help="compile kiln's artifacts afresh")
    parser.add_argument("--prepare-only", action="store_true",
                        help="compile kiln's artifacts and build the peers' models, measure nothing")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args()
    if args.window > args.max_seq_len:
        parser.error(f"--window {args.window} needs --max-seq-len of at least {args.window}")

    from kiln.evaluate import sliding_windows
    from kiln.frontend.gguf_file import GGUFFile
    from kiln.frontend.sources import default_model_path
    from kiln.frontend.tokenizer import tokenizer_from_gguf

    started = time.perf_counter()
    args.code_tag = peers.kiln_code_tag()
    gguf_path = default_model_path()
    bundle = tokenizer_from_gguf(GGUFFile(gguf_path))
    prompt_ids = bundle.tokenizer().encode(PROMPT).ids
    if args.prompt_tokens:  # a long prompt: the text's first N token ids, the same for every engine
        prompt_ids = text_ids(bundle, args.text, args.prompt_tokens)
        if len(prompt_ids) + args.new_tokens > args.max_seq_len:
            parser.error(f"--prompt-tokens {len(prompt_ids)} + --new-tokens {args.new_tokens} needs --max-seq-len "
                         f"of at least {len(prompt_ids) + args.new_tokens}")
    ppl_ids = None if args.no_ppl else text_ids(bundle, args.text, args.ppl_tokens)

    # Prepare everything first (compiles, builds), so the measurements run back to back.
    engines = []  # (name, kind, spec)
    for backend in args.backend or []:
        for mode in args.quantize:
            modes = args.activations if mode != "none" else ["float"]
            for activations in modes:  # fp32 has no quantized linears: one row
                name = f"kiln {KILN_BACKEND_NAMES[backend]} {'fp32' if mode == 'none' else mode}"
                name += " a8" if activations == "int8" else ""
                try:
                    artifact = kiln_artifact(args, backend, mode, activations)
                except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
                    print(f"{name}: compile failed: {type(err).__name__}: {err}")
                    continue
                engines.append((name, "kiln", {"engine": "kiln", "artifact": artifact}))
    skip = set(args.skip) | ({p for p in PEER_NAMES if p.startswith("ort-genai")} if "ort-genai" in args.skip else set())
    for peer in args.peers:
        if peer in skip:
            continue
        try:
            spec = peer_spec(args, peer, gguf_path)
        except Exception as err:  # noqa: BLE001
            print(f"{PEER_NAMES[peer]}: could not be prepared: {type(err).__name__}: {err}")
            continue
        if spec is not None:
            engines.append((PEER_NAMES[peer], "peer", spec))
    prepared = time.perf_counter() - started
    if args.prepare_only:
        print(f"prepared {len(engines)} engines in {prepared:.0f} s")
        return

    windows = sliding_windows(len(ppl_ids), args.window, args.stride) if ppl_ids else []
    print(f"SmolLM2-135M-Instruct: prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads, best decode of {args.repeats}; {platform.machine()}, {os.cpu_count()} cores")
    if ppl_ids:
        print(f"perplexity: the first {len(ppl_ids)} token ids of {args.text}, {windows[-1].end - 1} scored once each "
              f"over {len(windows)} sliding windows of {args.window} every {args.stride} (the tokens before a token "
              f"in its window are its context), the same ids for every engine")
    print("each engine runs in a process of its own; peak RSS is that process's VmHWM")
    sys.stdout.flush()

    results = {name: {"kind": kind} for name, kind, _ in engines}
    common = {"threads": args.threads}
    for name, _, spec in engines:  # speed first, all engines back to back
        try:
            out = peers.run_in_subprocess({**spec, **common, "task": "speed", "prompt_ids": prompt_ids,
                                           "new_tokens": args.new_tokens, "repeats": args.repeats})
            results[name]["speed"] = out
            print(f"  {name}: prefill {out['prefill_tokens_per_s']:.1f} tok/s, decode "
                  f"{out['decode_tokens_per_s']:.1f} tok/s, peak RSS {out['peak_rss_mib']:.0f} MiB", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"  {name}: speed failed: {err}", flush=True)
    for name, _, spec in engines if ppl_ids else []:
        try:
            out = peers.run_in_subprocess({**spec, **common, "task": "ppl", "token_ids": ppl_ids,
                                           "window": args.window, "stride": args.stride, "n_ctx": args.window})
            results[name]["ppl"] = out
            print(f"  {name}: perplexity {out['perplexity']:.4f} ({out['scored_tokens']} tokens, "
                  f"{out['seconds']:.0f} s, peak RSS {out['peak_rss_mib']:.0f} MiB)", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"  {name}: perplexity failed: {err}", flush=True)

    def get(name, task, key):
        return results[name].get(task, {}).get(key)

    ref = next((n for n in results if get(n, "speed", "token_ids")), None)
    print()
    print("| engine | prefill tok/s | decode tok/s | peak RSS MiB | perplexity | peak RSS MiB, perplexity run "
          f"| greedy tokens equal to {ref}'s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in results:
        same = None
        if ref and get(name, "speed", "token_ids"):
            same = f"{common_prefix(get(name, 'speed', 'token_ids'), get(ref, 'speed', 'token_ids'))}"
        print(f"| {name} | {fmt(get(name, 'speed', 'prefill_tokens_per_s'), '.1f')} "
              f"| {fmt(get(name, 'speed', 'decode_tokens_per_s'), '.1f')} "
              f"| {fmt(get(name, 'speed', 'peak_rss_mib'), '.0f')} | {fmt(get(name, 'ppl', 'perplexity'), '.4f')} "
              f"| {fmt(get(name, 'ppl', 'peak_rss_mib'), '.0f')} | {same or '-'} |")
    kiln_rows = [n for n in results if results[n]["kind"] == "kiln" and "speed" in results[n]]
    peer_rows = [n for n in results if results[n]["kind"] == "peer" and "speed" in results[n]]
    for peer in peer_rows if kiln_rows else []:
        print(f"\nratios to {peer} (kiln / peer; prefill, decode, peak RSS):")
        for name in kiln_rows:
            ratios = [get(name, "speed", key) / get(peer, "speed", key)
                      for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mib")]
            print(f"  {name:<16} prefill {ratios[0]:5.2f}x  decode {ratios[1]:5.2f}x  memory {ratios[2]:5.2f}x")
    print(f"\nruntime: {time.perf_counter() - started:.0f} s (preparing {prepared:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"prompt_tokens": len(prompt_ids), "threads": args.threads, "new_tokens": args.new_tokens,
                       "ppl_tokens": len(ppl_ids or []), "window": args.window, "stride": args.stride,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
