"""Serving under load: `kiln serve` against llama.cpp's server (llama-cpp-python) on the same GGUF, over loopback.

Each server runs as a subprocess of its own on a free loopback port. For every level of --clients, that many
streaming clients (httpx, asyncio) send chat requests back to back for --duration seconds: a shared system prompt
and user messages of mixed lengths (about 10 to 500 tokens), each client starting at a different message. No
request starts after the duration; those running then finish and are counted, so the wall time of a level runs
from its start to its last answer. Both servers sample alike: greedy (temperature 0), the end-of-sequence
tokens banned through logit_bias (every answer runs to max_tokens, as ignore_eos would), and llama.cpp's repeat
penalty set to 1 (its server's default is 1.1; kiln applies none unless asked).

Per (server, clients) row: requests answered, errors (HTTP errors, error events in the stream, broken
connections, answers cut short), requests/s, output tokens/s (usage counts where the stream reports them, else
max_tokens for an answer that ended on its length, else its content chunks), time to first token and
inter-token latency (the gap between content chunks) at p50 and p99, how many answers were decoding at once on
average (seen from the clients: the time-weighted overlap of their first-to-last token spans), and the server
process's peak resident memory since it started (VmHWM, read after the level). Then kiln / llama.cpp ratios per
level, the issue's targets, and how often the two servers' greedy answers to the same prompt agree.

kiln serves an artifact compiled once (GGUF blocks as they are, activations auto, --max-seq-len and
--max-num-seqs for the KV pool) and cached per hash of kiln's sources beside bench_generate's. llama-cpp-python's
server runs one Llama behind a lock and has no parallel slots (its n_ctx is one sequence's context), so it
answers one request at a time; --interrupt_requests is switched off so that a new request waits instead of
cutting the running stream short. `kiln serve` decodes up to its engine's max_running requests together and
queues the rest. Run it on an otherwise idle machine: under `nice` or beside other work the servers' threads are
starved unevenly and the numbers say little.

    python benchmarks/bench_serve.py [--clients 1 8 32] [--duration 30] [--max-tokens 128] [--threads 2]
        [--max-seq-len 1024] [--max-num-seqs 32] [--skip-llama-cpp] [--recompile] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402 - benchmarks/peers.py, beside this file

KILN = "kiln"
LLAMA_CPP = "llama.cpp"

SYSTEM_PROMPT = (
    "You are the help desk assistant of a public library in a small town. Answer the question you are asked "
    "first, in plain language, and keep to what the reader needs. The library opens from nine to six on "
    "weekdays and from ten to two on Saturdays; it is closed on Sundays and public holidays. Members may borrow "
    "up to twelve items for three weeks and renew them twice online unless someone has reserved them. Late "
    "returns cost twenty cents a day per item. The reading room, the children's corner and the local history "
    "archive are on the ground floor; computers and printers are upstairs. When you do not know something, say "
    "so and suggest asking a librarian at the front desk."
)

# Paragraphs that long messages quote, so user turns range from a line to several hundred tokens.
NOTES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a screw "
    "press, movable metal type and oil-based ink into a practical system for producing books. Before his "
    "invention, books were copied by hand, which made them rare and expensive.",
    "Within a few decades, printing shops had spread to more than two hundred cities across Europe, and millions "
    "of books were in circulation. Literacy grew, scientific ideas travelled faster, and religious and political "
    "debates reached a far wider audience than ever before.",
    "Public lending libraries spread in the nineteenth century, often funded by local taxes or by philanthropists "
    "who paid for buildings on the condition that towns would stock and staff them. Many were the first places "
    "where working people could read newspapers and books without paying for them.",
    "Today a library lends far more than books: audiobooks, films, board games, sewing machines and even tools. "
    "Librarians run reading groups, help people fill in forms online, teach basic computer skills and keep "
    "archives of local newspapers, photographs and family records.",
    "The town's own archive holds parish registers from the seventeenth century, maps of the old mill and the "
    "railway, school reports, and thousands of photographs donated by families. Volunteers have been scanning "
    "them for years so that people can search them from home.",
    "Our reading group meets on the first Tuesday of every month. Last month we read a detective novel set in a "
    "lighthouse, and the discussion went on long past closing time because nobody agreed about who had sent the "
    "letters that the keeper kept finding on the stairs.",
]

QUESTIONS = [
    "When are you open on Saturday?",
    "How many books can I borrow at once?",
    "Can I renew a book online if somebody else has reserved it? If not, what should I do instead?",
    "My daughter is seven and loves stories about animals. Suggest three kinds of books she could borrow and "
    "tell me where in the library she can find them.",
    "I returned four books nine days late. How much do I owe, and can I pay at the front desk with a card?",
    "Write a short, friendly notice for the front door announcing that the library will be closed on Monday "
    "for a public holiday and that returns can still go in the box outside.",
    "Explain to an older visitor who has never used a computer how to search the catalogue for a book by its "
    "title, step by step, without any technical words.",
    "What could a teenager volunteer to do at the library during the summer holidays?",
]


def conversations() -> list:
    """The user messages, mixed in length: each question alone, and with zero to all the notes quoted before it."""
    messages = []
    for index, question in enumerate(QUESTIONS):
        quoted = NOTES[:index % (len(NOTES) + 1)]  # 0..6 paragraphs: ~20 to ~500 tokens
        messages.append(question if not quoted else "Here are some notes:\n\n" + "\n\n".join(quoted)
                        + "\n\n" + question)
        messages.append(question)
    return messages


# --- the servers --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident set (VmHWM), or None when it has gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """A server subprocess on a loopback port: started, waited for until ``ready_path`` answers, stopped."""

    def __init__(self, name: str, command: list, port: int, ready_path: str):
        self.name, self.command, self.port, self.ready_path = name, command, port, ready_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-serve-{name}-", suffix=".log", delete=False)
        self.process = None

    def start(self, timeout: float) -> None:
        import httpx

        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + self.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {self.ready_path} within {timeout:.0f} s:\n{self.log_tail()}")

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.process.pid) if self.process else None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # both drain on Ctrl-C, as uvicorn does
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])


def kiln_artifact(args) -> str:
    """The artifact kiln serves: compiled once per kiln source hash, in the cache bench_generate uses."""
    import kiln

    path = os.path.join(peers.CACHE, f"kiln-{kiln.__version__}-{peers.kiln_code_tag()}",
                        f"smollm2-tvm-{args.max_seq_len}x{args.max_num_seqs}-gguf-serve.kiln")
    if args.recompile or not os.path.exists(os.path.join(path, "manifest.json")):
        kiln.compile("smollm2", backend="tvm", quantize="gguf", max_seq_len=args.max_seq_len,
                     max_num_seqs=args.max_num_seqs, output=path, progress=True, accuracy_gate="warn")
    return path


def kiln_server(args, artifact: str) -> ServerProcess:
    port = free_port()
    # --max-queued above the largest level, so back-pressure (503) never stands in for queueing here
    command = [sys.executable, "-m", "kiln.cli", "serve", artifact, "--port", str(port), "--threads",
               str(args.threads), "--max-queued", str(max(64, max(args.clients)))]
    return ServerProcess(KILN, command, port, "/health")


def llama_cpp_server(args, gguf: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.max_seq_len), "--interrupt_requests", "False", "--verbose", "False"]
    return ServerProcess(LLAMA_CPP, command, port, "/v1/models")


# --- the load -----------------------------------------------------------------------------------------------------

class Answer:
    """One streamed request as a client saw it."""

    def __init__(self, prompt_index: int, sent: float):
        self.prompt_index, self.sent = prompt_index, sent
        self.chunk_times: list = []  # arrival of each chunk with content
        self.text = ""
        self.tokens = None  # from the stream's usage, when the server sends it
        self.finish_reason = None
        self.error = None
        self.done = None

    def output_tokens(self, max_tokens: int) -> int:
        if self.tokens is not None:
            return self.tokens
        if self.finish_reason == "length":  # llama.cpp's stream has no usage: it stopped at max_tokens
            return max_tokens
        return len(self.chunk_times)


def request_body(server: str, messages: list, args, eos_ids: list) -> dict:
    body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(token): -100 for token in eos_ids}}
    if server == KILN:
        body["stream_options"] = {"include_usage": True}
    else:
        body["repeat_penalty"] = 1.0  # llama-cpp-python's server applies 1.1 unless told
    return body


async def stream_one(client, url: str, body: dict, answer: Answer) -> None:
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments and pings
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    answer.error = f"stream error: {event['error'].get('message', event['error'])}"
                    return
                if event.get("usage"):
                    answer.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        answer.chunk_times.append(time.perf_counter())
                        answer.text += content
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    except Exception as err:  # noqa: BLE001 - a broken connection is one error of the load, not the end of it
        answer.error = f"{type(err).__name__}: {err}"
    finally:
        answer.done = time.perf_counter()
    if answer.error is None and answer.output_tokens(body["max_tokens"]) < body["max_tokens"]:
        answer.error = f"cut short: {answer.output_tokens(body['max_tokens'])} tokens, finish {answer.finish_reason}"


async def run_level(server: ServerProcess, clients: int, args, prompts: list, eos_ids: list) -> tuple:
    """``clients`` clients sending requests back to back for ``args.duration`` seconds: the answers, the start and
    the wall time."""
    import httpx

    url = server.base_url + "/v1/chat/completions"
    answers = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + args.duration

        async def one_client(number: int) -> None:
            # each client walks the prompts from its own offset, so concurrent requests differ
            index = number * len(prompts) // clients
            while time.perf_counter() < stop_at:
                messages = [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": prompts[index % len(prompts)]}]
                answer = Answer(index % len(prompts), time.perf_counter())
                answers.append(answer)
                await stream_one(client, url, request_body(server.name, messages, args, eos_ids), answer)
                index += 1

        await asyncio.gather(*(one_client(n) for n in range(clients)))
        wall = time.perf_counter() - start
    return answers, start, wall


def percentile(values: list, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def mean_decoding(answers: list, start: float, wall: float) -> float:
    """How many answers were between their first and last token at once, averaged over the level's wall time."""
    spans = sum(a.chunk_times[-1] - a.chunk_times[0] for a in answers if len(a.chunk_times) > 1)
    return spans / wall if wall > 0 else 0.0


