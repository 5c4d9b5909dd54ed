"""The `kiln` command line: compile, run, chat, inspect and evaluate models."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time

from kiln import __version__
from kiln.ir.kv_cache import KVCacheSpec

MODEL_HELP = "'smollm2' (the embedded default), a .gguf file, a Hugging Face checkpoint dir, or an artifact dir"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kiln", description="kiln: compile language models and run them.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    compile_ = sub.add_parser("compile", help="compile a model into an artifact directory",
                              description="Capture, optimize and build MODEL into the artifact directory DIR.")
    compile_.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    compile_.add_argument("-o", "--output", metavar="DIR", required=True, help="artifact directory to write")
    add_compile_options(compile_)

    run = sub.add_parser("run", help="generate text from a prompt",
                         description="Generate from PROMPT (or standard input). MODEL that is not an artifact is "
                                     "compiled on first use into the cache (~/.cache/kiln) and reused after.")
    run.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    run.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (read from stdin when omitted)")
    run.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    run.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")
    run.add_argument("--stats", action="store_true", help="print prefill/decode speed to stderr")
    run.add_argument("--batch", action="store_true",
                     help="read one prompt per line from standard input, generate them together (continuous "
                          "batching) and print one JSON object per prompt, in order")
    add_sampling_options(run)
    add_speculation_options(run)
    add_compile_options(run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat",
                          description="Chat with MODEL; an empty line or /exit (or end of input) quits.")
    chat.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    chat.add_argument("--system", help="a system message to start the conversation")
    add_sampling_options(chat)
    add_speculation_options(chat)
    add_compile_options(chat)

    inspect = sub.add_parser("inspect", help="show what kiln makes of a model",
                             description="Capture and optimize MODEL (or read an artifact) and summarise it: IR, "
                                         "pass timings, fusion decisions, KV-cache and activation memory plans.")
    inspect.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    inspect.add_argument("--print-ir", action="store_true", help="print the whole IR text")
    inspect.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    inspect.add_argument("--print-after", metavar="PASS|all", help="print the IR after this pass (or all)")
    inspect.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after this pass")
    add_quantize_option(inspect)
    add_plan_options(inspect)

    eval_ = sub.add_parser("eval", help="measure a model's quality",
                           description="Measure MODEL's quality; `kiln eval ppl MODEL --text FILE` is perplexity.")
    eval_sub = eval_.add_subparsers(dest="eval_command", metavar="METRIC", parser_class=_Parser, required=True)
    ppl = eval_sub.add_parser("ppl", help="perplexity on a text file over sliding windows",
                              description="Perplexity of MODEL on FILE with the compiled prefill: windows of --window "
                                          "tokens every --stride tokens, each token after the first scored once with "
                                          "the tokens before it in its window as context.")
    ppl.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    ppl.add_argument("--text", metavar="FILE", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...} on stdout')
    ppl.add_argument("--window", type=int, default=512, help="tokens per window (context + scored), default 512")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half the window)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    add_compile_options(ppl)

    embed = sub.add_parser("embed", help="embed texts as vectors (an embedding model)",
                           description="Print one vector per TEXT (or per non-empty line of standard input) from an "
                                       "embedding model: a sentence-transformers or BERT directory (compiled on "
                                       "first use into the cache) or an embedding artifact.")
    embed.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    embed.add_argument("texts", metavar="TEXT", nargs="*", help="texts to embed (read from stdin, one per line, "
                                                                "when none)")
    embed.add_argument("--json", action="store_true", help='print {"model": ..., "embeddings": [[...], ...]}')
    add_compile_options(embed)

    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                           description="Serve MODEL (compiled on first use into the cache, as for run) over HTTP: "
                                       "/v1/completions, /v1/chat/completions, /v1/embeddings (an embedding model), "
                                       "/v1/models, /health and /metrics. Ctrl-C drains running requests and exits.")
    serve.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                           "only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", default=os.environ.get("KILN_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on every route but /health (default: $KILN_API_KEY)")
    serve.add_argument("--max-queued", type=int, default=64,
                       help="requests that may wait beyond those running; past it the server answers 503 with "
                            "Retry-After (default 64)")
    serve.add_argument("--max-running", type=int, metavar="N",
                       help="requests decoding together in one step (default 16); more wait in the queue")
    serve.add_argument("--model-name", help="the model's name in the API (default: MODEL's file or directory name)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds Ctrl-C waits for running requests before cancelling them (default 30)")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="run N engine replicas of an artifact as a Ray Serve deployment behind the same routes "
                            "(pip install 'kiln[ray]'); Ray restarts a replica that dies")
    serve.add_argument("--ray-address", metavar="ADDRESS",
                       help="with --replicas: the Ray cluster to join (as ray.init's address: auto, HOST:6379, "
                            "ray://HOST:10001); default: start a Ray instance on this machine")
    add_speculation_options(serve)
    add_compile_options(serve)

    for p in (compile_, run, chat, inspect, eval_, ppl, embed, serve):
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def add_plan_options(parser) -> None:
    group = parser.add_argument_group("planning")
    group.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence (prompt + new tokens)")
    group.add_argument("--max-num-seqs", type=int, default=4,
                       help="size the KV cache to hold this many sequences of --max-seq-len tokens (pages are shared: "
                            "it serves one long request or many short ones)")
    group.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    group.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default="f32", help="KV-cache element type")
    group.add_argument("--kv-cache-budget", metavar="BYTES", help="KV-cache memory budget, e.g. 512MiB")


QUANTIZE_CHOICES = ("auto", "none", "int8", "int4", "int4-g128", "gguf")


def add_quantize_option(group) -> None:
    group.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES,
                       help="weight-only quantization: auto (default: gguf for a quantized GGUF file, else none), "
                            "none (fp32), int8 (per output channel), int4 (groups of 32, with offsets), "
                            "int4-g128 (groups of 128) or gguf (keep the GGUF file's Q4_0/Q4_1/Q8_0/Q5_0/Q4_K/Q6_K "
                            "blocks)")


    group.add_argument("--activations", default="auto", choices=("auto", "float", "int8"),
                       help="what quantized linears multiply: float (exact), int8 (each row quantized per block of "
                            "32, as llama.cpp does: integer dot products, VNNI on the CPU) or auto (default: int8 for "
                            "quantized weights on the CPU with tvm or onnxruntime, else float)")
    group.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16"),
                       help="compute dtype: auto (default) and f32 widen f16/bf16 weights to f32 at compile time "
                            "and compute in f32; f16 and bf16 compute in that type (norm statistics, softmax, "
                            "attention scores, RoPE angles and logits in f32) with --backend tvm (cuda and cpu) and "
                            "reference; onnxruntime refuses them")


def quantize_arg(args):
    """--quantize as kiln.compile's quantize= (auto -> None)."""
    return None if args.quantize == "auto" else args.quantize


