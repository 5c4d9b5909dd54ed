"""Fuzz target: open, load and run an artifact whose manifest is mutated.

The other files are those of a small, valid reference-backend artifact (``artifact_seed/``: a 1-layer
Llama with a 128-token character tokenizer and a chat template; remake it with ``--make-seeds``). The input
drives structured edits of the seed's manifest (replace, delete or add a value anywhere in its JSON tree,
with integers at the edges of their ranges, strings naming other files, lists, objects) and, when its
first byte is odd, raw byte edits of the JSON text. Each mutated manifest is written into a private copy
of the artifact, which is loaded with ``kiln.load``; an engine that loads must generate from token ids,
from text and from a chat, or refuse in one KilnError.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

from harness import Choices, run, write_seeds

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = os.path.join(HERE, "artifact_seed")
_state: dict = {}

INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 64, 127, 128, 129, 255, 256, 4096, 2**31 - 1, 2**31,
                    2**32, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63), 10**18]
INTERESTING_STRINGS = ["", ".", "..", "/", "/etc/passwd", "../manifest.json", "manifest.json", "model.kir",
                       "module.kir", "weights.safetensors", "tokenizer.json", "chat_template.jinja", "f32", "f16",
                       "cpu", "cuda", "tvm", "reference", "onnxruntime", "0" * 64, "\x00", "\ud800", "a" * 300]


class ManifestChoices(Choices):
    def value(self, depth: int = 0):
        kind = self.byte() % 8
        if kind == 0:
            return self.pick(INTERESTING_INTS)
        if kind == 1:
            return self.pick(INTERESTING_STRINGS)
        if kind == 2:
            return None
        if kind == 3:
            return bool(self.byte() & 1)
        if kind == 4:
            return [self.value(depth + 1) for _ in range(self.byte() % 4)] if depth < 3 else []
        if kind == 5:
            return {self.pick(INTERESTING_STRINGS): self.value(depth + 1) for _ in range(self.byte() % 3)} \
                if depth < 3 else {}
        if kind == 6:
            return (self.byte() - 128) * 0.5
        return int.from_bytes(bytes(self.byte() for _ in range(8)), "little", signed=True)


def _containers(node, out):
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            _containers(value, out)
    elif isinstance(node, list):
        out.append(node)
        for value in node:
            _containers(value, out)
    return out


def mutate(manifest: dict, source: ManifestChoices) -> dict:
    for _ in range(1 + source.byte() % 4):
        holder = source.pick(_containers(manifest, []))
        keys = list(holder) if isinstance(holder, dict) else list(range(len(holder)))
        action = source.byte() % 4
        if not keys or action == 3:
            if isinstance(holder, dict):
                holder[source.pick(INTERESTING_STRINGS)] = source.value()
            else:
                holder.append(source.value())
        elif action == 2:
            del holder[source.pick(keys)]
        else:
            holder[source.pick(keys)] = source.value()
    return manifest


def _setup():
    if not _state:
        import kiln
        from kiln.backends import backend_version

        with open(os.path.join(SEED, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["kiln_version"] = kiln.__version__  # the seed outlives version bumps
        manifest["backend_version"] = backend_version("reference")
        work = tempfile.mkdtemp(prefix="kiln-fuzz-artifact-")
        atexit.register(shutil.rmtree, work, True)
        _state.update(manifest=manifest, work=work, kiln=kiln)
    return _state


def check(data: bytes) -> None:
    state = _setup()
    source = ManifestChoices(data[1:])
    manifest = mutate(json.loads(json.dumps(state["manifest"])), source)
    text = json.dumps(manifest).encode("utf-8", "surrogatepass")
    if data[:1] and data[0] & 1:  # raw edits of the JSON text as well
        raw = bytearray(text)
        for _ in range(source.byte() % 8):
            if raw:
                raw[(source.byte() << 8 | source.byte()) % len(raw)] = source.byte()
        text = bytes(raw)
    art = os.path.join(state["work"], "model.kiln")
    shutil.rmtree(art, ignore_errors=True)
    shutil.copytree(SEED, art)
    with open(os.path.join(art, "manifest.json"), "wb") as f:
        f.write(text)
    engine = state["kiln"].load(art)
    engine.generate([1, 72, 105], max_new_tokens=3)
    engine.generate("Hi", max_new_tokens=2, temperature=0.7, seed=1)
    engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    engine.logits([72, 105])


def make_seeds(corpus: str) -> None:
    """Write artifact_seed/ (a 1-layer Llama, hidden 16, with the tests' character tokenizer, reference backend)
    and two seed inputs: the manifest as it is, and one edit."""
    import torch
    import transformers

    sys.path.insert(0, os.path.dirname(HERE))
    import kiln
    from tiny_checkpoint import CHAT_TEMPLATE, char_tokenizer

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    scratch = tempfile.mkdtemp()
    work = os.path.join(scratch, "tiny-llama")  # the model's name in the manifest
    torch.manual_seed(0)  # the same weights each time the seed is remade
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(work, safe_serialization=True)
    char_tokenizer().save(os.path.join(work, "tokenizer.json"))
    with open(os.path.join(work, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, f)
    shutil.rmtree(SEED, ignore_errors=True)
    kiln.compile(work, backend="reference", max_seq_len=48, page_size=8, max_num_seqs=2, output=SEED)
    shutil.rmtree(scratch)
    write_seeds(corpus, {"seed-unchanged-manifest": b"\x00", "seed-one-edit": b"\x00\x03\x05\x02\x00"})


if __name__ == "__main__":
    run(check, "artifact", make_seeds)
