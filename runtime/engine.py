"""The generation engine: loads an artifact and generates text with prefill, decode and the KV cache.

Imports numpy, tokenizers, jinja2 and the backend's runtime only; never torch,
kiln.frontend or kiln.passes, so an artifact runs on a machine without them.

An Engine may be used from several threads: each generation holds one of the
sequences the KV cache has room for (a caller waits for one), and the steps of
all generations run one at a time on the executor, interleaved. Every batch is
checked (token ids inside the vocabulary, at least one token, positions inside
the compiled maximum) before any backend sees it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from kiln.ir.errors import ArtifactError, ConfigError, KilnError

from .artifact import ArtifactInfo, open_artifact
from .chat_template import DEFAULT_SIZE_BUDGET_CHARS, render_chat
from .detokenize import IncrementalDetokenizer
from .pages import PageManager
from .sampling import Sampler, SamplingParams
from .stopping import StopStringMatcher


@dataclass
class GenerationResult:
    text: str
    token_ids: list
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    stats: dict = field(default_factory=dict)
    logits: np.ndarray | None = None
    prompt_token_ids: list = field(default_factory=list)


class Tokenizer:
    """encode / decode over the artifact's tokenizer.json, with its special tokens. Errors from the Rust
    library (including its panics, which are BaseExceptions) become one-line ConfigErrors."""

    def __init__(self, tokenizer_json: str, config: dict, where: str = "tokenizer.json"):
        from tokenizers import Tokenizer as HFTokenizer

        self.backend = _tokenizer_call(lambda: HFTokenizer.from_str(tokenizer_json), f"loading {where}",
                                       ArtifactError)
        self.bos_token_id = config.get("bos_token_id")
        self.eos_token_ids = list(config.get("eos_token_ids") or [])
        self.bos_token = config.get("bos_token")
        self.eos_token = config.get("eos_token")
        # the longest text one token can stand for bounds how much text can fit in a sequence
        self.longest_token_chars = max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return list(_tokenizer_call(lambda: self.backend.encode(text, add_special_tokens=add_special_tokens).ids,
                                    "encoding the text"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return _tokenizer_call(lambda: self.backend.decode(ids, skip_special_tokens=skip_special_tokens),
                               "decoding token ids")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()


class Engine:
    """Runs one compiled artifact. Build with :func:`kiln.load`."""

    def __init__(self, info: ArtifactInfo, **backend_options):
        from kiln.backends import load_executor

        self.info = info
        manifest = info.manifest
        self.manifest = manifest
        self.kv_plan = manifest["kv_cache"]
        self.max_seq_len = self.kv_plan["max_seq_len"]
        self.vocab_size = manifest["model"]["vocab_size"]
        _check_against_module(info)
        tok = manifest.get("tokenizer")
        self.tokenizer = Tokenizer(info.read_text(tok["file"], "tokenizer.file"), tok) if tok else None
        template = manifest.get("chat_template")
        self.chat_template = info.read_text(template, "chat_template") if template else None
        try:
            self.executor = load_executor(info, **backend_options)
        except MemoryError:
            raise ArtifactError(f"{info.path}: not enough memory to load the model and its KV cache of "
                                f"{self.kv_plan['total_bytes']:,} bytes; recompile with a smaller --max-num-seqs, "
                                f"--max-seq-len or --kv-cache-budget") from None
        # prefill computing only the last token's logits, when the backend compiled it
        self._prefill_for_generation = "prefill_last" if self.executor.has_function("prefill_last") else "prefill"
        self.pages = PageManager(self.kv_plan["num_pages"], self.kv_plan["page_size"], self.kv_plan["pages_per_seq"])
        # Sequences that may be live at once: each can grow to max_seq_len without running out of pages.
        self.max_concurrent = max(1, min(self.kv_plan["max_num_seqs"],
                                         self.kv_plan["num_pages"] // self.kv_plan["pages_per_seq"]))
        self._sequences = threading.BoundedSemaphore(self.max_concurrent)
        self._held = threading.local()  # sequences the current thread holds (it must not wait for its own)
        # The executor and the page manager run one step at a time. Reentrant: a stream abandoned in a
        # reference cycle may be finalized by the garbage collector inside a step of the same thread.
        self._step_lock = threading.RLock()
        self._closed = False

    @classmethod
    def from_path(cls, path: str, **backend_options) -> "Engine":
        return cls(open_artifact(path), **backend_options)

    def close(self) -> None:
        """Release what the backend holds outside memory (ONNX Runtime's private copy of its models) now
        rather than when the engine is garbage-collected."""
        with self._step_lock:
            self._closed = True
            self.executor.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # low level ----------------------------------------------------------------
    @contextlib.contextmanager
    def _sequence(self):
        """A new sequence in the KV cache for the duration of the block; waits while the cache is full, unless
        this thread itself holds the sequences filling it."""
        held = getattr(self._held, "count", 0)
        if not self._sequences.acquire(blocking=held == 0):
            raise ConfigError(f"this thread already runs {held} generations, all the KV cache holds at once "
                              f"({self.max_concurrent}); finish one first or compile with a larger --max-num-seqs")
        self._held.count = held + 1
        try:
            with self._step_lock:
                seq = self.pages.add_sequence()
            try:
                yield seq
            finally:
                with self._step_lock:
                    first_page = self.pages.sequences[seq][:1]
                    self.pages.remove_sequence(seq)
                    if first_page:
                        self.executor.end_sequence(first_page[0])
        finally:
            self._held.count -= 1
            self._sequences.release()

    def _step(self, function: str, seq_ids: list, tokens: np.ndarray) -> np.ndarray:
        """Run prefill/decode for ``tokens[len(seq_ids), n]`` appended to each sequence; the one gate every
        batch passes before a backend sees it."""
        if tokens.ndim != 2 or tokens.shape[0] != len(seq_ids) or tokens.shape[1] == 0:
            raise ConfigError(f"a step needs at least one token per sequence, got a batch of shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ConfigError(f"token ids must be in [0, {self.vocab_size}), got {tokens.min()}..{tokens.max()}")
        n = tokens.shape[1]
        with self._step_lock:
            if self._closed:
                raise ConfigError("this engine was closed; load the artifact again")
            for seq_id in seq_ids:
                if self.pages.lengths[seq_id] + n > self.max_seq_len:
                    raise ConfigError(f"{self.pages.lengths[seq_id] + n} tokens exceed the compiled maximum of "
                                      f"{self.max_seq_len}")
            positions = np.empty(tokens.shape, dtype=np.int64)
            for row, seq_id in enumerate(seq_ids):
                start = self.pages.advance(seq_id, n)
                positions[row] = np.arange(start, start + n)
            table = self.pages.page_table(seq_ids)
            return self.executor.run(function, tokens.astype(np.int64), positions, table)

    def _prompt_ids(self, prompt) -> list:
        """The prompt as checked token ids: text through the tokenizer, or a sequence of integer ids; refused
        when empty, too long to fit, or holding ids outside the model's vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this artifact has no tokenizer: pass a list of token ids instead of text")
            self._check_text(prompt, "the prompt")
            return self._checked_ids(self.tokenizer.encode(prompt), "the prompt's text")
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise ConfigError("the prompt is bytes: pass text as str (decode it first) or a list of token ids")
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
                raise ConfigError(f"a prompt array must be one-dimensional integer token ids, got {prompt.dtype} "
                                  f"of shape {prompt.shape}")
            return self._checked_ids([int(i) for i in prompt], "the prompt")
        try:
            items = list(prompt)
        except TypeError:
            raise ConfigError(f"the prompt must be text (str) or a sequence of token ids, got "
                              f"{type(prompt).__name__}") from None
        bad = next((i for i in items if not isinstance(i, (int, np.integer)) or isinstance(i, (bool, np.bool_))),
                   None)
        if bad is not None:
            raise ConfigError(f"token ids must be integers, got {bad!r} ({type(bad).__name__}) in the prompt")
        return self._checked_ids([int(i) for i in items], "the prompt")

    def _check_text(self, text: str, what: str) -> None:
        if not text:
            raise ConfigError(f"{what} is empty: give some text to continue")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ConfigError(f"{what} is not valid Unicode text (a lone surrogate at character {err.start}); "
                              f"pass UTF-8 text") from None
        limit = self.max_seq_len * max(self.tokenizer.longest_token_chars, 1)
        if len(text) > limit:
            raise ConfigError(f"{what} has {len(text):,} characters, more than {self.max_seq_len} tokens (the "
                              f"compiled maximum) can hold; shorten it")

    def _checked_ids(self, ids: list, what: str) -> list:
        if not ids:
            raise ConfigError(f"{what} is empty: pass at least one token")
        if len(ids) > self.max_seq_len:
            raise ConfigError(f"{what} is {len(ids)} tokens, more than the compiled maximum of {self.max_seq_len}; "
                              f"shorten it or recompile with a larger --max-seq-len")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is None:
            return ids
        if not what.endswith("text"):
            raise ConfigError(f"{what} holds token id {bad}, outside the model's vocabulary of {self.vocab_size}")
        piece = self.tokenizer.backend.id_to_token(bad)  # ids the tokenizer made are its own, so they fit
        raise ConfigError(f"{what} holds token id {bad}{f' ({piece!r})' if piece is not None else ''}, outside the "
                          f"model's vocabulary of {self.vocab_size}; the artifact's tokenizer does not match its "
                          f"model")

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: numpy [len, vocab], via prefill."""
        ids = self._prompt_ids(token_ids)
        with self._sequence() as seq:
            return self._step("prefill", [seq], np.asarray([ids]))[0]

    # generation -----------------------------------------------------------------
    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (same arguments as :meth:`generate`)."""
        result_holder: list = []
        yield from self._generate(prompt, result_holder, **kwargs)

    def generate(self, prompt, *, return_logits: bool = False, **kwargs) -> GenerationResult:
        holder: list = []
        for _ in self._generate(prompt, holder, return_logits=return_logits, **kwargs):
            pass
        return holder[0]

    def chat(self, messages: list, *, add_generation_prompt: bool = True, stream: bool = False, **kwargs):
        """Apply the model's chat template (in jinja2's sandbox) and generate the reply."""
        prompt = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        self._check_text(prompt, "the rendered chat")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.tokenizer.bos_token_id is not None and self.manifest["tokenizer"].get("add_bos_token") and \
                (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        ids = self._checked_ids(ids, "the rendered chat's text")
        return self.stream(ids, **kwargs) if stream else self.generate(ids, **kwargs)

    def render_chat(self, messages: list, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(add_generation_prompt, bool):
            raise ConfigError(f"add_generation_prompt must be True or False, got {add_generation_prompt!r}")
        tok = self.tokenizer
        # a render longer than max_seq_len tokens' worth of text could never be run: stop it there
        budget = min(DEFAULT_SIZE_BUDGET_CHARS, self.max_seq_len * tok.longest_token_chars)
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.bos_token, eos_token=tok.eos_token, size_budget_chars=budget)

    def _generate(self, prompt, holder: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                  seed: int | None = None, stop=None, ignore_eos: bool = False,
                  return_logits: bool = False) -> Iterator[str]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens,
                                stop=() if stop is None else stop, ignore_eos=ignore_eos).validate()
        if not isinstance(return_logits, bool):
            raise ConfigError(f"return_logits must be True or False, got {return_logits!r}")
        ids = self._prompt_ids(prompt)
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) is "
                              f"{len(ids) + max_new_tokens}, more than the compiled maximum of "
                              f"{self.max_seq_len}; shorten the prompt, lower max_new_tokens or recompile "
                              f"with a larger --max-seq-len")
        sampler = Sampler(params)
        eos = set() if ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer.backend) if self.tokenizer else None
        matcher = StopStringMatcher(params.stop) if params.stop else None
        new_ids: list = []
        kept_logits: list = []
        text_parts: list = []
        finish = "length"
        with self._sequence() as seq:
            start = time.perf_counter()
            logits = self._step(self._prefill_for_generation, [seq], np.asarray([ids]))[0, -1]
            prefill_time = time.perf_counter() - start
            decode_start = time.perf_counter()
            decode_calls = 0
            history = list(ids)
            while True:
                if return_logits:
                    kept_logits.append(np.array(logits, dtype=np.float32))
                token = sampler.sample(logits, history)
                if token in eos:
                    finish = "stop"
                    break
                new_ids.append(token)
                history.append(token)
                piece = detok.push(token) if detok else ""
                if matcher is not None and piece:
                    piece, stopped = matcher.feed(piece)
                    if piece:
                        text_parts.append(piece)
                        yield piece
                    if stopped:
                        finish = "stop"
                        break
                elif piece:
                    text_parts.append(piece)
                    yield piece
                if len(new_ids) >= max_new_tokens:
                    break
                logits = self._step("decode", [seq], np.asarray([[token]]))[0, -1]
                decode_calls += 1
            decode_time = time.perf_counter() - decode_start
        if finish != "stop" or matcher is None or not matcher.stopped:
            tail = detok.flush() if detok else ""
            if matcher is not None:
                tail, _ = matcher.feed(tail) if tail else ("", False)
                tail += matcher.flush() if not matcher.stopped else ""
            if tail:
                text_parts.append(tail)
                yield tail
        stats = {
            "prompt_tokens": len(ids), "new_tokens": len(new_ids),
            "prefill_seconds": prefill_time, "decode_seconds": decode_time,
            "prefill_tokens_per_s": len(ids) / prefill_time if prefill_time > 0 else float("inf"),
            "decode_steps": decode_calls,
            "decode_tokens_per_s": decode_calls / decode_time if decode_time > 0 and decode_calls else 0.0,
        }
        holder.append(GenerationResult(text="".join(text_parts), token_ids=new_ids, finish_reason=finish,
                                       stats=stats, logits=np.stack(kept_logits) if return_logits and kept_logits
                                       else (np.zeros((0, 0), np.float32) if return_logits else None),
                                       prompt_token_ids=ids))


