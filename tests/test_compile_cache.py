"""The compile cache of `kiln run` (and chat, eval): a model that is not an artifact is compiled once into
$KILN_CACHE_DIR and reused on the next run without compiling; another backend, quantize mode or
--max-seq-len compiles a new entry of its own. The tiny Llama checkpoint, on the reference and ONNX
Runtime backends (cheap to build)."""

import json
import os

import pytest
import torch

from kiln.cli import main

from tiny_models import save_tiny_checkpoint, tiny_model, transformers_tokenizer

PROMPT = "w7 w8 w9 w10"
BASE = ["--backend", "reference", "--max-seq-len", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def expected_text(checkpoint):
    """transformers' greedy continuation of PROMPT, 4 tokens."""
    hf_tokenizer = transformers_tokenizer(checkpoint)
    ids = hf_tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = tiny_model("llama").generate(torch.as_tensor([ids]), max_new_tokens=4, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    return hf_tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def kiln_run(capsys, checkpoint, *options):
    """`kiln run CHECKPOINT PROMPT -n 4 --ignore-eos OPTIONS` in this process: (stdout, stderr)."""
    code = main(["run", str(checkpoint), PROMPT, "-n", "4", "--ignore-eos", *options])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


def entries(cache) -> dict:
    """Cache entry -> its artifact's manifest."""
    found = {}
    for name in sorted(os.listdir(cache)):
        with open(os.path.join(cache, name, "model.kiln", "manifest.json")) as f:
            found[name] = json.load(f)
    return found


def snapshot(cache) -> dict:
    """Every file under the cache with its inode and modification time: unchanged unless rewritten."""
    files = {}
    for root, _, names in os.walk(cache):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            files[os.path.join(root, name)] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return files


def test_the_second_run_uses_the_compiled_model(checkpoint, expected_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    out, err = kiln_run(capsys, checkpoint, *BASE)
    assert out == expected_text + "\n"
    assert "capturing with torch.export" in err and "using the compiled model" not in err
    (entry,) = entries(tmp_path)
    before = snapshot(tmp_path)
    out, err = kiln_run(capsys, checkpoint, *BASE)
    assert out == expected_text + "\n"
    assert f"kiln: using the compiled model in {os.path.join(tmp_path, entry, 'model.kiln')}" in err.splitlines()
    assert not any(stage in err for stage in ("loading model", "capturing", "optimizing", "building"))
    assert snapshot(tmp_path) == before  # nothing compiled, nothing rewritten


@pytest.mark.parametrize("option, value, manifest_value", [
    ("--backend", "onnxruntime", lambda m: m["backend"]),
    ("--quantize", "int8", lambda m: m["options"]["quantize"]),
    ("--max-seq-len", "40", lambda m: m["kv_cache"]["max_seq_len"]),
])
def test_another_option_compiles_a_new_entry(checkpoint, expected_text, tmp_path, monkeypatch, capsys, option,
                                             value, manifest_value):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    kiln_run(capsys, checkpoint, *BASE)
    (first,) = entries(tmp_path)
    changed = [*BASE, option, value]  # argparse keeps the last of a repeated option
    out, err = kiln_run(capsys, checkpoint, *changed)
    assert "capturing with torch.export" in err and "using the compiled model" not in err
    found = entries(tmp_path)
    (new,) = set(found) - {first}
    assert str(manifest_value(found[new])) == value
    assert str(manifest_value(found[first])) != value
    if option != "--quantize":  # int8 weights change the continuation; the others compute the same numbers
        assert out == expected_text + "\n"
    out, err = kiln_run(capsys, checkpoint, *changed)  # and that entry is the one reused
    assert f"using the compiled model in {os.path.join(tmp_path, new, 'model.kiln')}" in err
    assert set(entries(tmp_path)) == {first, new}
