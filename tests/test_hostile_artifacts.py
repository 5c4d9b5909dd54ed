"""A matrix of damaged and hostile artifacts (in the manner of llama.cpp's test-gguf): each is refused by
`kiln run` with status 2, one error line saying what is wrong, nothing written anywhere, and by kiln.load with
an ArtifactError; everything the runtime loads is what the manifest hashed."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest

import kiln
from kiln.cli import main
from kiln.ir.errors import ArtifactError, ConfigError
from kiln.runtime.artifact import open_artifact

from tiny_checkpoint import copy_artifact, read_manifest, rehash, snapshot, write_checkpoint, write_manifest


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    checkpoint = write_checkpoint(folder / "tiny")
    return {backend: kiln.compile(checkpoint, backend=backend, max_seq_len=32, output=folder / f"{backend}.kiln").path
            for backend in ("tvm", "onnxruntime")}


def edit(**changes):
    """A manifest edit: field path (keys joined by "/") -> new value, or a function of the old one (``DELETE``
    removes it)."""
    def apply(art):
        manifest = read_manifest(art)
        for dotted, value in changes.items():
            *parents, last = dotted.split("/")
            holder = manifest
            for key in parents:
                holder = holder[key]
            if value is DELETE:
                del holder[last]
            else:
                holder[last] = value(holder[last]) if callable(value) else value
        write_manifest(art, manifest)
    return apply


DELETE = object()


def rename_file_entry(old, new):
    def apply(art):
        manifest = read_manifest(art)
        manifest["files"][new] = manifest["files"].pop(old)
        write_manifest(art, manifest)
    return apply


def unlist(name):
    def apply(art):
        manifest = read_manifest(art)
        del manifest["files"][name]
        write_manifest(art, manifest)
    return apply


def write_bytes(name, transform):
    def apply(art):
        path = os.path.join(art, name)
        data = open(path, "rb").read()
        os.unlink(path)
        open(path, "wb").write(transform(data))
    return apply


def flip_last_byte(data):
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def replace_with_link(name):
    def apply(art):
        path = os.path.join(art, name)
        shutil.move(path, os.path.join(art, "elsewhere"))
        os.symlink(os.path.join(art, "elsewhere"), path)
    return apply


def replace_with_fifo(name):
    def apply(art):
        path = os.path.join(art, name)
        size = os.path.getsize(path)
        os.unlink(path)
        os.mkfifo(path)
        edit(**{f"files/{name}/bytes": size})(art)
    return apply


def remove_function(art):
    manifest = read_manifest(art)
    manifest["backend_info"]["weights"]["nonexistent"] = manifest["backend_info"]["weights"].pop("prefill_last")
    write_manifest(art, manifest)


def huge_cache(art, in_the_module_too=False):
    manifest = read_manifest(art)
    kv = manifest["kv_cache"]
    kv["num_pages"] = 2**40
    kv["total_bytes"] = kv["num_pages"] * kv["page_size"] * kv["bytes_per_token"]
    write_manifest(art, manifest)
    if in_the_module_too:  # the IR's record of the plan edited alike, and its hash redone
        path = os.path.join(art, "module.kir")
        lines = open(path).read().split("\n")
        metadata = json.loads(lines[1].strip()[len("metadata "):])
        metadata["kv_cache"] = kv
        lines[1] = "  metadata " + json.dumps(metadata, sort_keys=True)
        open(path, "w").write("\n".join(lines))
        rehash(art, ["module.kir"])


def safetensors_header(edit_header):
    """Rewrite the weights file's JSON header (the data after it unchanged): parsed before its hash is known."""
    def transform(data):
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        new = json.dumps(edit_header(header)).encode()
        return len(new).to_bytes(8, "little") + new + data[8 + length:]

    def apply(art):  # the size recorded anew, the hash left stale: the parser meets the file first
        write_bytes("weights.safetensors", transform)(art)
        edit(**{"files/weights.safetensors/bytes": os.path.getsize(os.path.join(art, "weights.safetensors"))})(art)
    return apply


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def huge_shape(header):
    header[_first_tensor(header)]["shape"] = [2**40, 2**40]
    return header


