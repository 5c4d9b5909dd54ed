"""Speculative decoding: drafters that propose the next tokens of decoding sequences, and the rule that accepts
them so the output keeps the target model's distribution.

The engine verifies a draft of k tokens in one ragged step (k + 1 logit rows of the sequence); the request walks
the rows in order, choosing each token as it would without speculation, and stops at the first that differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kiln.ir.errors import ConfigError
from kiln.ir.kv_cache import DECODE_STEP, DECODE_STEP_MAX_TOKENS, STEP

from .pages import PagePool
from .sampling import Sampler

MAX_SPECULATIVE_TOKENS = 16
SPECULATE_CHOICES = ("ngram", "draft")
_DRAFT_STREAM = 0x5EC  # mixed into a request's seed: the draft's draws are independent of the target's


@dataclass
class Draft:
    """Proposed tokens; ``probs`` [len(tokens), vocab] holds the distribution each was drawn from, or is None
    when the drafter chose them deterministically (a point mass: prompt lookup, or a greedy draft model)."""

    tokens: list
    probs: np.ndarray | None = None


def accept_or_resample(target_probs: np.ndarray, draft_probs: np.ndarray, token: int, rng: np.random.Generator) -> int:
    """Leviathan et al. (2023) / Chen et al. (2023): keep the draft's ``token`` (drawn from ``draft_probs``) with
    probability min(1, p(token) / q(token)), otherwise draw from norm(max(0, p - q)); the result is distributed as
    ``target_probs`` whatever q is. Both are [vocab] probabilities."""
    p, q = target_probs[token], draft_probs[token]
    if rng.random() * q < p:
        return token
    residual = np.maximum(target_probs - draft_probs, 0.0)
    cumulative = np.cumsum(residual)
    # p(token) < q(token) and both sum to 1, so the residual has mass; rounding can only shave it
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(min(index, len(cumulative) - 1))


def check_options(speculate, draft, num_speculative_tokens) -> str | None:
    """The engine's speculation options, checked: the drafter's kind (None: no speculation)."""
    if speculate is None and draft is not None:
        speculate = "draft"
    if speculate is not None and speculate not in SPECULATE_CHOICES:
        raise ConfigError(f"speculate must be None, 'ngram' (prompt lookup) or 'draft' (a draft model), got "
                          f"{speculate!r}")
    if speculate == "draft" and draft is None:
        raise ConfigError("speculate='draft' needs draft=, a draft model's artifact with the same tokenizer")
    if speculate == "ngram" and draft is not None:
        raise ConfigError("draft= gives a draft model, which speculate='ngram' (prompt lookup) does not use; "
                          "pass one of them")
    if not isinstance(num_speculative_tokens, int) or isinstance(num_speculative_tokens, bool) or \
            not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got "
                          f"{num_speculative_tokens!r}")
    return speculate


class PromptLookupDrafter:
    """Prompt lookup (n-gram) drafting, no second model: find the latest earlier occurrence of the sequence's
    last n tokens (n from ``max_ngram`` down to ``min_ngram``) in its prompt and output so far, and propose the
    tokens that followed it. Deterministic, so each proposal is a point mass. One matching token is too weak a
    hint: on SmolLM2 its drafts were accepted half as often as 2-gram ones and cost more than they saved."""

    def __init__(self, num_tokens: int, max_ngram: int = 3, min_ngram: int = 2):
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list, limits: list) -> dict:
        drafts = {}
        for request, limit in zip(requests, limits):
            tokens = self._lookup(request.seq.tokens, min(limit, self.num_tokens))
            if tokens:
                drafts[request.seq] = Draft(tokens)
        return drafts

    def _lookup(self, tokens: list, count: int) -> list:
        history = np.asarray(tokens, dtype=np.int64)
        length = len(history)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            # windows that start early enough to have a token after them, the suffix itself excluded
            windows = np.lib.stride_tricks.sliding_window_view(history[:length - 1], n)
            starts = np.flatnonzero((windows == history[length - n:]).all(axis=1))
            if starts.size:
                follow = int(starts[-1]) + n
                return [int(t) for t in history[follow:follow + count]]
        return []

    def forget(self, seq) -> None:
        pass

    def close(self) -> None:
        pass


class _DraftState:
    """What the draft model holds for one target sequence: the tokens whose K/V are in its cache, its pages,
    the request's sampling rules (without logprobs) and the generator its sampled drafts draw from."""

    def __init__(self, params):
        self.tokens: list = []
        self.pages: list = []
        self.sampler = Sampler(replace(params, logprobs=False, top_logprobs=0))
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed, _DRAFT_STREAM])


