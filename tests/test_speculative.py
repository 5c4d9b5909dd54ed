"""Speculative decoding (prompt lookup and a draft model): greedy output is token-identical to decoding without
speculation and to transformers, on several backends and with requests batched together; sampled output keeps
the target's distribution (chi-square tests against probabilities computed exactly from transformers); the
scheduler's pages stay exact when drafts are rejected (a simulated model that reads back its cache)."""

import re

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ConfigError
from kiln.runtime.speculative import PromptLookupDrafter, accept_or_resample

from test_scheduler import PAGE, Simulation, next_token, random_traffic, reference
from test_serving import PROMPTS, check_no_page_held, hf_greedy
from tiny_models import tiny_model

NEW = 24
ALPHA = 1e-3  # significance level of every chi-square test here


def chi_square_p_value(observed, expected) -> float:
    """Pearson's chi-square test of ``observed`` counts against ``expected`` ones (cells expected below 5 are
    pooled into one): the p-value, from the regularised upper incomplete gamma function."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    statistic = float(((observed - expected) ** 2 / expected).sum())
    degrees = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


# the scheduler ------------------------------------------------------------------------------------------------
class SpeculativeSimulation(Simulation):
    """Simulation's fake model with a fake drafter: each decoding sequence is proposed the reference's next
    tokens, corrupted at a random place half the time; the step writes the drafts into the cache, verification
    reads each position's context back from the cache through the page table, and the accepted count goes to
    accept_draft. Wrongly released, reused or published pages change the tokens or trip the checks."""

    def __init__(self, *args, num_draft=3, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_draft = num_draft
        self.rng = np.random.default_rng(seed)
        self.proposed = self.accepted = 0

    def _drafts(self):
        drafts = {}
        for seq in self.scheduler.running:
            if len(seq.tokens) - seq.num_computed != 1:
                continue
            draft = reference(seq.tokens, len(seq.tokens) + self.num_draft)[len(seq.tokens):]
            if self.rng.random() < 0.5:
                draft[int(self.rng.integers(len(draft)))] = 1000 + int(self.rng.integers(5))  # never right
            drafts[seq] = draft
        return drafts

    def step(self, cancel_after_planning=()):
        scheduler, pool = self.scheduler, self.pool
        plan = scheduler.schedule(self._drafts())
        scheduler.check()
        assert plan.chunks and plan.num_tokens <= scheduler.token_budget
        table = scheduler.page_table([chunk.seq for chunk in plan.chunks])
        for row, chunk in enumerate(plan.chunks):
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.count
            earlier = np.arange(start)
            assert self.cache[table[row, earlier // PAGE], earlier % PAGE].tolist() == seq.tokens[:start]
            new = np.arange(start, end)
            for page in set(table[row, new // PAGE].tolist()):
                assert pool.ref_count(page) == 1 and not pool.is_cached(page)
            self.cache[table[row, new // PAGE], new % PAGE] = chunk.tokens
            if chunk.draft:
                assert chunk.count == 1 + len(chunk.draft) and chunk.logit_offsets == list(range(chunk.count))
                assert end <= seq.max_tokens
        scheduler.complete(plan)
        scheduler.check()
        for row, chunk in enumerate(plan.chunks):
            seq = chunk.seq
            if not chunk.samples:
                continue
            accepted = 0
            for index in range(len(chunk.draft) + 1):
                # the known tokens and the draft's first `index`, as the step left them in the cache
                context = np.arange(chunk.start + chunk.count - len(chunk.draft) + index)
                token = next_token(self.cache[table[row, context // PAGE], context % PAGE].tolist())
                if len(seq.tokens) < seq.max_tokens:
                    seq.tokens.append(token)
                if index == len(chunk.draft) or token != chunk.draft[index] or len(seq.tokens) >= seq.max_tokens:
                    break
                accepted += 1
            self.proposed += len(chunk.draft)
            self.accepted += accepted
            if len(seq.tokens) >= seq.max_tokens:
                scheduler.finish(seq)
            else:
                scheduler.accept_draft(seq, accepted)
                # pages hold computed tokens and nothing more: the rejected drafts' pages went back
                assert len(seq.pages) == -(-seq.num_computed // PAGE)
            scheduler.check()
        return plan


@pytest.mark.parametrize("num_pages, max_running, token_budget", [(400, 8, 64), (400, 3, 6), (12, 4, 16)])
def test_rejected_drafts_leave_exact_pages_and_the_reference_tokens(num_pages, max_running, token_budget):
    sim = SpeculativeSimulation(num_pages, pages_per_seq=9, max_running=max_running, token_budget=token_budget,
                                seed=num_pages)
    seqs = sim.run(random_traffic(seed=num_pages + token_budget, count=30, max_total=9 * PAGE))
    for seq in seqs:
        assert seq.tokens == reference(seq.tokens[:seq.prompt_len], seq.max_tokens)
    assert 0 < sim.accepted < sim.proposed
    # prompts that continue finished sequences' outputs hit pages published by verification: they must hold
    # the verified tokens only
    hits = sim.pool.stats["prefix_hit_tokens"]
    again = sim.run({0: [(seq.tokens[:-1], 1) for seq in seqs if len(seq.tokens) > 2 * PAGE]})
    for seq in again:
        assert seq.tokens == reference(seq.tokens[:seq.prompt_len], seq.max_tokens)
    assert sim.pool.stats["prefix_hit_tokens"] > hits


def test_a_draft_takes_only_the_budget_and_pages_left():
    sim = SpeculativeSimulation(100, max_running=4, token_budget=4, num_draft=8)
    first = sim.add([1, 2, 3], 10)
    sim.step()  # the prompt
    second = sim.add([4, 5, 6], 10)
    plan = sim.step()  # the first decodes; the second's prompt comes first in the budget
    assert [(c.seq, c.count, len(c.draft)) for c in plan.chunks] == [(first, 1, 0), (second, 3, 0)]
    plan = sim.step()  # two decodes share the 2 tokens left
    assert [(c.seq, len(c.draft)) for c in plan.chunks] == [(first, 2), (second, 0)]
    tight = SpeculativeSimulation(3, pages_per_seq=3, max_running=1, token_budget=16, num_draft=8)
    seq = tight.add([1, 2, 3, 4, 5, 6, 7], 5)
    tight.step()
    plan = tight.step()  # 8 tokens known, 3 pages of 4: room for 4 draft tokens, and no preemption
    assert len(plan.chunks[0].draft) == 4 and not plan.preempted
    assert seq.status in ("running", "finished")


# prompt lookup --------------------------------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(3)
    assert drafter._lookup([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3], 3) == [8, 7, 1]  # the latest 3-gram match
    assert drafter._lookup([5, 6, 7, 8, 4, 6, 7], 2) == [8, 4]  # a 2-gram
    assert drafter._lookup([5, 6, 7, 8, 4, 6], 2) == []  # one token alone proposes nothing
    assert drafter._lookup([4, 4, 4], 4) == [4]  # the match may overlap the suffix
    assert drafter._lookup([1, 2, 3], 4) == []


# the engine: greedy ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts():
    """The tiny llama on each backend, and two drafts on the reference backend: the tiny qwen2 (another model
    with the same vocabulary: few of its drafts are right) and the tiny llama itself (all are)."""
    llama, qwen2 = tiny_model("llama"), tiny_model("qwen2")
    options = dict(max_seq_len=64, max_num_seqs=5, page_size=4)
    return {"reference": kiln.compile(llama, backend="reference", **options),
            "tvm": kiln.compile(llama, backend="tvm", **options),
            "onnxruntime": kiln.compile(llama, backend="onnxruntime", **options),
            "qwen2": kiln.compile(qwen2, backend="reference", **options)}


@pytest.fixture(scope="module")
def expected():
    return [hf_greedy("llama", p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("backend", ["reference", "tvm", "onnxruntime"])
@pytest.mark.parametrize("drafter", ["ngram", "qwen2", "self"])
def test_greedy_speculation_equals_transformers_batched(artifacts, expected, backend, drafter):
    options = {"ngram": dict(speculate="ngram"), "qwen2": dict(draft=artifacts["qwen2"].path),
               "self": dict(draft=artifacts["reference"].path)}[drafter]
    eng = kiln.load(artifacts[backend].path, num_speculative_tokens=3, **options)
    results = eng.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in results] == expected
    stats = eng.step_stats
    assert stats["draft_tokens"] > 0
    if drafter == "self":
        assert stats["accepted_draft_tokens"] == stats["draft_tokens"]  # its own drafts are always right
        assert stats["steps"] <= 2 + -(-(NEW - 1) // 4)  # the prefill, then 4 tokens a step
    else:
        assert 0 < stats["accepted_draft_tokens"] < stats["draft_tokens"]
    assert sum(r.stats["accepted_draft_tokens"] for r in results) == stats["accepted_draft_tokens"]
    check_no_page_held(eng)
    if drafter != "ngram":
        assert eng.drafter.pool.num_in_use() == 0
    eng.close()


def test_greedy_speculation_with_preemption_and_arrivals(artifacts, expected):
    """A cache too small for all five at once (preemption) and requests arriving while others decode."""
    tiny = kiln.compile(tiny_model("llama"), backend="reference", max_seq_len=48, page_size=4,
                        kv_cache_budget=14 * 4 * 2 * 2 * 2 * 16 * 4)
    eng = kiln.load(tiny.path, speculate="ngram", max_running=5, token_budget=64)
    first = eng.submit(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)
    later = [eng.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in PROMPTS[1:]]
    results = [first.result()] + [r.result() for r in later]
    assert [r.token_ids for r in results] == expected
    assert sum(r.stats["preemptions"] for r in results) > 0
    assert eng.step_stats["accepted_draft_tokens"] > 0
    check_no_page_held(eng)


def test_penalties_logprobs_and_logits_stay_right_under_speculation(artifacts):
    """Every verified row is chosen as a decode step would choose it: the same tokens, log-probabilities and
    logits as without speculation, with penalties and a bias that depend on the tokens accepted before."""
    kwargs = dict(max_new_tokens=NEW, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
                  frequency_penalty=0.3, logit_bias={7: 2.0}, logprobs=True, top_logprobs=3, return_logits=True)
    plain = kiln.load(artifacts["reference"].path).generate(PROMPTS, **kwargs)
    for options in (dict(speculate="ngram"), dict(draft=artifacts["reference"].path)):
        eng = kiln.load(artifacts["reference"].path, **options)
        if isinstance(eng.drafter, PromptLookupDrafter):
            eng.drafter.min_ngram = 1  # penalised output repeats no pair of tokens: draft from single ones
        fast = eng.generate(PROMPTS, **kwargs)
        assert eng.step_stats["accepted_draft_tokens"] > 0
        for a, b in zip(plain, fast):
            assert a.token_ids == b.token_ids
            assert [[i for i, _ in t.top_logprobs] for t in a.logprobs] == \
                [[i for i, _ in t.top_logprobs] for t in b.logprobs]
            np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=1e-4)
            np.testing.assert_allclose(a.logits, b.logits, atol=1e-4 * np.abs(a.logits).max())


def test_seeded_sampling_with_prompt_lookup_replays_without_it(artifacts):
    """A prompt-lookup draft is a point mass, so the rule draws once per token as decoding without it does:
    a seed gives the same tokens with and without speculation."""
    kwargs = dict(max_new_tokens=NEW, ignore_eos=True, temperature=0.7, top_k=20, seed=11)
    plain = [r.token_ids for r in kiln.load(artifacts["reference"].path).generate(PROMPTS, **kwargs)]
    eng = kiln.load(artifacts["reference"].path, speculate="ngram")
    eng.drafter.min_ngram = 1  # sampled output repeats few pairs of tokens: draft from single ones
    assert [r.token_ids for r in eng.generate(PROMPTS, **kwargs)] == plain
    assert eng.step_stats["accepted_draft_tokens"] > 0


def test_stop_strings_and_max_new_tokens_end_inside_a_verified_draft(tmp_path):
    """The word-level tiny llama continues "w7 w8 w9" with ... w76 w26 w26 w26 w26 w26: prompt lookup drafts
    each w26 after the second from the one before, so "w26 w26 w26" completes inside an accepted draft, as
    does a max_new_tokens of 29; the draft tokens after it are dropped."""
    from tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "ckpt")
    art = kiln.compile(str(tmp_path / "ckpt"), backend="reference", max_seq_len=64, page_size=4)
    plain = kiln.load(art.path)
    eng = kiln.load(art.path, speculate="ngram")
    for kwargs in (dict(stop="w26 w26 w26", max_new_tokens=30), dict(max_new_tokens=29)):
        want = plain.generate("w7 w8 w9", ignore_eos=True, **kwargs)
        got = eng.generate("w7 w8 w9", ignore_eos=True, **kwargs)
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert got.stats["accepted_draft_tokens"] > 0
    assert want.text.endswith("w76 w26 w26 w26 w26") and got.stats["accepted_draft_tokens"] > 0
    check_no_page_held(eng)


# the engine: sampling --------------------------------------------------------------------------------------------
def test_the_acceptance_rule_keeps_the_target_distribution():
    """accept_or_resample alone, over 200000 draws of a draft far from the target (seeded: the same draws every
    run, so the test cannot flake; a correct rule fails it with probability ALPHA over the choice of seed)."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])
    draws = 200_000
    drafted = rng.choice(len(q), size=draws, p=q)
    counts = np.bincount([accept_or_resample(p, q, int(x), rng) for x in drafted], minlength=len(p))
    assert counts[5] == 0
    assert chi_square_p_value(counts[:5], draws * p[:5]) > ALPHA