def overlapping(header):
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    return header


# (case id, backend, damage, what the one line must say)
CASES = [
    # versions and identity
    ("older format", "tvm", edit(format_version=1), "older than this kiln's 2; recompile it"),
    ("newer format", "tvm", edit(format_version=99), "newer than this kiln reads"),
    ("format not a number", "tvm", edit(format_version="2"), "format version '2' is newer"),
    ("other kiln", "tvm", edit(kiln_version="9.9.0"), "compiled by kiln 9.9.0"),
    ("other tvm", "tvm", edit(backend_version="0.1"), "compiled with tvm 0.1, installed is"),
    ("unknown backend", "tvm", edit(backend="pytorch"), "manifest backend 'pytorch'"),
    ("unknown target", "tvm", edit(target="tpu"), "manifest field target must be"),
    ("backend an object", "tvm", edit(backend={"f16": {}}), "manifest backend {'f16': {}} is not one of"),  # fuzzer
    ("cuda without a GPU", "tvm", edit(target="cuda"), "compiled for cuda, but this machine has no CUDA GPU"),
    ("ort cuda without a GPU", "onnxruntime", edit(target="cuda"), "has no CUDAExecutionProvider"),
    # the file list
    ("no files", "tvm", edit(files=DELETE), "files is missing or empty"),
    ("old-style file entry", "tvm", edit(**{"files/model.so": "0" * 64}), "must be {sha256"),
    ("bad sha", "tvm", edit(**{"files/model.so/sha256": "xyz"}), "must be {sha256"),
    ("traversal in files", "tvm", rename_file_entry("model.so", "../model.so"), "outside the artifact: '../model.so'"),
    ("absolute in files", "tvm", rename_file_entry("model.so", "/usr/lib/libc.so"), "outside the artifact"),
    ("library unlisted", "tvm", unlist("model.so"), "names 'model.so', which is not among the artifact's hashed"),
    ("absolute library", "tvm", edit(**{"backend_info/files/library": "/lib/x86_64-linux-gnu/libc.so.6"}),
     "backend_info.files.library names '/lib/x86_64-linux-gnu/libc.so.6', which is not among"),
    ("library outside", "tvm", edit(**{"backend_info/files/library": "../tvm.kiln/model.so"}), "not among"),
    ("weights unlisted", "tvm", unlist("weights.safetensors"), "not among the artifact's hashed files"),
    ("tokenizer outside", "tvm", edit(**{"tokenizer/file": "../../etc/passwd"}), "tokenizer.file names"),
    ("template is the manifest", "tvm", edit(chat_template="manifest.json"), "chat_template names 'manifest.json'"),
    ("module unlisted", "tvm", edit(module="other.kir"), "manifest field module names 'other.kir'"),
    ("onnx model outside", "onnxruntime", edit(**{"backend_info/files/prefill": "/tmp/evil.onnx"}), "not among"),
    ("onnx data unlisted", "onnxruntime", unlist("model.onnx.data"), "not among the artifact's hashed files"),
    # the files themselves
    ("library missing", "tvm", lambda art: os.unlink(os.path.join(art, "model.so")), "model.so is missing"),
    ("weights grown", "tvm", write_bytes("weights.safetensors", lambda d: d + b"\0"), "the manifest says"),
    ("weights changed", "tvm", write_bytes("weights.safetensors", flip_last_byte), "does not match its sha256"),
    ("library changed", "tvm", write_bytes("model.so", flip_last_byte), "model.so does not match its sha256"),
    ("tokenizer changed", "tvm", write_bytes("tokenizer.json", lambda d: d.replace(b'"<s>"', b'"<S>"')),
     "tokenizer.json does not match its sha256"),
    ("weights header length huge", "tvm", write_bytes("weights.safetensors", lambda d: (2**62).to_bytes(8, "little")
                                                      + d[8:]), "header length 4,611,686,018,427,387,904 runs past"),
    ("weights header not JSON", "tvm", write_bytes("weights.safetensors", lambda d: d[:8] + b"[" + d[9:]),
     "the header is not valid JSON"),
    ("weights shape huge", "tvm", safetensors_header(huge_shape), "bytes for shape [1099511627776, 1099511627776]"),
    ("weights overlap", "tvm", safetensors_header(overlapping), "where ["),
    ("weights dtype unknown", "tvm", safetensors_header(lambda h: {**h, _first_tensor(h): {
        **h[_first_tensor(h)], "dtype": {"F32": 1}}}), "has a malformed entry"),
    ("onnx data changed", "onnxruntime", write_bytes("model.onnx.data", flip_last_byte), "does not match its sha256"),
    ("library a symlink", "tvm", replace_with_link("model.so"), "model.so is a symbolic link"),
    ("manifest a symlink", "tvm", replace_with_link("manifest.json"), "the manifest is a symbolic link"),
    ("tokenizer a FIFO", "tvm", replace_with_fifo("tokenizer.json"), "tokenizer.json is not a regular file"),
    # the fields the runtime reads
    ("manifest not JSON", "tvm", write_bytes("manifest.json", lambda d: d[:-10]), "not valid JSON"),
    ("manifest a list", "tvm", write_bytes("manifest.json", lambda d: b"[1, 2]"), "not a kiln artifact manifest"),
    ("manifest huge", "tvm", write_bytes("manifest.json", lambda d: d + b" " * (17 * 2**20)), "more than"),
    ("manifest not UTF-8", "tvm", write_bytes("manifest.json", lambda d: d.replace(b'"tvm"', b'"\xff"', 1)),
     "not valid JSON"),
    ("no KV plan", "tvm", edit(kv_cache=DELETE), "kv_cache. must be an object"),
    ("zero pages", "tvm", edit(**{"kv_cache/num_pages": 0}), "kv_cache.num_pages must be a positive integer"),
    ("fewer pages than a sequence", "tvm", edit(**{"kv_cache/num_pages": 1}), "kv_cache.num_pages must be at least"),
    ("head_dim a string", "tvm", edit(**{"kv_cache/head_dim": "16"}), "kv_cache.head_dim must be a positive integer"),
    ("bytes per token wrong", "tvm", edit(**{"kv_cache/bytes_per_token": 12}), "kv_cache.bytes_per_token must be"),
    ("pages per sequence short", "tvm", edit(**{"kv_cache/pages_per_seq": 1}), "kv_cache.pages_per_seq must be"),
    ("unknown KV dtype", "tvm", edit(**{"kv_cache/dtype": "f8"}), "kv_cache.dtype must be one of"),
    ("KV dtype an object", "tvm", edit(**{"kv_cache/dtype": {"f32": 1}}), "kv_cache.dtype must be one of"),
    ("ort layer dtype an object", "onnxruntime", edit(**{"backend_info/kv_layers": lambda layers: [
        {**layer, "dtype": {}} for layer in layers]}), "backend_info.kv_layers must be"),
    ("vocab negative", "tvm", edit(**{"model/vocab_size": -1}), "model.vocab_size must be a positive integer"),
    ("eos out of range", "tvm", edit(**{"tokenizer/eos_token_ids": [10**6]}), "tokenizer.eos_token_ids must be"),
    ("bos a string", "tvm", edit(**{"tokenizer/bos_token_id": "1"}), "tokenizer.bos_token_id must be"),
    ("add_bos not a bool", "tvm", edit(**{"tokenizer/add_bos_token": 1}), "tokenizer.add_bos_token must be"),
    ("weights table without decode", "tvm", edit(**{"backend_info/weights/decode": DELETE}),
     "backend_info.weights must map prefill, decode"),
    ("function the library lacks", "tvm", remove_function, "model.so has no function nonexistent"),
    ("plan edited", "tvm", huge_cache, "manifest field kv_cache differs from the plan the model was compiled with "
                                        "(in num_pages, total_bytes)"),
    ("plan edited in the IR too", "tvm", lambda art: huge_cache(art, True), "the KV cache takes 9,007,199,254,740,992 "
                                                                            "bytes, more than this machine's"),
    ("ort layers disagree", "onnxruntime", edit(**{"backend_info/kv_layers": lambda layers: layers[:1]}),
     "backend_info.kv_layers must be a list of 2"),
    ("ort models without prefill", "onnxruntime", edit(**{"backend_info/models/prefill": DELETE}),
     "backend_info.models must be"),
]


