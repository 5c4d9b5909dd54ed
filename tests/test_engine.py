"""The runtime engine on compiled tiny models (reference backend): generation matches transformers."""

import json
import os

import pytest
import torch

import kiln
from kiln.ir.errors import ArtifactError, ConfigError

from runtime_check import assert_generates_without_torch
from tiny_models import FP32_TOLERANCE, VOCAB, relative_error, tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "llama.kiln"
    art = kiln.compile(tiny_model("llama"), backend="reference", max_seq_len=48, output=path)
    return art.path


@pytest.fixture(scope="module")
def engine(artifact):
    return kiln.load(artifact)


def _hf_greedy(ids, n):
    model = tiny_model("llama")
    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers(engine):
    prompt = [5, 17, 99, 3, 42, 7]
    res = engine.generate(prompt, max_new_tokens=10, ignore_eos=True, return_logits=True)
    assert res.token_ids == _hf_greedy(prompt, 10)
    assert res.finish_reason == "length"
    assert res.logits.shape == (10, VOCAB)
    with torch.no_grad():
        ref = tiny_model("llama")(torch.as_tensor([prompt + res.token_ids[:-1]])).logits[0, len(prompt) - 1:]
    assert relative_error(res.logits, ref.numpy()) <= FP32_TOLERANCE


def test_logits_at_every_position(engine):
    ids = [1, 2, 3, 4, 5, 6, 7]
    with torch.no_grad():
        ref = tiny_model("llama")(torch.as_tensor([ids])).logits[0].numpy()
    got = engine.logits(ids)
    assert got.shape == ref.shape
    assert relative_error(got, ref) <= FP32_TOLERANCE


def test_seeded_sampling_repeats_and_differs_by_seed(engine):
    a = engine.generate([3, 4, 5], max_new_tokens=8, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
    b = engine.generate([3, 4, 5], max_new_tokens=8, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
    c = engine.generate([3, 4, 5], max_new_tokens=8, temperature=1.0, top_k=20, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_too_long_request_names_both_numbers(engine):
    with pytest.raises(ConfigError, match=r"40 tokens.*max_new_tokens \(20\).*48"):
        engine.generate(list(range(1, 41)), max_new_tokens=20)


def test_text_needs_a_tokenizer(engine):
    with pytest.raises(ConfigError, match="no tokenizer"):
        engine.generate("hello")


def test_tampered_artifact_is_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy.kiln"
    shutil.copytree(artifact, copy)
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        kiln.load(str(copy))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99 is newer"):
        kiln.load(str(copy))


def test_artifact_holds_no_pickle(artifact):
    for name in os.listdir(artifact):
        data = open(os.path.join(artifact, name), "rb").read()
        assert not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name
        assert not name.endswith((".pkl", ".pt", ".bin"))


def test_failed_compile_leaves_existing_artifact_untouched(artifact, tmp_path):
    import shutil

    def contents(directory):
        return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}

    target = tmp_path / "keep.kiln"
    shutil.copytree(artifact, target)
    before = contents(target)
    with pytest.raises(ConfigError, match="KV cache budget of 1 bytes holds 0 pages"):
        kiln.compile(tiny_model("llama"), backend="reference", max_seq_len=48, output=target,
                     kv_cache_budget=1)  # too small for one sequence: refused during planning
    assert contents(target) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".keep.kiln")]


def test_loading_and_generating_never_imports_torch(artifact):
    assert_generates_without_torch(artifact)