def add_compile_options(parser) -> None:
    group = parser.add_argument_group("compilation (when MODEL is not an artifact)")
    group.add_argument("--backend", default="tvm", help="tvm (default), onnxruntime or reference (numpy, slow)")
    group.add_argument("--target", default="cpu", help="cpu (default) or cuda")
    add_quantize_option(group)
    group.add_argument("--threads", type=int, default=None, help="CPU threads for the TVM runtime")
    group.add_argument("--accuracy-gate", default="refuse", choices=("refuse", "warn", "off"),
                       help="compare the compiled model with the source (torch eager) on a short built-in text "
                            "before installing it (top-1 agreement, mean KL): refuse (default) a compile below the "
                            "thresholds, warn and install it, or off")
    add_plan_options(parser)


def add_sampling_options(parser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("-n", "--max-new-tokens", type=int, default=256, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    group.add_argument("--presence-penalty", type=float, default=0.0,
                       help="in [-2, 2]: subtracted from the logit of every token already generated")
    group.add_argument("--frequency-penalty", type=float, default=0.0,
                       help="in [-2, 2]: subtracted once per time a token was already generated")
    group.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                       help="add BIAS (in [-100, 100]) to a token's logit (repeatable)")
    group.add_argument("--json-schema", metavar="FILE",
                       help="hold the output to the JSON schema in FILE (needs llguidance)")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def add_speculation_options(parser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument("--speculate", choices=("ngram", "draft"),
                       help="ngram: draft tokens by prompt lookup (no second model); draft: with --draft's model")
    group.add_argument("--draft", metavar="ARTIFACT",
                       help="a draft model's artifact directory with MODEL's tokenizer (e.g. SmolLM2 compiled with "
                            "--quantize int4 for SmolLM2 fp32); implies --speculate draft")
    group.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       help="draft tokens verified per step and sequence (default 4)")


def speculation_options(args) -> dict:
    """The Engine's speculative-decoding keywords from --speculate, --draft and --num-speculative-tokens."""
    from kiln.runtime.artifact import is_artifact

    speculate = getattr(args, "speculate", None)
    draft = getattr(args, "draft", None)
    count = getattr(args, "num_speculative_tokens", None)
    if draft is not None and not is_artifact(draft):
        raise UsageError(f"--draft {draft} is not a kiln artifact directory; compile the draft model first (kiln "
                         f"compile DRAFT -o DIR --quantize int4) and pass DIR")
    if count is not None and speculate is None and draft is None:
        raise UsageError("--num-speculative-tokens sets how many tokens a drafter proposes; give --speculate ngram "
                         "or --draft ARTIFACT too")
    return {name: value for name, value in (("speculate", speculate), ("draft", draft),
                                             ("num_speculative_tokens", count)) if value is not None}


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read {text!r} as a size; write e.g. 1073741824, 512MiB or 2GB") from None
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"a memory budget must be a positive, finite number of bytes, got {text!r}")
    if value > 2**62:
        raise UsageError(f"a memory budget of {text!r} is more bytes than any machine has; write e.g. 512MiB")
    return int(value)


