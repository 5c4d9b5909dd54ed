"""The continuous-batching scheduler against a simulated model that keeps, for every page and offset, the
token written there: each chunk must find exactly its sequence's earlier tokens behind its page table, and
the "sampled" token is read back from that cache, so a wrongly shared, leaked or reused page changes the
output. Final tokens are compared with a reference that knows nothing of pages or batches."""

import zlib

import numpy as np
import pytest

from kiln.ir.errors import ConfigError
from kiln.runtime.pages import PagePool
from kiln.runtime.scheduler import Scheduler, Sequence

PAGE = 4


def next_token(tokens) -> int:
    """The fake model's greedy choice: a digest of the whole context."""
    return zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes()) % 1000


def reference(prompt, max_tokens) -> list:
    tokens = list(prompt)
    while len(tokens) < max_tokens:
        tokens.append(next_token(tokens))
    return tokens


class Simulation:
    """The engine's step loop over a fake model: plan, check what the plan's page tables read, write the
    chunks' tokens into the cache, complete, sample from the cache, append, finish."""

    def __init__(self, num_pages, pages_per_seq=16, max_running=4, token_budget=16, prefix_caching=True):
        self.pool = PagePool(num_pages, PAGE, prefix_caching)
        self.scheduler = Scheduler(self.pool, pages_per_seq, max_running, token_budget)
        self.cache = np.full((num_pages, PAGE), -1, dtype=np.int64)
        self.plans = []
        self.logit_positions: dict = {}  # sequence -> positions whose logits were asked for, in order
        self.first_start: dict = {}  # sequence -> where its first chunk started: the prefix-cache hit
        self.next_id = 0

    def add(self, prompt, max_new_tokens, all_logits=False) -> Sequence:
        seq = Sequence(self.next_id, list(prompt), len(prompt), len(prompt) + max_new_tokens, all_logits)
        self.next_id += 1
        self.scheduler.add(seq)
        self.scheduler.check()
        return seq

    def step(self, cancel_after_planning=()):
        scheduler, pool = self.scheduler, self.pool
        plan = scheduler.schedule()
        scheduler.check()
        assert plan.chunks, "a step with work planned nothing"
        assert plan.num_tokens <= scheduler.token_budget
        seqs = [chunk.seq for chunk in plan.chunks]
        assert len(set(seqs)) == len(seqs) and not set(seqs) & set(plan.preempted)
        self.plans.append([(chunk.seq, chunk.start, chunk.count, list(chunk.logit_offsets)) for chunk in plan.chunks])
        table = scheduler.page_table(seqs)
        contexts = []
        for row, chunk in enumerate(plan.chunks):
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.count
            assert seq.status == "running" and start == seq.num_computed and chunk.count >= 1
            self.first_start.setdefault(seq, start)
            assert chunk.samples == (end == len(seq.tokens))
            earlier = np.arange(start)
            assert self.cache[table[row, earlier // PAGE], earlier % PAGE].tolist() == seq.tokens[:start], \
                f"request {seq.request_id} reads other tokens than its own behind its page table"
            new = np.arange(start, end)
            for page in set(table[row, new // PAGE].tolist()):
                # a page being written belongs to this sequence alone and is not in the prefix cache
                assert pool.ref_count(page) == 1 and not pool.is_cached(page)
            self.cache[table[row, new // PAGE], new % PAGE] = seq.tokens[start:end]
            self.logit_positions.setdefault(seq, []).extend(start + offset for offset in chunk.logit_offsets)
            if not seq.all_logits:
                assert chunk.logit_offsets == ([chunk.count - 1] if chunk.samples else [])
            context = np.arange(end)
            contexts.append(self.cache[table[row, context // PAGE], context % PAGE].tolist())
        for seq in cancel_after_planning:
            scheduler.finish(seq)
        scheduler.complete(plan)
        scheduler.check()
        for chunk, context in zip(plan.chunks, contexts):
            seq = chunk.seq
            if chunk.samples and seq.status == "running":
                if len(seq.tokens) < seq.max_tokens:
                    seq.tokens.append(next_token(context))
                if len(seq.tokens) >= seq.max_tokens:
                    scheduler.finish(seq)
                    scheduler.check()
        return plan

    def run(self, arrivals=None, max_steps=5000):
        """Steps until all work is done; ``arrivals`` maps a step number to (prompt, max_new_tokens) pairs
        added before that step."""
        arrivals = dict(arrivals or {})
        added = []
        step = 0
        while arrivals or self.scheduler.has_work():
            for prompt, max_new in arrivals.pop(step, []):
                added.append(self.add(prompt, max_new))
            if self.scheduler.has_work():
                self.step()
            step += 1
            assert step < max_steps
        self.assert_empty()
        return added

    def assert_empty(self):
        self.scheduler.check()
        assert not self.scheduler.has_work()
        assert self.pool.num_in_use() == 0 and self.pool.num_free() == self.pool.num_pages


def random_traffic(seed, count, max_total):
    """(arrival step, prompt, max_new_tokens) triples; half the prompts start with a common 9-token prefix."""
    rng = np.random.default_rng(seed)
    common = [int(t) for t in rng.integers(0, 50, size=9)]
    arrivals: dict = {}
    for _ in range(count):
        prompt = [int(t) for t in rng.integers(0, 50, size=int(rng.integers(1, max_total - 1)))]
        if rng.random() < 0.5:
            prompt = (common + prompt)[:max_total - 1]
        max_new = int(rng.integers(1, max_total - len(prompt) + 1))
        arrivals.setdefault(int(rng.integers(0, 40)), []).append((prompt, max_new))
    return arrivals


@pytest.mark.parametrize("num_pages, max_running, token_budget, prefix_caching", [
    (400, 8, 64, True),  # room for everyone
    (400, 3, 3, True),  # chunked prefill: prompts cross many steps
    (12, 4, 16, True),  # a pool for one longest sequence: preemption
    (12, 4, 16, False),
    (9, 3, 5, True),  # preemption and chunking together
])
def test_random_traffic_gives_the_reference_tokens(num_pages, max_running, token_budget, prefix_caching):
    sim = Simulation(num_pages, pages_per_seq=9, max_running=max_running, token_budget=token_budget,
                     prefix_caching=prefix_caching)
    arrivals = random_traffic(seed=num_pages + token_budget, count=30, max_total=9 * PAGE)
    seqs = sim.run(arrivals)
    assert len(seqs) == 30
    for seq in seqs:
        assert seq.status == "finished"
        assert seq.tokens == reference(seq.tokens[:seq.prompt_len], seq.max_tokens)
        assert seq.cached_prompt_tokens == sim.first_start[seq]  # the first admission's hit, not a later one's
    chunks = [chunk for plan in sim.plans for chunk in plan]
    preemptions = sim.scheduler.stats["preemptions"]
    assert preemptions == sum(seq.num_preemptions for seq in seqs)
    if num_pages < 20:
        assert preemptions > 0  # the tiny pool did force recomputation
    if token_budget <= 5:
        assert any(offsets == [] for _, _, _, offsets in chunks)  # intermediate prefill chunks
        assert max(len(plan) for plan in sim.plans) > 1  # and still batches
    if prefix_caching:
        assert sim.pool.stats["prefix_hit_tokens"] > 0


def test_preemption_recomputes_to_the_same_tokens_as_a_huge_pool():
    arrivals = random_traffic(seed=7, count=20, max_total=8 * PAGE)
    results = []
    for num_pages in (8, 1000):
        sim = Simulation(num_pages, pages_per_seq=8, max_running=6, token_budget=24)
        results.append([seq.tokens for seq in sim.run(arrivals)])
        if num_pages == 8:
            assert sim.scheduler.stats["preemptions"] >= 5
    assert results[0] == results[1]


def test_decodes_are_planned_before_a_running_prefill():
    sim = Simulation(100, max_running=3, token_budget=6)
    first = sim.add([1, 2, 3], 30)
    second, third = sim.add([4], 5), sim.add([5], 5)
    sim.step()  # 3 + 1 + 1 tokens: every prompt done, each sampled one
    first.tokens += list(range(10, 20))  # the engine gave the first 10 more tokens to read (a continuation)
    plan = sim.step()
    assert [(c.seq, c.start, c.count) for c in plan.chunks] == [(first, 3, 4), (second, 1, 1), (third, 1, 1)]
    assert plan.chunks[0].logit_offsets == []  # an intermediate chunk needs no logits


def test_the_latest_arrival_is_preempted_and_comes_back_first():
    sim = Simulation(num_pages=6, pages_per_seq=6, max_running=3, token_budget=30)
    a, b, c = (sim.add([i] * 7, 12) for i in (1, 2, 3))
    late = sim.add([4] * 2, 3)
    assert len(sim.step().chunks) == 3  # 2 pages each; the late one cannot get a page
    assert sim.scheduler.waiting == (late,)
    sim.step()  # position 7 still fits in the second page
    plan = sim.step()  # position 8 needs a third page for a and b: c goes, then b still has none
    assert plan.preempted == [c]
    assert [chunk.seq for chunk in plan.chunks] == [a, b]
    assert c.status == "waiting" and c.pages == [] and c.num_computed == 0 and c.num_preemptions == 1
    assert sim.scheduler.waiting == (c, late)  # ahead of the later arrival
    assert sim.scheduler.running == (a, b)
    sim.run()
    assert c.tokens == reference([3] * 7, 19) and late.tokens == reference([4] * 2, 5)


def test_a_sequence_preempts_itself_when_it_is_the_latest():
    sim = Simulation(num_pages=4, pages_per_seq=4, max_running=2, token_budget=16)
    a, b = sim.add([1] * 7, 9), sim.add([2] * 8, 8)
    sim.step()  # 2 pages each; a next writes position 7 (its second page), b position 8 (a third page)
    plan = sim.step()
    assert plan.preempted == [b] and [chunk.seq for chunk in plan.chunks] == [a]
    assert b.num_preemptions == 1 and sim.scheduler.waiting == (b,)
    sim.run()
    assert b.tokens == reference([2] * 8, 16)


def test_prefix_sharing_hits_shares_pages_and_never_rewrites_them():
    sim = Simulation(num_pages=60, pages_per_seq=8, max_running=8, token_budget=64)
    prefix = list(range(100, 112))  # three pages
    first = sim.add(prefix + [1, 2], 6)
    twin = sim.add(prefix + [1, 2], 6)  # the same prompt at the same time: nothing cached yet
    sim.step()
    assert first.cached_prompt_tokens == twin.cached_prompt_tokens == 0
    shared = first.pages[:3]
    assert all(sim.pool.is_cached(p) for p in shared) and not any(sim.pool.is_cached(p) for p in twin.pages)
    snapshot = sim.cache[shared].copy()
    hits_before = sim.pool.stats["prefix_hit_tokens"]
    others = [sim.add(prefix + [50 + i] * (i + 1), 8) for i in range(6)]
    sim.step()
    assert [seq.cached_prompt_tokens for seq in others] == [12] * 6
    assert all(seq.pages[:3] == shared for seq in others)
    assert [sim.pool.ref_count(p) for p in shared] == [7, 7, 7]  # first and the six others
    assert sim.pool.stats["prefix_hit_tokens"] - hits_before == 6 * 12
    assert sim.scheduler.stats["prefix_hit_tokens"] == sim.pool.stats["prefix_hit_tokens"]
    first_chunks = {seq: (start, count) for seq, start, count, _ in sim.plans[-1]}
    assert all(first_chunks[seq] == (12, i + 1) for i, seq in enumerate(others))  # only the suffixes ran
    sim.run()
    assert (sim.cache[shared] == snapshot).all()
    assert all(sim.pool.is_cached(p) for p in shared)  # unreferenced now, still cached
    for seq in [first, twin] + others:
        assert seq.tokens == reference(seq.tokens[:seq.prompt_len], seq.max_tokens)


def test_a_fully_cached_prompt_still_computes_a_token():
    sim = Simulation(num_pages=20, pages_per_seq=4)
    prompt = list(range(8))  # exactly two pages
    first = sim.add(prompt, 1)
    sim.run()
    again = sim.add(prompt, 3)
    longer = sim.add(prompt + [9], 3)
    plan = sim.step()
    assert [(c.start, c.count, c.logit_offsets) for c in plan.chunks] == [(4, 4, [3]), (8, 1, [0])]
    assert again.cached_prompt_tokens == 4 and longer.cached_prompt_tokens == 8
    assert again.pages[:1] == longer.pages[:1] and longer.pages[1] not in again.pages
    sim.run()
    assert again.tokens == reference(prompt, 11) and again.tokens[:9] == first.tokens
    assert longer.tokens == reference(prompt + [9], 12)


def test_all_logits_asks_for_every_prompt_position_and_skips_the_prefix_cache():
    sim = Simulation(num_pages=20, max_running=1, token_budget=4)
    prompt = list(range(20, 30))
    sim.add(prompt, 1)
    sim.run()  # the prompt's pages are cached now
    scored = sim.add(prompt, 2, all_logits=True)
    sim.run()
    assert scored.cached_prompt_tokens == 0
    assert [(start, count, offsets) for plan in sim.plans[-4:] for _, start, count, offsets in plan] == [
        (0, 4, [0, 1, 2, 3]), (4, 4, [0, 1, 2, 3]), (8, 2, [0, 1]), (10, 1, [0])]
    assert sim.logit_positions[scored] == list(range(11))
    assert scored.tokens == reference(prompt, 12)
    # generated tokens computed again (a continuation, or a recompute after preemption) need no logits
    # unless the chunk reaches the end
    short = sim.add([7, 8], 10, all_logits=True)
    assert sim.step().chunks[0].logit_offsets == [0, 1]
    short.tokens += [1, 2, 3, 4, 5]
    assert [(c.start, c.count, c.logit_offsets) for c in sim.step().chunks] == [(2, 4, [])]
    assert [(c.start, c.count, c.logit_offsets) for c in sim.step().chunks] == [(6, 2, [1])]


def test_finish_cancels_waiting_and_running_sequences_and_is_idempotent():
    sim = Simulation(num_pages=30, pages_per_seq=8, max_running=3, token_budget=6)
    seqs = [sim.add([i] * (5 + 3 * i), 10) for i in range(6)]
    sim.step()  # seqs[0] (5 tokens) and part of seqs[1]
    waiting, prefilling = seqs[4], seqs[1]
    assert waiting.status == "waiting" and prefilling.num_computed < prefilling.prompt_len
    sim.scheduler.finish(waiting)
    sim.scheduler.finish(prefilling)
    sim.scheduler.finish(prefilling)
    sim.scheduler.check()
    assert waiting.status == prefilling.status == "finished" and prefilling.pages == []
    for _ in range(6):
        sim.step()
    decoding = seqs[0]
    assert decoding.status == "running" and len(decoding.tokens) > decoding.prompt_len
    sim.scheduler.finish(decoding)
    planned_then_cancelled = sim.scheduler.running[0]
    sim.step(cancel_after_planning=[planned_then_cancelled])  # finished between schedule() and complete()
    assert planned_then_cancelled.status == "finished" and planned_then_cancelled.pages == []
    sim.run()
    cancelled = {waiting, prefilling, decoding, planned_then_cancelled}
    assert len(cancelled) == 4
    for seq in seqs:
        expected = reference(seq.tokens[:seq.prompt_len], seq.max_tokens)
        if seq in cancelled:
            assert seq.tokens == expected[:len(seq.tokens)] and len(seq.tokens) < seq.max_tokens
        else:
            assert seq.tokens == expected


def test_add_refuses_what_could_never_fit_with_both_numbers():
    scheduler = Scheduler(PagePool(num_pages=1000, page_size=16), pages_per_seq=256)
    with pytest.raises(ConfigError, match=r"^a request of 5,000 tokens \(prompt 100 \+ max_new_tokens 4,900\) "
                                          r"needs 313 pages of 16 tokens; a sequence may hold 256 \(4,096 tokens\)"):
        scheduler.add(Sequence(0, [1] * 100, 100, 5000))
    scheduler = Scheduler(PagePool(num_pages=256, page_size=16), pages_per_seq=400)
    with pytest.raises(ConfigError, match=r"needs 313 pages of 16 tokens; the KV cache has 256 \(4,096 tokens\): "
                                          r"lower max_new_tokens or compile with a larger --kv-cache-budget$"):
        scheduler.add(Sequence(0, [1] * 100, 100, 5000))
    with pytest.raises(ConfigError, match="no tokens"):
        scheduler.add(Sequence(0, [], 0, 10))
    with pytest.raises(ConfigError, match="a prompt of 12 tokens is longer than the 10 tokens"):
        scheduler.add(Sequence(0, [1] * 12, 12, 10))
    assert not scheduler.has_work()
    scheduler.add(Sequence(0, [1] * 100, 100, 256 * 16))  # exactly the whole cache
    assert scheduler.waiting[0].arrival == 0
    with pytest.raises(ConfigError, match="a token budget of 2 cannot hold one decode for each of 3"):
        Scheduler(PagePool(8, 4), pages_per_seq=2, max_running=3, token_budget=2)


def test_page_table_rows_are_the_pages_padded_with_zero():
    sim = Simulation(num_pages=10, pages_per_seq=5)
    a, b = sim.add(list(range(9)), 3), sim.add([7], 3)
    sim.step()
    table = sim.scheduler.page_table([b, a])
    assert table.dtype == np.int32 and table.shape == (2, 5)
    assert table[0].tolist() == b.pages + [0] * 4 and table[1].tolist() == a.pages + [0, 0]
    assert len(set(a.pages + b.pages)) == 4
