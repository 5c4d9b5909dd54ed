"""A tiny Hugging Face checkpoint directory with a tokenizer, and helpers to tamper with compiled artifacts.

The tokenizer maps printable ASCII to its code point (ids 32..126), with <unk> 0, <s> 1, </s> 2 and
filler tokens elsewhere: 128 ids, the tiny models' vocabulary, so text prompts work end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from tiny_models import VOCAB, tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<extra_{i}>": i for i in range(3, 32)})
    vocab.update({chr(i): i for i in range(32, 127)})
    vocab.update({f"<extra_{i}>": i for i in range(127, VOCAB)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


def write_checkpoint(path, name: str = "llama", chat_template: str | None = CHAT_TEMPLATE) -> str:
    """tiny_model(name) with the character tokenizer (and a chat template) as a checkpoint directory."""
    path = os.fspath(path)
    tiny_model(name).save_pretrained(path, safe_serialization=True)
    char_tokenizer().save(os.path.join(path, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path


def copy_artifact(source, target) -> str:
    shutil.copytree(source, target)
    return os.fspath(target)


def rehash(artifact, names=None) -> None:
    """Record the current bytes of ``names`` (all listed files when None) in the manifest: a tampered artifact
    whose hashes agree, to reach the checks that come after the hash check."""
    manifest_path = os.path.join(artifact, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name in names or list(manifest["files"]):
        with open(os.path.join(artifact, name), "rb") as f:
            data = f.read()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(artifact, manifest)


def read_manifest(artifact) -> dict:
    with open(os.path.join(artifact, "manifest.json")) as f:
        return json.load(f)


def write_manifest(artifact, manifest: dict) -> None:
    with open(os.path.join(artifact, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def snapshot(root) -> dict:
    """Every path under ``root`` with its kind, size and content hash (files) or target (links)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir",)
            elif os.path.isfile(full):
                with open(full, "rb") as f:
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("other",)
    return out
