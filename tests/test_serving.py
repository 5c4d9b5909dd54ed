"""Continuous batching end to end on tiny models, against transformers: prompts of different lengths generated
together equal each generated alone and transformers' greedy tokens, with the prefix cache on and off, with
preemption forced by a tiny KV cache, chunked prefill forced by a tiny token budget, and requests arriving while
others decode; seeded sampling does not depend on the neighbours; cancelled and finished requests leave no page
behind; and a request that can never fit is refused with both numbers.
"""

import threading
import time

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ConfigError

from tiny_models import VOCAB, tiny_model

PROMPTS = [[5, 9, 33, 40, 41, 7, 100, 3, 8, 77, 12], [64, 3], [17, 18, 19, 20, 21, 22, 23], [99],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
NEW = 9


def hf_greedy(name: str, prompt: list, new_tokens: int = NEW) -> list:
    model = tiny_model(name)
    ids = torch.as_tensor([prompt])
    with torch.no_grad():  # every token attended (id 0 is a word-level tokenizer's <unk>, not padding)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama_artifacts():
    """The tiny llama on TVM: a roomy cache (pages of 4 tokens) and a cache of 12 pages (48 tokens), which
    cannot hold the five prompts' 47 prompt tokens and 45 new ones at once."""
    model = tiny_model("llama")
    return {"roomy": kiln.compile(model, backend="tvm", max_seq_len=64, max_num_seqs=4, page_size=4),
            "tiny": kiln.compile(model, backend="tvm", max_seq_len=32, page_size=4,
                                 kv_cache_budget=12 * 4 * 2 * 2 * 2 * 16 * 4)}


@pytest.fixture(scope="module")
def expected():
    return [hf_greedy("llama", p) for p in PROMPTS]


def wait_for_tokens(request, count: int) -> None:
    """Until the request has generated ``count`` tokens (the tiny models have no tokenizer to stream text)."""
    deadline = time.monotonic() + 60
    while len(request.seq.tokens) < len(request.prompt_ids) + count:
        assert time.monotonic() < deadline and not request.done
        time.sleep(0.001)


def check_no_page_held(engine) -> None:
    engine.pool.check()
    assert engine.pool.num_in_use() == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prompts_together_equal_alone_and_transformers(llama_artifacts, expected, prefix_caching):
    eng = kiln.load(llama_artifacts["roomy"], prefix_caching=prefix_caching)
    alone = [eng.generate(p, max_new_tokens=NEW, ignore_eos=True).token_ids for p in PROMPTS]
    together = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)]
    assert alone == expected
    assert together == expected
    assert eng.step_stats["steps"] < 2 * len(PROMPTS) * NEW  # the batch really ran together
    check_no_page_held(eng)


def test_preemption_on_a_tiny_cache_gives_the_same_tokens(llama_artifacts, expected):
    eng = kiln.load(llama_artifacts["tiny"], max_running=5, token_budget=64)
    assert eng.spec.num_pages == 12
    results = eng.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in results] == expected
    assert sum(r.stats["preemptions"] for r in results) > 0
    check_no_page_held(eng)


@pytest.mark.parametrize("budget", [1, 3])
def test_chunked_prefill_on_a_tiny_token_budget(llama_artifacts, expected, budget):
    eng = kiln.load(llama_artifacts["roomy"], max_running=1, token_budget=budget)
    results = eng.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in results] == expected
    assert eng.step_stats["tokens"] / eng.step_stats["steps"] <= budget
    check_no_page_held(eng)


def test_requests_arriving_while_others_decode(llama_artifacts, expected):
    eng = kiln.load(llama_artifacts["roomy"], prefix_caching=False)
    first = eng.submit(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)
    wait_for_tokens(first, 2)  # the first request is decoding
    later = [eng.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in PROMPTS[1:]]
    assert first.result().token_ids == expected[0]
    assert [r.result().token_ids for r in later] == expected[1:]
    check_no_page_held(eng)


def test_logits_match_transformers_beside_other_requests(llama_artifacts):
    eng = kiln.load(llama_artifacts["roomy"])
    with torch.no_grad():
        ref = tiny_model("llama")(torch.as_tensor([PROMPTS[4]])).logits[0].numpy()
    others = [eng.submit(p, max_new_tokens=NEW, ignore_eos=True) for p in PROMPTS[:3]]
    got = eng.logits(PROMPTS[4])
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    for r in others:
        r.result()
    check_no_page_held(eng)


def test_seeded_sampling_does_not_depend_on_the_neighbours(llama_artifacts):
    eng = kiln.load(llama_artifacts["roomy"])
    kwargs = dict(max_new_tokens=12, temperature=1.3, top_k=40, seed=7, ignore_eos=True)
    alone = eng.generate(PROMPTS[2], **kwargs).token_ids
    neighbours = [eng.submit(p, max_new_tokens=12, temperature=0.9, seed=i, ignore_eos=True)
                  for i, p in enumerate(PROMPTS)]
    beside = eng.submit(PROMPTS[2], **kwargs)
    assert beside.result().token_ids == alone
    for r in neighbours:
        r.result()
    check_no_page_held(eng)


def test_a_shared_prompt_prefix_is_served_from_the_cache(llama_artifacts):
    eng = kiln.load(llama_artifacts["roomy"])
    system = list(range(3, 30))  # 27 tokens: 6 full pages of 4
    first = eng.generate(system + [40, 41], max_new_tokens=4, ignore_eos=True)
    assert first.stats["cached_prompt_tokens"] == 0
    second = eng.generate(system + [50, 51, 52], max_new_tokens=4, ignore_eos=True)
    assert second.stats["cached_prompt_tokens"] == 24
    assert second.token_ids == hf_greedy("llama", system + [50, 51, 52], 4)
    check_no_page_held(eng)