def plan_kwargs(args) -> dict:
    for flag in ("max_seq_len", "max_num_seqs", "page_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return {"max_seq_len": args.max_seq_len, "max_num_seqs": args.max_num_seqs, "page_size": args.page_size,
            "kv_cache_dtype": args.kv_cache_dtype,
            "kv_cache_budget": parse_bytes(args.kv_cache_budget) if args.kv_cache_budget else None,
            "activations": getattr(args, "activations", "auto"), "dtype": getattr(args, "dtype", "auto"),
            "accuracy_gate": getattr(args, "accuracy_gate", "refuse")}


def check_compile_args(args) -> None:
    from kiln.backends import BACKENDS

    if args.backend not in BACKENDS:
        raise UsageError(f"unknown backend {args.backend!r}; expected one of {', '.join(sorted(BACKENDS))}")
    if args.target not in ("cpu", "cuda"):
        raise UsageError(f"unknown target {args.target!r}; expected cpu or cuda")
    if args.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown --quantize {args.quantize!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    plan_kwargs(args)


def sampling_kwargs(args) -> dict:
    from kiln.ir.errors import ConfigError
    from kiln.runtime.sampling import SamplingParams

    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
              "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
              "logit_bias": parse_logit_bias(args.logit_bias), "seed": args.seed, "stop": tuple(args.stop),
              "ignore_eos": args.ignore_eos}
    try:
        SamplingParams(**kwargs).validate()
    except ConfigError as err:
        raise UsageError(str(err).replace("SamplingParams.", "--").replace("_", "-")) from None
    if args.json_schema is not None:
        kwargs["json_schema"] = read_json_schema(args.json_schema)
    return kwargs


def parse_logit_bias(items: list) -> dict:
    """--logit-bias TOKEN_ID=BIAS, repeated: {token_id: bias}; the ranges are SamplingParams' to check."""
    bias = {}
    for item in items:
        token, _, value = item.partition("=")
        try:
            token_id, number = int(token), float(value)
        except ValueError:
            raise UsageError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 50256=-100), got {item!r}") from None
        if token_id in bias:
            raise UsageError(f"--logit-bias gives token {token_id} twice; give each token one bias")
        bias[token_id] = number
    return bias


def read_json_schema(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.loads(f.read(MAX_STDIN_BYTES + 1))
    except OSError as err:
        raise UsageError(f"--json-schema cannot read {path}: {err.strerror}") from None
    except (ValueError, RecursionError) as err:
        raise UsageError(f"--json-schema {path} is not JSON: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema {path} holds {type(schema).__name__}, not a JSON schema object")
    return schema


# engines ------------------------------------------------------------------------
def cache_dir() -> str:
    return os.environ.get("KILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")


def open_engine(args):
    """An Engine for MODEL (an artifact directly, anything else through the compile cache); its notices (prefix
    caching off on a backend that cannot share pages) go to stderr."""
    engine = _open_engine(args)
    for notice in engine.notices:
        sys.stderr.write(f"kiln: {notice}\n")
    return engine


def _open_engine(args):
    from kiln.runtime.artifact import is_artifact

    from .progress import Progress

    backend_options = {"num_threads": args.threads} if getattr(args, "threads", None) else {}
    backend_options.update(speculation_options(args))
    if getattr(args, "max_running", None) is not None:
        backend_options["max_running"] = args.max_running
    if is_artifact(args.model):
        from kiln.api import load
        from kiln.backends.tvm.executor import RUNTIME_ONLY_ENV

        os.environ.setdefault(RUNTIME_ONLY_ENV, "1")  # this process only runs the artifact: no TVM compiler

        return load(args.model, **backend_options)
    import hashlib

    from kiln.api import compile as compile_model
    from kiln.api import load
    from kiln.backends import backend_version
    from kiln.frontend.sources import content_hash
    from kiln.ir.errors import ArtifactError

    progress = Progress()
    with progress.stage("hashing model"):
        digest = content_hash(args.model)
    key = json.dumps({"model": digest, "kiln": __version__, "backend": args.backend,
                      "backend_version": backend_version(args.backend), "target": args.target,
                      "quantize": args.quantize, "cache_format": 4, **plan_kwargs(args)}, sort_keys=True)
    path = os.path.join(cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:24], "model.kiln")
    if os.path.lexists(path):
        try:
            engine = load(path, **backend_options)
        except ArtifactError as err:
            # the cache is kiln's own: a damaged or incomplete entry is rebuilt, never fatal
            progress.stream.write(f"kiln: the cached compile in {path} is unusable ({err}); rebuilding it\n")
            _remove_cache_entry(path)
        else:
            progress.stream.write(f"kiln: using the compiled model in {path}\n")
            return engine
    compile_model(args.model, backend=args.backend, target=args.target, quantize=quantize_arg(args), output=path,
                  progress=progress, **plan_kwargs(args))
    return load(path, **backend_options)


