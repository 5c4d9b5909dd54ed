"""Continuous batching: which tokens of which sequences the next model step computes.

Each step gets a plan under a token budget (decodes first, then running prefills in chunks, then new
sequences, first served from the prefix cache), KV pages are allocated as tokens are planned, and the newest
running sequence is preempted for recompute when the pool runs dry.

Per step the engine calls: ``plan = schedule(drafts)``; run the model on ``plan`` (``page_table``);
``complete(plan)``; append a sampled token to each sequence whose chunk reached its end (with speculative
decoding, the accepted draft tokens and the target's next one, then ``accept_draft``); ``finish()`` the ones that
are done.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from kiln.ir.errors import ConfigError

from .pages import PagePool


@dataclass(eq=False)
class Sequence:
    """One request's tokens and where their K/V live. Compared by identity: two requests may hold equal
    tokens."""

    request_id: int
    tokens: list[int]  # prompt then generated tokens; the engine appends sampled tokens
    prompt_len: int
    max_tokens: int  # the most tokens this sequence may ever hold (prompt + max_new_tokens, capped by max_seq_len)
    all_logits: bool = False  # logits at every prompt position (perplexity), not just the last
    pages: list[int] = field(default_factory=list)  # in position order: the page table's row
    num_computed: int = 0  # tokens whose K/V are in the cache
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at the first admission
    status: str = "waiting"  # "waiting" | "running" | "finished"
    arrival: int = -1  # FIFO order, set by Scheduler.add and kept across preemption
    num_preemptions: int = 0


@dataclass
class Chunk:
    """Tokens ``seq.tokens[start:start + count]`` computed in one step, at positions ``start...``."""

    seq: Sequence
    start: int  # == seq.num_computed when planned
    count: int
    # offsets within the chunk whose logits the engine needs: count - 1 when the chunk reaches the end of
    # the known tokens, and every prompt position when seq.all_logits
    logit_offsets: list[int]
    # the chunk reaches the end of the known tokens: the engine samples the next token from offset count - 1
    samples: bool = False
    # speculative decoding: proposed tokens after the known ones, the chunk's last len(draft) tokens; their K/V
    # are written but count as computed only once accept_draft verifies them, and every offset has logits
    draft: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        known = self.count - len(self.draft)
        return self.seq.tokens[self.start:self.start + known] + self.draft


@dataclass
class StepPlan:
    chunks: list[Chunk]  # every sequence at most once, running ones in arrival order, then admitted ones
    preempted: list[Sequence]  # set back to waiting while planning, their pages released

    @property
    def num_tokens(self) -> int:
        return sum(chunk.count for chunk in self.chunks)


class Scheduler:
    """Plans each step's ragged batch over a :class:`PagePool`. Pure bookkeeping on one thread: no model,
    no locks.

    ``token_budget`` bounds the tokens of one step and must cover ``max_running`` decodes, so every
    running decode is planned every step: no sequence starves and every step with work makes progress.
    """

    def __init__(self, pool: PagePool, pages_per_seq: int, max_running: int = 16, token_budget: int = 256):
        if max_running < 1 or pages_per_seq < 1:
            raise ConfigError(f"a scheduler needs max_running >= 1 and pages_per_seq >= 1, got {max_running} and "
                              f"{pages_per_seq}")
        if token_budget < max_running:
            raise ConfigError(f"a token budget of {token_budget} cannot hold one decode for each of "
                              f"{max_running} running sequences: raise the budget or lower max_running")
        self.pool = pool
        self.pages_per_seq = pages_per_seq
        self.max_running = max_running
        self.token_budget = token_budget
        self._running: list[Sequence] = []  # by arrival
        self._waiting: list[Sequence] = []  # by arrival: preempted sequences come back ahead of new ones
        self._next_arrival = 0
        self._preemptions = 0

    # queues -------------------------------------------------------------------
    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def stats(self) -> dict:
        return {"pages_in_use": self.pool.num_in_use(), "pages_free": self.pool.num_free(),
                "running": len(self._running), "waiting": len(self._waiting), "preemptions": self._preemptions,
                "prefix_queries_tokens": self.pool.stats["prefix_queries_tokens"],
                "prefix_hit_tokens": self.pool.stats["prefix_hit_tokens"]}

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FIFO); refused with a ConfigError when it could never fit."""
        assert seq.status == "waiting" and not seq.pages and seq.num_computed == 0 and seq.arrival < 0, \
            f"request {seq.request_id} was already added"
        size = self.pool.page_size
        if not seq.tokens:
            raise ConfigError(f"request {seq.request_id} has no tokens: a prompt needs at least one")
        if len(seq.tokens) > seq.max_tokens:
            raise ConfigError(f"a prompt of {len(seq.tokens):,} tokens is longer than the {seq.max_tokens:,} "
                              f"tokens its sequence may hold: shorten the prompt")
        need = -(-seq.max_tokens // size)
        request = (f"a request of {seq.max_tokens:,} tokens (prompt {seq.prompt_len:,} + max_new_tokens "
                   f"{seq.max_tokens - seq.prompt_len:,}) needs {need:,} pages of {size} tokens")
        if need > self.pages_per_seq:
            raise ConfigError(f"{request}; a sequence may hold {self.pages_per_seq:,} "
                              f"({self.pages_per_seq * size:,} tokens): lower max_new_tokens or compile with a "
                              f"larger --max-seq-len")
        if need > self.pool.num_pages:
            raise ConfigError(f"{request}; the KV cache has {self.pool.num_pages:,} "
                              f"({self.pool.num_pages * size:,} tokens): lower max_new_tokens or compile with a "
                              f"larger --kv-cache-budget")
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self._waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """The sequence is done or cancelled, waiting or running: its pages go back at once (cached ones stay
        cached, evictable). Idempotent."""
        if seq.status == "finished":
            return
        (self._running if seq.status == "running" else self._waiting).remove(seq)
        self.pool.release(seq.pages)
        seq.pages = []
        seq.status = "finished"

    # planning -----------------------------------------------------------------
    def schedule(self, drafts: Mapping[Sequence, list[int]] | None = None) -> StepPlan:
        """The next step's chunks: running sequences in arrival order, each taking all its uncomputed tokens
        or what is left of the budget once the decodes after it are counted; then waiting sequences, FIFO,
        while the budget, max_running and free pages allow. A step that had to preempt admits nobody.

        ``drafts`` (speculative decoding) proposes tokens after a decoding sequence's last one: they join its
        chunk with what is left of the budget and of the free pages once everything else is planned, so a
        draft never preempts or delays a sequence."""
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        budget = self.token_budget
        # decodes not planned yet: a prefill leaves room for them, so every running decode runs every step
        unplanned_decodes = {seq for seq in self._running if len(seq.tokens) - seq.num_computed == 1}
        index = 0
        while index < len(self._running):
            seq = self._running[index]
            unplanned_decodes.discard(seq)
            count = min(len(seq.tokens) - seq.num_computed, budget - len(unplanned_decodes))
            if count <= 0:  # nothing to compute (the engine has not finished it yet) or no budget left
                index += 1
                continue
            grown = self._grow(seq, seq.num_computed + count, preempted)
            unplanned_decodes.difference_update(preempted)
            if not grown:
                continue  # it preempted itself: the next sequence moved to this index
            chunks.append(self._chunk(seq, count))
            budget -= count
            index += 1
        while not preempted and self._waiting and len(self._running) < self.max_running and budget > 0:
            seq = self._waiting[0]
            count = self._admit(seq, budget)
            if count == 0:
                break  # FIFO: the head waits for pages, and nobody overtakes it
            chunks.append(self._chunk(seq, count))
            budget -= count
        for chunk in chunks:
            draft = (drafts or {}).get(chunk.seq)
            if draft and budget > 0 and chunk.count == 1 and chunk.samples and not chunk.seq.all_logits:
                budget -= self._add_draft(chunk, draft[:budget])
        return StepPlan(chunks, preempted)

    def _add_draft(self, chunk: Chunk, draft: list[int]) -> int:
        """Extend a decode's chunk with as much of ``draft`` as the sequence's max_tokens and the free pages
        allow, without preempting; returns the number of draft tokens taken."""
        seq, size = chunk.seq, self.pool.page_size
        end = chunk.start + chunk.count  # == len(seq.tokens)
        room = min(seq.max_tokens, (len(seq.pages) + self.pool.num_free()) * size) - end
        draft = draft[:max(room, 0)]
        if not draft:
            return 0
        pages = self.pool.allocate(-(-(end + len(draft)) // size) - len(seq.pages))
        assert pages is not None
        seq.pages += pages
        chunk.draft = list(draft)
        chunk.count += len(draft)
        chunk.logit_offsets = list(range(chunk.count))
        return len(draft)

    def _grow(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Give a running sequence pages for ``num_tokens`` tokens, preempting the latest arrivals while the
        pool is short; False when the sequence itself was the latest and was preempted."""
        assert num_tokens <= seq.max_tokens, \
            f"request {seq.request_id} holds {num_tokens} tokens, past its max_tokens {seq.max_tokens}"
        need = -(-num_tokens // self.pool.page_size) - len(seq.pages)
        while (pages := self.pool.allocate(need)) is None:
            victim = self._running[-1]
            assert victim is not seq or len(self._running) > 1, \
                f"request {seq.request_id} alone cannot get {need} pages: the pool's accounting is wrong"
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.pages += pages
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Back to waiting, ahead of every sequence that arrived after it; recomputed from scratch (or from
        the prefix cache, where its own pages may still be) when admitted again."""
        self._running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages = []
        seq.num_computed = 0
        seq.status = "waiting"
        seq.num_preemptions += 1
        self._preemptions += 1
        bisect.insort(self._waiting, seq, key=lambda s: s.arrival)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Move the head of the waiting queue to running with pages for its first chunk, when they are free
        without preempting anyone; returns the chunk's token count, 0 when it must wait."""
        size = self.pool.page_size
        # At least one token is left to compute (its logits pick the next token), so the hit stops short of
        # the last one. A caller of all_logits wants logits the cache cannot give, so it computes everything.
        query = seq.tokens[:len(seq.tokens) - 1]
        hit = [] if seq.all_logits else self.pool.match(query)
        count = min(len(seq.tokens) - len(hit) * size, budget)
        need = -(-(len(hit) * size + count) // size) - len(hit)
        # taking the hit's references removes its unreferenced pages from what allocate can hand out
        if need > self.pool.num_free() - sum(1 for page in hit if self.pool.ref_count(page) == 0):
            return 0
        if not seq.all_logits:
            hit = self.pool.lookup(query)  # the same pages: nothing changed since match
        pages = self.pool.allocate(need)
        assert pages is not None
        seq.pages = hit + pages
        seq.num_computed = len(hit) * size
        if seq.num_preemptions == 0:
            seq.cached_prompt_tokens = min(seq.num_computed, seq.prompt_len)
        seq.status = "running"
        self._waiting.remove(seq)
        bisect.insort(self._running, seq, key=lambda s: s.arrival)
        return count

    @staticmethod
    def _chunk(seq: Sequence, count: int) -> Chunk:
        start = seq.num_computed
        offsets = []
        if seq.all_logits:
            offsets = list(range(min(count, seq.prompt_len - start)))
        samples = start + count == len(seq.tokens)
        if samples and count - 1 not in offsets:
            offsets.append(count - 1)
        return Chunk(seq, start, count, offsets, samples)

    def complete(self, plan: StepPlan) -> None:
        """The engine ran ``plan``: its tokens' K/V are in the cache. Call before appending sampled tokens.
        Sequences finished (cancelled) since the plan are skipped."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status != "running":
                continue
            assert chunk.start == seq.num_computed, f"request {seq.request_id}: a plan completed twice or stale"
            seq.num_computed += chunk.count - len(chunk.draft)
            self.pool.register(seq.tokens, seq.pages, seq.num_computed)

    def accept_draft(self, seq: Sequence, accepted: int) -> None:
        """After :meth:`complete`, the engine verified a chunk's draft: its first ``accepted`` tokens are now
        the sequence's (appended to ``seq.tokens`` with the target's next token), so their K/V count as
        computed and full pages of them enter the prefix cache; pages that hold only rejected tokens go back.
        The rejected tokens' K/V left in the last page lie past ``num_computed`` and are overwritten before
        anything reads them. Skipped for a sequence finished since."""
        if seq.status != "running":
            return
        assert seq.num_computed + accepted <= len(seq.tokens), (seq.num_computed, accepted, len(seq.tokens))
        seq.num_computed += accepted
        self.pool.register(seq.tokens, seq.pages, seq.num_computed)
        keep = -(-seq.num_computed // self.pool.page_size)
        self.pool.release(seq.pages[keep:])
        del seq.pages[keep:]

    def page_table(self, seqs: list[Sequence]) -> np.ndarray:
        """int32 [len(seqs), pages_per_seq]: each row the sequence's pages in position order, padded with 0."""
        table = np.zeros((len(seqs), self.pages_per_seq), dtype=np.int32)
        for row, seq in enumerate(seqs):
            table[row, :len(seq.pages)] = seq.pages
        return table

    def check(self) -> None:
        """Assert the scheduler's invariants on top of the pool's: the queues hold the right sequences in
        arrival order, waiting ones hold no pages, running ones hold pages for their computed tokens, and
        every page's reference count is the number of live sequences holding it."""
        self.pool.check()
        assert [s.arrival for s in self._running] == sorted(s.arrival for s in self._running)
        assert [s.arrival for s in self._waiting] == sorted(s.arrival for s in self._waiting)
        assert len(self._running) <= self.max_running
        holders = [0] * self.pool.num_pages
        for seq in self._waiting:
            assert seq.status == "waiting" and not seq.pages and seq.num_computed == 0
        for seq in self._running:
            assert seq.status == "running"
            assert len(seq.pages) == len(set(seq.pages)) <= self.pages_per_seq
            assert seq.num_computed <= len(seq.tokens) <= seq.max_tokens
            assert len(seq.pages) * self.pool.page_size >= seq.num_computed
            for page in seq.pages:
                holders[page] += 1
        assert holders == [self.pool.ref_count(page) for page in range(self.pool.num_pages)], \
            "a page's reference count is not the number of sequences holding it"
