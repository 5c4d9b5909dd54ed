"""The engines bench_generate.py compares, each run in a process of its own.

One engine per process, so each one's peak resident memory (VmHWM, or ru_maxrss)
is its own: a process loads one engine and runs one task on it, then prints one
JSON line. Tasks:

- ``speed``: a warm-up, then ``repeats`` greedy generations of ``new_tokens`` from
  the same prompt ids; the fastest decode is kept. Prefill is the prompt's tokens
  over the time to the first new token; decode is the tokens after the first over
  the time after it (kiln's own ``stats`` definitions).
- ``ppl``: perplexity on given token ids over kiln.evaluate's sliding windows (every
  token after the first scored once, with the tokens before it in its window as
  context); every engine is fed the same ids of each window.

Engines: ``kiln`` (a compiled artifact), ``ort-genai`` (ONNX Runtime GenAI on a
model its own builder made), ``llama.cpp`` (llama-cpp-python on the GGUF) and
``transformers`` (eager LlamaForCausalLM in fp32 with the GGUF's weights).

This module also prepares what the peers load, cached under ~/.cache/kiln/bench:
a transformers checkpoint of SmolLM2 written from the GGUF (the weights kiln's
GGUF loader reads, with the GGUF's tokenizer), and ONNX Runtime GenAI models
built from it by ``python -m onnxruntime_genai.models.builder``.

    python benchmarks/peers.py worker SPEC.json   (SPEC: {"engine": "llama.cpp", "task": "speed", ...})
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CACHE = os.path.join(os.path.expanduser("~/.cache/kiln"), "bench")
RESULT_TAG = "PEER-RESULT "


# --- preparing the peers' models (in the parent; needs torch and transformers) ---------------------------------

def transformers_smollm2(source):
    """transformers' LlamaForCausalLM holding the weights kiln's GGUF loader reads from ``source`` (a ModelSource)."""
    from kiln.frontend.gguf_model import transformers_llama

    return transformers_llama(source)


def kiln_code_tag() -> str:
    """A hash of kiln's Python sources: artifacts compiled by other code are not reused."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for package in ("kiln", "kiln.frontend", "kiln.ir", "kiln.passes", "kiln.backends", "kiln.runtime"):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder, dirs, files in sorted(os.walk(root)):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(f for f in files if f.endswith(".py")):
                    with open(os.path.join(folder, name), "rb") as f:
                        h.update(os.path.relpath(os.path.join(folder, name), root).encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def _gguf_tag(gguf_path: str) -> str:
    from kiln.frontend.gguf_file import GGUFFile

    return GGUFFile(gguf_path).sha256()[:12]


def _publish(tmp: str, final: str) -> None:
    """Move a finished ``tmp`` directory to ``final`` (another process may have got there first)."""
    os.chmod(tmp, 0o755)  # mkdtemp made it 0700
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf_checkpoint(gguf_path: str, cache: str = CACHE) -> str:
    """A transformers checkpoint directory of the GGUF (fp32 weights as kiln dequantizes them, the GGUF's
    tokenizer), written once and reused."""
    final = os.path.join(cache, f"smollm2-hf-{_gguf_tag(gguf_path)}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    from kiln.frontend.gguf_file import GGUFFile
    from kiln.frontend.sources import load_source
    from kiln.frontend.tokenizer import tokenizer_from_gguf

    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-", dir=cache)
    source = load_source(gguf_path)
    model = transformers_smollm2(source)
    model.save_pretrained(tmp)
    bundle = tokenizer_from_gguf(GGUFFile(gguf_path))
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(bundle.tokenizer_json)
    eos = bundle.eos_token
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bundle.bos_token, "eos_token": eos,
        "pad_token": eos, "add_bos_token": bundle.add_bos_token, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": source.config["max_position_embeddings"]}
    if bundle.chat_template:
        tokenizer_config["chat_template"] = bundle.chat_template
    with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    generation = {"bos_token_id": bundle.bos_token_id, "eos_token_id": bundle.eos_token_ids,
                  "pad_token_id": bundle.eos_token_ids[0] if bundle.eos_token_ids else None, "do_sample": False}
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    _publish(tmp, final)
    return final


def ort_genai_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("onnxruntime-genai")
    except Exception:  # noqa: BLE001 - not installed
        return None


def build_ort_genai(gguf_path: str, precision: str, cache: str = CACHE, log=sys.stderr) -> str:
    """ONNX Runtime GenAI's own model of SmolLM2 at ``precision`` (int4 | int8 | fp32), built by its model builder
    with its defaults for the CPU from the exported checkpoint; built once and reused."""
    version = ort_genai_version()
    if version is None:
        raise ImportError("onnxruntime-genai is not installed (pip install onnxruntime-genai onnx-ir)")
    final = os.path.join(cache, f"ort-genai-{version}-{_gguf_tag(gguf_path)}-{precision}-cpu")
    if os.path.isfile(os.path.join(final, "genai_config.json")):
        return final
    hf_dir = export_hf_checkpoint(gguf_path, cache)
    tmp = tempfile.mkdtemp(prefix=".ort-genai-", dir=cache)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", tmp, "-p", precision,
           "-e", "cpu", "-c", os.path.join(tmp, ".builder-cache")]
    print(f"building ONNX Runtime GenAI {precision}: {' '.join(cmd)}", file=log, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not os.path.isfile(os.path.join(tmp, "genai_config.json")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the ONNX Runtime GenAI builder failed (status {done.returncode}):\n"
                           + "\n".join(done.stdout.splitlines()[-15:]))
    shutil.rmtree(os.path.join(tmp, ".builder-cache"), ignore_errors=True)
    print(f"built in {time.perf_counter() - start:.0f} s: {final}", file=log, flush=True)
    _publish(tmp, final)
    return final


# --- engines (in the worker process) ----------------------------------------------------------------------------

class KilnEngine:
    def __init__(self, spec):
        os.environ.setdefault("KILN_TVM_RUNTIME_ONLY", "1")  # as `kiln run ARTIFACT`: TVM's runtime library only
        import kiln

        self.engine = kiln.load(spec["artifact"], num_threads=spec["threads"], prefix_caching=False)

    def generate(self, prompt_ids, new_tokens):
        res = self.engine.generate(list(prompt_ids), max_new_tokens=new_tokens, ignore_eos=True)
        return res.stats["prefill_tokens_per_s"], res.stats["decode_tokens_per_s"], list(res.token_ids)

    def logits(self, ids):
        return self.engine.logits(list(ids))


class OrtGenAIEngine:
    def __init__(self, spec):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(spec["model_dir"])
        config.clear_providers()  # the CPU
        threads = spec["threads"]
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        with open(os.path.join(spec["model_dir"], "genai_config.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)["model"]["vocab_size"]

    def _generator(self, max_length):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def generate(self, prompt_ids, new_tokens):
        """Greedy by hand, as the llama.cpp row does: GenAI's own search stops at an end-of-sequence token
        (SmolLM2's first token after this prompt is one), while kiln's rows run past it (ignore_eos)."""
        import numpy as np

        gen = self._generator(len(prompt_ids) + new_tokens)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))  # runs the prompt
        tokens = [int(np.argmax(gen.get_logits().reshape(-1)[-self.vocab:]))]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.append_tokens(np.asarray(tokens[-1:], dtype=np.int32))  # runs one token
            tokens.append(int(np.argmax(gen.get_logits().reshape(-1)[-self.vocab:])))
        end = time.perf_counter()
        return len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first), tokens

    def logits(self, ids):
        import numpy as np

        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)  # [1, len(ids), vocab]: every position
        return out.reshape(-1, out.shape[-1])