def summarize(answers: list, start: float, wall: float, args) -> dict:
    good = [a for a in answers if a.error is None]
    ttft = [a.chunk_times[0] - a.sent for a in good if a.chunk_times]
    itl = [later - earlier for a in good for earlier, later in zip(a.chunk_times, a.chunk_times[1:])]
    tokens = sum(a.output_tokens(args.max_tokens) for a in good)
    errors = [a.error for a in answers if a.error is not None]
    return {"requests": len(good), "errors": len(errors), "error_samples": sorted(set(errors))[:3],
            "wall_s": wall, "requests_per_s": len(good) / wall, "output_tokens_per_s": tokens / wall,
            "output_tokens": tokens, "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
            "decoding_at_once": mean_decoding(good, start, wall)}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def bench_server(server: ServerProcess, args, prompts: list, eos_ids: list, texts: dict) -> list:
    """Start the server, warm it up, run every level, stop it; a row per level (the greedy texts go to ``texts``)."""
    rows = []
    started = time.perf_counter()
    server.start(args.start_timeout)
    try:
        load_seconds = time.perf_counter() - started
        # one short request first: lazy initialisation is not part of any level
        warm = Answer(0, time.perf_counter())
        warm_body = {**request_body(server.name, [{"role": "user", "content": QUESTIONS[0]}], args, eos_ids),
                     "max_tokens": 4}
        asyncio.run(stream_one_with_client(server, warm_body, warm))
        if warm.error:
            raise RuntimeError(f"{server.name}'s warm-up request failed: {warm.error}")
        for clients in args.clients:
            answers, start, wall = asyncio.run(run_level(server, clients, args, prompts, eos_ids))
            row = {"server": server.name, "clients": clients, **summarize(answers, start, wall, args),
                   "peak_rss_mib": server.peak_rss_mib(), "load_s": load_seconds}
            rows.append(row)
            for answer in answers:
                if answer.error is None:
                    texts.setdefault(answer.prompt_index, answer.text)
            print(f"  {server.name}, {clients} clients: {row['requests']} answers, {row['errors']} errors, "
                  f"{row['output_tokens_per_s']:.1f} output tok/s", flush=True)
    finally:
        server.stop()
    return rows


