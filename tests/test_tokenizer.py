"""kiln's tokenizers against independent references.

SmolLM2's GGUF tokenizer is compared with transformers' GGUF tokenizer and with a
small pure-Python BPE written here from llama.cpp's rules for tokenizer.ggml.pre
"smollm" (split on \\p{N}, then GPT-2's regex). transformers' conversion ignores
"smollm" and so misses the digit split: it differs on whitespace runs before a digit.
"""

import json
import os

import gguf
import pytest
import regex
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from kiln.frontend.gguf_file import GGUFFile
from kiln.frontend.tokenizer import (TokenizerBundle, check_tokenizer_fits, tokenizer_from_gguf, tokenizer_from_hf_dir,
                                     tokenizers_errors)
from kiln.ir.errors import ModelFormatError

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, Ærøskøbing, Straße",
    "日本語のテキストと中文文本",
    "emoji: 🎉🚀👩‍👩‍👧 ok",
    "3.14159265358979 and 1234567890123 and -42",
    "def f(x):\n    if x > 0:\n        return x ** 2\n    return None\n",
    "\tfor i in range(10):\n\t\tprint(i)\n",
    "spaces     and\t\ttabs\n\n\nnewlines   ",
    "  leading and trailing  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b<|im_end|>",
    "it's don't we'll they've I'm you'd she's",
    "",
    " ",
    "\n",
    "x = [1,2,3]  # list",
    "a  1 b\t2 c\n 3",
    "    return  0\n\t\t42",
]
# Whitespace runs before a digit: where transformers' missing digit split shows.
DIGIT_AFTER_SPACES = {"a  1 b\t2 c\n 3", "    return  0\n\t\t42"}


# --- an independent reference: llama.cpp's "smollm" pre-tokenizer and plain BPE, in Python ---

def _bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


