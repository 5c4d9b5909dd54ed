"""SentencePiece GGUF vocabularies (tokenizer.ggml.model "llama") against llama.cpp's own tokenizer.

Tiny vocabulary-only GGUF files are written here with gguf.GGUFWriter: three specials, the 256
<0xXX> byte tokens and a few hundred pieces with random scores, so the order merges happen in
matters. llama-cpp-python opens them with vocab_only=True and is the reference for ids and text.
"""

import ctypes
import json

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from kiln.frontend.tokenizer import TokenizerBundle, check_tokenizer_fits, tokenizer_from_gguf
from kiln.ir.errors import ModelFormatError
from kiln.runtime.chat_template import render_chat
from kiln.runtime.detokenize import IncrementalDetokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference tokenizer")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN),
                                                int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED),
                                                int(gguf.TokenType.BYTE))

SPACE = "\u2581"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
# Characters that are pieces of their own; every multi-character piece is made of them, as in a
# SentencePiece model. Anything else (newlines, tabs, ß, most CJK, emoji) takes the byte fallback.
ALPHABET = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"()[]{}=+-*/_#@&%$|")
            + [SPACE, "é", "è", "à", "ü", "ñ", "日", "本", "語"])
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there! Hello World. Hello, hello",
    "def main(): return x + y * 2 if x else None",
    "for i in range(10): print(i, end=', ')",
    "café crème à la mode, über señor, très bien",
    "日本語 日本 本日 語",
    "1234567890 3.14 2024-01-01 100 200 300",
    "    indented code    with    spaces  and  tabs",
    "inline ing in int into inner winning",
]
# Pieces whose merge order decides the result: "▁hello" is best reached through "▁he" + "llo",
# but "ll" outscores "▁he", and "▁▁▁▁" beats "▁▁▁".
HAND_PIECES = {"ll": -1.0, "llo": -2.0, "he": -3.0, "▁h": -4.0, "▁he": -5.0, "▁hello": -6.0, "lo": -0.5,
               "▁▁": -0.1, "▁▁▁▁": -0.2, "▁▁▁": -7.0, "in": -0.3, "ing": -8.0, "▁in": -9.0, "nin": -0.05}
TEXTS = [
    "", " ", "  ", "hello", "Hello world", " hello", "hello ", "  leading and trailing  ", "a\nb", "\n",
    "\n\n  \n", "\t tab\tstop", "line one\nline two\r\n", "café crème à la mode", "naïve über straße",
    "日本語のテキスト", "中文 日本", "emoji 😀👍🏽 ok", "🦀", "👨\u200d👩\u200d👧 family", "digits 1234567890 3.14159",
    "def f(x):\n    return x * 2  # comment", "    indented", "a  b   c    d", "mixed\u00a0nbsp", "e\u0301te\u0301",
    "winning inning spinning", "hellohello hello hellllo", "The quick brown fox jumps over the lazy dog. " * 3,
    f"literal {SPACE} space mark",
]
FRAGMENTS = ["hello", "world", "the", " ", "  ", "\n", "\t", "日本", "語", "😀", "é", "ß", "123", "3.14", "(x)",
             "inning", "▁", "Hello", ",", "!", "def", "return", "🦀", "über", "x = y", "    "]


def escaped(text: str) -> str:
    return SPACE + text.replace(" ", SPACE)


def build_vocabulary(seed: int = 0) -> tuple[list[str], list[float], list[int]]:
    """Specials, bytes, single characters, then pieces with distinct random scores."""
    rng = np.random.default_rng(seed)
    allowed = set(ALPHABET)
    candidates = sorted({line[i:j] for line in map(escaped, CORPUS) for i in range(len(line))
                         for j in range(i + 2, min(i + 8, len(line) + 1)) if set(line[i:j]) <= allowed})
    chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), size=400, replace=False))]
    pieces = list(HAND_PIECES) + [p for p in chosen if p not in HAND_PIECES]
    piece_scores = list(HAND_PIECES.values()) + list(-rng.permutation(len(pieces) - len(HAND_PIECES)) - 10.0)
    tokens = SPECIALS + BYTE_TOKENS + ALPHABET + pieces
    scores = [0.0] * (len(SPECIALS) + 256) + [-1000.0 - i for i in range(len(ALPHABET))] + piece_scores
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(ALPHABET) + len(pieces))
    return tokens, [float(s) for s in scores], types


LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                   "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
                   "{% endfor %}")