def _top_k_probs(logits: np.ndarray, k: int) -> np.ndarray:
    """transformers' top-k (ties with the k-th kept) then softmax, in float64."""
    logits = logits.astype(np.float64)
    kth = np.sort(logits)[-k]
    masked = np.where(logits >= kth, logits, -np.inf)
    probs = np.exp(masked - masked.max())
    return probs / probs.sum()


def _exact_three_tokens(name: str, prompt: list, top_k: int) -> dict:
    """{(t1, t2, t3): probability} of the first three sampled tokens of tiny model ``name`` at temperature 1
    with top-k, from transformers' logits."""
    model = tiny_model(name)

    def next_probs(ids):
        with torch.no_grad():
            return _top_k_probs(model(torch.as_tensor([ids])).logits[0, -1].numpy(), top_k)

    joint = {}
    first = next_probs(prompt)
    for t1 in np.flatnonzero(first):
        second = next_probs(prompt + [int(t1)])
        for t2 in np.flatnonzero(second):
            third = next_probs(prompt + [int(t1), int(t2)])
            for t3 in np.flatnonzero(third):
                joint[(int(t1), int(t2), int(t3))] = first[t1] * second[t2] * third[t3]
    return joint


def test_sampling_with_a_draft_model_keeps_the_target_distribution(artifacts):
    """3000 seeded requests at temperature 1 and top-k 4 with the tiny qwen2 drafting 2 tokens for the tiny
    llama: the joint distribution of the first three tokens (the second and third from verification) against
    transformers' exact probabilities, by a chi-square test at ALPHA. Seeds 0..2999 make the draws the same
    every run, so the test cannot flake; a correct engine fails it with probability ALPHA over the choice of
    seeds. The draft's own distribution is far enough from the target's that this many draws would reject it
    (checked), so accepting the drafts unchecked could not pass."""
    prompt, top_k, draws = [5, 9, 33, 40], 4, 3000
    target = _exact_three_tokens("llama", prompt, top_k)
    eng = kiln.load(artifacts["reference"].path, draft=artifacts["qwen2"].path, num_speculative_tokens=2,
                    max_running=32, token_budget=256)
    requests = [eng.submit(prompt, max_new_tokens=3, temperature=1.0, top_k=top_k, seed=seed, ignore_eos=True)
                for seed in range(draws)]
    samples = [tuple(r.result().token_ids) for r in requests]
    stats = eng.step_stats
    assert 0 < stats["accepted_draft_tokens"] < stats["draft_tokens"]  # both branches of the rule ran
    cells = sorted(target)
    observed = [samples.count(cell) for cell in cells]
    assert sum(observed) == draws  # nothing outside the target's support
    expected = [draws * target[cell] for cell in cells]
    assert chi_square_p_value(observed, expected) > ALPHA
    # the power check: drafts taken unchecked would give t2, t3 from qwen2's distribution
    model = tiny_model("qwen2")
    with torch.no_grad():
        first = _top_k_probs(tiny_model("llama")(torch.as_tensor([prompt])).logits[0, -1].numpy(), top_k)
    unchecked = {}
    for t1 in np.flatnonzero(first):
        with torch.no_grad():
            second = _top_k_probs(model(torch.as_tensor([prompt + [int(t1)]])).logits[0, -1].numpy(), top_k)
        for t2 in np.flatnonzero(second):
            with torch.no_grad():
                third = _top_k_probs(model(torch.as_tensor([prompt + [int(t1), int(t2)]])).logits[0, -1].numpy(),
                                     top_k)
            for t3 in np.flatnonzero(third):
                unchecked[(int(t1), int(t2), int(t3))] = first[t1] * second[t2] * third[t3]
    wrong = [draws * unchecked.get(cell, 0.0) for cell in cells]
    assert chi_square_p_value(wrong, expected) < 1e-12
    check_no_page_held(eng)
    assert eng.drafter.pool.num_in_use() == 0


