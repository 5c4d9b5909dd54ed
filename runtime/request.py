"""One submitted generation: its sampling state on the engine's loop thread, its text and result for the caller.

The engine's loop thread feeds a request the logits of each new position (``accept``): it samples with the
request's own parameters and seed (under its grammar's mask, for structured output), detokenizes, matches stop
strings, and queues text pieces with their tokens. The caller reads them from any thread with ``stream()`` (text)
or ``events()`` (text, token ids, log-probabilities), or waits for ``result()``; ``cancel()`` ends it early and
frees its pages at the engine's next step.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from .detokenize import IncrementalDetokenizer
from .grammar import GrammarMatcher
from .sampling import Choice, Sampler, SamplingParams, check_finite
from .stopping import StopStringMatcher

_END = object()  # queued after the last piece


@dataclass
class GenerationResult:
    text: str
    token_ids: list
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    stats: dict = field(default_factory=dict)
    logits: np.ndarray | None = None
    prompt_token_ids: list = field(default_factory=list)
    # with logprobs=True: one TokenLogprob (token_id, logprob, top_logprobs) per entry of token_ids
    logprobs: list | None = None


class StreamEvent(NamedTuple):
    """A piece of a request's output as :meth:`Request.events` yields it: new text and the tokens that made it.

    Text held back (an incomplete UTF-8 character, a possible stop string) comes with a later event, so an
    event's ``text`` may be empty only when it carries the last tokens. Joined in order, the events' texts are
    the result's text, their ``token_ids`` its token ids and their ``logprobs`` (None unless logprobs=True)
    its logprobs."""

    text: str
    token_ids: list
    logprobs: list | None


class Request:
    """A generation in the engine. Made by :meth:`Engine.submit`; safe to read from any thread."""

    def __init__(self, request_id: int, prompt_ids: list, params: SamplingParams, *, eos: set,
                 tokenizer=None, return_logits: bool = False, all_logits: bool = False,
                 grammar: GrammarMatcher | None = None):
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self._eos = eos
        self._sampler = Sampler(params)
        self._grammar = grammar
        self._detok = IncrementalDetokenizer(tokenizer.backend) if tokenizer is not None else None
        self._matcher = StopStringMatcher(params.stop) if params.stop else None
        self._return_logits = return_logits
        self._all_logits = all_logits  # Engine.logits: every prompt position's logits, nothing sampled
        self._kept_logits: list = []
        self._logits_at: dict = {}  # position -> logits, for Engine.logits
        self._accepted = 0  # positions sampled (a verifying step samples several)
        self._steps = 0  # steps that gave this request logits to sample from
        self.draft_tokens = 0  # speculative decoding: draft tokens verified, and those accepted (stats)
        self.accepted_draft_tokens = 0
        self._new_ids: list = []
        self._logprobs: list = []
        self._unsent = 0  # tokens of _new_ids not yet in an event
        self._text: list = []
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False
        self.seq = None  # the scheduler's Sequence, set when the engine takes the request
        self.times = {"submitted": time.perf_counter()}
        # the next token is the argmax of the logits and nothing else reads them (no logprobs, penalties, bias,
        # grammar or kept logits): the engine may hand it the argmax alone (accept_argmax)
        self.argmax_only = (params.temperature == 0 and not params.logprobs and params.repetition_penalty == 1
                            and not params.presence_penalty and not params.frequency_penalty
                            and not params.logit_bias and grammar is None and not return_logits and not all_logits)

    # the caller's side ------------------------------------------------------------------
    def stream(self) -> Iterator[str]:
        """Text pieces as they are generated; raises the request's error if it failed. Read a request through
        one of stream() and events(), not both: they take from the same queue."""
        for event in self.events():
            if event.text:
                yield event.text

    def events(self) -> Iterator[StreamEvent]:
        """:class:`StreamEvent` (text, token_ids, logprobs) as they are generated; raises the request's error
        if it failed."""
        while True:
            event = self._pieces.get()
            if event is _END:
                break
            yield event
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish; its :class:`GenerationResult` (or its error, raised)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """Stop generating; the engine's loop sees it before its next step and frees the pages. No-op once
        finished."""
        if not self._done.is_set():
            self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # the engine loop's side ---------------------------------------------------------------
    def accept(self, logits: np.ndarray) -> bool:
        """Sample the next token from ``logits`` [vocab]; returns whether the request goes on (False: finished,
        with its result set)."""
        self._steps += 1
        return self._take(self._choose(logits))

    def accept_argmax(self, token_id: int, logit: float) -> bool:
        """:meth:`accept` for an ``argmax_only`` request, given the argmax of its logits (the lowest index among
        ties) and the logit there, which must be finite as the sampler requires."""
        self._steps += 1
        self._mark_position()
        check_finite(logit)
        return self._take(Choice(int(token_id), None))

    def accept_draft(self, rows: np.ndarray, draft: list, draft_probs: np.ndarray | None) -> tuple[int, bool]:
        """Speculative decoding: ``rows`` [len(draft) + 1, vocab] are the target's logits after the last token
        and after each draft token. Each row gives the next token exactly as :meth:`accept` would (penalties,
        grammar, stop strings, logprobs all see the tokens taken before it), under the acceptance rule where a
        draft model drew the token from ``draft_probs`` [len(draft), vocab] (None: the draft is a point mass, so
        drawing from the target's distribution and keeping the draft where they agree is the rule). Stops at
        the first token that differs from the draft. Returns (draft tokens accepted, whether the request goes
        on)."""
        self._steps += 1
        self.draft_tokens += len(draft)
        for index, row in enumerate(rows):
            proposed = draft[index] if index < len(draft) else None
            if proposed is not None and draft_probs is not None:
                choice = self._choose(row, proposed, draft_probs[index])
            else:
                choice = self._choose(row)
            if choice.token_id == proposed:
                self.accepted_draft_tokens += 1  # before _take, which may finish the request and its stats
            if not self._take(choice) or choice.token_id != proposed:
                break  # the last row has no draft token, so the loop always ends here
        return index, not self._done.is_set()

    def _mark_position(self) -> None:
        """A position is being sampled: the first one ends the prefill's time."""
        self.times.setdefault("first_token", time.perf_counter())
        self._accepted += 1

    def _choose(self, logits: np.ndarray, draft_token: int | None = None, draft_probs: np.ndarray | None = None):
        self._mark_position()
        if self._return_logits:
            self._kept_logits.append(np.array(logits, dtype=np.float32))
        grammar = self._grammar
        allowed = grammar.allowed_tokens() if grammar is not None else None
        if draft_probs is not None:
            return self._sampler.verify(logits, draft_token, draft_probs, self.seq.tokens,
                                        generated_token_ids=self._new_ids, allowed=allowed)
        return self._sampler.choose(logits, self.seq.tokens, generated_token_ids=self._new_ids, allowed=allowed)

    def _take(self, choice) -> bool:
        """Append a chosen token (or finish on end-of-sequence); returns whether the request goes on."""
        grammar = self._grammar
        token = choice.token_id
        # a grammar allows end-of-sequence only once its match is complete, and that ends it even with ignore_eos
        if token in self._eos or (grammar is not None and grammar.is_eos(token)):
            self.finish("stop")
            return False
        if grammar is not None:
            grammar.advance(token)
        self._new_ids.append(token)
        self._unsent += 1
        if choice.logprob is not None:
            self._logprobs.append(choice.logprob)
        self.seq.tokens.append(token)
        piece = self._detok.push(token) if self._detok else ""
        if self._matcher is not None and piece:
            piece, stopped = self._matcher.feed(piece)
            self._emit(piece)
            if stopped:
                self.finish("stop")
                return False
        else:
            self._emit(piece)
        if grammar is not None and grammar.finished:
            self.finish("stop")
            return False
        if len(self._new_ids) >= self.params.max_new_tokens:
            self.finish("length")
            return False
        return True

    def accept_all(self, positions, rows: np.ndarray) -> None:
        """Engine.logits: keep these positions' logits (a preempted request computes some positions again)."""
        for position, row in zip(positions, rows):
            self._logits_at[position] = np.asarray(row, dtype=np.float32)

    def _emit(self, piece: str, last: bool = False) -> None:
        """Queue ``piece`` with the tokens generated since the previous event. Without text the tokens wait for
        the next piece, unless this is the last event or there is no tokenizer (every event's text is empty)."""
        if not piece and not (self._unsent and (last or self._detok is None)):
            return
        self._text.append(piece)
        start = len(self._new_ids) - self._unsent
        logprobs = self._logprobs[start:] if self.params.logprobs else None
        self._pieces.put(StreamEvent(piece, self._new_ids[start:], logprobs))
        self._unsent = 0

    def finish(self, reason: str) -> None:
        if self._done.is_set():
            return
        if not self._all_logits:
            tail = ""
            if self._matcher is None or not self._matcher.stopped:
                tail = self._detok.flush() if self._detok else ""
                if self._matcher is not None:
                    tail, _ = self._matcher.feed(tail) if tail else ("", False)
                    tail += self._matcher.flush() if not self._matcher.stopped else ""
            self._emit(tail, last=True)
        self.times["finished"] = time.perf_counter()
        if self._all_logits:
            logits = np.stack([self._logits_at[p] for p in sorted(self._logits_at)])
        elif self._return_logits:
            logits = np.stack(self._kept_logits) if self._kept_logits else np.zeros((0, 0), np.float32)
        else:
            logits = None
        self._result = GenerationResult(text="".join(self._text), token_ids=list(self._new_ids), finish_reason=reason,
                                        stats=self._stats(), logits=logits, prompt_token_ids=self.prompt_ids,
                                        logprobs=list(self._logprobs) if self.params.logprobs else None)
        self._done.set()
        self._pieces.put(_END)

    def fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self._error = error
        self.times["finished"] = time.perf_counter()
        self._done.set()
        self._pieces.put(_END)

    def _stats(self) -> dict:
        t = self.times
        admitted = t.get("admitted", t["submitted"])
        first = t.get("first_token", t["finished"])
        prefill = first - admitted
        decode = t["finished"] - first
        steps = max(self._steps - 1, 0)  # every step after the first was a decode (or verifying) step
        decoded = max(self._accepted - 1, 0)  # the positions those steps sampled
        computed = len(self.prompt_ids) - (self.seq.cached_prompt_tokens if self.seq is not None else 0)
        return {
            "prompt_tokens": len(self.prompt_ids), "new_tokens": len(self._new_ids),
            "cached_prompt_tokens": self.seq.cached_prompt_tokens if self.seq is not None else 0,
            "preemptions": self.seq.num_preemptions if self.seq is not None else 0,
            "queue_seconds": admitted - t["submitted"],
            "time_to_first_token": first - t["submitted"],
            "prefill_seconds": prefill, "decode_seconds": decode,
            # the prompt tokens this request computed (not those served from the prefix cache)
            "prefill_tokens_per_s": computed / prefill if prefill > 0 else float("inf"),
            "decode_steps": steps,
            "decode_tokens_per_s": decoded / decode if decode > 0 and decoded else 0.0,
            "draft_tokens": self.draft_tokens, "accepted_draft_tokens": self.accepted_draft_tokens,
        }
