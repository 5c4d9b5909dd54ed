"""Tokenizers for kiln: a `tokenizers` JSON plus the special-token facts the runtime needs.

Built from a GGUF's tokenizer.ggml.* metadata (byte-level BPE pre-tokenized as llama.cpp
does for the file's tokenizer.ggml.pre, or SentencePiece merged by score with byte
fallback as llama.cpp does) or read from a Hugging Face directory.
Every call into `tokenizers` is wrapped so that its errors and Rust panics become one
ModelFormatError line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from kiln.frontend.gguf_file import GGUFFile
from kiln.ir.errors import ModelFormatError
from kiln.ir.files import MAX_JSON_BYTES, MAX_TEMPLATE_BYTES, MAX_TOKENIZER_BYTES, read_text

# Encoded once at load: a tokenizer that fails (or panics) on plain text is refused at compile time.
_PROBE_TEXT = "Hello, world! 123 <|im_start|> ünïcödé 日本"


@contextlib.contextmanager
def tokenizers_errors(where: str, what: str):
    """Turn what `tokenizers` raises inside the block into one ModelFormatError line: its exceptions, and
    Rust panics, which pyo3 raises as PanicException, a BaseException (not an Exception)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the block holds only calls into tokenizers
        raise ModelFormatError(f"{where}: {what} ({_one_line(err)})") from None
    except BaseException as err:
        if type(err).__name__ != "PanicException":  # KeyboardInterrupt, SystemExit stay what they are
            raise
        raise ModelFormatError(f"{where}: {what}: the tokenizers library panicked ({_one_line(err)}); the "
                               "tokenizer is malformed") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__


# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split():
    return [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]


def _digits_then_gpt2_split():
    # llama.cpp splits on \p{N} first, then applies GPT-2's regex: HF spells that Digits + ByteLevel.
    return [pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]


