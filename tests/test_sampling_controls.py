"""Presence/frequency penalties, logit bias, logprobs and n completions (issue 13, point 3), against references
written from their definitions: transformers' logits processors (SequenceBias, RepetitionPenalty, Temperature,
TopK, TopP) and numpy (OpenAI's penalty formula, log-softmax) over the logits the engine returns.

The engine tests use the tiny Llama on TVM with pages of 4 tokens, so a prompt's full pages can be shared.
"""

import dataclasses

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import kiln
from kiln.ir.errors import ConfigError, KilnError
from kiln.runtime.sampling import Sampler, SamplingParams

from tiny_models import VOCAB, tiny_model

PROB_TOLERANCE = 1e-9  # float64 end to end on both sides; float32 logits in, so differences are rounding only


def numpy_penalties(logits, generated, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's definition: logits[t] -= frequency * count[t] + presence * (count[t] > 0), generated tokens only."""
    counts = np.zeros(logits.shape[0])
    for token in generated:
        counts[token] += 1
    return logits - frequency * counts - presence * (counts > 0)


def reference_distribution(logits, prompt_and_generated, generated, params: SamplingParams) -> np.ndarray:
    """Dense probabilities: logit bias, repetition penalty (transformers), presence/frequency (numpy), then
    transformers' temperature, top-k and top-p warpers, in vLLM's order."""
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    input_ids = torch.tensor([prompt_and_generated], dtype=torch.long)
    if params.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias})(input_ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    scores = torch.from_numpy(numpy_penalties(scores[0].numpy(), generated, params.presence_penalty,
                                              params.frequency_penalty))[None]
    if params.temperature == 0:
        dense = np.zeros(logits.shape[0])
        dense[int(torch.argmax(scores[0]))] = 1.0
        return dense
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    for warper in warpers:
        scores = warper(input_ids, scores)
    return torch.softmax(scores[0], dim=-1).numpy()


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


CASES = [
    SamplingParams(temperature=1.0, presence_penalty=1.5),
    SamplingParams(temperature=1.0, frequency_penalty=0.7),
    SamplingParams(temperature=0.8, presence_penalty=-1.0, frequency_penalty=-0.5),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 10: -100.0, 999: 2.5}),
    SamplingParams(temperature=0.7, top_k=30, top_p=0.9, presence_penalty=0.5, frequency_penalty=1.0,
                   repetition_penalty=1.3, logit_bias={4: 3.0, 5: -3.0}),
    SamplingParams(temperature=0.0, frequency_penalty=2.0, logit_bias={7: 1.0}),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p)[15:100])
@pytest.mark.parametrize("seed", [0, 1])
def test_distribution_matches_the_references(params, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(1000) * 3.0).astype(np.float32)
    prompt = [int(t) for t in np.argsort(-logits)[:3]]
    # the likeliest tokens generated, some several times, so counts and presence both change the outcome
    generated = [int(t) for t in np.argsort(-logits)[3:9]] * 2 + [int(np.argmax(logits))]
    expected = reference_distribution(logits, prompt + generated, generated, params)
    token_ids, probs = Sampler(params).distribution(logits, prompt + generated, generated_token_ids=generated)
    got = np.zeros(1000)
    got[token_ids] = probs
    assert set(token_ids.tolist()) == set(np.flatnonzero(expected > 0).tolist())
    np.testing.assert_allclose(got, expected, atol=PROB_TOLERANCE, rtol=0)


def test_a_bias_of_100_forces_a_token_and_minus_100_forbids_it():
    logits = np.random.default_rng(3).standard_normal(500).astype(np.float32) * 5
    top = int(np.argmax(logits))
    sampler = Sampler(SamplingParams(temperature=1.0, logit_bias={"17": 100.0, top: -100.0}, seed=0))
    draws = [sampler.sample(logits) for _ in range(200)]
    assert set(draws) == {17}  # JSON's string keys are token ids too
    forbid = Sampler(SamplingParams(temperature=1.0, logit_bias={top: -100.0}, seed=0))
    ids, probs = forbid.distribution(logits)
    assert probs[list(ids).index(top)] < 1e-40


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, logprobs=True, top_logprobs=5,
                                                   presence_penalty=0.4, frequency_penalty=0.3, top_k=10,
                                                   logit_bias={2: 4.0}),
                                    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=20,
                                                   frequency_penalty=1.0)])