def _remove_cache_entry(path: str) -> None:
    """Remove a damaged entry of kiln's compile cache (and nothing outside the cache)."""
    import shutil

    root = os.path.realpath(cache_dir())
    real = os.path.realpath(path)
    assert os.path.commonpath([root, real]) == root and real != root, f"{path} is outside the cache {root}"
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# commands ------------------------------------------------------------------------
def cmd_compile(args) -> int:
    from kiln.api import compile as compile_model

    from .artifact import output_path
    from .progress import Progress

    check_compile_args(args)
    output_path(args.output)  # refuse a path that is not free or an artifact before any work
    art = compile_model(args.model, backend=args.backend, target=args.target, quantize=quantize_arg(args),
                        output=args.output, progress=Progress(), **plan_kwargs(args))
    print(f"kiln: wrote {art.path}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    check_compile_args(args)
    kwargs = sampling_kwargs(args)
    if args.batch:
        return run_batch(args, kwargs)
    prompt = args.prompt if args.prompt is not None else read_stdin_prompt()
    check_prompt_text(prompt, "PROMPT" if args.prompt is not None else "the prompt on standard input")
    engine = open_engine(args)
    stream = not args.no_stream and sys.stdout.isatty()
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        result = engine.chat(messages, stream=stream, **kwargs)
    else:
        result = engine.stream(prompt, **kwargs) if stream else engine.generate(prompt, **kwargs)
    if stream:
        for piece in result:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(result.text)
        if args.stats:
            s = result.stats
            print(f"kiln: prefill {s['prompt_tokens']} tokens at {s['prefill_tokens_per_s']:.1f} tok/s, decode "
                  f"{s['new_tokens']} tokens at {s['decode_tokens_per_s']:.1f} tok/s ({result.finish_reason})",
                  file=sys.stderr)
    return 0


def run_batch(args, kwargs) -> int:
    """kiln run --batch: every non-empty line of standard input is a prompt; all are submitted at once."""
    if args.prompt is not None:
        raise UsageError("--batch reads its prompts from standard input, one per line; drop PROMPT")
    lines = [line for line in read_stdin_prompt().splitlines() if line.strip()]
    if not lines:
        raise UsageError("--batch found no prompt on standard input; give one prompt per line")
    for number, line in enumerate(lines, 1):
        check_prompt_text(line, f"line {number} of standard input")
    engine = open_engine(args)
    start = time.perf_counter()
    if args.chat:
        requests = [engine.submit(engine.chat_prompt([{"role": "user", "content": line}]), **kwargs)
                    for line in lines]
    else:
        requests = [engine.submit(line, **kwargs) for line in lines]
    new_tokens = 0
    for index, request in enumerate(requests):
        result = request.result()
        new_tokens += len(result.token_ids)
        print(json.dumps({"index": index, "text": result.text, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.stats["prompt_tokens"], "new_tokens": result.stats["new_tokens"],
                          "cached_prompt_tokens": result.stats["cached_prompt_tokens"]}, ensure_ascii=False),
              flush=True)
    if args.stats:
        seconds = time.perf_counter() - start
        print(f"kiln: {len(requests)} prompts, {new_tokens} new tokens in {seconds:.2f} s "
              f"({new_tokens / seconds:.1f} tok/s together)", file=sys.stderr)
    return 0


MAX_STDIN_BYTES = 64 * 2**20
MAX_TEXT_BYTES = 1 * 2**30  # kiln eval's --text: far beyond any evaluation corpus that fits in memory


def read_stdin_prompt() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("give a PROMPT or pipe one on standard input")
    data = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise UsageError(f"standard input holds more than {MAX_STDIN_BYTES // 2**20} MiB, far more than a prompt; "
                         f"pipe a shorter text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"standard input is not UTF-8 text (an undecodable byte at offset {err.start}); convert "
                         f"it to UTF-8") from None


def check_prompt_text(prompt: str, what: str) -> None:
    if not prompt:
        raise UsageError(f"{what} is empty; give some text to continue")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8 (the argument holds bytes that do not decode); pass UTF-8 "
                         f"text") from None


