"""Stopping on EOS: a model whose greedy continuation reaches its end-of-sequence token stops there, as
transformers' generate does with the same EOS id: finish_reason "stop", the EOS neither in the tokens nor
in the text; `ignore_eos` generates past it. The tiny Llama with the word-level tokenizer, its EOS the word
its greedy continuation of the prompt reaches at the fifth step."""

import subprocess
import sys

import pytest
import torch

import kiln

from tiny_models import TINY_WORDS, save_tiny_checkpoint, tiny_model, transformers_tokenizer

PROMPT = "w7 w8 w9 w10"
NEW_TOKENS = 12
EOS_STEP = 4


def hf_greedy(ids, eos_ids):
    with torch.no_grad():
        out = tiny_model("llama").generate(torch.as_tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                           eos_token_id=eos_ids, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """(engine, transformers tokenizer, EOS id, the EOS ids both stop on, artifact path)."""
    ids = [TINY_WORDS.index(word) for word in PROMPT.split()]
    free_run = hf_greedy(ids, None)
    eos = free_run[EOS_STEP]
    assert eos >= 6 and eos not in free_run[:EOS_STEP], free_run  # a word reached for the first time here
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(directory, eos_token=TINY_WORDS[eos])
    hf_tokenizer = transformers_tokenizer(directory)
    # the tokenizer's EOS, and the config's (</s>, from generation_config.json), which the greedy run never hits
    eos_ids = [eos, tiny_model("llama").generation_config.eos_token_id]
    assert eos_ids[1] not in free_run[:EOS_STEP]
    path = kiln.compile(str(directory), backend="reference", max_seq_len=32,
                        output=tmp_path_factory.mktemp("art") / "eos.kiln").path
    return kiln.load(path), hf_tokenizer, eos, eos_ids, path


def test_generation_stops_at_eos_like_transformers(eos_model):
    engine, hf_tokenizer, eos, eos_ids, _ = eos_model
    res = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert res.prompt_token_ids == hf_tokenizer(PROMPT)["input_ids"]
    expected = hf_greedy(res.prompt_token_ids, eos_ids)
    assert expected[-1] == eos and len(expected) == EOS_STEP + 1  # transformers keeps the EOS it stopped on
    assert res.finish_reason == "stop"
    assert res.token_ids == expected[:-1] and eos not in res.token_ids
    assert res.text == hf_tokenizer.decode(expected[:-1], skip_special_tokens=True)
    assert TINY_WORDS[eos] not in res.text.split()
    assert "".join(engine.stream(PROMPT, max_new_tokens=NEW_TOKENS)) == res.text


def test_ignore_eos_generates_past_it(eos_model):
    engine, _, eos, _, _ = eos_model
    res = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert res.finish_reason == "length"
    assert res.token_ids == hf_greedy(res.prompt_token_ids, None)
    assert res.token_ids[EOS_STEP] == eos


def test_a_limit_before_the_eos_ends_on_length(eos_model):
    engine, _, _, eos_ids, _ = eos_model
    res = engine.generate(PROMPT, max_new_tokens=EOS_STEP)
    assert res.finish_reason == "length"
    assert res.token_ids == hf_greedy(res.prompt_token_ids, eos_ids)[:EOS_STEP]


def test_kiln_run_prints_the_text_before_the_eos(eos_model):
    engine, hf_tokenizer, _, eos_ids, path = eos_model
    expected = hf_greedy(hf_tokenizer(PROMPT)["input_ids"], eos_ids)[:-1]
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(path), PROMPT, "-n", str(NEW_TOKENS),
                          "--stats"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == hf_tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert f"decode {EOS_STEP} tokens" in out.stderr and "(stop)" in out.stderr
