"""Prefill and decode speed of kiln beside its peers on SmolLM2, in one run.

Same prompt (about 130 tokens), 128 new tokens, greedy, the same thread count.
Peers run when installed: llama.cpp (llama-cpp-python, on the same Q4_1 GGUF)
and transformers eager (LlamaForCausalLM with the same weights in fp32).
Prints tokens/s and every kiln row's ratio to each peer.

    python benchmarks/bench_generate.py [--threads 2] [--new-tokens 128]
        [--backend tvm onnxruntime] [--quantize none int8 int4 gguf]   (one kiln row per pair)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "a screw press, movable metal type and oil-based ink into a practical system for producing books. "
    "Before his invention, books were copied by hand, which made them rare and expensive. Within a few "
    "decades, printing shops had spread to more than two hundred cities across Europe, and millions of "
    "books were in circulation. The consequences were enormous: literacy grew, scientific ideas travelled "
    "faster, and religious and political debates reached a far wider audience than ever before. Explain "
    "in a few paragraphs why this invention mattered so much, and what it changed for ordinary people."
)


def bench_kiln(args, prompt_ids, backend, quantize):
    import kiln

    cache = os.path.join(os.path.expanduser("~/.cache/kiln"), "bench", f"kiln-{kiln.__version__}-v2",
                         f"smollm2-{backend}-{args.max_seq_len}-{quantize}.kiln")
    if not os.path.exists(os.path.join(cache, "manifest.json")):
        kiln.compile("smollm2", backend=backend, quantize=quantize, max_seq_len=args.max_seq_len,
                     max_num_seqs=1, output=cache, progress=True)
    engine = kiln.load(cache, num_threads=args.threads, prefix_caching=False)  # each run prefills its prompt
    engine.generate(prompt_ids[:16], max_new_tokens=4, ignore_eos=True)  # warm up
    best = None
    for _ in range(args.repeats):
        res = engine.generate(prompt_ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        stats = res.stats
        if best is None or stats["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            best = stats
    return best["prefill_tokens_per_s"], best["decode_tokens_per_s"], res.token_ids


def bench_llama_cpp(args, prompt_ids, gguf_path):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.max_seq_len, n_batch=512, verbose=False)
    best = (0.0, 0.0)
    for _ in range(args.repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        prefill = time.perf_counter() - start
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode = time.perf_counter() - start
        best = max(best, (len(prompt_ids) / prefill, (args.new_tokens - 1) / decode), key=lambda t: t[1])
    return best


def bench_transformers(args, prompt_ids, source):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    cfg = source.config
    config = transformers.LlamaConfig(**{k: cfg[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
        "head_dim")})
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(source.model.state_dict(), strict=False)
    ids = torch.as_tensor([prompt_ids])
    best = (0.0, 0.0)
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - start
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            start = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            decode = time.perf_counter() - start
            best = max(best, (len(prompt_ids) / prefill, (args.new_tokens - 1) / decode), key=lambda t: t[1])
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", nargs="+", default=["tvm", "onnxruntime"], help="kiln backends to measure")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--skip", nargs="*", default=[], help="peers to skip: llama.cpp transformers")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "int4", "gguf"],
                        choices=["none", "int8", "int4", "int4-g128", "gguf"],
                        help="kiln weight quantization modes to measure (one row per backend and mode)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from kiln.frontend.sources import default_model_path, load_source

    source = load_source("smollm2")
    tokenizer = source.tokenizer.tokenizer()
    prompt_ids = tokenizer.encode(PROMPT).ids
    print(f"SmolLM2-135M-Instruct, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, greedy")
    rows = []
    for backend in args.backend:
        for mode in args.quantize:
            name = f"kiln {backend} {'fp32' if mode == 'none' else mode}"
            try:
                rows.append((name,) + bench_kiln(args, prompt_ids, backend, mode)[:2])
            except Exception as err:  # one failing row must not hide the others
                print(f"{name}: failed: {type(err).__name__}: {err}")
            sys.stdout.flush()
    peers = []
    if "llama.cpp" not in args.skip:
        try:
            peers.append(("llama.cpp (Q4_1)",) + bench_llama_cpp(args, prompt_ids, default_model_path()))
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
    if "transformers" not in args.skip:
        try:
            peers.append(("transformers eager (fp32)",) + bench_transformers(args, prompt_ids, source))
        except ImportError:
            print("transformers: not installed")
    print(f"{'engine':<28} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, prefill, decode in rows + peers:
        print(f"{name:<28} {prefill:>14.1f} {decode:>13.1f}")
    for peer, peer_prefill, peer_decode in peers:
        print(f"ratios to {peer} (prefill, decode):")
        for name, prefill, decode in rows:
            print(f"  {name:<26} {prefill / peer_prefill:5.2f}x {decode / peer_decode:5.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