async def stream_one_with_client(server: ServerProcess, body: dict, answer: Answer) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        await stream_one(client, server.base_url + "/v1/chat/completions", body, answer)


# --- the report ---------------------------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report(rows: list, texts: dict, args) -> None:
    print()
    print("| server | clients | answers | errors | requests/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
          "| ITL p50 ms | ITL p99 ms | decoding at once | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
              f"| {r['output_tokens_per_s']:.1f} | {fmt(r['ttft_p50_ms'], '.0f')} | {fmt(r['ttft_p99_ms'], '.0f')} "
              f"| {fmt(r['itl_p50_ms'], '.1f')} | {fmt(r['itl_p99_ms'], '.1f')} | {r['decoding_at_once']:.1f} "
              f"| {fmt(r['peak_rss_mib'], '.0f')} |")
    for r in rows:
        for sample in r["error_samples"]:
            print(f"  {r['server']}, {r['clients']} clients, error: {sample}")

    by_key = {(r["server"], r["clients"]): r for r in rows}
    pairs = [(by_key[(KILN, c)], by_key[(LLAMA_CPP, c)]) for c in args.clients
             if (KILN, c) in by_key and (LLAMA_CPP, c) in by_key]
    if pairs:
        print("\nkiln / llama.cpp (throughput: above 1 is kiln ahead; latency and memory: below 1 is kiln ahead):")
        for k, l in pairs:
            print(f"  {k['clients']:>3} clients: requests/s {ratio(k['requests_per_s'], l['requests_per_s'])}  "
                  f"output tok/s {ratio(k['output_tokens_per_s'], l['output_tokens_per_s'])}  "
                  f"TTFT p50 {ratio(k['ttft_p50_ms'], l['ttft_p50_ms'])}  "
                  f"ITL p50 {ratio(k['itl_p50_ms'], l['itl_p50_ms'])}  "
                  f"peak RSS {ratio(k['peak_rss_mib'], l['peak_rss_mib'])}")

    kiln_rows = [r for r in rows if r["server"] == KILN]
    if kiln_rows:
        top = max(kiln_rows, key=lambda r: r["clients"])
        print(f"\ntargets (kiln):\n  no errors at {top['clients']} clients: "
              f"{'PASS' if top['errors'] == 0 else 'FAIL'} ({top['errors']} errors)")
        first = kiln_rows[0]
        if first is not top and first["peak_rss_mib"] and top["peak_rss_mib"]:
            print(f"  memory at {top['clients']} clients: peak RSS {top['peak_rss_mib']:.0f} MiB, "
                  f"{top['peak_rss_mib'] - first['peak_rss_mib']:+.0f} MiB over the peak after {first['clients']} "
                  f"client(s) (resident memory grows as KV-cache pages are first used, up to the pool fixed at "
                  f"compile time by --max-seq-len and --max-num-seqs)")
        for k, l in pairs:
            if k["clients"] > 1:
                ahead = k["output_tokens_per_s"] > l["output_tokens_per_s"]
                print(f"  output tok/s ahead of llama.cpp's server at {k['clients']} clients: "
                      f"{'PASS' if ahead else 'FAIL'} ({ratio(k['output_tokens_per_s'], l['output_tokens_per_s'])})")

    both = sorted(set(texts.get(KILN, {})) & set(texts.get(LLAMA_CPP, {})))
    if both:
        same = sum(texts[KILN][i] == texts[LLAMA_CPP][i] for i in both)
        prefixes = sorted(common_prefix(texts[KILN][i], texts[LLAMA_CPP][i]) for i in both)
        print(f"\ngreedy answers to the same prompt: {same} of {len(both)} identical between kiln and llama.cpp; "
              f"they agree for the first {prefixes[len(prefixes) // 2]} characters (median; "
              f"shortest {prefixes[0]}) of answers about {len(texts[KILN][both[0]])} characters long")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level in which requests start")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (the end token is banned)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="kiln's compiled maximum; llama.cpp's n_ctx")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences of --max-seq-len kiln's KV pool holds")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="measure kiln alone")
    parser.add_argument("--recompile", action="store_true", help="compile kiln's artifact afresh")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is an error")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to start")
    parser.add_argument("--json", help="also write every row to this JSON file")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.duration <= 0 or args.max_tokens < 1:
        parser.error("--clients, --duration and --max-tokens must be positive")

    from kiln.frontend.gguf_file import GGUFFile
    from kiln.frontend.sources import default_model_path
    from kiln.frontend.tokenizer import tokenizer_from_gguf

    began = time.perf_counter()
    gguf = default_model_path()
    bundle = tokenizer_from_gguf(GGUFFile(gguf))
    prompts = conversations()
    encode = bundle.tokenizer().encode
    lengths = sorted(len(encode(p).ids) for p in prompts)
    system_tokens = len(encode(SYSTEM_PROMPT).ids)
    if system_tokens + lengths[-1] + args.max_tokens + 32 > args.max_seq_len:  # 32: the chat template's own tokens
        parser.error(f"the longest prompt ({system_tokens} + {lengths[-1]} tokens) and --max-tokens {args.max_tokens} "
                     f"need a larger --max-seq-len than {args.max_seq_len}")

    # prepare first (the compile), so the two servers are measured back to back
    try:
        servers = [kiln_server(args, kiln_artifact(args))]
    except Exception as err:  # noqa: BLE001 - llama.cpp's rows still stand alone
        print(f"kiln: compile failed: {type(err).__name__}: {err}", flush=True)
        servers = []
    if not args.skip_llama_cpp:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
            print("llama.cpp: its server is not installed (pip install 'llama-cpp-python[server]'); kiln alone")
        else:
            servers.append(llama_cpp_server(args, gguf))

    load = os.getloadavg()
    print(f"SmolLM2-135M-Instruct ({os.path.basename(gguf)}), chat requests streamed over loopback: a "
          f"{system_tokens}-token system prompt shared by all, {len(prompts)} user messages of {lengths[0]} to "
          f"{lengths[-1]} tokens, {args.max_tokens} new tokens each (greedy, end token banned); {args.duration:.0f} s "
          f"per level; {args.threads} threads per server; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f} at the start (other processes share the machine: numbers are indicative)", flush=True)

    rows, texts = [], {}
    for server in servers:
        try:
            rows += bench_server(server, args, prompts, bundle.eos_token_ids, texts.setdefault(server.name, {}))
        except Exception as err:  # noqa: BLE001 - one server failing must not hide the other's rows
            print(f"{server.name}: failed: {err}", flush=True)
    report(rows, texts, args)
    print(f"\nruntime: {time.perf_counter() - began:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"max_tokens": args.max_tokens, "duration_s": args.duration, "threads": args.threads,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