def _private_copies():
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"kiln-load-{os.getpid()}-")]


@pytest.mark.parametrize("name, backend, damage, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_artifact_is_refused_in_one_line(name, backend, damage, message, artifacts, tmp_path, capsys,
                                                 monkeypatch):
    art = copy_artifact(artifacts[backend], tmp_path / "model.kiln")
    damage(art)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    before = snapshot(tmp_path)
    status = main(["run", art, "Hello", "-n", "2"])
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("kiln: error: "), err
    assert message in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written next to it, no cache entry made
    with pytest.raises(ArtifactError, match=re.escape(message)):
        kiln.load(art)
    assert _private_copies() == []


def test_the_intact_artifacts_load_and_run(artifacts, capsys):
    for art in artifacts.values():
        assert main(["run", art, "Hello", "-n", "3", "--ignore-eos"]) == 0
        assert capsys.readouterr().out.strip()
    assert _private_copies() == []


def test_files_swapped_after_the_check_are_caught_when_loaded(artifacts, tmp_path):
    """open_artifact checks the manifest and sizes; the bytes loaded later are hashed as they are read, so a
    library, weights or tokenizer replaced in between (same size, other bytes) is refused, not loaded."""
    for backend, name in (("tvm", "model.so"), ("tvm", "weights.safetensors"), ("tvm", "tokenizer.json"),
                          ("onnxruntime", "prefill_last.onnx"), ("onnxruntime", "model.onnx.data")):
        art = copy_artifact(artifacts[backend], tmp_path / f"{backend}-{name}")
        info = open_artifact(art)
        write_bytes(name, flip_last_byte)(art)
        with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
            kiln.runtime.engine.Engine(info)
        assert _private_copies() == []