def test_logprobs_are_the_log_softmax_of_the_processed_logits(params):
    """Temperature applied (none when greedy), bias and penalties too; top-k truncation not: the alternatives
    can lie outside the top-k set."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(300) * 2).astype(np.float32)
    generated = [int(t) for t in np.argsort(-logits)[:4]]
    processed = numpy_penalties(logits.astype(np.float64), generated, params.presence_penalty,
                                params.frequency_penalty)
    for token, bias in params.logit_bias:
        processed[token] += bias
    expected = numpy_log_softmax(processed / (params.temperature or 1.0))
    sampler = Sampler(dataclasses.replace(params, seed=1))
    for _ in range(20):
        choice = sampler.choose(logits, generated, generated_token_ids=generated)
        token, logprob, top = choice.logprob
        assert token == choice.token_id
        assert abs(logprob - expected[token]) <= PROB_TOLERANCE
        order = sorted(range(300), key=lambda t: (-expected[t], t))[:params.top_logprobs]
        assert [t for t, _ in top] == order
        np.testing.assert_allclose([lp for _, lp in top], expected[order], atol=PROB_TOLERANCE, rtol=0)
    assert Sampler(SamplingParams(temperature=1.0)).choose(logits).logprob is None


def test_a_token_mask_renormalises_over_the_allowed_tokens():
    """A grammar's mask: disallowed tokens cannot be drawn, the rest keep their softmax ratios (numpy), greedy
    takes the best allowed token, and a mask allowing nothing fails in one line."""
    logits = np.random.default_rng(9).standard_normal(64).astype(np.float32)
    allowed = np.zeros(64, dtype=bool)
    allowed[[1, 5, 9, 33]] = True
    ids, probs = Sampler(SamplingParams(temperature=0.5)).distribution(logits, allowed=allowed)
    expected = np.exp(numpy_log_softmax(logits[[1, 5, 9, 33]] / 0.5))
    order = np.argsort(ids)
    assert ids[order].tolist() == [1, 5, 9, 33]
    np.testing.assert_allclose(probs[order], expected, atol=PROB_TOLERANCE, rtol=0)
    assert Sampler(SamplingParams()).sample(logits, allowed=allowed) == [1, 5, 9, 33][int(np.argmax(expected))]
    with pytest.raises(KilnError, match="masked every token"):
        Sampler(SamplingParams(temperature=1.0)).sample(logits, allowed=np.zeros(64, dtype=bool))


@pytest.mark.parametrize("field,value,expected", [
    ("presence_penalty", 2.5, "presence_penalty must be a number in [-2, 2]"),
    ("frequency_penalty", "1", "frequency_penalty must be a number in [-2, 2]"),
    ("logit_bias", {5: 101.0}, "biases in [-100, 100], got 101.0 for token 5"),
    ("logit_bias", {"five": 1.0}, "token id 'five'"),
    ("logit_bias", {-3: 1.0}, "token id -3"),
    ("logit_bias", [1, 2], "a mapping of token ids"),
    ("logprobs", "yes", "logprobs must be True or False"),
    ("top_logprobs", 21, "top_logprobs must be an integer in [0, 20], got 21"),
])
def test_bad_values_are_refused_in_one_line(field, value, expected):
    with pytest.raises(ConfigError) as err:
        SamplingParams(**{field: value}).validate()
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ConfigError, match="top_logprobs must be 0 unless logprobs=True, got 3"):
        SamplingParams(top_logprobs=3).validate()


# the engine --------------------------------------------------------------------------------------------------
PROMPT = [5, 17, 99, 3, 42, 7, 64, 2, 11, 30]  # 10 tokens: two full pages of 4 to share


@pytest.fixture(scope="module")
def engine():
    return kiln.load(kiln.compile(tiny_model("llama"), backend="tvm", max_seq_len=64, max_num_seqs=4,
                                  page_size=4))


def test_greedy_penalties_and_bias_follow_numpy_at_every_step(engine):
    """Each greedy token is the argmax of that step's returned logits after the bias and OpenAI's penalties over
    the tokens before it (numpy): the engine feeds the penalties the right counts."""
    bias = {int(t): float(b) for t, b in zip([12, 40, 77], [3.0, -2.0, 1.5])}
    res = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, return_logits=True, presence_penalty=1.2,
                          frequency_penalty=0.9, logit_bias=bias)
    plain = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert res.token_ids != plain.token_ids  # the penalties change this output
    for step, token in enumerate(res.token_ids):
        processed = numpy_penalties(res.logits[step].astype(np.float64), res.token_ids[:step], 1.2, 0.9)
        for t, b in bias.items():
            processed[t] += b
        assert token == int(np.argmax(processed)), step


def test_logprobs_and_events_match_the_returned_logits(engine):
    """Sampled at temperature 0.8 with penalties: each token's logprob and top 4 are numpy's log-softmax of
    the step's returned logits, processed as the definition says; events carry the same tokens and logprobs."""
    kwargs = dict(max_new_tokens=10, ignore_eos=True, temperature=0.8, seed=11, presence_penalty=0.5,
                  frequency_penalty=0.5, logprobs=True, top_logprobs=4)
    res = engine.generate(PROMPT, return_logits=True, **kwargs)
    assert len(res.logprobs) == len(res.token_ids) == 10
    for step, (token, logprob, top) in enumerate(res.logprobs):
        assert token == res.token_ids[step]
        processed = numpy_penalties(res.logits[step].astype(np.float64), res.token_ids[:step], 0.5, 0.5)
        expected = numpy_log_softmax(processed / 0.8)
        assert abs(logprob - expected[token]) <= 1e-9
        order = sorted(range(VOCAB), key=lambda t: (-expected[t], t))[:4]
        assert [t for t, _ in top] == order
        np.testing.assert_allclose([lp for _, lp in top], expected[order], atol=1e-9, rtol=0)
    events = list(engine.submit(PROMPT, **kwargs).events())
    assert [t for e in events for t in e.token_ids] == res.token_ids  # same seed, same tokens
    assert [lp for e in events for lp in e.logprobs] == res.logprobs
    assert all(e.text == "" for e in events)  # the tiny model has no tokenizer: one event per token
    assert engine.generate(PROMPT, max_new_tokens=2).logprobs is None