def cmd_embed(args) -> int:
    """kiln embed: one line of space-separated floats per text, in order (or one JSON object with --json)."""
    check_compile_args(args)
    texts = args.texts or [line for line in read_stdin_prompt().splitlines() if line.strip()]
    if not texts:
        raise UsageError("give a TEXT to embed or pipe texts on standard input, one per line")
    for number, text in enumerate(texts, 1):
        check_prompt_text(text, f"text {number}")
    with open_engine(args) as engine:
        vectors = engine.embed(texts)
        name = engine.manifest["model"].get("name")
    if args.json:
        print(json.dumps({"model": name, "embeddings": vectors.tolist()}))
    else:
        for vector in vectors:
            print(" ".join(f"{value:.8g}" for value in vector))
    return 0


def cmd_chat(args) -> int:
    from kiln.ir.errors import KilnError

    check_compile_args(args)
    kwargs = sampling_kwargs(args)
    engine = open_engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        pieces: list = []
        try:
            line = _read_chat_line()
            if line is None or line.strip() in ("", "/exit", "/quit"):
                return 0
            for piece in engine.chat(messages + [{"role": "user", "content": line}], stream=True, **kwargs):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (UsageError, KilnError) as err:
            if not interactive:  # a script's input: fail with the status that says so
                raise
            # at a terminal the conversation goes on without the turn that failed
            sys.stdout.write("\n" if pieces else "")
            print(f"kiln: error: {err}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(pieces)}]


def _read_chat_line() -> str | None:
    """One line of the user's (None at the end of input), bounded and UTF-8."""
    raw = sys.stdin.buffer.readline(MAX_STDIN_BYTES + 1)
    if not raw:
        return None
    if len(raw) > MAX_STDIN_BYTES:
        raise UsageError(f"a line of more than {MAX_STDIN_BYTES // 2**20} MiB is far more than a chat message")
    try:
        return raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as err:
        raise UsageError(f"that line is not UTF-8 text (an undecodable byte at offset {err.start})") from None


def cmd_inspect(args) -> int:
    from kiln.runtime.artifact import is_artifact

    from .driver import capture_source, optimize, summarize
    from .progress import Progress

    if args.print_after or args.stop_after:
        from kiln.passes import PassManager
        from kiln.passes.pipeline import PIPELINE

        names = list(dict.fromkeys(PassManager(PIPELINE).names()))
        for flag, name in (("--print-after", args.print_after), ("--stop-after", args.stop_after)):
            if name is not None and name not in names and not (flag == "--print-after" and name == "all"):
                raise UsageError(f"{flag} {name!r} is not a pass of the pipeline; expected one of "
                                 f"{', '.join(names)}" + (" or all" if flag == "--print-after" else ""))
        if is_artifact(args.model):
            raise UsageError(f"{args.model} is a compiled artifact; --print-after and --stop-after need a model "
                             f"to compile")
    if is_artifact(args.model):
        summary, module = _artifact_summary(args.model)
    elif _is_embedding_source(args.model):  # an encoder: @embed through kiln/embedding.py's pipeline
        from kiln.api import compile_options

        from .embedding import capture_embedding

        module = capture_embedding(args.model, max_seq_len=args.max_seq_len, pass_options=compile_options(),
                                   progress=Progress(), print_after=args.print_after, stop_after=args.stop_after)[0]
        summary = summarize(module)
    else:
        from kiln.api import compile_options

        from kiln.api import resolve_activations, resolve_dtype, resolve_quantize

        options = compile_options(quantize=quantize_arg(args), **plan_kwargs(args))
        resolve_dtype(options, getattr(args, "backend", "tvm"), getattr(args, "target", "cpu"))
        progress = Progress()
        module, source_info = capture_source(args.model, max_seq=args.max_seq_len, progress=progress)
        resolve_quantize(options, source_info, progress)
        resolve_activations(options, getattr(args, "backend", "tvm"), getattr(args, "target", "cpu"))
        optimize(module, options, print_after=args.print_after, stop_after=args.stop_after, progress=progress)
        summary = summarize(module)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.print_ir:
        from kiln.ir.printer import print_module

        print(print_module(module), end="")
    return 0


def _is_embedding_source(model: str) -> bool:
    from .embedding import is_embedding_source

    return is_embedding_source(model)


def _artifact_summary(path: str):
    from kiln.ir.parser import parse_module
    from kiln.runtime.artifact import open_artifact

    from .driver import summarize

    info = open_artifact(path)
    module = parse_module(info.read_text(info.manifest["module"], "module"))
    module.metadata["passes"] = info.manifest.get("passes", [])
    summary = summarize(module)
    summary["artifact"] = {k: info.manifest[k] for k in ("backend", "backend_version", "target", "kiln_version",
                                                          "files")}
    launches = info.manifest["backend_info"].get("kernel_launches")
    if isinstance(launches, dict):
        summary["artifact"]["kernel_launches"] = launches
    parallel = info.manifest["backend_info"].get("parallel_launches")
    if isinstance(parallel, dict):
        summary["artifact"]["parallel_launches"] = parallel
    if isinstance(info.manifest.get("accuracy"), dict):
        summary["artifact"]["accuracy"] = info.manifest["accuracy"]
    return summary, module


def format_summary(summary: dict) -> str:
    lines = [f"model: {summary['model']}",
             f"parameters: {summary['parameters']:,} ({summary['parameter_bytes'] / 2**20:.1f} MiB)",
             f"symbolic dims: {', '.join(summary['symbolic_dims'])}",
             "entry functions:"]
    if summary.get("symbol_ranges"):  # declared by the capture; the verifier proves slices in bounds with them
        lines.insert(3, "symbol ranges: " + ", ".join(f"{name} in [{least}, {greatest}]"
                                                      for name, (least, greatest) in summary["symbol_ranges"].items()))
    if summary.get("artifact"):
        art = summary["artifact"]
        lines.insert(1, f"artifact: {art['backend']} {art['backend_version']}, target {art['target']}, "
                        f"kiln {art['kiln_version']}, {len(art['files'])} files")
        if art.get("kernel_launches"):
            parallel = art.get("parallel_launches") or {}
            lines.insert(2, "kernel launches per call: " + ", ".join(
                f"@{name} {count}" + (f" ({parallel[name]} on the thread pool)" if name in parallel else "")
                for name, count in sorted(art["kernel_launches"].items())) +
                " (@step_decode's: per decoded token of one sequence)")
        if art.get("accuracy"):
            from .accuracy import describe

            lines.insert(2, describe(art["accuracy"]))
    for name, info in summary["functions"].items():
        params = ", ".join(f"{k}: {v}" for k, v in info["params"].items())
        lines.append(f"  @{name}({params}) -> {', '.join(info['results'])}  [{info['nodes']} nodes]")
    lines.append(f"ops in @{summary['ops_function']}:")
    for op, count in summary["ops"].items():
        lines.append(f"  {op:<16} {count}")
    unfused = summary.get("unfused_attention") or []
    lines.append("attention: all fused" if not unfused else f"attention: {len(unfused)} left unfused:")
    lines.extend(f"  - {reason}" for reason in unfused)
    moe = summary.get("experts")
    if moe:
        lines.append(f"experts: {moe['layers']} MoE layers, top-{moe['top_k']} of {moe['experts']}; expert weights "
                     f"{moe['expert_weight_bytes'] / 2**20:.2f} MiB, read per decoded token "
                     f"{moe['expert_bytes_per_decoded_token'] / 2**20:.2f} MiB"
                     + (f" ({', '.join(f'{n} x {f}' for f, n in sorted(moe['formats'].items()))})"
                        if moe.get("formats") else ""))
    mla = summary.get("latent_attention")
    if mla:
        lines.append(f"latent attention (MLA): {mla['layers']} layers cache one latent of {mla['latent_dim']} "
                     f"({mla['value_dim']} + rope {mla['latent_dim'] - mla['value_dim']}) per token, "
                     f"{mla['bytes_per_token']:,} bytes per token; multi-head attention with the same "
                     f"{mla['num_heads']} heads (K {mla['expanded_k_dim']} + V {mla['expanded_v_dim']}) would cache "
                     f"{mla['mha_bytes_per_token']:,} ({mla['mha_bytes_per_token'] / mla['bytes_per_token']:.1f}x)")
    kv = summary.get("kv_cache")
    if kv:
        lines.extend(KVCacheSpec.from_json(kv).describe())
    quant = summary.get("quantization")
    if quant:
        formats = ", ".join(f"{count} x {fmt}" for fmt, count in sorted(quant["weight_formats"].items()))
        lines.append(f"quantization: {quant['mode']}: {formats}; weights {quant['weight_bytes_before'] / 2**20:.1f} "
                     f"-> {quant['weight_bytes_after'] / 2**20:.1f} MiB")
        if quant["fp32_weights_kept"]:
            lines.append(f"  kept in fp32: {', '.join(quant['fp32_weights_kept'])}")
    aq = summary.get("activations_quantized")
    lines.append("quantized linears multiply float activations" if not aq else
                 f"quantized linears multiply {aq['mode']} activations (per block of 32): {aq['linear_q']} linear_q"
                 + (f", {aq['kept_float']} kept float (K or group not a multiple of 32)" if aq["kept_float"] else "")
                 + (f"; experts: {aq['moe_experts_q']} moe_experts_q, {aq['moe_experts_q_kept_float']} kept float"
                    if "moe_experts_q" in aq else ""))
    acts = summary.get("activations")
    if acts:
        lines.append("activation memory:")
        for name, plan in acts["functions"].items():
            env = ", ".join(f"{k}={v}" for k, v in plan.get("env", {}).items())
            lines.append(f"  @{name} ({env}): peak {plan['peak_bytes'] / 2**20:.2f} MiB vs naive "
                         f"{plan['naive_bytes'] / 2**20:.2f} MiB")
    if summary.get("passes"):
        lines.append("passes:")
        for rec in summary["passes"]:
            lines.append(f"  {rec['name']:<34} {rec['milliseconds']:9.1f} ms  "
                         f"{'modified' if rec['modified'] else '-'}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    if args.eval_command == "ppl":
        return cmd_eval_ppl(args)
    raise UsageError(f"unknown metric {args.eval_command!r}; expected ppl")


def cmd_eval_ppl(args) -> int:
    from kiln.evaluate import check_window, encode_text, perplexity
    from kiln.ir.errors import ConfigError
    from kiln.runtime.artifact import is_artifact

    check_compile_args(args)
    if args.stride is None:
        args.stride = max(args.window // 2, 1)
    try:
        check_window(args.window, args.stride)
    except ConfigError as err:
        raise UsageError(str(err).replace("the window", "--window").replace("the stride", "--stride")) from None
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (one of context, one scored), got {args.max_tokens}")
    if args.model != "smollm2" and not os.path.exists(args.model):
        raise UsageError(f"model {args.model!r} not found: expected {MODEL_HELP}")
    if not is_artifact(args.model) and args.window - 1 > args.max_seq_len:
        raise UsageError(f"--window {args.window} feeds {args.window - 1} tokens at once, more than --max-seq-len "
                         f"{args.max_seq_len}; raise --max-seq-len or lower --window")
    from kiln.ir.errors import KilnError
    from kiln.ir.files import read_text

    try:
        text = read_text(args.text, "text file", MAX_TEXT_BYTES)
    except KilnError as err:
        raise UsageError(f"--text {err}") from None
    if not text:
        raise UsageError(f"--text {args.text}: the file is empty; perplexity needs at least 2 tokens of text")
    engine = open_engine(args)
    ids = encode_text(engine, text)
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"--text {args.text}: the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; "
                         f"perplexity needs at least 2 (one of context, one scored)")
    show = sys.stderr.isatty()

    def on_window(done, total, stats):
        if show:
            sys.stderr.write(f"\rkiln: window {done}/{total}, {stats.tokens} tokens, perplexity so far "
                             f"{stats.perplexity:.4f}")
            sys.stderr.flush()

    result = perplexity(engine, ids, window=args.window, stride=args.stride, on_window=on_window)
    if show:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens}))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of "
              f"{args.window}, stride {args.stride}; {result.seconds:.1f} s, "
              f"{result.tokens / max(result.seconds, 1e-9):.1f} tokens/s)")
    return 0