def write_gguf(path, tokens, scores=None, types=None, *, model="llama", add_bos=None, add_eos=None,
               add_space_prefix=None, bos=1, eos=2, unk=0, chat_template=None, raw=None):
    """A llama-architecture GGUF with no tensors: what llama.cpp needs to load a vocabulary alone.
    None leaves a key out; raw maps keys to (writer method name, value) for deliberately wrong types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    raw = dict(raw or {})
    for key, method, value in (("tokenizer.ggml.tokens", "add_token_list", tokens),
                               ("tokenizer.ggml.scores", "add_token_scores", scores),
                               ("tokenizer.ggml.token_type", "add_token_types", types),
                               ("tokenizer.ggml.bos_token_id", "add_bos_token_id", bos),
                               ("tokenizer.ggml.eos_token_id", "add_eos_token_id", eos),
                               ("tokenizer.ggml.unknown_token_id", "add_unk_token_id", unk),
                               ("tokenizer.ggml.add_bos_token", "add_add_bos_token", add_bos),
                               ("tokenizer.ggml.add_eos_token", "add_add_eos_token", add_eos),
                               ("tokenizer.ggml.add_space_prefix", "add_add_space_prefix", add_space_prefix),
                               ("tokenizer.chat_template", "add_chat_template", chat_template)):
        if key in raw:
            raw_method, raw_value = raw.pop(key)
            getattr(writer, raw_method)(key, raw_value)
        elif value is not None:
            getattr(writer, method)(value)
    assert not raw, f"unknown raw keys {sorted(raw)}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(FRAGMENTS, size=rng.integers(1, 12))) for _ in range(count)]


class Pair:
    """One vocabulary file opened by kiln and by llama.cpp."""

    def __init__(self, path):
        self.path = path
        self.bundle = tokenizer_from_gguf(path)
        self.kiln = self.bundle.tokenizer()
        self.llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = self.llama._model.vocab

    def llama_ids(self, text: str, add_bos: bool, special: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def llama_text(self, ids: list[int]) -> str:
        """llama.cpp's own detokenize (not llama-cpp-python's per-piece join), specials left out."""
        tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        size = 32 * len(ids) + 16  # a piece here is at most 7 characters of at most 3 bytes
        buffer = ctypes.create_string_buffer(size)
        written = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buffer, size, False, False)
        assert 0 <= written <= size
        return buffer.raw[:written].decode("utf-8")


@pytest.fixture(scope="module")
def vocabulary():
    return build_vocabulary()


@pytest.fixture(scope="module")
def llama2(tmp_path_factory, vocabulary):
    """Llama-2's layout: no add_bos / add_space_prefix keys (both default to true), a chat template."""
    tokens, scores, types = vocabulary
    return Pair(write_gguf(tmp_path_factory.mktemp("spm") / "llama2.gguf", tokens, scores, types,
                           chat_template=LLAMA2_TEMPLATE))


@pytest.fixture(scope="module")
def no_prefix(tmp_path_factory, vocabulary):
    """Gemma's layout: no space prefix, and a user-defined and an extra control token."""
    tokens, scores, types = vocabulary
    tokens, scores, types = tokens + ["<tool>", "<|end|>"], scores + [0.0, 0.0], types + [USER_DEFINED, CONTROL]
    return Pair(write_gguf(tmp_path_factory.mktemp("spm") / "gemma.gguf", tokens, scores, types,
                           add_bos=False, add_space_prefix=False))


