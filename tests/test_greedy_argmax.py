"""Greedy decoding takes each logits row's argmax on the device: TVM's @argmax_rows against numpy's argmax
(ties, infinities, NaN, a vocabulary that is no multiple of the CPU kernel's 64 lanes), and the engine's greedy
tokens against transformers and against numpy's argmax of the full-logits path, with and without the device
argmax (other backends and older artifacts take it on the host)."""

import json
import shutil

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import KilnError

from tiny_models import tiny_model

tvm = pytest.importorskip("tvm")

from kiln.backends.tvm.build import build, compile_cuda_source, cuda_source  # noqa: E402
from kiln.backends.tvm.lower import ARGMAX_ROWS, add_argmax_rows  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit missing)")


def _rows(vocab: int, seed: int = 0) -> np.ndarray:
    """Rows of hard cases: random, ties (rounded values, the maximum several times), every value -inf, +inf
    last, NaN (twice), the maximum in the last and the first column, and all equal."""
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


def _argmax_function(vocab: int, dtype: str = "f32"):
    from tvm import relax

    executable = build(add_argmax_rows(tvm.IRModule(), vocab, dtype, "cpu"), "cpu")
    return relax.VirtualMachine(executable, tvm.cpu())[ARGMAX_ROWS]


@pytest.mark.parametrize("vocab", [1, 5, 64, 100, 1000, 4099])
def test_argmax_rows_is_numpys_argmax(vocab):
    """Each row's index is numpy's argmax (ties: the lowest index) and its value the logit there (NaN for a
    row holding one), for any vocabulary size: the kernel's 64 lanes plus the columns after them."""
    x = _rows(vocab)
    ids, values = (out.numpy() for out in _argmax_function(vocab)(tvm.runtime.tensor(x)))
    want = np.argmax(x, axis=1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(values, x[np.arange(len(x)), want])  # NaN equals NaN here
    assert ids.dtype == np.int32


def test_argmax_rows_of_one_row_and_of_f16():
    x = _rows(1000)[[1, 4]]
    function = _argmax_function(1000, "f16")
    for rows in (x[:1], x):
        ids, values = (out.numpy() for out in function(tvm.runtime.tensor(rows.astype(np.float16))))
        np.testing.assert_array_equal(ids, np.argmax(rows.astype(np.float16), axis=1))


@needs_nvcc
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_argmax_rows_compiles_for_cuda(dtype):
    """CUDA: a thread block per row reduces across its threads (warp shuffles), and nvcc compiles it."""
    source = cuda_source(add_argmax_rows(tvm.IRModule(), 49152, dtype, "cuda:sm_80"), "sm_80")
    assert "__shfl_down_sync" in source
    assert compile_cuda_source(source, "sm_80")


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU")
def test_argmax_rows_runs_on_cuda():
    from tvm import relax

    executable = build(add_argmax_rows(tvm.IRModule(), 4099, "f32", "cuda"), "cuda")
    function = relax.VirtualMachine(executable, tvm.cuda(0))[ARGMAX_ROWS]
    x = _rows(4099)
    ids, values = (out.numpy() for out in function(tvm.runtime.tensor(x, tvm.cuda(0))))
    np.testing.assert_array_equal(ids, np.argmax(x, axis=1))


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


def _spy_on_steps(engine) -> list:
    """Record what each step of ``engine`` asked the executor for."""
    wants = []
    step = engine.executor.step

    def recording(function, inputs, **kwargs):
        wants.append(kwargs.get("want", "logits"))
        return step(function, inputs, **kwargs)

    engine.executor.step = recording
    return wants


def test_greedy_steps_take_the_argmax_on_the_device(artifact):
    """Greedy requests alone (one at a time and three in one step): every step asks for the argmax, and the
    tokens are transformers' greedy tokens and numpy's argmax of each row of the full-logits path (the same
    requests with return_logits=True, which hands the sampler whole rows)."""
    engine = kiln.load(artifact)
    assert engine.info.manifest["backend_info"]["argmax_function"] == ARGMAX_ROWS
    assert engine.executor.computes_argmax
    wants = _spy_on_steps(engine)
    alone = [engine.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
    together = [r.result().token_ids for r in
                [engine.submit(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]]
    assert set(wants) == {"argmax"}
    del wants[:]
    for prompt, tokens, batched in zip(PROMPTS, alone, together):
        full = engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True)
        assert tokens == batched == full.token_ids == _transformers_greedy(prompt)
        assert tokens == np.argmax(full.logits, axis=1).tolist()
    assert set(wants) == {"logits"}


def test_a_step_with_a_request_that_reads_its_logits_copies_them(artifact):
    """One request wanting logprobs in the step: the step copies the logits, and the greedy request beside it
    still gets transformers' tokens."""
    engine = kiln.load(artifact)
    wants = _spy_on_steps(engine)
    greedy = engine.submit(PROMPTS[0], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with_logprobs = engine.submit(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    assert greedy.result().token_ids == _transformers_greedy(PROMPTS[0])
    assert with_logprobs.result().token_ids == _transformers_greedy(PROMPTS[1])
    assert "logits" in wants
    assert len(with_logprobs.result().logprobs) == NEW_TOKENS


def test_an_artifact_without_argmax_rows_takes_the_argmax_on_the_host(artifact, tmp_path):
    """An artifact compiled before @argmax_rows (no backend_info.argmax_function) still decodes greedily: the
    engine takes numpy's argmax of the copied logits."""
    old = tmp_path / "old.kiln"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["backend_info"]["argmax_function"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    engine = kiln.load(old)
    assert not engine.executor.computes_argmax
    wants = _spy_on_steps(engine)
    assert engine.generate(PROMPTS[2], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == \
        _transformers_greedy(PROMPTS[2])
    assert set(wants) == {"logits"}


def test_a_non_finite_largest_logit_fails_the_request(artifact):
    """As the sampler does with a row whose largest logit is NaN or inf: the request fails in one line."""
    engine = kiln.load(artifact)
    step = engine.executor.step

    def broken(function, inputs, **kwargs):
        out = step(function, inputs, **kwargs)
        if kwargs.get("want") == "argmax":
            return out[0], np.full_like(out[1], np.nan)
        return out

    engine.executor.step = broken
    with pytest.raises(KilnError, match="expected finite logits, found a largest logit of nan"):
        engine.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True)