def cmd_serve(args) -> int:
    """kiln serve: the HTTP server until Ctrl-C or SIGTERM, which drain running requests (up to --drain-timeout)
    and end with status 0, as uvicorn's own command does."""
    check_compile_args(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queued < 0:
        raise UsageError(f"--max-queued must be 0 or more, got {args.max_queued}")
    if args.max_running is not None and args.max_running < 1:
        raise UsageError(f"--max-running must be 1 or more, got {args.max_running}")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise UsageError(f"--drain-timeout must be a finite number of seconds >= 0, got {args.drain_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key (or KILN_API_KEY) is empty; give a key or leave it unset")
    if args.replicas is not None and args.replicas < 1:
        raise UsageError(f"--replicas must be 1 or more, got {args.replicas}")
    if args.ray_address is not None and args.replicas is None:
        raise UsageError("--ray-address places replicas on a Ray cluster; give --replicas N too")
    try:
        from .server import listening_socket, serve
    except ImportError as err:
        raise UsageError(f"kiln serve needs FastAPI, uvicorn and prometheus_client ({err}); install them with: "
                         f"pip install 'kiln[serve]'") from None
    name = args.model_name or os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    if args.replicas is not None:
        return serve_replicas(args, name)
    with listening_socket(args.host, args.port) as sock, open_engine(args) as engine:
        try:
            serve(engine, sock, model_name=name, api_key=args.api_key, max_queued=args.max_queued,
                  drain_timeout=args.drain_timeout)
        except (KeyboardInterrupt, Terminated):
            pass  # the server has drained; the engine closes on the way out
    print("kiln: stopped serving", file=sys.stderr)
    return 0


def replica_engine_options(args) -> dict:
    """The Engine keywords of kiln serve's flags for every replica: --max-running and speculation (a draft
    artifact's path made absolute, as the artifact's is)."""
    options = speculation_options(args)
    if "draft" in options:
        options["draft"] = os.path.abspath(options["draft"])
    if args.max_running is not None:
        options["max_running"] = args.max_running
    return options


def serve_replicas(args, name: str) -> int:
    """kiln serve --replicas N: the artifact's engines on Ray Serve until Ctrl-C or SIGTERM, which remove the
    deployment (replicas drain for up to --drain-timeout) and leave a joined cluster running."""
    from kiln.runtime.artifact import is_artifact

    from .server import listening_socket

    if not is_artifact(args.model):
        raise UsageError(f"--replicas serves a compiled artifact, and {args.model!r} is not one: run kiln compile "
                         f"MODEL -o DIR first, to a path every Ray node can read")
    if args.port == 0:
        raise UsageError("--replicas needs a fixed --port: Ray's proxy listens on that port on every node")
    try:
        import logging

        import ray

        from .replicas import deploy, undeploy
    except ImportError as err:
        raise UsageError(f"--replicas needs Ray Serve ({err}); install it with: pip install 'kiln[ray]'") from None
    listening_socket(args.host, args.port).close()  # a busy port fails at once, not after Ray has started
    on_sigterm = signal.getsignal(signal.SIGTERM)
    # the replicas' logs stay in Ray's session directory (/tmp/ray/session_latest/logs), not on this terminal
    ray.init(address=args.ray_address, log_to_driver=False, logging_level="warning")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # Ray's driver takes SIGTERM for a crash report that exits at once; kiln's handler removes the deployment
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        url = deploy(args.model, replicas=args.replicas, model_name=name, host=args.host, port=args.port,
                     api_key=args.api_key, max_queued=args.max_queued, drain_timeout=args.drain_timeout,
                     threads=args.threads, engine_options=replica_engine_options(args))
        print(f"kiln: serving {name} on {url}/v1 ({args.replicas} replicas on Ray Serve)", file=sys.stderr,
              flush=True)
        try:
            signal.pause()
        except (KeyboardInterrupt, Terminated):
            undeploy()
    finally:
        ray.shutdown()
    print("kiln: stopped serving", file=sys.stderr)
    return 0


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "chat": cmd_chat, "inspect": cmd_inspect, "eval": cmd_eval,
            "embed": cmd_embed, "serve": cmd_serve}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