def _check_against_module(info: ArtifactInfo) -> None:
    """The manifest's KV plan is the one the library was compiled for (the hashed IR records it), and its cache
    fits in this machine's memory: both before anything is allocated."""
    from kiln.ir.errors import ParseError
    from kiln.ir.files import memory_bytes
    from kiln.ir.parser import parse_metadata

    try:
        compiled = parse_metadata(info.read_text(info.manifest["module"], "module")).get("kv_cache")
    except ParseError as err:
        raise ArtifactError(f"{info.path}: {info.manifest['module']}: {err}; recompile the artifact") from None
    plan = info.manifest["kv_cache"]
    if compiled != plan:
        differ = sorted(k for k in set(plan) | set(compiled or {}) if (compiled or {}).get(k) != plan.get(k))
        raise ArtifactError(f"{info.path}: manifest field kv_cache differs from the plan the model was compiled "
                            f"with (in {', '.join(differ)}); the manifest was edited, recompile the artifact")
    if plan["total_bytes"] > memory_bytes():
        raise ArtifactError(f"{info.path}: the KV cache takes {plan['total_bytes']:,} bytes, more than this "
                            f"machine's {memory_bytes():,}; recompile with a smaller --max-num-seqs, --max-seq-len "
                            f"or --kv-cache-budget")


def _tokenizer_call(call, doing: str, error: type[KilnError] = ConfigError):
    """Run a call into the Rust tokenizers library; its errors and panics (a pyo3 PanicException derives from
    BaseException) become one line."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except MemoryError:
        raise error(f"the tokenizer ran out of memory {doing}") from None
    except BaseException as err:  # noqa: BLE001 - see the docstring
        raise error(f"the tokenizer failed {doing}: {type(err).__name__}: {' '.join(str(err).split())[:200]}") \
            from None