def test_scores_decide_the_merges(llama2):
    # Guards the comparisons below: the same merges applied in the opposite order tokenize much of
    # the text differently from llama.cpp, so matching it takes the order the scores give.
    spec = json.loads(llama2.kiln.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    reversed_order = Tokenizer.from_str(json.dumps(spec))
    texts = TEXTS + random_texts(150, seed=1)
    differ = sum(reversed_order.encode(text).ids != llama2.llama_ids(text, add_bos=True) for text in texts)
    assert differ > len(texts) // 4


@pytest.mark.parametrize("add_bos", [False, True])
def test_encode_matches_llama_cpp(llama2, add_bos):
    for text in TEXTS + random_texts(150, seed=1):
        expected = llama2.llama_ids(text, add_bos=add_bos)
        assert llama2.kiln.encode(text, add_special_tokens=add_bos).ids == expected, repr(text)


def test_encode_without_space_prefix_matches_llama_cpp(no_prefix):
    for text in TEXTS + random_texts(100, seed=2):
        for add_bos in (False, True):  # the file says no BOS: llama.cpp and kiln add none either way
            expected = no_prefix.llama_ids(text, add_bos=add_bos)
            assert no_prefix.kiln.encode(text, add_special_tokens=add_bos).ids == expected, repr(text)


def test_control_and_user_defined_tokens_match_llama_cpp_parsing_specials(no_prefix, llama2):
    # kiln always matches control tokens whole (llama.cpp's special=True); user-defined ones are
    # matched whole by both either way, and each fragment after one gets its own space prefix.
    texts = ["<s>hello</s> world", "a<tool>b", "<tool> x <|end|>\n<s>", "<unk>日本<|end|><|end|>", "x </s>"]
    for pair in (no_prefix, llama2):
        for text in texts:
            expected = pair.llama_ids(text, add_bos=False, special=True)
            assert pair.kiln.encode(text, add_special_tokens=False).ids == expected, (pair.path.name, text)
    assert no_prefix.kiln.encode("a<tool>b", add_special_tokens=False).ids == \
        no_prefix.llama_ids("a<tool>b", add_bos=False, special=False)


@pytest.mark.parametrize("pair_name", ["llama2", "no_prefix"])
def test_decode_matches_llama_cpp_and_round_trips(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    for text in TEXTS + random_texts(100, seed=3):
        ids = pair.llama_ids(text, add_bos=False)
        decoded = pair.kiln.decode(ids, skip_special_tokens=True)
        assert decoded == pair.llama_text(ids), repr(text)
        # A literal U+2581 in the text is read as a space by both, so it cannot come back.
        assert decoded == text or SPACE in text, repr(text)
        with_bos = pair.kiln.encode(text, add_special_tokens=True).ids
        assert pair.kiln.decode(with_bos, skip_special_tokens=True) == decoded


def test_byte_fallback_really_happens(llama2):
    ids = llama2.kiln.encode("🦀", add_special_tokens=False).ids
    assert [llama2.kiln.id_to_token(i) for i in ids] == [SPACE, "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]


def stream(tokenizer, ids, prompt_ids=()) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    return "".join(pieces) + detokenizer.flush()


@pytest.mark.parametrize("pair_name", ["llama2", "no_prefix"])
def test_incremental_detokenizer_equals_one_decode(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    prompts = random_texts(60, seed=4)
    for index, text in enumerate(TEXTS + random_texts(60, seed=5)):
        ids = pair.kiln.encode(text, add_special_tokens=False).ids
        expected = pair.llama_text(ids)
        assert stream(pair.kiln, ids) == expected, repr(text)
        # After a prompt the stream is the continuation: the space before the first word stays.
        prompt_ids = pair.kiln.encode(prompts[index % len(prompts)], add_special_tokens=True).ids
        prompt_text = pair.kiln.decode(prompt_ids)
        assert stream(pair.kiln, ids, prompt_ids) == pair.kiln.decode(prompt_ids + ids)[len(prompt_text):]


def test_incremental_detokenizer_traps(llama2):
    kiln = llama2.kiln
    # The first token's "▁" is dropped as in one decode; a 4-byte character split over byte tokens
    # comes out whole, only once its last byte arrives and a non-byte token closes the run.
    ids = kiln.encode("hello 🦀 world", add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(kiln)
    pieces = [detokenizer.push(i) for i in ids]
    assert pieces[0] == kiln.decode(ids[:1]) and not pieces[0].startswith(" ")
    crab = [i for i, token in enumerate(map(kiln.id_to_token, ids)) if token.startswith("<0x")]
    assert len(crab) == 4 and all(pieces[i] == "" for i in crab)
    assert "".join(pieces) + detokenizer.flush() == llama2.llama_text(ids) == "hello 🦀 world"


def test_llama2_bundle_matches_llama_cpp(llama2, vocabulary):
    bundle, vocab = llama2.bundle, llama2.vocab
    assert bundle.bos_token_id == llama_cpp.llama_vocab_bos(vocab) == 1
    assert bundle.eos_token_ids == [llama_cpp.llama_vocab_eos(vocab)] == [2]
    assert bundle.add_bos_token is llama_cpp.llama_vocab_get_add_bos(vocab) is True
    assert (bundle.bos_token, bundle.eos_token) == ("<s>", "</s>")
    assert bundle.chat_template == LLAMA2_TEMPLATE
    check_tokenizer_fits(bundle, len(vocabulary[0]), "test")
    # The chat path: the rendered template begins with <s>, so nothing more is added (llama.cpp
    # with add_bos would double it); the text is parsed with specials, as llama.cpp's server does.
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "日本 🦀"},
                {"role": "user", "content": "  again?"}]
    prompt = render_chat(bundle.chat_template, messages, bos_token=bundle.bos_token, eos_token=bundle.eos_token)
    ids = llama2.kiln.encode(prompt, add_special_tokens=False).ids
    assert ids == llama2.llama_ids(prompt, add_bos=False, special=True)
    assert ids[0] == bundle.bos_token_id and ids.count(bundle.eos_token_ids[0]) == 1


def test_no_prefix_bundle_matches_llama_cpp(no_prefix):
    assert no_prefix.bundle.add_bos_token is llama_cpp.llama_vocab_get_add_bos(no_prefix.vocab) is False
    assert no_prefix.bundle.bos_token_id == llama_cpp.llama_vocab_bos(no_prefix.vocab)


def test_missing_special_ids_take_llama_cpp_defaults(tmp_path, vocabulary):
    pair = Pair(write_gguf(tmp_path / "old.gguf", *vocabulary, bos=None, eos=None, unk=None))
    assert pair.bundle.bos_token_id == llama_cpp.llama_vocab_bos(pair.vocab) == 1
    assert pair.bundle.eos_token_ids == [llama_cpp.llama_vocab_eos(pair.vocab)] == [2]
    assert pair.bundle.add_bos_token is llama_cpp.llama_vocab_get_add_bos(pair.vocab) is True
    assert pair.kiln.encode("hello 🦀").ids == pair.llama_ids("hello 🦀", add_bos=True)


def test_empty_token_is_renamed_as_llama_cpp_does(tmp_path, vocabulary):
    tokens, scores, types = vocabulary
    pair = Pair(write_gguf(tmp_path / "empty.gguf", tokens + [""], scores + [-5000.0], types + [NORMAL]))
    empty_id = len(tokens)
    assert pair.kiln.id_to_token(empty_id) == llama_cpp.llama_vocab_get_text(pair.vocab, empty_id).decode()
    assert pair.kiln.encode("hello world").ids == pair.llama_ids("hello world", add_bos=True)


def test_add_eos_token(tmp_path, vocabulary):
    pair = Pair(write_gguf(tmp_path / "eos.gguf", *vocabulary, add_eos=True))
    for text in ("", "hello world", "🦀"):
        assert pair.kiln.encode(text).ids == pair.llama_ids(text, add_bos=True), repr(text)
        assert pair.kiln.encode(text).ids[-1] == 2


def test_bundle_json_round_trip(llama2):
    again = TokenizerBundle.from_dict(llama2.bundle.to_dict()).tokenizer()
    assert again.encode("naïve 日本 🦀").ids == llama2.kiln.encode("naïve 日本 🦀").ids


def _bad(vocabulary, **changes):
    tokens, scores, types = (list(part) for part in vocabulary)
    return dict(tokens=tokens, scores=scores, types=types) | changes


@pytest.mark.parametrize("make, key", [
    (lambda v: _bad(v, scores=None), "tokenizer.ggml.scores"),
    (lambda v: _bad(v, scores=v[1][:-1]), "tokenizer.ggml.scores"),
    (lambda v: _bad(v, scores=v[1][:5] + [float("nan")] + v[1][6:]), "tokenizer.ggml.scores"),
    (lambda v: _bad(v, types=None), "tokenizer.ggml.token_type"),
    (lambda v: _bad(v, types=v[2][:-1]), "tokenizer.ggml.token_type"),
    (lambda v: _bad(v, tokens=SPECIALS + v[0][259:], scores=v[1][:3] + v[1][259:], types=v[2][:3] + v[2][259:]),
     "tokenizer.ggml.tokens"),  # no byte tokens
    (lambda v: _bad(v, tokens=v[0][:3] + ["<0x00>"] * 2 + v[0][5:]), "tokenizer.ggml.tokens"),  # duplicates
    (lambda v: _bad(v, types=v[2][:10] + [NORMAL] + v[2][11:]), "tokenizer.ggml.token_type"),  # byte typed normal
    (lambda v: _bad(v, raw={"tokenizer.ggml.tokens": ("add_array", list(range(len(v[0]))))}), "tokenizer.ggml.tokens"),
    (lambda v: _bad(v, raw={"tokenizer.ggml.scores": ("add_array", ["x"] * len(v[0]))}), "tokenizer.ggml.scores"),
    (lambda v: _bad(v, raw={"tokenizer.ggml.add_space_prefix": ("add_uint8", 1)}), "tokenizer.ggml.add_space_prefix"),
    (lambda v: _bad(v, bos=len(v[0])), "tokenizer.ggml.bos_token_id"),
])
def test_malformed_metadata_is_one_typed_line(tmp_path, vocabulary, make, key):
    fields = make(vocabulary)
    path = write_gguf(tmp_path / "bad.gguf", fields.pop("tokens"), fields.pop("scores"), fields.pop("types"), **fields)
    with pytest.raises(ModelFormatError) as info:
        tokenizer_from_gguf(path)
    message = str(info.value)
    assert key in message and str(path) in message and "\n" not in message, message