GPT2_REGEX = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def _split_keep(pattern, text):
    """Matches and the text between them, in order (llama.cpp's unicode_regex_split)."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append(text[start:m.start()])
        pieces.append(m.group())
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class ReferenceBPE:
    def __init__(self, meta):
        self.tokens = meta["tokenizer.ggml.tokens"]
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.special = sorted((t for t, ty in zip(self.tokens, meta["tokenizer.ggml.token_type"]) if ty in (3, 4)),
                              key=len, reverse=True)
        self.byte_map = _bytes_to_unicode()
        self.unbyte = {c: b for b, c in self.byte_map.items()}

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text):
        ids = []
        special = regex.compile("|".join(regex.escape(s) for s in self.special))
        for chunk in _split_keep(special, text):
            if chunk in self.special:
                ids.append(self.vocab[chunk])
                continue
            for digit_piece in _split_keep(regex.compile(r"\p{N}"), chunk):
                for word in GPT2_REGEX.findall(digit_piece):
                    spelled = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                    ids.extend(self.vocab[p] for p in self._bpe(spelled))
        return ids

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            token = self.tokens[i]
            if token in self.special:
                out += token.encode("utf-8")
            else:
                out += bytes(self.unbyte[c] for c in token)
        return out.decode("utf-8", errors="replace")



@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    return GGUFFile(smollm2_path).metadata


@pytest.fixture(scope="module")
def reference(smollm2_meta):
    return ReferenceBPE(smollm2_meta)


@pytest.fixture(scope="module")
def kiln_bundle(smollm2_path):
    return tokenizer_from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path),
                                                      gguf_file=os.path.basename(smollm2_path))


@pytest.mark.parametrize("text", STRINGS)
def test_encode_decode_match_reference_bpe(kiln_bundle, reference, text):
    tokenizer = kiln_bundle.tokenizer()
    ids = tokenizer.encode(text).ids
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids) == text


def test_encode_decode_match_transformers(kiln_bundle, hf_tokenizer):
    tokenizer = kiln_bundle.tokenizer()
    for text in STRINGS:
        ids = tokenizer.encode(text).ids
        expected = hf_tokenizer.encode(text, add_special_tokens=True)
        assert (ids != expected) if text in DIGIT_AFTER_SPACES else (ids == expected), text
        # Decoding is per id, so it must agree everywhere, with and without special tokens.
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_transformers_gguf_conversion_misses_smollm_digit_split(kiln_bundle, hf_tokenizer, reference):
    # Documents why the reference BPE above exists: SmolLM2 splits digits before GPT-2's regex.
    text = "a  1"
    expected = reference.encode(text)
    assert kiln_bundle.tokenizer().encode(text).ids == expected
    assert hf_tokenizer.convert_ids_to_tokens(expected) == ["a", "ĠĠ", "1"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode(text)) == ["a", "Ġ", "Ġ", "1"]


def test_special_tokens_and_template(kiln_bundle, hf_tokenizer, smollm2_meta):
    assert kiln_bundle.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert kiln_bundle.eos_token_ids == [hf_tokenizer.eos_token_id] == [2]
    assert kiln_bundle.bos_token == "<|im_start|>" and kiln_bundle.eos_token == "<|im_end|>"
    assert kiln_bundle.add_bos_token is False
    assert kiln_bundle.chat_template == smollm2_meta["tokenizer.chat_template"] == hf_tokenizer.chat_template
    tokenizer = kiln_bundle.tokenizer()
    assert tokenizer.get_vocab_size() == len(smollm2_meta["tokenizer.ggml.tokens"])
    assert tokenizer.encode("<|im_start|>").ids == [1]


def test_bundle_round_trip(kiln_bundle):
    again = TokenizerBundle.from_dict(json.loads(json.dumps(kiln_bundle.to_dict())))
    assert again == kiln_bundle
    with pytest.raises(ModelFormatError):
        TokenizerBundle.from_dict({"tokenizer_json": "{}", "surprise": 1})


def test_hf_dir_from_saved_transformers_tokenizer(tmp_path, hf_tokenizer):
    hf_tokenizer.save_pretrained(tmp_path)
    bundle = tokenizer_from_hf_dir(tmp_path)
    tokenizer = bundle.tokenizer()
    for text in STRINGS:
        assert tokenizer.encode(text).ids == hf_tokenizer.encode(text)
    assert bundle.bos_token_id == hf_tokenizer.bos_token_id and bundle.eos_token_ids == [hf_tokenizer.eos_token_id]
    assert bundle.chat_template == hf_tokenizer.chat_template
    assert bundle.add_bos_token is False


def _tiny_bos_tokenizer() -> Tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "<eot>": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.add_special_tokens(["<s>", "</s>", "<eot>"])
    return tokenizer


def test_hf_dir_with_bos_named_templates_and_generation_eos(tmp_path):
    _tiny_bos_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    bundle = tokenizer_from_hf_dir(tmp_path)
    assert (bundle.bos_token_id, bundle.eos_token_ids, bundle.add_bos_token) == (0, [1, 5], True)
    assert (bundle.bos_token, bundle.eos_token, bundle.chat_template) == ("<s>", "</s>", "D")
    assert bundle.tokenizer().encode("ab b").ids == [0, 4, 3]


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nothing"}}')
    with pytest.raises(ModelFormatError, match="tokenizers"):
        tokenizer_from_hf_dir(tmp_path)
    _tiny_bos_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ModelFormatError, match="<missing>"):
        tokenizer_from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelFormatError, match="JSON"):
        tokenizer_from_hf_dir(tmp_path)


# --- small synthetic GGUF vocabularies ------------------------------------------------------

def _write_vocab_gguf(path, model="gpt2", pre="smollm", merges=("a b",), add_bos=None, extra_tokens=()):
    byte_map = _bytes_to_unicode()
    tokens = ["<s>", "</s>"] + [byte_map[b] for b in range(256)] + ["ab", "<tool>"] + list(extra_tokens)
    types = [3, 3] + [1] * 257 + [4] + [1] * len(extra_tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_add_bos_and_user_defined_tokens(tmp_path):
    bundle = tokenizer_from_gguf(_write_vocab_gguf(tmp_path / "v.gguf", add_bos=True))
    tokenizer = bundle.tokenizer()
    assert bundle.add_bos_token and bundle.bos_token_id == 0 and bundle.eos_token_ids == [1]
    ab, tool = 258, 259
    assert tokenizer.encode("ab<tool>").ids == [0, ab, tool]
    assert tokenizer.encode("ab", add_special_tokens=False).ids == [ab]
    # User-defined tokens are text: kept when decoding without specials; control tokens are dropped.
    assert tokenizer.decode([0, ab, tool, 1], skip_special_tokens=True) == "ab<tool>"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"model": "t5"}, "tokenizer.ggml.model"),
    ({"pre": "mystery"}, "tokenizer.ggml.pre"),
    ({"pre": None}, "tokenizer.ggml.pre"),
    ({"merges": ("a c",)}, "merges"),
    ({"merges": ("ab",)}, "merges"),
    ({"extra_tokens": ("ab",)}, "unique"),
])
def test_gguf_vocab_refusals(tmp_path, kwargs, fragment):
    path = _write_vocab_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelFormatError, match=fragment) as info:
        tokenizer_from_gguf(path)
    assert str(path) in str(info.value)


# --- refusals: panics, ids beyond the model, files that are not regular ---------------------------------

def test_rust_panics_become_one_typed_line():
    # A Precompiled normalizer with an invalid charsmap makes tokenizers 0.2x panic while loading
    # (pyo3's PanicException derives from BaseException, so `except Exception` misses it).
    tokenizer = json.loads(_tiny_bos_tokenizer().to_str())
    tokenizer["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "!!"}
    bundle = TokenizerBundle(tokenizer_json=json.dumps(tokenizer), bos_token_id=0)
    with pytest.raises(ModelFormatError, match="panicked") as info:
        bundle.tokenizer()
    assert "\n" not in str(info.value)
    # Only panics and exceptions are converted: an interrupt stays an interrupt.
    with pytest.raises(KeyboardInterrupt):
        with tokenizers_errors("here", "what"):
            raise KeyboardInterrupt


def test_check_tokenizer_fits_against_the_model_rows(kiln_bundle, smollm2_meta):
    rows = len(smollm2_meta["tokenizer.ggml.tokens"])
    last = smollm2_meta["tokenizer.ggml.tokens"][-1]
    check_tokenizer_fits(kiln_bundle, rows, "smollm2")
    with pytest.raises(ModelFormatError, match=f"with id {rows - 1}, beyond the model's {rows - 1} embedding rows") as info:
        check_tokenizer_fits(kiln_bundle, rows - 1, "smollm2")
    assert repr(last) in str(info.value)


def test_special_ids_must_fit_the_model():
    bundle = TokenizerBundle(tokenizer_json=_tiny_bos_tokenizer().to_str(), bos_token_id=0, eos_token_ids=[1, 9])
    with pytest.raises(ModelFormatError, match="eos_token_id 9 is beyond the model's 6 embedding rows"):
        check_tokenizer_fits(bundle, 6, "tiny")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_hf_dir_reads_only_regular_files(tmp_path, name, kind):
    _tiny_bos_tokenizer().save(str(tmp_path / "tokenizer.json"))
    target = tmp_path / name
    if target.exists():
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block forever
    else:
        os.symlink("/dev/zero", target)  # reading it would never end
    with pytest.raises(ModelFormatError, match="FIFO" if kind == "fifo" else "device") as info:
        tokenizer_from_hf_dir(tmp_path)
    assert name in str(info.value)
