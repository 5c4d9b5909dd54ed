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
from kiln.ir.kv_cache import DECODE_STEP, STEP
from kiln.runtime.artifact import open_artifact

from tiny_checkpoint import copy_artifact, read_manifest, rehash, snapshot, write_checkpoint, write_manifest


class _Artifacts(dict):
    """The tiny model compiled for each backend, on first use: "tvm", "onnxruntime", and "tvm-step-only" (a TVM
    library built without @step_decode, for a manifest that lists a function its library lacks)."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.checkpoint = write_checkpoint(folder / "tiny")

    def __missing__(self, name):
        backend = name.split("-")[0]
        with pytest.MonkeyPatch.context() as patch:
            if name == "tvm-step-only":
                import kiln.backends.tvm.compile as tvm_compile

                patch.setattr(tvm_compile, "ENTRY_FUNCTIONS", (STEP,))
            path = kiln.compile(self.checkpoint, backend=backend, max_seq_len=32,
                                output=self.folder / f"{name}.kiln").path
        self[name] = path
        return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return _Artifacts(tmp_path_factory.mktemp("artifacts"))


def edit(**changes):
    """A manifest edit: field path (keys and list indices joined by "/") -> new value, or a function of the old
    one (``DELETE`` removes it)."""
    def apply(art):
        manifest = read_manifest(art)
        for dotted, value in changes.items():
            *parents, last = (int(key) if key.isdigit() else key for key in dotted.split("/"))
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


def claim_a_function_the_library_lacks(art):
    """The weights table of a library built with @step only, claiming @step_decode too."""
    manifest = read_manifest(art)
    weights = manifest["backend_info"]["weights"]
    assert set(weights) == {STEP}, weights  # the library really lacks it
    weights[DECODE_STEP] = list(weights[STEP])
    write_manifest(art, manifest)


def edit_module_metadata(art, kv):
    """The IR's record of the KV-cache spec set to ``kv``, and module.kir's hash redone."""
    path = os.path.join(art, "module.kir")
    lines = open(path).read().split("\n")
    assert lines[1].startswith("  metadata "), lines[1][:80]
    metadata = json.loads(lines[1].strip()[len("metadata "):])
    metadata["kv_cache"] = kv
    lines[1] = "  metadata " + json.dumps(metadata, sort_keys=True)
    open(path, "w").write("\n".join(lines))
    rehash(art, ["module.kir"])


def edit_spec(change, in_the_module_too=False):
    """The manifest's KV-cache spec edited by ``change(kv)``, its derived fields recomputed here (tokens = pages x
    page size; bytes = tokens x bytes per token), so only the cross-checks can tell; the IR's record alike."""
    def apply(art):
        manifest = read_manifest(art)
        kv = manifest["kv_cache"]
        change(kv)
        kv["max_tokens"] = kv["num_pages"] * kv["page_size"]
        kv["total_bytes"] = kv["max_tokens"] * kv["bytes_per_token"]
        write_manifest(art, manifest)
        if in_the_module_too:
            edit_module_metadata(art, kv)
    return apply


def huge_cache(kv):
    kv["num_pages"] = 2**40


def one_page(kv):
    kv["num_pages"] = 1


def more_pages(kv):
    kv["num_pages"] += 1


def half_precision(kv):
    kv["dtype"] = "f16"
    kv["bytes_per_token"] //= 2


def split_groups(art):
    """Layers 0 and 1 in groups of their own, everywhere the manifest and IR say so (step signature too): only
    the library's parameters can tell."""
    manifest = read_manifest(art)
    kv = manifest["kv_cache"]
    (group,) = kv["groups"]
    assert group["layers"] == [0, 1], group
    kv["groups"] = [{**group, "layers": [0]}, {**group, "layers": [1]}]
    pool = f"f32[1, {kv['num_pages']}, {group['num_kv_heads']}, {kv['page_size']}, {group['k_head_dim']}]"
    inputs = manifest["step"]["inputs"][:5] + [{"name": f"{kind}_cache_{g}", "type": pool}
                                               for g in (0, 1) for kind in "kv"]
    manifest["step"]["inputs"] = inputs
    write_manifest(art, manifest)
    edit_module_metadata(art, kv)


def swap(items, i, j):
    items = list(items)
    items[i], items[j] = items[j], items[i]
    return items


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


# what the manifest's step field must be for the tiny model (one group of two layers)
STEP_SIGNATURE = ("manifest field step must be the step signature (function step, inputs token_ids, positions, "
                  "token_seq, page_table, logit_rows, k_cache_0, v_cache_0, functions step and optionally "
                  "step_decode), found ")