class DraftModelDrafter:
    """A smaller model with the same tokenizer drafts k tokens by k steps of its own (one catch-up chunk per
    sequence, then single-token decodes), over a KV cache of its own. Its cache follows the target's sequence
    by comparing tokens: whatever the target rejected is simply recomputed at the next proposal. A greedy
    request drafts the draft's argmax (a point mass); a sampled one draws from the draft's distribution under
    the request's sampling parameters, which the acceptance rule needs as q."""

    def __init__(self, draft_engine, num_tokens: int):
        self.engine = draft_engine  # its own loop never starts: this drafter steps its executor
        self.executor = draft_engine.executor
        self.spec = draft_engine.spec
        self.num_tokens = num_tokens
        self.pool = PagePool(self.spec.num_pages, self.spec.page_size, prefix_caching=False)
        self.max_sequences = getattr(self.executor, "max_sequences", None)
        self._states: dict = {}  # target Sequence -> _DraftState
        self._decode_function = DECODE_STEP if self.executor.has_function(DECODE_STEP) else STEP
        self.steps = 0

    def propose(self, requests: list, limits: list) -> dict:
        size = self.spec.page_size
        active = []  # (request, state, draft length, first position to compute)
        for request, limit in zip(requests, limits):
            seq = request.seq
            count = min(limit, self.num_tokens, self.spec.max_seq_len + 1 - len(seq.tokens))
            state = self._states.get(seq)
            if count < 1:
                continue
            if state is None:
                if self.max_sequences is not None and len(self._states) >= self.max_sequences:
                    continue
                state = self._states[seq] = _DraftState(request.params)
            same = 0  # the draft's cached tokens that are still the sequence's, at least one left to feed
            for cached, actual in zip(state.tokens, seq.tokens[:-1]):
                if cached != actual:
                    break
                same += 1
            self._truncate(state, same)
            # the draft writes K/V up to position len(tokens) + count - 2 (the last draft token is never fed)
            need = -(-(len(seq.tokens) + count - 1) // size) - len(state.pages)
            pages = self.pool.allocate(need)
            if pages is None:
                self.forget(seq)  # no room in the draft's cache: this sequence decodes without a draft now
                continue
            state.pages += pages
            active.append((request, state, count))
        if not active:
            return {}
        chunks = [(request.seq.tokens[len(state.tokens):], len(state.tokens), state) for request, state, _ in active]
        drafted = {request.seq: ([], []) for request, _, _ in active}
        for round_ in range(max(count for _, _, count in active)):
            logits = self._step(chunks)
            next_chunks = []
            for (request, state, count), (fed, start, _), row in zip(active, chunks, logits):
                state.tokens = state.tokens[:start] + list(fed)
                tokens, probs = drafted[request.seq]
                token, q = self._draw(request, state, row, request.seq.tokens + tokens)
                tokens.append(token)
                probs.append(q)
                if round_ + 1 < count:
                    next_chunks.append(([token], start + len(fed), state))
            active = [entry for entry in active if entry[2] > round_ + 1]
            chunks = next_chunks
        return {seq: Draft(tokens, None if probs[0] is None else np.stack(probs))
                for seq, (tokens, probs) in drafted.items()}

    def _draw(self, request, state: _DraftState, logits: np.ndarray, context: list):
        generated = context[len(request.prompt_ids):]
        token_ids, probs = state.sampler.distribution(logits, context, generated_token_ids=generated)
        if request.params.temperature == 0:
            return int(token_ids[0]), None
        dense = np.zeros(logits.shape[-1], dtype=np.float64)
        dense[token_ids] = probs
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, state.rng.random() * cumulative[-1], side="right"))
        return int(token_ids[min(index, len(token_ids) - 1)]), dense

    def _step(self, chunks: list) -> np.ndarray:
        """One ragged step of the draft model over (tokens, start, state) chunks: the last row's logits of each."""
        counts = [len(tokens) for tokens, _, _ in chunks]
        token_ids = np.fromiter((t for tokens, _, _ in chunks for t in tokens), np.int64, sum(counts))
        positions = np.fromiter((p for tokens, start, _ in chunks for p in range(start, start + len(tokens))),
                                np.int64, sum(counts))
        token_seq = np.repeat(np.arange(len(chunks), dtype=np.int32), counts)
        table = np.zeros((len(chunks), self.spec.pages_per_seq), dtype=np.int32)
        for row, (_, _, state) in enumerate(chunks):
            table[row, :len(state.pages)] = state.pages
        rows = np.cumsum(counts) - 1
        decode = len(chunks) <= DECODE_STEP_MAX_TOKENS and all(count == 1 for count in counts)
        self.steps += 1
        return self.executor.step(self._decode_function if decode else STEP,
                                  {"token_ids": token_ids, "positions": positions, "token_seq": token_seq,
                                   "page_table": table, "logit_rows": rows.astype(np.int64)})

    def _truncate(self, state: _DraftState, length: int) -> None:
        del state.tokens[length:]
        keep = -(-length // self.spec.page_size)
        if keep == 0 and state.pages:
            self.executor.end_sequence(state.pages[0])  # a backend keeping state per sequence starts it again
        self.pool.release(state.pages[keep:])
        del state.pages[keep:]

    def forget(self, seq) -> None:
        """The target's sequence ended: its draft pages go back."""
        state = self._states.pop(seq, None)
        if state is not None:
            self._truncate(state, 0)

    def close(self) -> None:
        for seq in list(self._states):
            self.forget(seq)
        self.engine.close()