class LlamaCppEngine:
    def __init__(self, spec):
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                         n_ctx=spec["n_ctx"], n_batch=spec["n_ctx"], logits_all=spec["task"] == "ppl",
                         verbose=False)

    def _last_logits(self):
        """The last evaluated token's logits. ``Llama.scores`` holds them only with logits_all=True (which makes
        every prompt position compute logits): without it, llama-cpp-python 0.3 leaves ``scores`` zero."""
        import numpy as np
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def generate(self, prompt_ids, new_tokens):
        import numpy as np

        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(list(prompt_ids))
        tokens = [int(np.argmax(self._last_logits()))]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(self._last_logits())))
        end = time.perf_counter()
        return len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first), tokens

    def logits(self, ids):
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)


class TransformersEngine:
    def __init__(self, spec):
        import torch

        from kiln.frontend.sources import load_source

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = transformers_smollm2(load_source(spec["gguf"]))

    def generate(self, prompt_ids, new_tokens):
        torch = self.torch
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(torch.as_tensor([list(prompt_ids)]), use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            tokens = [int(token)]
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
                tokens.append(int(token))
            end = time.perf_counter()
        return len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first), tokens

    def logits(self, ids):
        with self.torch.no_grad():
            return self.model(self.torch.as_tensor([list(ids)])).logits[0].float().numpy()