def main(argv=None) -> int:
    """Run one kiln command. Every failure ends in one line on stderr and a non-zero status: 2 for what the user
    can fix, 1 for kiln's own errors, 130 for Ctrl-C, 143 for SIGTERM, 141 for a closed standard output;
    ``--debug`` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:  # a panic in a Rust extension prints no backtrace; transformers keeps its info lines to itself
        os.environ["RUST_BACKTRACE"] = "0"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if sys.stderr is None:  # started with stderr closed: nowhere to say anything, the status must tell
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:  # started with stdout closed: fail when (and only if) there is output to write
        sys.stdout = _ClosedStream()
    for stream in (sys.stdout, sys.stderr):  # arguments that are not UTF-8 must not break the error line
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous = _on_sigterm()
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        status = COMMANDS[args.command](args)
        sys.stdout.flush()
        return status
    except UsageError as err:
        return _fail(f"kiln: error: {err}", 2)
    except KeyboardInterrupt:
        return _fail("kiln: interrupted", 130)
    except Terminated:
        return _fail("kiln: terminated", 143)
    except BrokenPipeError:
        _silence_stdout()
        return _fail("kiln: error: standard output was closed before all the output was written", 141)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - user errors print one line; --debug shows the traceback
        from kiln.ir.errors import KilnError

        if debug:
            raise
        if isinstance(err, (KilnError, OSError)):
            return _fail(f"kiln: error: {err}", 2)
        if isinstance(err, MemoryError):
            return _fail("kiln: error: out of memory; use a smaller model or smaller --max-seq-len / --max-num-seqs "
                         "(rerun with --debug for the traceback)", 1)
        return _fail(f"kiln: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _ClosedStream:
    def write(self, text):
        raise BrokenPipeError("standard output is closed")

    def flush(self):
        pass

    def isatty(self):
        return False


MAX_ERROR_CHARS = 2000  # a hostile file can put megabytes of text into a name an error quotes


def _fail(message: str, status: int) -> int:
    line = " ".join(message.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[:MAX_ERROR_CHARS - 1] + "…"
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr is closed too: the status has to say it
        pass
    return status


def _on_sigterm():
    """Turn SIGTERM into an exception (cleanup runs); returns the handler to restore, None off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


def _silence_stdout() -> None:
    """After a broken pipe, send what is still buffered for stdout nowhere, so exiting does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
