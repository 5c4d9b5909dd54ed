"""The generation engine: loads an artifact and serves requests with continuous batching over the paged KV cache.

Imports numpy, tokenizers, jinja2 and the backend's runtime only; never torch, kiln.frontend or kiln.passes,
so an artifact runs on a machine without them.

``submit`` may be called from any thread; it returns a :class:`Request` at once. One loop thread of the
engine's own runs the model: each iteration the scheduler plans a step (decodes of running requests, prompt
chunks under a token budget, new requests served from the prefix cache where their prompt starts with
cached pages), the engine checks the batch, runs the backend's step once over all of it, and hands each
request the logits it needs. ``generate``, ``stream``, ``chat`` and ``logits`` are built on ``submit``;
``submit_n`` makes several completions of one prompt that share its cached pages. With speculative decoding a
drafter proposes tokens for the decoding sequences before each plan, and the step verifies them.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from kiln.ir.errors import ArtifactError, ConfigError, KilnError
from kiln.ir.kv_cache import DECODE_STEP, DECODE_STEP_MAX_TOKENS, STEP, KVCacheSpec

from .artifact import ArtifactInfo, open_artifact
from .chat_template import DEFAULT_SIZE_BUDGET_CHARS, render_chat
from .grammar import GrammarCompiler, schema_from_request
from .pages import PagePool
from .request import GenerationResult, Request, StreamEvent
from .sampling import SamplingParams, TokenLogprob
from .scheduler import Scheduler, Sequence as ScheduledSequence
from .speculative import DraftModelDrafter, PromptLookupDrafter, check_options

__all__ = ["Engine", "GenerationResult", "Request", "StreamEvent", "TokenLogprob", "Tokenizer"]

DEFAULT_MAX_RUNNING = 16  # requests decoding together in one step
DEFAULT_TOKEN_BUDGET = 512  # tokens per step: decodes first, then prompt chunks
MAX_COMPLETIONS = 128  # n of one prompt at most (OpenAI's limit)
DEFAULT_SPECULATIVE_TOKENS = 4  # draft tokens verified per step and sequence


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
    """Runs one compiled artifact. Build with :func:`kiln.load`.

    ``max_running``: requests in one step at most (others wait); ``token_budget``: tokens per step (a longer
    prompt is prefilled in chunks beside the running decodes); ``prefix_caching``: share full pages of prompt
    tokens between requests (on where the backend can share pages).

    Speculative decoding: ``speculate="ngram"`` drafts by prompt lookup; ``draft=`` (an artifact's directory)
    drafts with that model, which must share this one's tokenizer. Each decoding sequence gets up to
    ``num_speculative_tokens`` draft tokens verified per step; the output is what decoding without them gives
    (token for token when greedy, in distribution when sampling)."""

    def __init__(self, info: ArtifactInfo, *, max_running: int = DEFAULT_MAX_RUNNING,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, prefix_caching: bool = True, speculate: str | None = None,
                 draft=None, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS, **backend_options):
        from kiln.backends import load_executor

        speculate = check_options(speculate, draft, num_speculative_tokens)
        for name, value in (("max_running", max_running), ("token_budget", token_budget)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(prefix_caching, bool):
            raise ConfigError(f"prefix_caching must be True or False, got {prefix_caching!r}")
        self.info = info
        manifest = info.manifest
        self.manifest = manifest
        self.spec = KVCacheSpec.from_json(manifest["kv_cache"])
        self.max_seq_len = self.spec.max_seq_len
        self.vocab_size = manifest["model"]["vocab_size"]
        _check_against_module(info, self.spec)
        tok = manifest.get("tokenizer")
        self.tokenizer = Tokenizer(info.read_text(tok["file"], "tokenizer.file"), tok) if tok else None
        template = manifest.get("chat_template")
        self.chat_template = info.read_text(template, "chat_template") if template else None
        try:
            self.executor = load_executor(info, **backend_options)
        except MemoryError:
            raise ArtifactError(f"{info.path}: not enough memory to load the model and its KV cache of "
                                f"{self.spec.total_bytes:,} bytes; recompile with a smaller --max-num-seqs, "
                                f"--max-seq-len or --kv-cache-budget") from None
        self.prefix_caching = prefix_caching and self.executor.shares_pages
        self.notices: list = []
        if prefix_caching and not self.executor.shares_pages:
            self.notices.append(f"prefix caching is off: the {info.backend} backend keeps each sequence in a buffer "
                                f"of its own and cannot share pages between sequences")
        held = getattr(self.executor, "max_sequences", None)
        if held is not None and held < max_running:
            max_running = held  # the backend keeps per-sequence state for this many
        self.pool = PagePool(self.spec.num_pages, self.spec.page_size, prefix_caching=self.prefix_caching)
        self.scheduler = Scheduler(self.pool, self.spec.pages_per_seq, max_running=max_running,
                                   token_budget=token_budget)
        self.max_running, self.token_budget = max_running, token_budget
        self._decode_function = DECODE_STEP if self.executor.has_function(DECODE_STEP) else STEP
        # the backend takes a greedy step's argmax itself (TVM's @argmax_rows on CUDA), else the engine does
        self._device_argmax = bool(getattr(self.executor, "computes_argmax", False))
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _incoming, _closed and the loop thread's start and end
        self._incoming: list = []
        self._requests: dict = {}  # Sequence -> Request, for the loop thread
        # submit_n: a prompt's first completion -> the others, held back until its prompt is in the prefix cache
        self._followers: dict = {}
        self._grammars: GrammarCompiler | None = None
        self._first_page: dict = {}  # Sequence -> the first page it last ran with (for end_sequence)
        self._closed = False
        self._loop_thread: threading.Thread | None = None
        self.step_stats = {"steps": 0, "tokens": 0, "peak_pages_in_use": 0, "draft_tokens": 0,
                           "accepted_draft_tokens": 0}
        self.drafter = None
        if speculate == "ngram":
            self.drafter = PromptLookupDrafter(num_speculative_tokens)
        elif speculate == "draft":
            self.drafter = self._draft_model_drafter(draft, num_speculative_tokens)

    def _draft_model_drafter(self, path, num_tokens: int) -> DraftModelDrafter:
        """The draft model's own Engine (never started: the drafter steps its executor on this engine's loop
        thread), checked to share this model's tokenizer."""
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"draft must be a draft model's artifact directory, got {type(path).__name__}")
        try:
            draft = Engine(open_artifact(os.fspath(path)))
        except KilnError as err:  # the draft's fault, not this artifact's (the CLI rebuilds a broken artifact)
            raise ConfigError(f"draft: {err}") from None
        if draft.manifest.get("embedding") is not None:
            draft.close()
            raise ConfigError(f"draft: {path} is an embedding model; a draft must be a causal language model")
        problem = None
        if draft.vocab_size != self.vocab_size:
            problem = f"a vocabulary of {draft.vocab_size} tokens, this model {self.vocab_size}"
        elif (draft.tokenizer is None) != (self.tokenizer is None) or (
                self.tokenizer is not None and
                draft.tokenizer.backend.get_vocab(with_added_tokens=True) !=
                self.tokenizer.backend.get_vocab(with_added_tokens=True)):
            problem = "another tokenizer"
        if problem is not None:
            draft.close()
            raise ConfigError(f"draft: the draft model {draft.info.path} has {problem}; a draft model must share "
                              f"the target's tokenizer")
        return DraftModelDrafter(draft, num_tokens)

    @classmethod
    def from_path(cls, path: str, **options) -> "Engine":
        """An Engine for a causal LM's artifact; an embedding model's gives an :class:`EmbeddingEngine`."""
        info = open_artifact(path)
        if info.manifest.get("embedding") is not None:
            from .embedding import EmbeddingEngine

            if "max_running" in options:
                raise ConfigError(f"{path} is an embedding model, which embeds each call's texts at once; "
                                  f"max_running applies to generating models only")
            return EmbeddingEngine(info, **options)
        return cls(info, **options)

    def close(self) -> None:
        """Stop the loop (requests still running fail with a one-line error) and release what the backend
        holds outside memory (ONNX Runtime's private copy of its models)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._loop_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        closed = ConfigError("this engine was closed; load the artifact again")
        held = [r for followers in self._followers.values() for r in followers]
        for request in list(self._incoming) + list(self._requests.values()) + held:
            request.fail(closed)
        if self.drafter is not None:
            self.drafter.close()
        self.executor.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # submitting ---------------------------------------------------------------------
    def submit(self, prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias=None,
               seed: int | None = None, stop=None, ignore_eos: bool = False, logprobs: bool = False,
               top_logprobs: int = 0, response_format=None, json_schema=None,
               return_logits: bool = False) -> Request:
        """Queue a generation and return its :class:`Request` at once; safe from any thread. Bad arguments
        are refused here, in one line.

        Sampling: see :class:`SamplingParams` (``presence_penalty`` / ``frequency_penalty`` in [-2, 2] over the
        generated tokens, ``logit_bias`` {token id: bias in [-100, 100]}). ``logprobs=True`` records each
        generated token's log-probability and its ``top_logprobs`` (0..20) most likely alternatives, as
        :class:`Sampler` defines them (after bias, penalties and temperature, before top-k/top-p/min-p), in
        ``GenerationResult.logprobs`` and in :meth:`Request.events`. ``response_format`` (OpenAI's: ``{"type":
        "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``) or
        ``json_schema`` (the schema alone) holds the output to a JSON schema through llguidance."""
        return self._submit_n(prompt, 1, locals())[0]  # locals(): every keyword argument, by name

    def submit_n(self, prompt, n: int, **kwargs) -> list:
        """``n`` completions of one prompt (same arguments as :meth:`submit`): a list of :class:`Request`.
        Completion ``i`` samples with ``seed + i`` when a seed is given, so a run replays. With prefix caching
        the prompt is computed once: the other completions start when the first has its prompt in the cache,
        and take its full pages from there."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_COMPLETIONS:
            raise ConfigError(f"n must be an integer in [1, {MAX_COMPLETIONS}], got {n!r}")
        unknown = set(kwargs) - set(_SUBMIT_DEFAULTS)
        if unknown:
            raise ConfigError(f"submit_n got an unknown argument {sorted(unknown)[0]!r}; it takes "
                              f"{', '.join(_SUBMIT_DEFAULTS)}")
        return self._submit_n(prompt, n, {**_SUBMIT_DEFAULTS, **kwargs})

    def _submit_n(self, prompt, n: int, arguments: dict) -> list:
        options = {name: arguments[name] for name in _SUBMIT_DEFAULTS}
        return_logits = options.pop("return_logits")
        schema = schema_from_request(options.pop("response_format"), options.pop("json_schema"))
        stop = options.pop("stop")
        params = SamplingParams(stop=() if stop is None else stop, **options).validate()
        if not isinstance(return_logits, bool):
            raise ConfigError(f"return_logits must be True or False, got {return_logits!r}")
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab_size:
            raise ConfigError(f"logit_bias holds token id {params.logit_bias[-1][0]}, outside the model's "
                              f"vocabulary of {self.vocab_size}")
        ids = self._prompt_ids(prompt)
        max_new_tokens = params.max_new_tokens
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) is "
                              f"{len(ids) + max_new_tokens}, more than the compiled maximum of "
                              f"{self.max_seq_len}; shorten the prompt, lower max_new_tokens or recompile "
                              f"with a larger --max-seq-len")
        grammar = self._grammar_compiler().matcher(schema) if schema is not None else None
        eos = set() if params.ignore_eos or self.tokenizer is None else set(self.tokenizer.eos_token_ids)
        requests = []
        for index in range(n):
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + index)
            request = Request(next(self._ids), ids, seeded, eos=eos, tokenizer=self.tokenizer,
                              return_logits=return_logits,
                              grammar=grammar.copy() if grammar is not None and index else grammar)
            request.seq = ScheduledSequence(request.id, list(ids), len(ids), len(ids) + max_new_tokens)
            requests.append(request)
        if not self.prefix_caching:  # nothing to share: all start at once
            return [self._enqueue(request) for request in requests]
        return [self._enqueue(requests[0], followers=requests[1:])] + requests[1:]

    def _grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise ConfigError("structured output needs the model's tokenizer, and this artifact has none")
        with self._lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.vocab_size,
                                                 self.tokenizer.eos_token_ids)
            return self._grammars

    def _enqueue(self, request: Request, followers: list = ()) -> Request:
        with self._lock:
            if self._closed:
                raise ConfigError("this engine was closed; load the artifact again")
            if followers:
                self._followers[request] = list(followers)
            self._incoming.append(request)
            if self._loop_thread is None:
                self._loop_thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
                self._loop_thread.start()
        return request

    def generate(self, prompt, *, n: int | None = None, **kwargs):
        """Generate from one prompt (text or token ids) -> GenerationResult; from a list of prompts -> a list of
        results in the same order, generated together. With ``n`` (see :meth:`submit_n`) each prompt gives a
        list of ``n`` results instead of one."""
        batch = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list, tuple, np.ndarray))
                                                            for p in prompt)
        groups = []
        try:
            for one in prompt if batch else [prompt]:
                groups.append(self.submit_n(one, 1 if n is None else n, **kwargs))
            results = [[r.result() for r in group] for group in groups]
        finally:
            for group in groups:
                for r in group:
                    r.cancel()
        if n is None:
            results = [group[0] for group in results]
        return results if batch else results[0]

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yield text pieces as they are generated (same arguments as :meth:`submit`). Closing the generator
        cancels the request. For token ids and logprobs with the text, read :meth:`Request.events`."""
        request = self.submit(prompt, **kwargs)
        try:
            yield from request.stream()
        finally:
            request.cancel()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of ``token_ids``: numpy [len, vocab]."""
        ids = self._prompt_ids(token_ids)
        request = Request(next(self._ids), ids, SamplingParams(max_new_tokens=1).validate(), eos=set(),
                          all_logits=True)
        request.seq = ScheduledSequence(request.id, list(ids), len(ids), len(ids), all_logits=True)
        self._enqueue(request)
        try:
            return request.result().logits
        finally:
            request.cancel()

    def embed(self, texts, **kwargs):
        """Refused: a causal LM's artifact has no embedding entry (compile a sentence-transformers or BERT model)."""
        raise ConfigError(f"this artifact is a causal language model ({self.manifest['model'].get('name')}), which "
                          f"has no embedding entry; compile a sentence-transformers or BERT directory to embed text")

    def chat(self, messages: list, *, add_generation_prompt: bool = True, stream: bool = False, **kwargs):
        """Apply the model's chat template (in jinja2's sandbox) and generate the reply. The previous turns'
        tokens are usually still in the prefix cache, so a turn prefills mostly its new message."""
        ids = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
        if stream and kwargs.get("n") is not None:
            raise ConfigError("chat(stream=True) streams one reply; for n replies use submit_n(chat_prompt(...), n) "
                              "and read each request's events()")
        return self.stream(ids, **kwargs) if stream else self.generate(ids, **kwargs)

    def chat_prompt(self, messages: list, *, add_generation_prompt: bool = True) -> list:
        """The token ids of ``messages`` rendered with the chat template (for :meth:`submit`)."""
        prompt = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        self._check_text(prompt, "the rendered chat")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if self.tokenizer.bos_token_id is not None and self.manifest["tokenizer"].get("add_bos_token") and \
                (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        return self._checked_ids(ids, "the rendered chat's text")

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

    # the loop thread ------------------------------------------------------------------
    def _loop(self) -> None:
        """Step until no request is left, then end (the next submit starts a new loop), so an idle engine holds
        no thread and can be garbage-collected. A bug in the loop fails every request instead of leaving its
        callers waiting."""
        try:
            self._steps()
        except BaseException as err:
            with self._lock:
                self._loop_thread = None
                stranded, self._incoming = list(self._incoming) + list(self._requests.values()), []
                stranded += [r for followers in self._followers.values() for r in followers]
                self._followers.clear()
            failure = ConfigError(f"kiln's engine loop failed: {type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:200]}; this is a bug in kiln, please report it")
            for request in stranded:
                request.fail(failure)
            for seq in list(self._requests):
                self.scheduler.finish(seq)
                self._release(seq)
            self._requests.clear()
            raise

    def _steps(self) -> None:
        while True:
            with self._lock:
                if self._closed or (not self._incoming and not self._requests):
                    self._loop_thread = None
                    return
                incoming, self._incoming = self._incoming, []
            for request in incoming:
                if request.cancelled:
                    request.finish("cancelled")
                    self._release_followers(request)
                    continue
                try:
                    self.scheduler.add(request.seq)
                except ConfigError as err:
                    request.fail(err)
                    self._release_followers(request)
                    continue
                self._requests[request.seq] = request
            for seq, request in list(self._requests.items()):
                if request.cancelled:
                    request.finish("cancelled")
                    self._end(seq)
            if not self.scheduler.has_work():
                continue
            drafts = self._propose()
            plan = self.scheduler.schedule({seq: draft.tokens for seq, draft in drafts.items()})
            for seq in plan.preempted:
                self._release(seq)
            if not plan.chunks:
                continue
            try:
                logits, argmax = self._run(plan)
            except BaseException as err:  # noqa: BLE001 - the loop outlives a failed step; its requests fail
                error = err if isinstance(err, KilnError) else ConfigError(
                    f"the {self.info.backend} backend failed a step: {type(err).__name__}: "
                    f"{' '.join(str(err).split())[:200]}")
                for chunk in plan.chunks:
                    self._requests[chunk.seq].fail(error)
                    self._end(chunk.seq)
                if not isinstance(err, Exception):
                    raise
                continue
            self.scheduler.complete(plan)
            self._hand_out(plan, logits, argmax, drafts)

    def _propose(self) -> dict:
        """The drafter's proposals (Sequence -> Draft) for the running sequences that decode next step."""
        if self.drafter is None:
            return {}
        decoding = [seq for seq in self.scheduler.running
                    if len(seq.tokens) - seq.num_computed == 1 and len(seq.tokens) < seq.max_tokens]
        if not decoding:
            return {}
        return self.drafter.propose([self._requests[seq] for seq in decoding],
                                    [seq.max_tokens - len(seq.tokens) for seq in decoding])

    def _run(self, plan) -> tuple:
        """Check the planned batch (the one gate every batch passes before a backend sees it) and run one step:
        (logits [rows, vocab], None), or (None, (each row's argmax, the logit there)) when every request that
        samples in it takes the argmax alone (greedy, nothing else reading its logits). The backend then takes the
        argmax where it runs, when it can, and copies two numbers per row instead of the row."""
        chunks = plan.chunks
        counts = [chunk.count for chunk in chunks]
        token_ids = np.fromiter((t for c in chunks for t in c.tokens), np.int64, sum(counts))
        positions = np.fromiter((p for c in chunks for p in range(c.start, c.start + c.count)), np.int64,
                                sum(counts))
        token_seq = np.repeat(np.arange(len(chunks), dtype=np.int32), counts)
        starts = np.cumsum([0] + counts[:-1])
        rows = np.fromiter((start + o for start, c in zip(starts, chunks) for o in c.logit_offsets), np.int64)
        if token_ids.size == 0 or token_ids.min() < 0 or token_ids.max() >= self.vocab_size:
            raise ConfigError(f"token ids must be in [0, {self.vocab_size}), got a step of {token_ids.size} tokens "
                              f"in {token_ids.min(initial=0)}..{token_ids.max(initial=0)}")
        if positions.max() >= self.max_seq_len:
            raise ConfigError(f"{positions.max() + 1} tokens exceed the compiled maximum of {self.max_seq_len}")
        table = self.scheduler.page_table([c.seq for c in chunks])
        for chunk in chunks:
            self._first_page[chunk.seq] = chunk.seq.pages[0]
            self._requests[chunk.seq].times.setdefault("admitted", time.perf_counter())
        decode = (len(chunks) <= DECODE_STEP_MAX_TOKENS and all(c.count == 1 for c in chunks)
                  and rows.size == len(chunks))
        inputs = {"token_ids": token_ids, "positions": positions, "token_seq": token_seq, "page_table": table,
                  "logit_rows": rows}
        function = self._decode_function if decode else STEP
        argmax_only = rows.size > 0 and all(
            not c.draft and not c.seq.all_logits and self._requests[c.seq].argmax_only for c in chunks)
        logits = argmax = None
        if argmax_only and self._device_argmax:
            argmax = self.executor.step(function, inputs, want="argmax")
        else:
            logits = self.executor.step(function, inputs)
            if argmax_only:  # numpy's argmax, as the sampler takes it, without the sampler's float64 copy
                ids = logits.argmax(axis=1)
                argmax, logits = (ids, logits[np.arange(ids.size), ids]), None
        stats = self.step_stats
        stats["steps"] += 1
        stats["tokens"] += int(token_ids.size)
        stats["draft_tokens"] += sum(len(c.draft) for c in chunks)
        stats["peak_pages_in_use"] = max(stats["peak_pages_in_use"], self.pool.num_in_use())
        return logits, argmax

    def _hand_out(self, plan, logits: np.ndarray | None, argmax: tuple | None, drafts: dict) -> None:
        row = 0
        for chunk in plan.chunks:
            seq, request = chunk.seq, self._requests[chunk.seq]
            mine = logits[row:row + len(chunk.logit_offsets)] if logits is not None else None
            row += len(chunk.logit_offsets)
            if seq.all_logits:
                request.accept_all([chunk.start + o for o in chunk.logit_offsets], mine)
                if chunk.samples:
                    request.finish("length")
                    self._end(seq)
                continue
            if chunk.samples and self._followers:
                self._release_followers(request)  # its prompt's full pages are in the prefix cache now
            try:
                if chunk.draft:
                    probs = drafts[seq].probs
                    before = request.accepted_draft_tokens
                    accepted, going_on = request.accept_draft(
                        mine, chunk.draft, None if probs is None else probs[:len(chunk.draft)])
                    self.step_stats["accepted_draft_tokens"] += request.accepted_draft_tokens - before
                    if going_on:
                        self.scheduler.accept_draft(seq, accepted)
                elif not chunk.samples:
                    going_on = True
                elif argmax is not None:
                    going_on = request.accept_argmax(argmax[0][row - 1], argmax[1][row - 1])
                else:
                    going_on = request.accept(mine[-1])
            except Exception as err:  # noqa: BLE001 - a sampling error fails its own request, not the loop
                request.fail(err if isinstance(err, KilnError) else ConfigError(
                    f"sampling failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"))
                going_on = False
            if not going_on:
                self._end(seq)

    def _end(self, seq) -> None:
        """A finished or cancelled request: its pages go back (full ones stay in the prefix cache)."""
        self.scheduler.finish(seq)
        self._release(seq)
        request = self._requests.pop(seq, None)
        if request is not None:
            self._release_followers(request)

    def _release_followers(self, request: Request) -> None:
        """submit_n's other completions join the queue once the first has computed its prompt (or ended)."""
        with self._lock:
            followers = self._followers.pop(request, None)
            if followers:
                self._incoming.extend(followers)

    def _release(self, seq) -> None:
        if self.drafter is not None:
            self.drafter.forget(seq)
        first = self._first_page.pop(seq, None)
        if first is not None:
            self.executor.end_sequence(first)

    # prompts ------------------------------------------------------------------------------
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


# submit's keyword arguments and their defaults, which submit_n and generate pass through
_SUBMIT_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(Engine.submit).parameters.items()
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_against_module(info: ArtifactInfo, spec: KVCacheSpec) -> None:
    """The manifest's KV-cache spec is the one the library was compiled for (the hashed IR records it), and the
    cache fits in this machine's memory: both before anything is allocated."""
    from kiln.ir.errors import ParseError
    from kiln.ir.files import memory_bytes
    from kiln.ir.parser import parse_metadata

    try:
        compiled = parse_metadata(info.read_text(info.manifest["module"], "module")).get("kv_cache")
    except ParseError as err:
        raise ArtifactError(f"{info.path}: {info.manifest['module']}: {err}; recompile the artifact") from None
    declared = info.manifest["kv_cache"]
    if compiled != declared:
        differ = sorted(k for k in set(declared) | set(compiled or {})
                        if (compiled or {}).get(k) != declared.get(k))
        raise ArtifactError(f"{info.path}: manifest field kv_cache differs from the spec the model was compiled "
                            f"with (in {', '.join(differ)}); the manifest was edited, recompile the artifact")
    if spec.total_bytes > memory_bytes():
        raise ArtifactError(f"{info.path}: the KV cache takes {spec.total_bytes:,} bytes, more than this "
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