ENGINES = {"kiln": KilnEngine, "ort-genai": OrtGenAIEngine, "llama.cpp": LlamaCppEngine,
           "transformers": TransformersEngine}


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM from /proc/self/status, else ru_maxrss (KiB on Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_task(spec: dict) -> dict:
    start = time.perf_counter()
    engine = ENGINES[spec["engine"]](spec)
    out = {"load_seconds": time.perf_counter() - start}
    if spec["task"] == "speed":
        prompt = spec["prompt_ids"]
        engine.generate(prompt[:16], 4)  # warm up
        best = None
        for _ in range(spec["repeats"]):
            prefill, decode, tokens = engine.generate(prompt, spec["new_tokens"])
            if best is None or decode > best[1]:
                best = (prefill, decode, tokens)
        out.update(prefill_tokens_per_s=best[0], decode_tokens_per_s=best[1], token_ids=best[2])
    elif spec["task"] == "ppl":
        import numpy as np

        from kiln.evaluate import ScoreStats, sliding_windows

        ids = np.asarray(spec["token_ids"], dtype=np.int64)
        stats = ScoreStats()
        windows = sliding_windows(len(ids), spec["window"], spec["stride"])
        for w in windows:
            feed = ids[w.input_slice].tolist()
            t = time.perf_counter()
            logits = np.asarray(engine.logits(feed))
            stats.seconds += time.perf_counter() - t
            if logits.shape[0] != len(feed):
                raise RuntimeError(f"expected logits for {len(feed)} positions, got shape {logits.shape}")
            stats.add(logits[w.scored_rows], ids[w.score_from:w.end])
        out.update(perplexity=stats.perplexity, scored_tokens=stats.tokens, windows=len(windows),
                   seconds=stats.seconds)
    else:
        raise ValueError(f"unknown task {spec['task']!r}")
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_in_subprocess(spec: dict, timeout: float | None = None) -> dict:
    """Run one task on one engine in a fresh Python process; returns its JSON result (with ``peak_rss_mib`` of
    that process), or raises RuntimeError with the tail of its output."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, TVM_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", f.name], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join(done.stdout.splitlines()[-8:])
    status = str(done.returncode)
    if done.returncode < 0:
        status = f"{signal.Signals(-done.returncode).name}"
        if spec["engine"] == "llama.cpp":
            status += (" (a native llama-cpp-python build whose AMX kernels this machine cannot run? rebuild with "
                       "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON\")")
    raise RuntimeError(f"the {spec['engine']} {spec['task']} process exited with {status}:\n{tail}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "worker":
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    result = run_task(spec)
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
