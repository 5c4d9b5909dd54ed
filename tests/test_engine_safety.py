"""No input crashes the engine: bad prompts are refused in one line before any backend runs, the same way on
every backend, and one engine serves several threads with the results of a single thread."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ConfigError

from tiny_checkpoint import copy_artifact, rehash, write_checkpoint
from tiny_models import VOCAB, tiny_model

BACKENDS = ["reference", "tvm", "onnxruntime"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    return {backend: kiln.compile(checkpoint, backend=backend, max_seq_len=64, output=folder / f"{backend}.kiln").path
            for backend in BACKENDS}


class CountingExecutor:
    """Wraps an executor and counts the kernels it was asked to run."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def step(self, *args):
        self.calls += 1
        return self.inner.step(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, artifacts):
    eng = kiln.load(artifacts[request.param])
    eng.executor = CountingExecutor(eng.executor)
    return eng


BAD_PROMPTS = [
    ("", "empty"),
    ([], "empty"),
    ([1.5, 2], "must be integers"),
    ([True, 3], "must be integers"),
    (b"hello", "bytes"),
    ([-1, 5], "outside the model's vocabulary"),
    ([5, VOCAB], "outside the model's vocabulary"),
    (np.array([[1, 2]]), "one-dimensional"),
    (np.array([1.0, 2.0]), "integer token ids"),
    ("a\ud800b", "lone surrogate"),
    ("x" * 100_000, "more than 64 tokens"),
    (list(range(1, 70)), "more than the compiled maximum of 64"),
    (42, "text (str) or a sequence of token ids"),
    (None, "text (str) or a sequence of token ids"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS, ids=[m for _, m in BAD_PROMPTS])
def test_bad_prompts_are_refused_before_any_kernel(engine, prompt, message):
    before = engine.executor.calls
    for call in (lambda: engine.generate(prompt, max_new_tokens=2), lambda: list(engine.stream(prompt)),
                 lambda: engine.logits(prompt)):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert engine.executor.calls == before


@pytest.mark.parametrize("kwargs, message", [
    ({"stop": ""}, "stop"), ({"stop": ["ok", ""]}, "stop"), ({"stop": [3]}, "stop"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"temperature": float("nan")}, "temperature"),
    ({"seed": -1}, "seed"), ({"return_logits": "yes"}, "return_logits"), ({"top_k": 1.0}, "top_k"),
])
def test_inconsistent_options_are_refused(engine, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        engine.generate("Hi", **kwargs)


def test_text_encoding_outside_the_vocabulary_is_refused_not_clamped(artifacts, tmp_path):
    """A tokenizer whose added token lies beyond the model's rows (a mismatched artifact, hashes made to agree)
    must be refused on every backend before a kernel runs; TVM used to clamp the id and print garbage."""
    for backend in BACKENDS:
        art = copy_artifact(artifacts[backend], tmp_path / backend)
        with open(os.path.join(art, "tokenizer.json")) as f:
            tok = json.load(f)
        tok["added_tokens"].append({"id": VOCAB, "content": "<oops>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
        with open(os.path.join(art, "tokenizer.json"), "w") as f:
            json.dump(tok, f)
        rehash(art, ["tokenizer.json"])
        eng = kiln.load(art)
        eng.executor = CountingExecutor(eng.executor)
        with pytest.raises(ConfigError, match=rf"token id {VOCAB} \('<oops>'\), outside the model's vocabulary "
                                              rf"of {VOCAB}; the artifact's tokenizer does not match its model"):
            eng.generate("ab<oops>", max_new_tokens=2)
        assert eng.generate("ab", max_new_tokens=2, ignore_eos=True).token_ids  # the rest still works
        assert eng.executor.calls == 2


def test_tokenizer_panics_become_one_line(engine, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
        pass

    class Panicking:
        def encode(self, *args, **kwargs):
            raise PanicException("called `Option::unwrap()` on a `None` value\nat src/tokenizer.rs:42")

    monkeypatch.setattr(engine.tokenizer, "backend", Panicking())
    with pytest.raises(ConfigError, match=r"^the tokenizer failed encoding the text: PanicException: called "):
        engine.generate("hello")


def test_chat_needs_a_template_and_a_tokenizer(artifacts, tmp_path):
    ids_only = kiln.compile(tiny_model("llama"), backend="reference", max_seq_len=32)
    eng = kiln.load(ids_only)
    for call in (lambda: eng.chat([{"role": "user", "content": "hi"}]), lambda: eng.generate("hi")):
        with pytest.raises(ConfigError):
            call()
    eng = kiln.load(artifacts["reference"])
    with pytest.raises(ConfigError, match="add_generation_prompt"):
        eng.chat([{"role": "user", "content": "hi"}], add_generation_prompt="yes")
    with pytest.raises(ConfigError):
        eng.chat("not a list of messages")


# threads -----------------------------------------------------------------------------------------
PROMPTS = ["Hello there", "The sky is", "1, 2, 3,", "Once upon", "A", "Kiln compiles models"]


def _jobs():
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        jobs.append(("generate", prompt, {"max_new_tokens": 12, "ignore_eos": True}))
        jobs.append(("generate", prompt, {"max_new_tokens": 9, "temperature": 0.9, "top_k": 20, "seed": i,
                                          "ignore_eos": True}))
        jobs.append(("stream", prompt, {"max_new_tokens": 7, "ignore_eos": True}))
        jobs.append(("logits", [int(c) for c in prompt.encode()[:10]], {}))
    return jobs


def _do(engine, job):
    kind, prompt, kwargs = job
    if kind == "generate":
        res = engine.generate(prompt, **kwargs)
        return res.token_ids, res.text
    if kind == "stream":
        return "".join(engine.stream(prompt, **kwargs))
    return engine.logits(prompt)


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_four_threads_get_the_single_threaded_results(backend, artifacts):
    eng = kiln.load(artifacts[backend])
    jobs = _jobs()
    expected = [_do(eng, job) for job in jobs]
    results: dict = {}
    errors: list = []

    def worker(index):
        try:
            for round_ in range(3):  # each thread runs every fourth job three times, in a shifting order
                for j in range(index, len(jobs), 4):
                    results.setdefault(j, []).append(_do(eng, jobs[(j + round_ * 4) % len(jobs)]))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    checked = 0
    for j, got in results.items():
        for round_, value in enumerate(got):
            want = expected[(j + round_ * 4) % len(jobs)]
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(value, want)
            else:
                assert value == want, (backend, jobs[(j + round_ * 4) % len(jobs)])
            checked += 1
    assert checked == 3 * len(jobs)


def test_more_threads_than_the_cache_holds_wait_their_turn(checkpoint, tmp_path):
    """A cache of exactly one 32-token sequence: five threads' requests queue and run as pages allow, one thread's
    open streams never deadlock it, and each gets what one request alone gets."""
    art = kiln.compile(checkpoint, backend="tvm", max_seq_len=32, max_num_seqs=1, page_size=4)
    eng = kiln.load(art)
    assert eng.spec.num_pages == eng.spec.pages_per_seq == 8
    want = eng.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids
    got, errors = [], []

    def worker():
        try:
            got.append(eng.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == [want] * 5
    # one thread with two open streams and a third request: nothing waits on the thread itself
    first, second = eng.stream("Hi", max_new_tokens=5), eng.stream("Ho", max_new_tokens=5)
    next(first), next(second)
    assert eng.generate("Hello", max_new_tokens=20, ignore_eos=True).token_ids == want
    first.close(), second.close()
    assert eng.pool.num_in_use() == 0 or eng.scheduler.running


def test_prefill_logits_match_transformers_after_checks(artifacts):
    """The checks change nothing for good input: prefill logits still equal transformers' (the tiny model's
    own weights), on every backend."""
    ids = [72, 101, 108, 108, 111]
    with torch.no_grad():
        ref = tiny_model("llama")(torch.as_tensor([ids])).logits[0].numpy()
    for backend in BACKENDS:
        got = kiln.load(artifacts[backend]).logits(ids)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), backend