# options -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(speculate="medusa"), "speculate must be None, 'ngram'"),
    (dict(speculate="ngram", num_speculative_tokens=0), "num_speculative_tokens must be an integer in"),
    (dict(speculate="draft"), "speculate='draft' needs draft="),
    (dict(draft=12), "draft must be a draft model's artifact directory"),
])
def test_bad_speculation_options_are_one_line(artifacts, options, message):
    with pytest.raises(ConfigError, match=message) as err:
        kiln.load(artifacts["reference"].path, **options)
    assert "\n" not in str(err.value)


def test_a_draft_with_another_vocabulary_is_refused(artifacts, tmp_path):
    from tiny_models import build_tiny_model

    other = kiln.compile(build_tiny_model("llama", vocab_size=100), backend="reference", max_seq_len=64)
    with pytest.raises(ConfigError, match=r"^draft: .*vocabulary of 100 tokens, this model 128; a draft model"):
        kiln.load(artifacts["reference"].path, draft=other.path)


def test_cli_run_with_speculation_prints_the_same_text(tmp_path):
    import subprocess
    import sys

    from tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "ckpt")
    art = kiln.compile(str(tmp_path / "ckpt"), backend="reference", max_seq_len=64, page_size=4,
                       output=tmp_path / "tiny.kiln").path

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "kiln.cli", "run", art, "w7 w8 w9", "-n", "20", "--ignore-eos",
                               "--no-stream", *flags], capture_output=True, text=True, timeout=300)

    plain = run()
    assert plain.returncode == 0 and plain.stdout.strip()
    for flags in (["--speculate", "ngram", "--num-speculative-tokens", "3"], ["--draft", art]):
        fast = run(*flags)
        assert (fast.returncode, fast.stdout) == (0, plain.stdout)
    for flags, message in ((["--draft", str(tmp_path)], "--draft .* is not a kiln artifact directory"),
                           (["--num-speculative-tokens", "2"], "give --speculate ngram or --draft"),
                           (["--speculate", "ngram", "--num-speculative-tokens", "99"],
                            "num_speculative_tokens must be an integer in")):
        refused = run(*flags)
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
        assert re.search(message, refused.stderr)