def _regex_split(pattern: str):
    def build():
        return [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    return build


# tokenizer.ggml.pre -> pre-tokenizer, following llama.cpp's llama-vocab.cpp groups.
_BYTE_LEVEL_PRE_TOKENIZERS = {
    "gpt-2": _gpt2_split,
    "gpt2": _gpt2_split,
    "phi-2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split,
    "command-r": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
    "exaone": _digits_then_gpt2_split,
    "minerva-7b": _digits_then_gpt2_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "dbrx": _regex_split(_LLAMA3_SPLIT),
    "smaug-bpe": _regex_split(_LLAMA3_SPLIT),
    "falcon3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_split(_QWEN2_SPLIT),
}


@dataclass
class TokenizerBundle:
    """A serialized `tokenizers` tokenizer and its special tokens.

    The tokenizer's own post-processor adds BOS when add_bos_token is true (as a
    Hugging Face tokenizer.json does), so callers encode with add_special_tokens=True.
    """

    tokenizer_json: str
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos_token: bool = False
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def tokenizer(self) -> Tokenizer:
        with tokenizers_errors("tokenizer bundle", "expected a `tokenizers` tokenizer, found one it cannot load"):
            return Tokenizer.from_str(self.tokenizer_json)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerBundle":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "tokenizer_json" not in d:
            found = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ModelFormatError(f"tokenizer bundle: expected keys {sorted(names)}, found {found}")
        return cls(**d)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 maps to itself, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tokenizer_from_gguf(gguf_file) -> TokenizerBundle:
    """Build the tokenizer a GGUF describes. gguf_file: a GGUFFile or a path to one."""
    if not isinstance(gguf_file, GGUFFile):
        gguf_file = GGUFFile(gguf_file)
    meta = gguf_file.metadata
    where = gguf_file.path

    def fail(key: str, expected: str, found, fix: str = "convert the model again with a current llama.cpp") -> None:
        raise ModelFormatError(f"{where}: GGUF tokenizer {key}: expected {expected}, found {found}; {fix}")

    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        fail("tokenizer.ggml.model", "'gpt2' (byte-level BPE) or 'llama' (SentencePiece)", repr(model),
             "kiln reads no other GGUF vocabulary yet; compile the model's Hugging Face directory instead")
    sentencepiece = model == "llama"
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        fail("tokenizer.ggml.tokens", "a non-empty array of strings", "none")
    token_types = meta.get("tokenizer.ggml.token_type")
    if token_types is None and sentencepiece:
        fail("tokenizer.ggml.token_type", "one type per token (a SentencePiece vocabulary needs them to tell byte "
             "and control tokens from text)", "none")
    token_types = token_types or [TOKEN_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        fail("tokenizer.ggml.token_type", f"{len(tokens)} entries (one per token)", len(token_types))
    tokens = _checked_tokens(tokens, fail)
    vocab = {token: index for index, token in enumerate(tokens)}

    def token_id(key: str, default: int | None = None) -> int | None:
        value = meta.get(key)
        if value is None:
            return default if default is not None and default < len(tokens) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
            fail(key, f"a token id below {len(tokens)}", value)
        return value

    # A SentencePiece file without these keys gets llama.cpp's defaults for one (<unk>=0, <s>=1, </s>=2,
    # BOS added); llama.cpp adds no BOS to a BPE vocabulary unless the file asks.
    bos_id = token_id("tokenizer.ggml.bos_token_id", 1 if sentencepiece else None)
    eos_ids: list[int] = []
    for key, default in (("tokenizer.ggml.eos_token_id", 2 if sentencepiece else None),
                         ("tokenizer.ggml.eot_token_id", None), ("tokenizer.ggml.eom_token_id", None)):
        value = token_id(key, default)
        if value is not None and value not in eos_ids:
            eos_ids.append(value)
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", sentencepiece, fail)
    if add_bos and bos_id is None:
        fail("tokenizer.ggml.bos_token_id", "a BOS id since add_bos_token is true", "none")

    # llama.cpp honours add_eos_token; kiln does so for SentencePiece files (BPE ones keep what they had).
    add_eos = sentencepiece and _flag(meta, "tokenizer.ggml.add_eos_token", False, fail)
    if add_eos and not eos_ids:
        fail("tokenizer.ggml.eos_token_id", "an EOS id since add_eos_token is true", "none")
    if sentencepiece:
        unk_id = token_id("tokenizer.ggml.unknown_token_id", 0)
        tokenizer = _sentencepiece_tokenizer(meta, tokens, token_types, vocab, unk_id, fail, where)
    else:
        tokenizer = _byte_level_tokenizer(meta, tokens, token_types, vocab, fail, where)
    with tokenizers_errors(where, "GGUF tokenizer: tokenizers cannot build it"):
        if add_bos or add_eos:
            tokenizer.post_processor = _special_template(tokens, bos_id if add_bos else None,
                                                         eos_ids[0] if add_eos else None)
        elif not sentencepiece:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer_json = tokenizer.to_str()

    chat_template = _checked_template(meta.get("tokenizer.chat_template"), f"{where}: GGUF tokenizer.chat_template")
    return TokenizerBundle(
        tokenizer_json=tokenizer_json,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos_token=add_bos,
        chat_template=chat_template,
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_ids[0]] if eos_ids else None,
    )


def _checked_tokens(tokens: list, fail) -> list[str]:
    """The token strings, each unique; an empty one is renamed as llama.cpp does, so it cannot clash."""
    named = []
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            fail("tokenizer.ggml.tokens", "an array of strings", f"a {type(token).__name__} at id {index}")
        token = token or f"[EMPTY_{index}]"
        if token in seen:
            fail("tokenizer.ggml.tokens", "unique tokens", f"{token!r} at ids {seen[token]} and {index}")
        seen[token] = index
        named.append(token)
    return named


def _flag(meta: dict, key: str, default: bool, fail) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        fail(key, "true or false", repr(value))
    return value


def _special_template(tokens: list[str], bos_id: int | None, eos_id: int | None):
    """A post-processor that puts BOS in front and EOS behind, as llama.cpp's add_special does."""
    def sequence(name: str, type_id: int) -> list[str]:
        # The list form keeps a token with spaces whole (tokenizers splits a template string on spaces).
        return ([f"{tokens[bos_id]}:{type_id}"] if bos_id is not None else []) + [f"${name}:{type_id}"] + \
            ([f"{tokens[eos_id]}:{type_id}"] if eos_id is not None else [])

    ends = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
    return processors.TemplateProcessing(single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
                                         special_tokens=list(ends.items()))


def _add_whole_tokens(tokenizer: Tokenizer, special: list[str], added: list[str]) -> None:
    """Tokens matched whole in the text before the model sees it. Special ones are skipped when decoding
    without specials; added (user-defined) ones are ordinary text."""
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in added])