def test_n_completions_share_the_prompt_and_replay_by_seed(engine):
    """n=3 seeded completions: completion i is what seed + i gives alone; the later ones take the prompt's
    two full pages from the prefix cache; nothing is left held."""
    kwargs = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0)
    engine.pool.check()
    results = engine.generate(PROMPT, n=3, seed=40, **kwargs)
    assert [r.stats["cached_prompt_tokens"] for r in results[1:]] == [8, 8]
    alone = [engine.generate(PROMPT, seed=40 + i, **kwargs).token_ids for i in range(3)]
    assert [r.token_ids for r in results] == alone
    assert len({tuple(t) for t in alone}) > 1
    batch = engine.generate([PROMPT, PROMPT[:5]], n=2, seed=40, **kwargs)
    assert [len(group) for group in batch] == [2, 2]
    assert [r.token_ids for r in batch[0]] == alone[:2]
    requests = engine.submit_n(PROMPT, 2, max_new_tokens=30, ignore_eos=True)
    for request in requests:
        request.cancel()
    assert [r.result().finish_reason for r in requests] == ["cancelled", "cancelled"]
    engine.pool.check()
    assert engine.pool.num_in_use() == 0 and not engine._followers


@pytest.mark.parametrize("call,expected", [
    (lambda e: e.submit_n(PROMPT, 0), "n must be an integer in [1, 128], got 0"),
    (lambda e: e.generate(PROMPT, n=129), "n must be an integer in [1, 128], got 129"),
    (lambda e: e.submit_n(PROMPT, 2, temprature=1.0), "unknown argument 'temprature'"),
    (lambda e: e.submit(PROMPT, logit_bias={VOCAB: 1.0}), f"token id {VOCAB}, outside the model's vocabulary"),
    (lambda e: e.submit(PROMPT, presence_penalty=-3), "presence_penalty must be a number in [-2, 2] (0 switches it "
                                                      "off), got -3"),
])
def test_engine_refusals_are_one_line(engine, call, expected):
    with pytest.raises(ConfigError) as err:
        call(engine)
    assert expected in str(err.value) and "\n" not in str(err.value)


# kiln run's flags ------------------------------------------------------------------------------------------------
def kiln_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from tiny_models import save_tiny_checkpoint

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    return kiln.compile(str(directory), backend="reference", max_seq_len=32,
                        output=tmp_path_factory.mktemp("art") / "tiny.kiln").path


def test_cli_logit_bias_and_penalties(tiny_artifact, tmp_path):
    """--logit-bias 9=100 makes every greedy token w9 (id 9 of the word-level vocabulary); out-of-range and
    malformed flags are refused in one line with status 2."""
    out = kiln_cli("run", tiny_artifact, "w7 w8", "-n", "3", "--ignore-eos", "--logit-bias", "9=100",
                   "--presence-penalty", "0.5", "--frequency-penalty", "0.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "w9 w9 w9\n"
    schema = tmp_path / "schema.json"
    schema.write_text("{not json")
    for flags, expected in [(["--presence-penalty", "3"], "--presence-penalty must be a number in [-2, 2]"),
                            (["--logit-bias", "nine=1"], "--logit-bias takes TOKEN_ID=BIAS"),
                            (["--logit-bias", "9=500"], "got 500.0 for token 9"),
                            (["--json-schema", str(schema)], "is not JSON")]:
        out = kiln_cli("run", tiny_artifact, "w7", "-n", "2", *flags)
        assert out.returncode == 2 and expected in out.stderr, (flags, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
