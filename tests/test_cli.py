"""The command line: version, help, one-line errors with status 2, inspect on a checkpoint and an artifact,
and `kiln run` on a compiled artifact against transformers."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import llama_parameter_count, save_tiny_checkpoint, tiny_model, transformers_tokenizer


def kiln_cli(*args, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, input=input)


def test_version_and_help():
    from kiln import __version__

    out = kiln_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"kiln {__version__}"
    out = kiln_cli("--help")
    assert out.returncode == 0
    for command in ("compile", "run", "chat", "inspect", "eval"):
        assert command in out.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "smollm2", "hi", "--temperature", "-1"], "--temperature must be"),
    (["run", "smollm2", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["run", "smollm2", "hi", "-n", "0"], "--max-new-tokens must be"),
    (["run", "smollm2", "hi", "--backend", "nope"], "unknown backend 'nope'"),
    (["compile", "smollm2", "-o", "x", "--max-seq-len", "0"], "--max-seq-len must be positive"),
    (["inspect", "/no/such/model"], "not found"),
    (["run", "/no/such/model.gguf", "hi"], "model '/no/such/model.gguf' not found"),
    (["inspect", "smollm2", "--kv-cache-budget", "lots"], "cannot read 'lots' as a size"),
    (["frobnicate"], "invalid choice"),
    (["inspect", "smollm2", "--quantize", "int3"], "invalid choice: 'int3'"),
])
def test_user_errors_are_one_line_status_2(args, message):
    out = kiln_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("kiln: error")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback():
    out = kiln_cli("--debug", "inspect", "/no/such/model")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_bad_gguf_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    out = kiln_cli("inspect", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("kiln: error")]) == 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_tiny_checkpoint(path)
    return path


def tiny_llama_parameters() -> int:
    config = tiny_model("llama").config
    return llama_parameter_count(config.vocab_size, config.hidden_size, config.num_hidden_layers,
                                 config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                 config.intermediate_size, config.tie_word_embeddings)


def test_inspect_json_on_a_checkpoint(checkpoint):
    start = time.perf_counter()
    out = kiln_cli("inspect", str(checkpoint), "--json", "--max-seq-len", "64", "--page-size", "8")
    elapsed_ms = (time.perf_counter() - start) * 1000
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["parameters"] == tiny_llama_parameters() == 90_432
    assert summary["ops"]["paged_attention"] == 2 and summary["ops"]["gated_mlp"] == 2
    assert summary["unfused_attention"] == []
    kv = summary["kv_cache"]
    # 2 layers x (K, V) x 2 KV heads x head_dim 16 x 4 bytes
    assert kv["bytes_per_token"] == 2 * 2 * 2 * 16 * 4 and kv["page_size"] == 8
    assert kv["groups"] == [{"kind": "kv", "layers": [0, 1], "num_kv_heads": 2, "k_head_dim": 16, "v_head_dim": 16,
                             "window": None}]
    assert kv["max_tokens"] == kv["num_pages"] * 8
    assert 0 < summary["activations"]["peak_bytes"] < summary["activations"]["naive_bytes"]
    names = [p["name"] for p in summary["passes"]]
    assert "fuse_attention" in names
    # the passes ran inside the command, so their times add up to less than its run, and to something
    assert 0 < sum(p["milliseconds"] for p in summary["passes"]) < elapsed_ms
    assert set(summary["functions"]) == {"step", "step_decode"}
    assert summary["symbolic_dims"] == ["rows", "seqs", "tokens"]  # @step_decode has fixed sizes
    # the capture declared torch.export's ranges: a batch and a sequence of at most --max-seq-len
    assert summary["symbol_ranges"] == {"batch": [1, 64], "seq": [1, 64]}
    text = kiln_cli("inspect", str(checkpoint), "--max-seq-len", "64", "--page-size", "8").stdout
    assert "symbol ranges: batch in [1, 64], seq in [1, 64]" in text.splitlines()


def test_inspect_shows_quantization_and_refuses_gguf_for_a_checkpoint(checkpoint):
    out = kiln_cli("inspect", str(checkpoint), "--json", "--max-seq-len", "64", "--quantize", "int4")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    quant = summary["quantization"]
    # tiny llama: hidden 64, 2 layers x 7 linears in groups of 32; the table and logits as int8 per row
    assert quant["mode"] == "int4" and quant["weight_formats"] == {"int4-g32+offset": 14, "int8-per-row": 2}
    assert summary["parameters"] == tiny_llama_parameters()  # the model's, not the packed blocks' elements
    out = kiln_cli("inspect", str(checkpoint), "--max-seq-len", "64", "--quantize", "gguf")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is not a GGUF file" in out.stderr and "use none, int8, int4 or int4-g128" in out.stderr


def test_inspect_print_after_and_stop_after(checkpoint):
    out = kiln_cli("inspect", str(checkpoint), "--max-seq-len", "64", "--print-after", "fuse_rope",
                   "--stop-after", "fuse_rope")
    assert out.returncode == 0, out.stderr
    assert "// IR after fuse_rope" in out.stdout and "= rope(" in out.stdout
    assert "paged_attention" not in out.stdout  # stopped before the KV cache was inserted


def test_inspect_refuses_a_budget_below_one_sequence(checkpoint):
    out = kiln_cli("inspect", str(checkpoint), "--max-seq-len", "64", "--kv-cache-budget", "1KiB")
    assert out.returncode == 2
    assert "KV cache budget of 1,024 bytes" in out.stderr and "64 tokens" in out.stderr


def test_compile_then_run_and_inspect_an_artifact(checkpoint, tmp_path):
    """`kiln run` on the compiled artifact prints transformers' greedy continuation, from an argument or from
    standard input; `kiln inspect` reads the artifact."""
    art = tmp_path / "tiny.kiln"
    out = kiln_cli("compile", str(checkpoint), "-o", str(art), "--backend", "reference", "--max-seq-len", "32")
    assert out.returncode == 0, out.stderr
    assert (art / "manifest.json").exists()
    prompt = "w7 w8 w9 w10"
    hf_tokenizer = transformers_tokenizer(checkpoint)
    ids = hf_tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        new = tiny_model("llama").generate(torch.as_tensor([ids]), max_new_tokens=8, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    expected = hf_tokenizer.decode(new, skip_special_tokens=True)
    assert len(expected.split()) == 8
    out = kiln_cli("run", str(art), prompt, "-n", "8", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    out = kiln_cli("run", str(art), "-n", "8", "--ignore-eos", input=prompt)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    out = kiln_cli("inspect", str(art), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["artifact"]["backend"] == "reference" and summary["ops"]["paged_attention"] == 2
    assert summary["parameters"] == tiny_llama_parameters()