def test_the_onnx_models_load_from_a_private_copy_removed_with_the_engine(artifacts):
    engine = kiln.load(artifacts["onnxruntime"])
    (copy,) = _private_copies()
    assert oct(os.stat(os.path.join(tempfile.gettempdir(), copy)).st_mode & 0o777) == "0o700"
    assert engine.logits([72, 105]).shape == (2, 128)
    engine.close()
    assert _private_copies() == []
    with pytest.raises(ConfigError, match="this engine was closed"):
        engine.logits([72, 105])


def test_a_rehashed_manifest_edit_is_still_validated(artifacts, tmp_path):
    """Hashes cover the files, not the manifest: a manifest edit that keeps every hash is caught by the field
    checks (here a tokenizer swapped for one with more tokens than the model has rows, hashes redone)."""
    art = copy_artifact(artifacts["tvm"], tmp_path / "model.kiln")
    tok = json.load(open(os.path.join(art, "tokenizer.json")))
    tok["added_tokens"].append({"id": 130, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True})
    json.dump(tok, open(os.path.join(art, "tokenizer.json"), "w"))
    rehash(art, ["tokenizer.json"])
    edit(**{"tokenizer/eos_token_ids": [130]})(art)
    with pytest.raises(ArtifactError, match="tokenizer.eos_token_ids must be a list of token ids below 128"):
        kiln.load(art)