def _byte_level_tokenizer(meta: dict, tokens: list[str], token_types: list, vocab: dict[str, int], fail,
                          where: str) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        fail("tokenizer.ggml.merges", "an array of 'left right' strings", "none")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        fail("tokenizer.ggml.pre", f"one of {sorted(_BYTE_LEVEL_PRE_TOKENIZERS)}", repr(pre))
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            fail("tokenizer.ggml.merges", "'left right' of two vocabulary tokens whose join is a token",
                 f"{merge!r} at #{index}")
        pairs.append((parts[0], parts[1]))

    # A control token spelled outside the byte alphabet is not one this vocabulary can hold (a mislabel);
    # it stays out, as in transformers' GGUF loader.
    alphabet = set(_byte_alphabet().values())
    special = [token for token, kind in zip(tokens, token_types) if kind == TOKEN_CONTROL and set(token) <= alphabet]
    added = [token for token, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED]
    with tokenizers_errors(where, "GGUF tokenizer: tokenizers cannot build it"):
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(_BYTE_LEVEL_PRE_TOKENIZERS[pre]())
        tokenizer.decoder = decoders.ByteLevel()
        _add_whole_tokens(tokenizer, special, added)
    return tokenizer


_SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def _sentencepiece_tokenizer(meta: dict, tokens: list[str], token_types: list, vocab: dict[str, int],
                             unk_id: int | None, fail, where: str) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a `tokenizers` pipeline.

    llama.cpp escapes spaces as U+2581, puts one in front of every text fragment (unless
    add_space_prefix is false), splits the fragment into characters and, over the whole fragment,
    keeps joining the adjacent pair whose join is the best-scoring token; characters left outside
    the vocabulary become <0xXX> byte tokens. That is BPE without a pre-tokenizer, with one merge
    per split of each token into two tokens, ranked by the joined token's score, and byte fallback.
    One difference remains: a character that is no token itself but sits inside one falls back to
    bytes at once here, where llama.cpp could still join it; SentencePiece makes no such pieces.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        fail("tokenizer.ggml.scores", "one score per token for tokenizer.ggml.model 'llama' (SentencePiece merges "
             "follow them)", "none")
    if len(scores) != len(tokens):
        fail("tokenizer.ggml.scores", f"{len(tokens)} entries (one per token)", len(scores))
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            fail("tokenizer.ggml.scores", "finite numbers", f"{score!r} at id {index}")
    missing = [token for token in _BYTE_TOKENS if token not in vocab]
    if missing:
        fail("tokenizer.ggml.tokens", "the 256 byte tokens <0x00>..<0xFF> that SentencePiece falls back to for "
             "characters outside the vocabulary", f"{len(missing)} missing, the first {missing[0]}",
             "kiln supports SentencePiece vocabularies with byte fallback only")
    for token in _BYTE_TOKENS:
        if token_types[vocab[token]] != TOKEN_BYTE:
            fail("tokenizer.ggml.token_type", f"{TOKEN_BYTE} (byte) for the byte tokens",
                 f"{token_types[vocab[token]]!r} for {token} at id {vocab[token]}")
    add_space_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True, fail)

    # Ties between different tokens of equal score go to the lower id (llama.cpp takes the leftmost pair);
    # a BPE-trained SentencePiece model gives every piece a score of its own, so this rarely shows.
    ranked = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]

    # llama.cpp matches control and unknown tokens whole when it parses specials, user-defined ones always.
    special = [token for token, kind in zip(tokens, token_types) if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    added = [token for token, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED]
    unk_token = None if unk_id is None else tokens[unk_id]
    with tokenizers_errors(where, "GGUF tokenizer: tokenizers cannot build it"):
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=False,
                                         byte_fallback=True))
        prefix = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
        tokenizer.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", _SPACE)])
        # llama.cpp drops the one space it added from the first token when decoding.
        strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
        tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                              + strip)
        _add_whole_tokens(tokenizer, special, added)
    return tokenizer


