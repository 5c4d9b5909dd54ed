"""Serving speed of kiln's engine on SmolLM2: continuous batching and the prefix cache, in one run.

1. Throughput: 1, 4 and 16 distinct short prompts (20-60 tokens), greedy, ignore_eos, 64 new tokens each,
   submitted all at once (continuous batching) against the same requests one after another (submit, wait,
   submit the next). Reports total new tokens / wall time for both, their ratio, each request's decode
   tokens/s, the engine's steps, and checks that every request's greedy tokens are the same both ways.
   These runs use an engine without prefix caching, so they measure batching alone; each mode's best of
   --repeats alternating runs is reported (mismatches are counted over all of them).
2. Time to first token of a chat request whose ~500-token system prompt is already in the prefix cache
   (a first request with that system prompt warms it; a second asks a different question) against the first,
   uncached request. Each repeat uses a system prompt of its own (a different first line), so nothing of it
   is cached before; the medians are reported.
3. Peak KV-cache bytes in use per run (peak pages in use x page size x bytes per token) against the pool.

Prints a markdown table with PASS/FAIL beside the targets: 16 concurrent requests give at least 3x the
aggregate tokens/s of one at a time; a cached 500-token system prompt cuts time to first token at least 5x.
The artifact (by default with the GGUF's Q4_1 blocks, as `kiln run smollm2` compiles it) is built once,
in about a minute, into ~/.cache/kiln/bench/ and reused. --quick (16 new tokens, 2 repeats) takes about 30 s.

    python benchmarks/bench_serving.py [--threads 2] [--new-tokens 64] [--concurrency 1 4 16]
        [--quantize gguf] [--system-tokens 500] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Distinct short prompts (20-60 tokens each); more requests than prompts reuse them with a numbered prefix.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle that seems to have been "
    "written by his own grandfather, fifty years before the keeper was born.",
    "Explain to a ten-year-old why the sky is blue during the day and red or orange at sunset.",
    "List five practical tips for someone learning to cook at home for the first time, with one sentence on "
    "each tip and an example of a first dish to try.",
    "Describe the water cycle, from evaporation over the ocean to rain falling on a mountain and flowing back "
    "to the sea through rivers and lakes, in a way a curious teenager would enjoy reading.",
    "What are the main differences between a violin, a viola and a cello? Answer in a short paragraph.",
    "Compose a polite email to a neighbour asking them to keep their dog from barking late at night, "
    "without sounding angry. Mention that you work early shifts at the hospital and need to sleep by ten.",
    "Summarize the plot of a detective novel in which the butler is innocent and the gardener is the thief.",
    "Give me a simple recipe for vegetable soup that uses carrots, potatoes, onions and celery, takes less "
    "than an hour, and can be frozen in portions for the rest of the week.",
    "Why do cats purr? Give two or three possible explanations that scientists have proposed over the years.",
    "Write a haiku about autumn leaves falling into a quiet river, then explain the image in one sentence.",
    "Imagine a city on Mars in the year 2200. Describe a typical morning for a schoolteacher who lives there, "
    "from waking up in a pressurized apartment to the first lesson of the day, including what she eats for "
    "breakfast and how she travels to school.",
    "How does a bicycle stay upright when it is moving? Keep the explanation short, avoid equations, and use "
    "an everyday comparison that a beginner would understand.",
    "Suggest a name and a slogan for a small bakery that specializes in sourdough bread and cinnamon rolls.",
    "Tell me about the migration of monarch butterflies across North America, how many generations it takes "
    "to complete, and why scientists find it so remarkable.",
    "Draft three interview questions for a candidate applying to be a librarian at a public library in a "
    "small town with many retired readers and a growing number of young families.",
    "Explain the difference between weather and climate, with one everyday example of each and a sentence "
    "on why the two are often confused.",
]

# Rules of a customer-support assistant: joined until the system prompt reaches --system-tokens.
SYSTEM_RULES = [
    "Greet the customer briefly and answer the question they asked before offering anything else.",
    "Keep answers short: three to five sentences unless the customer asks for detail or a step-by-step guide.",
    "Never invent order numbers, tracking codes, prices or delivery dates; if you do not know, say so plainly.",
    "Our store sells kitchen equipment: knives, pans, pots, small appliances, storage containers and utensils.",
    "Standard shipping takes three to five working days; express shipping takes one to two working days.",
    "Orders over fifty euros ship free within the European Union; smaller orders pay a flat fee of five euros.",
    "Customers may return unused items within thirty days of delivery for a full refund of the item price.",
    "Used items may be returned only when they are faulty; ask for a photo of the fault and the order number.",
    "Knives are sharpened free of charge once a year for registered customers; they pay only for postage.",
    "Warranty on small appliances is two years from delivery and covers manufacturing faults, not wear.",
    "Nonstick pans are not covered by the warranty when the coating was damaged by metal utensils.",
    "When a customer is upset, acknowledge the problem first, apologize once, and then offer a concrete fix.",
    "Do not discuss competitors' products or prices, and do not recommend other stores.",
    "Payment is accepted by card, bank transfer and invoice for business customers with a verified account.",
    "Business customers get a ten percent discount on orders of more than twenty identical items.",
    "If a question is about food safety or allergies, give general advice and suggest checking the label.",
    "Gift wrapping costs three euros per item and can be added until the order is shipped.",
    "Discount codes cannot be combined, and they cannot be applied after an order has been placed.",
    "If a parcel is marked as delivered but the customer has not received it, open a carrier investigation.",
    "Carrier investigations take up to ten working days; offer a replacement once the carrier confirms a loss.",
    "Never ask for full card numbers, passwords or security codes, and warn customers who send them.",
    "Answer in the customer's language when it is English, German, French, Spanish or Italian.",
    "For any other language, answer in English and say that a colleague can help in their language by email.",
    "Opening hours of the phone line are nine to five, Monday to Friday, except public holidays.",
    "Escalate to a human agent when the customer asks for one, or after two failed attempts to solve a problem.",
    "Close every answer by asking whether there is anything else you can help with today.",
]

QUESTIONS = [
    "Can I return a pan I bought three weeks ago if I have not used it?",
    "How long does express shipping take to Germany?",
    "My blender stopped working after a year. Is it still under warranty?",
    "Do you offer a discount when a restaurant orders thirty knives?",
    "Can I add gift wrapping to an order I placed this morning?",
    "My parcel says delivered but it is not here. What should I do?",
    "Do I pay for shipping on an order of forty euros?",
    "Can you sharpen a knife I bought from you last year?",
]


def artifact_path(args) -> str:
    """The compiled artifact, built on first use in the cache directory that bench_generate uses too."""
    import kiln

    cache = os.path.join(os.path.expanduser("~/.cache/kiln"), "bench", f"kiln-{kiln.__version__}-serving-v1",
                         f"smollm2-{args.backend}-{args.max_seq_len}x{args.max_num_seqs}-{args.quantize}.kiln")
    if not os.path.exists(os.path.join(cache, "manifest.json")):
        kiln.compile("smollm2", backend=args.backend, quantize=args.quantize, max_seq_len=args.max_seq_len,
                     max_num_seqs=args.max_num_seqs, output=cache, progress=True)
    return cache


def prompt_ids(engine, count: int) -> list:
    ids = []
    for index in range(count):
        text = PROMPTS[index % len(PROMPTS)]
        if index >= len(PROMPTS):
            text = f"Request {index}: {text}"
        ids.append(engine.tokenizer.encode(text))
    return ids


def chat_ids(engine, system: str, question: str | None = None) -> list:
    """Token ids of a chat: the system prompt, then the user's question and the assistant's turn (without a
    question: the system message alone)."""
    messages = [{"role": "system", "content": system}]
    if question is not None:
        messages.append({"role": "user", "content": question})
    text = engine.render_chat(messages, add_generation_prompt=question is not None)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def system_prompt(engine, variant: int, target_tokens: int) -> str:
    """A system prompt of about ``target_tokens`` tokens (rendered with the chat template) whose first line
    names ``variant``, so prompts of different variants share no page of the prefix cache."""
    lines = [f"You are support assistant number {variant} of Kitchenware Direct, an online kitchen store. "
             f"Follow these rules in every answer."]
    rules = iter(SYSTEM_RULES * (1 + target_tokens // 300))
    while len(chat_ids(engine, "\n".join(lines))) < target_tokens:
        lines.append(f"Rule {len(lines)}: {next(rules)}")
    return "\n".join(lines)


def reset_peak(engine) -> None:
    """step_stats keeps the peak since load: start it again so each run reports its own."""
    engine.step_stats["peak_pages_in_use"] = engine.pool.num_in_use()


def run_requests(engine, prompts: list, new_tokens: int, concurrent: bool) -> dict:
    """Generate every prompt (all submitted at once, or each after the previous finished) and measure."""
    options = dict(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reset_peak(engine)
    steps, tokens = engine.step_stats["steps"], engine.step_stats["tokens"]
    start = time.perf_counter()
    if concurrent:
        requests = [engine.submit(ids, **options) for ids in prompts]
        results = [request.result() for request in requests]
    else:
        results = [engine.submit(ids, **options).result() for ids in prompts]
    wall = time.perf_counter() - start
    steps = engine.step_stats["steps"] - steps
    spec = engine.spec
    return {
        "wall": wall,
        "new_tokens": sum(len(r.token_ids) for r in results),
        "decode_per_request": statistics.mean(r.stats["decode_tokens_per_s"] for r in results),
        "steps": steps,
        "step_tokens": engine.step_stats["tokens"] - tokens,
        "peak_kv_bytes": engine.step_stats["peak_pages_in_use"] * spec.page_size * spec.bytes_per_token,
        "token_ids": [r.token_ids for r in results],
    }


def bench_throughput(args, path: str) -> tuple:
    import kiln

    engine = kiln.load(path, max_running=max(args.concurrency), token_budget=max(512, max(args.concurrency)),
                       prefix_caching=False, num_threads=args.threads)
    try:
        prompts = prompt_ids(engine, max(args.concurrency))
        run_requests(engine, prompts, 2, concurrent=True)  # warm up both step functions
        run_requests(engine, prompts[:1], 2, concurrent=True)
        rows = []
        for count in args.concurrency:
            best = {False: None, True: None}
            mismatches = 0
            for _ in range(args.repeats):  # alternating, so a burst of load on a shared machine hits both
                runs = {concurrent: run_requests(engine, prompts[:count], args.new_tokens, concurrent)
                        for concurrent in (False, True)}
                mismatches += sum(a != b for a, b in zip(runs[False]["token_ids"], runs[True]["token_ids"]))
                for concurrent, run in runs.items():
                    if best[concurrent] is None or run["wall"] < best[concurrent]["wall"]:
                        best[concurrent] = run
            rows.append((count, best[False], best[True], mismatches))
        return rows, [len(ids) for ids in prompts], engine.spec
    finally:
        engine.close()


def bench_ttft(args, path: str) -> dict | None:
    """None where the backend cannot share KV pages (no prefix cache to measure)."""
    import kiln

    engine = kiln.load(path, prefix_caching=True, num_threads=args.threads)
    try:
        if not engine.prefix_caching:
            return None
        # warm up at full length, with a system prompt (variant number) of its own
        engine.generate(chat_ids(engine, system_prompt(engine, args.repeats, args.system_tokens), QUESTIONS[0]),
                        max_new_tokens=1)
        reset_peak(engine)
        uncached, cached = [], []
        for repeat in range(args.repeats):
            system = system_prompt(engine, repeat, args.system_tokens)
            first = engine.generate(chat_ids(engine, system, QUESTIONS[(2 * repeat) % len(QUESTIONS)]),
                                    max_new_tokens=1)
            second = engine.generate(chat_ids(engine, system, QUESTIONS[(2 * repeat + 1) % len(QUESTIONS)]),
                                     max_new_tokens=1)
            uncached.append(first.stats)
            cached.append(second.stats)
        spec = engine.spec
        return {
            "system_tokens": len(chat_ids(engine, system)),
            "uncached": uncached, "cached": cached,
            "peak_kv_bytes": engine.step_stats["peak_pages_in_use"] * spec.page_size * spec.bytes_per_token,
        }
    finally:
        engine.close()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, rows, prompt_lengths, spec, ttft) -> None:
    pool = spec.total_bytes

    def kv(nbytes: int) -> str:
        return f"{nbytes / 2**20:,.1f} MiB ({100 * nbytes / pool:.1f}%)"

    print(f"SmolLM2-135M-Instruct, kiln {args.backend} {args.quantize}, {args.threads} threads, greedy, "
          f"{args.new_tokens} new tokens per request (ignore_eos), prompts of {min(prompt_lengths)}-"
          f"{max(prompt_lengths)} tokens; KV pool {pool / 2**20:,.1f} MiB ({spec.num_pages} pages of "
          f"{spec.page_size} tokens, {spec.bytes_per_token:,} bytes per token)")
    print()
    print(f"Throughput, best of {args.repeats} (ms/step: wall time / engine steps; peak KV: of the pool; "
          f"mismatches: requests whose greedy tokens differ from one at a time, over every run)")
    print()
    print("| requests | mode | wall s | aggregate tok/s | vs one at a time | decode tok/s per request | steps "
          "| tokens/step | ms/step | peak KV | mismatches |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, sequential, concurrent, mismatches in rows:
        base = sequential["new_tokens"] / sequential["wall"]
        for mode, run in (("one at a time", sequential), ("concurrent", concurrent)):
            rate = run["new_tokens"] / run["wall"]
            steps = max(run["steps"], 1)
            print(f"| {count} | {mode} | {run['wall']:.2f} | {rate:.1f} | {rate / base:.2f}x | "
                  f"{run['decode_per_request']:.1f} | {run['steps']} | {run['step_tokens'] / steps:.1f} | "
                  f"{1000 * run['wall'] / steps:.1f} | {kv(run['peak_kv_bytes'])} | "
                  f"{mismatches if mode == 'concurrent' else ''} |")
    print()
    if ttft is None:
        print(f"Time to first token: not measured, the {args.backend} backend has no prefix caching")
    else:
        median = {kind: statistics.median(s["time_to_first_token"] for s in ttft[kind])
                  for kind in ("uncached", "cached")}
        print(f"Time to first token of a chat request with a {ttft['system_tokens']}-token system prompt, median "
              f"of {args.repeats}; peak KV {kv(ttft['peak_kv_bytes'])}")
        print()
        print("| system prompt | prompt tokens | cached prompt tokens | time to first token ms |")
        print("|---|---:|---:|---:|")
        for kind in ("uncached", "cached"):
            stats = ttft[kind]
            print(f"| {kind} | {statistics.median(s['prompt_tokens'] for s in stats):.0f} | "
                  f"{statistics.median(s['cached_prompt_tokens'] for s in stats):.0f} | {1000 * median[kind]:.1f} |")
    print()
    count, sequential, concurrent, _ = max(rows, key=lambda row: row[0])
    speedup = (concurrent["new_tokens"] / concurrent["wall"]) / (sequential["new_tokens"] / sequential["wall"])
    mismatches = sum(row[3] for row in rows)
    print("| target | measured | result |")
    print("|---|---:|---|")
    print(f"| {count} concurrent requests: >= 3x the aggregate tok/s of one at a time | {speedup:.2f}x | "
          f"{verdict(speedup >= 3)} |")
    if ttft is not None:
        ratio = median["uncached"] / median["cached"]
        print(f"| cached {ttft['system_tokens']}-token system prompt: time to first token cut >= 5x | "
              f"{ratio:.2f}x | {verdict(ratio >= 5)} |")
    print(f"| greedy tokens concurrent == one at a time | {mismatches} mismatches | {verdict(mismatches == 0)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (--quick: 16)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests per run")
    parser.add_argument("--system-tokens", type=int, default=500, help="system prompt length, chat template included")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each throughput mode (the best is kept) and time-to-first-token pairs "
                             "(the median is kept); --quick: 2")
    parser.add_argument("--backend", default="tvm", choices=["tvm", "onnxruntime", "reference"])
    parser.add_argument("--quantize", default="gguf", choices=["none", "int8", "int4", "int4-g128", "gguf"])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="full-length sequences the KV pool holds")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 new tokens, 2 repeats")
    args = parser.parse_args()
    for name in ("threads", "new_tokens", "repeats", "system_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.concurrency) < 1:
        parser.error("--concurrency takes request counts of at least 1")
    if args.quick:
        args.new_tokens = min(args.new_tokens, 16)
        args.repeats = min(args.repeats, 2)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    path = artifact_path(args)
    rows, prompt_lengths, spec = bench_throughput(args, path)
    ttft = bench_ttft(args, path)
    report(args, rows, prompt_lengths, spec, ttft)


if __name__ == "__main__":
    main()
