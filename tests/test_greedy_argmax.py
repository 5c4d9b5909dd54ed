"""Greedy decoding reads each logits row's argmax alone: TVM's @argmax_rows (CUDA artifacts) against numpy's
argmax (ties, infinities, NaN, f16), compiled with nvcc and run on a GPU when there is one; the engine hands a
greedy step's requests the argmax (from the backend when it takes it, else numpy's over the logits) and its
tokens are transformers' greedy tokens and numpy's argmax of the full-logits path."""

import json
import shutil

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import KilnError
from kiln.runtime import sampling

from tiny_models import tiny_model

tvm = pytest.importorskip("tvm")

from kiln.backends.tvm.build import build, compile_cuda_source, cuda_source  # noqa: E402
from kiln.backends.tvm.lower import ARGMAX_ROWS, add_argmax_rows  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit missing)")
needs_gpu = pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU")


def _rows(vocab: int, seed: int = 0) -> np.ndarray:
    """Rows of hard cases: random, ties (rounded values, the maximum several times), every value -inf, +inf
    last, NaN (twice), the maximum in the last and in the first column, all equal, half -inf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((9, vocab)).astype(np.float32)
    x[1] = np.round(x[1])
    x[1, [vocab // 3, vocab // 2, vocab - 1]] = 50.0
    x[2] = -np.inf
    x[3, -1] = np.inf
    x[4, [vocab // 2, vocab // 4]] = np.nan
    x[5, -1] = 9.0
    x[6, 0] = 9.0
    x[7] = 1.5
    x[8, vocab // 2:] = -np.inf
    return x


def _argmax_function(vocab: int, dtype: str = "f32", target: str = "cpu"):
    from tvm import relax

    device = tvm.cuda(0) if target == "cuda" else tvm.cpu()
    executable = build(add_argmax_rows(tvm.IRModule(), vocab, dtype, target), target)
    function = relax.VirtualMachine(executable, device)[ARGMAX_ROWS]
    return lambda rows: [out.numpy() for out in function(tvm.runtime.tensor(rows, device))]


@pytest.mark.parametrize("vocab", [1, 5, 100, 4099])
def test_argmax_rows_is_numpys_argmax(vocab):
    """The kernel's loops (here run unscheduled on the CPU): each row's index is numpy's argmax (ties: the
    lowest index), its value the logit there (NaN for a row holding one)."""
    x = _rows(vocab)
    ids, values = _argmax_function(vocab)(x)
    want = np.argmax(x, axis=1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(values, x[np.arange(len(x)), want])  # NaN equals NaN here
    assert ids.dtype == np.int32


def test_argmax_rows_of_f16_logits():
    x = _rows(1000).astype(np.float16)
    ids, values = _argmax_function(1000, "f16")(x)
    np.testing.assert_array_equal(ids, np.argmax(x, axis=1))


@pytest.mark.nvcc
@needs_nvcc
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_argmax_rows_compiles_for_cuda(dtype):
    """A thread block per row reduces across its threads (warp shuffles), and nvcc compiles it."""
    source = cuda_source(add_argmax_rows(tvm.IRModule(), 49152, dtype, "cuda:sm_80"), "sm_80")
    assert "__shfl_down_sync" in source
    assert compile_cuda_source(source, "sm_80")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("vocab", [100, 49152 + 7])
def test_argmax_rows_on_the_gpu_is_numpys_argmax(vocab):
    x = _rows(vocab)
    ids, values = _argmax_function(vocab, target="cuda")(x)
    want = np.argmax(x, axis=1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(values, x[np.arange(len(x)), want])


@pytest.mark.nvcc
@needs_nvcc
def test_a_cuda_artifact_names_argmax_rows_and_a_cpu_one_does_not(tmp_path):
    for target in ("cuda", "cpu"):
        path = kiln.compile(tiny_model("llama"), backend="tvm", target=target, max_seq_len=48,
                            output=tmp_path / f"{target}.kiln").path
        with open(f"{path}/manifest.json") as f:
            backend_info = json.load(f)["backend_info"]
        assert backend_info.get("argmax_function") == (ARGMAX_ROWS if target == "cuda" else None)


# the engine ---------------------------------------------------------------------------------------------------
PROMPTS = ([5, 17, 99, 3, 42, 7], [1, 2, 3], [64, 8, 8, 8, 120, 33, 2, 90, 11])
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("argmax") / "llama.kiln"
    return kiln.compile(tiny_model("llama"), backend="tvm", max_seq_len=48, output=path).path


def _transformers_greedy(ids):
    with torch.no_grad():
        out = tiny_model("llama").generate(torch.as_tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


class ArgmaxExecutor:
    """The CPU executor as the engine sees a backend that takes the argmax itself (TVM's on CUDA):
    ``step(..., want="argmax")`` answers numpy's argmax of each row and the logit there, and records what each
    step asked for."""

    def __init__(self, executor, values=None):
        self.inner, self.wants, self.values = executor, [], values
        self.computes_argmax = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, function, inputs, want="logits"):
        self.wants.append(want)
        logits = self.inner.step(function, inputs)
        if want == "logits":
            return logits
        ids = logits.argmax(axis=1)
        values = logits[np.arange(ids.size), ids]
        return ids, values if self.values is None else np.full_like(values, self.values)


def _with_argmax_executor(engine, values=None) -> ArgmaxExecutor:
    engine.executor = ArgmaxExecutor(engine.executor, values)
    engine._device_argmax = True  # what Engine.__init__ reads from the executor
    return engine.executor


def _count_sampler_calls(monkeypatch) -> list:
    calls = []
    choose = sampling.Sampler.choose
    monkeypatch.setattr(sampling.Sampler, "choose", lambda self, *a, **k: calls.append(1) or choose(self, *a, **k))
    return calls


def test_greedy_tokens_are_the_argmax_without_the_sampler(artifact, monkeypatch):
    """A CPU artifact (no @argmax_rows): greedy requests, one at a time and three in one step, take numpy's
    argmax of the step's logits without going through the sampler, and get transformers' greedy tokens, which
    are numpy's argmax of each row of the full-logits path (return_logits=True, through the sampler)."""
    engine = kiln.load(artifact)
    assert not engine.executor.computes_argmax
    calls = _count_sampler_calls(monkeypatch)
    alone = [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
    together = [r.result().token_ids for r in
                [engine.submit(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]]
    assert calls == []
    for prompt, tokens, batched in zip(PROMPTS, alone, together):
        full = engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
        assert tokens == batched == full.token_ids == _transformers_greedy(prompt)
        assert tokens == np.argmax(full.logits, axis=1).tolist()
    assert len(calls) == len(PROMPTS) * NEW_TOKENS


def test_greedy_steps_ask_a_backend_that_takes_the_argmax_for_it(artifact):
    engine = kiln.load(artifact)
    executor = _with_argmax_executor(engine)
    alone = [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
    together = [r.result().token_ids for r in
                [engine.submit(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]]
    assert set(executor.wants) == {"argmax"}
    assert alone == together == [_transformers_greedy(p) for p in PROMPTS]


def test_a_step_with_a_request_that_reads_its_logits_copies_them(artifact):
    """One request wanting logprobs in the step: the step copies the logits, and the greedy request beside it
    still gets transformers' tokens."""
    engine = kiln.load(artifact)
    executor = _with_argmax_executor(engine)
    greedy = engine.submit(PROMPTS[0], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with_logprobs = engine.submit(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    assert greedy.result().token_ids == _transformers_greedy(PROMPTS[0])
    assert with_logprobs.result().token_ids == _transformers_greedy(PROMPTS[1])
    assert len(with_logprobs.result().logprobs) == NEW_TOKENS
    assert "logits" in executor.wants  # the steps holding both requests


@pytest.mark.parametrize("broken", [np.nan, np.inf])
def test_a_largest_logit_that_is_not_finite_fails_the_request(artifact, broken):
    """As the sampler refuses a row whose largest logit is NaN or inf: the request fails in one line."""
    engine = kiln.load(artifact)
    _with_argmax_executor(engine, values=broken)
    with pytest.raises(KilnError, match=f"expected finite logits, found a largest logit of {broken}"):
        engine.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True)


@pytest.mark.cuda
@needs_gpu
def test_cuda_greedy_decoding_takes_the_argmax_on_the_gpu(tmp_path):
    path = kiln.compile(tiny_model("llama"), backend="tvm", target="cuda", max_seq_len=48,
                        output=tmp_path / "cuda.kiln").path
    engine = kiln.load(path)
    assert engine.executor.computes_argmax
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == \
            _transformers_greedy(prompt)