def _checked_template(template, where: str) -> str | None:
    size = len(template.encode("utf-8", "surrogatepass")) if isinstance(template, str) else 0
    if size > MAX_TEMPLATE_BYTES:
        raise ModelFormatError(f"{where}: the chat template is {size:,} bytes, more than the {MAX_TEMPLATE_BYTES:,} "
                               "a chat template may have; check that this is the right model")
    return template if isinstance(template, str) else None


def _read_json(path: str) -> dict | None:
    """A JSON object from an optional regular file of bounded size (None when absent)."""
    if not os.path.lexists(path):
        return None
    text = read_text(path, os.path.basename(path), MAX_JSON_BYTES)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelFormatError(f"{path}: expected valid JSON, found an unparsable file ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as serialized AddedToken objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_hf_dir(directory: str | os.PathLike) -> TokenizerBundle:
    """Read tokenizer.json, tokenizer_config.json (and chat_template.jinja, generation_config.json if present).

    Only regular files of bounded size are read; a FIFO or a link to a device is refused in one line.
    """
    directory = os.fspath(directory)
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    tokenizer_json = read_text(tokenizer_path, "tokenizer.json", MAX_TOKENIZER_BYTES)
    with tokenizers_errors(tokenizer_path, "expected a `tokenizers` tokenizer, found one it cannot load"):
        tokenizer = Tokenizer.from_str(tokenizer_json)
    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}

    def lookup(name: str) -> tuple[str | None, int | None]:
        text = _token_text(config.get(name))
        if text is None:
            return None, None
        with tokenizers_errors(tokenizer_path, f"cannot look up {name}"):
            token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise ModelFormatError(f"{directory}: tokenizer_config.json {name} {text!r} is not in tokenizer.json's vocabulary")
        return text, token_id

    bos_token, bos_id = lookup("bos_token")
    eos_token, eos_id = lookup("eos_token")
    eos_ids = [eos_id] if eos_id is not None else []
    generation = _read_json(os.path.join(directory, "generation_config.json")) or {}
    extra = generation.get("eos_token_id")
    for token_id in (extra if isinstance(extra, list) else [extra]):
        if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in eos_ids:
            eos_ids.append(token_id)

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if chat_template is None and os.path.lexists(jinja_path):
        chat_template = read_text(jinja_path, "chat template", MAX_TEMPLATE_BYTES)
    chat_template = _checked_template(chat_template, f"{directory}: tokenizer_config.json chat_template")

    # What the tokenizer does is what counts: the post-processor either adds BOS or it does not.
    with tokenizers_errors(tokenizer_path, "the tokenizer fails on an empty text"):
        add_bos = bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return TokenizerBundle(tokenizer_json=tokenizer_json, bos_token_id=bos_id, eos_token_ids=eos_ids,
                           add_bos_token=add_bos, chat_template=chat_template,
                           bos_token=bos_token, eos_token=eos_token)


def check_tokenizer_fits(bundle: TokenizerBundle, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that can give an id the model has no row for (a backend would clamp it or
    fail at run time), or that fails on plain text; runs at load, so compile refuses it."""
    tokenizer = bundle.tokenizer()
    with tokenizers_errors(where, "the tokenizer fails on plain text"):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        tokenizer.encode(_PROBE_TEXT, add_special_tokens=True)
    if vocab:
        token, top = max(vocab.items(), key=lambda item: item[1])
        if top >= vocab_size:
            raise ModelFormatError(
                f"{where}: the tokenizer has token {token!r} with id {top}, beyond the model's {vocab_size} "
                "embedding rows; the tokenizer does not belong to these weights (or an added token was never given a row)")
    for name, ids in (("bos_token_id", [bundle.bos_token_id]), ("eos_token_id", bundle.eos_token_ids)):
        for token_id in ids:
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ModelFormatError(f"{where}: the tokenizer's {name} {token_id} is beyond the model's "
                                       f"{vocab_size} embedding rows; fix the tokenizer or generation config")