def test_cancelled_requests_free_their_pages(llama_artifacts):
    eng = kiln.load(llama_artifacts["roomy"])
    requests = [eng.submit(p, max_new_tokens=40, ignore_eos=True) for p in PROMPTS]
    wait_for_tokens(requests[0], 1)
    for r in requests:
        r.cancel()
    for r in requests:
        assert r.result().finish_reason in ("cancelled", "length")
    # an abandoned stream cancels its request too (the tiny model has no tokenizer: give it ids and text)
    stream = eng.stream(PROMPTS[1], max_new_tokens=40, ignore_eos=True)
    stream.close()
    eng.generate([1, 2], max_new_tokens=1)  # one more step, after which nothing is held
    check_no_page_held(eng)


def test_a_request_that_can_never_fit_is_refused_with_both_numbers(llama_artifacts):
    eng = kiln.load(llama_artifacts["tiny"])
    with pytest.raises(ConfigError, match="is 33, more than the compiled maximum of 32"):
        eng.submit([1] * 30, max_new_tokens=3)
    assert eng.generate([1] * 20, max_new_tokens=12, ignore_eos=True).finish_reason == "length"


def test_many_threads_submit_at_once(llama_artifacts, expected):
    eng = kiln.load(llama_artifacts["roomy"])
    got: dict = {}

    def worker(i):
        got[i] = eng.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW, ignore_eos=True).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == {i: expected[i % len(PROMPTS)] for i in range(12)}
    check_no_page_held(eng)


# about 8-12 s each: mistral (sliding window) by default, gpt2 and falcon with -m slow
@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=pytest.mark.slow), "mistral",
                                  pytest.param("falcon", marks=pytest.mark.slow)])
def test_other_architectures_batch_like_transformers(name):
    """Learned positions (GPT-2), a sliding window of 4 (Mistral), multi-query (Falcon): batched greedy tokens."""
    eng = kiln.load(kiln.compile(tiny_model(name), backend="tvm", max_seq_len=64, max_num_seqs=4, page_size=4),
                    token_budget=16)
    prompts = [p[:12] for p in PROMPTS]
    results = eng.generate(prompts, max_new_tokens=NEW, ignore_eos=True)
    assert [r.token_ids for r in results] == [hf_greedy(name, p) for p in prompts]
    assert all(0 <= t < VOCAB for r in results for t in r.token_ids)


# chat turns reuse the cache; the CLI's batch mode ---------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    from tiny_models import save_tiny_checkpoint

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory)
    return str(directory), kiln.compile(str(directory), backend="tvm", max_seq_len=128, page_size=4,
                                        output=tmp_path_factory.mktemp("art") / "chat.kiln").path


def test_a_chat_turn_prefills_only_what_is_new(chat_artifact):
    """The second turn's prompt starts with the first turn's rendered prompt: all its full pages come from the
    prefix cache, and the reply is still transformers' greedy reply to the whole conversation."""
    from tiny_models import transformers_tokenizer

    directory, path = chat_artifact
    eng = kiln.load(path)
    hf_tokenizer = transformers_tokenizer(directory)
    first = [{"role": "user", "content": "what is the capital of france"}]
    reply = eng.chat(first, max_new_tokens=6)
    turn_one = eng.chat_prompt(first)
    second = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "and of spain"}]
    res = eng.chat(second, max_new_tokens=6, ignore_eos=True)
    ids = eng.chat_prompt(second)
    assert ids[:len(turn_one)] == turn_one
    assert res.stats["cached_prompt_tokens"] >= len(turn_one) // 4 * 4 > 0
    expected = list(hf_tokenizer.apply_chat_template(second, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert ids == expected
    assert res.token_ids == hf_greedy("llama", expected, 6)
    check_no_page_held(eng)


def test_cli_batch_prints_one_json_line_per_prompt_in_order(chat_artifact):
    import json
    import subprocess
    import sys

    directory, path = chat_artifact
    prompts = ["hello there", "", "the cat sat on", "one two three four five six"]
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "run", path, "--batch", "-n", "5", "--ignore-eos"],
                         input="\n".join(prompts) + "\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]  # the blank line is skipped
    eng = kiln.load(path)
    for line, prompt in zip(lines, [p for p in prompts if p]):
        alone = eng.generate(prompt, max_new_tokens=5, ignore_eos=True)
        assert (line["text"], line["new_tokens"], line["finish_reason"]) == (alone.text, 5, "length")
    refused = subprocess.run([sys.executable, "-m", "kiln.cli", "run", path, "hi", "--batch"], input="x\n",
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and "--batch" in refused.stderr


@pytest.mark.slow
def test_smollm2_prompts_together_equal_alone_and_transformers():
    """SmolLM2 on TVM: its five test prompts generated together (chunked beside each other's decodes) give each
    prompt's tokens alone and transformers' greedy tokens."""
    from smollm2 import SMOL_PROMPTS, transformers_smollm2

    model = transformers_smollm2()
    eng = kiln.load(kiln.compile("smollm2", backend="tvm", max_seq_len=256, max_num_seqs=2, activations="float"),
                    token_budget=32)
    prompts = [eng.tokenizer.encode(t) for t in SMOL_PROMPTS]
    together = [r.token_ids for r in eng.generate(prompts, max_new_tokens=24, ignore_eos=True)]
    for prompt, tokens in zip(prompts, together):
        with torch.no_grad():
            out = model.generate(torch.as_tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()
        assert tokens == eng.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    check_no_page_held(eng)