ORT_INPUTS = ("manifest field backend_info.inputs must be token_ids, positions, logit_rows, pad_index, unpad_index, "
              "seqlens_k, total_sequence_length, then past_key_<l>, past_value_<l> for each of the 2 layers")

# (case id, backend, damage, what the one line must say)
CASES = [
    # versions and identity
    ("older format", "tvm", edit(format_version=2),
     "artifact format version 2 is older than this kiln's 3; recompile it"),
    ("much older format", "tvm", edit(format_version=1), "artifact format version 1 is older than this kiln's 3"),
    ("newer format", "tvm", edit(format_version=99), "newer than this kiln reads"),
    ("format not a number", "tvm", edit(format_version="3"), "format version '3' is newer"),
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
    ("onnx model outside", "onnxruntime", edit(**{"backend_info/files/model": "/tmp/evil.onnx"}),
     "backend_info.files.model names '/tmp/evil.onnx', which is not among"),
    ("onnx data unlisted", "onnxruntime", unlist("model.onnx.data"), "not among the artifact's hashed files"),
    ("onnx model unlisted", "onnxruntime", unlist("step.onnx"), "names 'step.onnx', which is not among"),
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
    # the KV-cache spec: refused by KVCacheSpec.from_json, naming the field
    ("no KV spec", "tvm", edit(kv_cache=DELETE),
     "manifest field kv_cache: expected an object, found NoneType; the artifact is damaged, recompile it"),
    ("KV spec a list", "tvm", edit(kv_cache=[]), "manifest field kv_cache: expected an object, found list"),
    ("zero pages", "tvm", edit(**{"kv_cache/num_pages": 0}),
     "manifest field kv_cache.num_pages: expected an integer >= 1, found 0"),
    ("pages a bool", "tvm", edit(**{"kv_cache/num_pages": True}),
     "manifest field kv_cache.num_pages: expected an integer >= 1, found True"),
    ("pages past 2**40", "tvm", edit(**{"kv_cache/num_pages": 2**41}),
     "manifest field kv_cache.num_pages: expected an integer >= 1, found 2199023255552"),
    ("zero page size", "tvm", edit(**{"kv_cache/page_size": 0}),
     "manifest field kv_cache.page_size: expected an integer >= 1, found 0"),
    ("fewer pages than a sequence", "tvm", edit(**{"kv_cache/num_pages": 1}),
     "manifest field kv_cache.num_pages: expected at least 2 (one sequence of max_seq_len 32 tokens), found 1"),
    ("head dim a string", "tvm", edit(**{"kv_cache/groups/0/k_head_dim": "16"}),
     "manifest field kv_cache.groups[0].k_head_dim: expected an integer >= 1, found '16'"),
    ("no KV heads", "tvm", edit(**{"kv_cache/groups/0/num_kv_heads": DELETE}),
     "manifest field kv_cache.groups[0].num_kv_heads: expected an integer >= 1, found None"),
    ("bytes per token wrong", "tvm", edit(**{"kv_cache/bytes_per_token": 12}),
     "manifest field kv_cache.bytes_per_token: expected 512 (from the spec), found 12"),
    ("pages per sequence short", "tvm", edit(**{"kv_cache/pages_per_seq": 1}),
     "manifest field kv_cache.pages_per_seq: expected 2 (from the spec), found 1"),
    ("total bytes wrong", "tvm", edit(**{"kv_cache/total_bytes": 1}),
     "manifest field kv_cache.total_bytes: expected 65536 (from the spec), found 1"),
    ("unknown KV dtype", "tvm", edit(**{"kv_cache/dtype": "f8"}),
     "manifest field kv_cache.dtype: expected one of f32, f16, bf16, found 'f8'"),
    ("KV dtype an object", "tvm", edit(**{"kv_cache/dtype": {"f32": 1}}),  # fuzzer
     "manifest field kv_cache.dtype: expected one of f32, f16, bf16, found {'f32': 1}"),
    ("no layer groups", "tvm", edit(**{"kv_cache/groups": []}),
     "manifest field kv_cache.groups: expected a non-empty list of layer groups"),
    ("groups not a list", "tvm", edit(**{"kv_cache/groups": {"0": {}}}),
     "manifest field kv_cache.groups: expected a non-empty list of layer groups"),
    ("a layer twice", "tvm", edit(**{"kv_cache/groups/0/layers": [0, 0]}),
     "manifest field kv_cache.groups: the groups' layers must be 0..1, each once, found [0, 0]"),
    ("a layer missing", "tvm", edit(**{"kv_cache/groups/0/layers": [1]}),
     "manifest field kv_cache.groups: the groups' layers must be 0..0, each once, found [1]"),
    ("negative layer", "tvm", edit(**{"kv_cache/groups/0/layers": [0, -1]}),
     "manifest field kv_cache.groups[0].layers: expected an integer >= 0, found -1"),
    ("unknown group kind", "tvm", edit(**{"kv_cache/groups/0/kind": "mla"}),
     "manifest field kv_cache.groups[0].kind: expected one of kv, latent"),
    ("zero window", "tvm", edit(**{"kv_cache/groups/0/window": 0}),
     "manifest field kv_cache.groups[0].window: expected an integer >= 1, found 0"),
    ("ort spec damaged", "onnxruntime", edit(**{"kv_cache/groups/0/v_head_dim": -16}),
     "manifest field kv_cache.groups[0].v_head_dim: expected an integer >= 1, found -16"),
    # a well-formed spec that is not the one compiled: the hashed IR's record, then the library, tell
    ("spec edited", "tvm", edit_spec(huge_cache),
     "manifest field kv_cache differs from the spec the model was compiled with (in max_tokens, num_pages, "
     "total_bytes); the manifest was edited, recompile the artifact"),
    ("fewer pages than a sequence, derived fields redone", "tvm", edit_spec(one_page), "manifest field kv_cache.num_pages: expected at least 2 (one sequence of max_seq_len 32 tokens), found 1"),
    ("more pages, derived fields redone", "tvm", edit_spec(more_pages),
     "manifest field kv_cache differs from the spec the model was compiled with (in max_tokens, num_pages, "
     "total_bytes)"),
    ("KV dtype edited", "tvm", edit_spec(half_precision),
     "manifest field kv_cache differs from the spec the model was compiled with (in bytes_per_token, dtype, "
     "total_bytes)"),
    ("ort spec edited", "onnxruntime", edit_spec(more_pages), "manifest field kv_cache differs from the spec"),
    ("spec edited in the IR too", "tvm", edit_spec(huge_cache, in_the_module_too=True),
     "the KV cache takes 9,007,199,254,740,992 bytes, more than this machine's"),
    ("groups edited in the IR and step too", "tvm", split_groups,
     "model.so's @step takes model_embed_tokens_weight as parameter 7, the manifest names k_cache_1; recompile"),
    # the step signature
    ("no step signature", "tvm", edit(step=DELETE), STEP_SIGNATURE + "None"),
    ("step a list", "tvm", edit(step=["step"]), STEP_SIGNATURE + "['step']"),
    ("step inputs reordered", "tvm", edit(**{"step/inputs": lambda inputs: swap(inputs, 0, 1)}), STEP_SIGNATURE),
    ("step pools reordered", "tvm", edit(**{"step/inputs": lambda inputs: swap(inputs, 5, 6)}), STEP_SIGNATURE),
    ("step input renamed", "tvm", edit(**{"step/inputs/5/name": "kv_cache"}), STEP_SIGNATURE),
    ("step without a pool", "tvm", edit(**{"step/inputs": lambda inputs: inputs[:-1]}), STEP_SIGNATURE),
    ("step with an extra input", "tvm", edit(**{"step/inputs": lambda inputs: inputs + [{"name": "kv_cache"}]}),
     STEP_SIGNATURE),
    ("step inputs as names", "tvm", edit(**{"step/inputs": lambda inputs: [i["name"] for i in inputs]}),
     STEP_SIGNATURE),
    ("step function renamed", "tvm", edit(**{"step/function": "prefill"}), STEP_SIGNATURE + "{'function': 'prefill'"),
    ("step functions without step", "tvm", edit(**{"step/functions": [DECODE_STEP]}), STEP_SIGNATURE),
    ("step functions unknown", "tvm", edit(**{"step/functions": lambda names: names + ["prefill_last"]}),
     STEP_SIGNATURE),
    ("step functions holding an object", "tvm", edit(**{"step/functions": lambda names: names + [{"": 0}]}),
     STEP_SIGNATURE),  # fuzzer
    ("ort step without a pool", "onnxruntime", edit(**{"step/inputs": lambda inputs: inputs[:-1]}), STEP_SIGNATURE),
    # the other fields the runtime reads
    ("vocab negative", "tvm", edit(**{"model/vocab_size": -1}), "model.vocab_size must be a positive integer"),
    ("eos out of range", "tvm", edit(**{"tokenizer/eos_token_ids": [10**6]}), "tokenizer.eos_token_ids must be"),
    ("bos a string", "tvm", edit(**{"tokenizer/bos_token_id": "1"}), "tokenizer.bos_token_id must be"),
    ("add_bos not a bool", "tvm", edit(**{"tokenizer/add_bos_token": 1}), "tokenizer.add_bos_token must be"),
    # the TVM library and its weights table
    ("weights table without step", "tvm", edit(**{f"backend_info/weights/{STEP}": DELETE}),
     "manifest field backend_info.weights must map step (and step_decode) to lists of weight names"),
    ("weights table with another function", "tvm", edit(**{"backend_info/weights": lambda table: {
        STEP: table[STEP], "prefill_last": table[DECODE_STEP]}}),
     "backend_info.weights must map step (and step_decode)"),
    ("weights list a string", "tvm", edit(**{f"backend_info/weights/{STEP}": "model.embed_tokens.weight"}),
     "backend_info.weights must map step (and step_decode) to lists of weight names"),
    ("weights reordered", "tvm", edit(**{f"backend_info/weights/{STEP}": lambda names: swap(names, 0, 1)}),
     "model.so's @step takes model_embed_tokens_weight as parameter 7, the manifest names "
     "model_layers_0_self_attn_o_proj_weight; recompile the artifact"),
    ("weights one short", "tvm", edit(**{f"backend_info/weights/{DECODE_STEP}": lambda names: names[:-1]}),
     "model.so's @step_decode takes model_layers_1_self_attn_q_proj_weight_model_layers_1_self_attn_k_proj_weight_"
     "model_layers_1_self_attn_v_proj_weight as parameter 24, the manifest names nothing"),
    ("function the library lacks", "tvm-step-only", claim_a_function_the_library_lacks,
     "model.so has no function step_decode that the manifest lists; recompile the artifact"),
    # the ONNX Runtime model's inputs and outputs
    ("ort layer dtype an object", "onnxruntime", edit(**{"backend_info/kv_layers": lambda layers: [
        {**layer, "dtype": {}} for layer in layers]}), "manifest field backend_info.kv_layers must be a list of 2"),
    ("ort layers disagree", "onnxruntime", edit(**{"backend_info/kv_layers": lambda layers: layers[:1]}),
     "manifest field backend_info.kv_layers must be a list of 2"),
    ("ort layer head dim edited", "onnxruntime", edit(**{"backend_info/kv_layers/1/head_dim": 8}),
     "manifest field backend_info.kv_layers[1] must be {'num_kv_heads': 2, 'head_dim': 16, 'dtype': 'f32'}"),
    ("ort inputs without a layer's values", "onnxruntime",
     edit(**{"backend_info/inputs": lambda names: [n for n in names if n != "past_value_1"]}),
     ORT_INPUTS + " (missing past_value_1)"),
    ("ort inputs reordered", "onnxruntime", edit(**{"backend_info/inputs": lambda names: swap(names, 0, 1)}),
     ORT_INPUTS + " in that order"),
    ("ort inputs missing", "onnxruntime", edit(**{"backend_info/inputs": DELETE}),
     "manifest field backend_info.inputs must be the list of the step model's input names"),
    ("ort input unknown", "onnxruntime", edit(**{"backend_info/inputs": lambda names: names + ["attention_mask"]}),
     "the step model takes the input 'attention_mask', which this executor does not feed"),
    ("ort logits a number", "onnxruntime", edit(**{"backend_info/logits": 3}),
     "manifest field backend_info.logits must be the name of the logits output"),
    ("ort output the model lacks", "onnxruntime", edit(**{"backend_info/logits": "scores"}),
     "step.onnx has no output scores"),
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
    for name in ("tvm", "onnxruntime", "tvm-step-only"):  # the last decodes with @step
        assert main(["run", artifacts[name], "Hello", "-n", "3", "--ignore-eos"]) == 0
        assert capsys.readouterr().out.strip()
    assert _private_copies() == []


def test_files_swapped_after_the_check_are_caught_when_loaded(artifacts, tmp_path):
    """open_artifact checks the manifest and sizes; the bytes loaded later are hashed as they are read, so a
    library, weights or tokenizer replaced in between (same size, other bytes) is refused, not loaded."""
    for backend, name in (("tvm", "model.so"), ("tvm", "weights.safetensors"), ("tvm", "tokenizer.json"),
                          ("onnxruntime", "step.onnx"), ("onnxruntime", "model.onnx.data")):
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
