"""The ONNX Runtime backend end to end: compiled artifacts generate what transformers generates.

Tiny architectures: prefill logits and every decode step's logits within 1e-5 of transformers
(relative to the largest logit) and identical greedy tokens, as for TVM; quantized models against
transformers running weights quantized and dequantized in torch. Batches of sequences of
different lengths in any KV buffer rows; the TVM and ONNX Runtime backends against each other
on random token sequences; the Engine API (generate, streaming, stop strings, chat) on a tiny
Llama with SmolLM2's tokenizer, checked against transformers and the tokenizers library.
SmolLM2 (slow): prefill logits and greedy output against transformers, as for TVM.
"""

import json
import os

import numpy as np
import pytest
import torch

import kiln
from kiln.ir.errors import ArtifactError, ConfigError

from runtime_check import assert_generates_without_torch
from tiny_models import (FP32_TOLERANCE, TINY_ARCHS, assert_engine_matches_transformers, dequantized_tiny_llama,
                         relative_error, tiny_model)

pytest.importorskip("onnxruntime")

FAST_ARCHS = ("llama", "gpt2", "falcon")  # GQA + RMSNorm + RoPE; learned positions + LayerNorm; MQA
PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = {}

    def get(arch, **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(arch) / "model.kiln"
            cache[key] = kiln.compile(tiny_model(arch), backend="onnxruntime", max_seq_len=48, output=path,
                                      **options).path
        return cache[key]

    return get


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_tiny_architecture_matches_transformers(compiled, arch):
    assert_engine_matches_transformers(kiln.load(compiled(arch)), arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(TINY_ARCHS) - set(FAST_ARCHS)))
def test_tiny_architecture_matches_transformers_slow(compiled, arch):
    assert_engine_matches_transformers(kiln.load(compiled(arch)), arch)


def test_decode_graph_matches_transformers(compiled):
    """By default the generation prefill (prefill_last) also decodes (one copy of the prepacked weights);
    the lowered decode function, loaded as its own session, computes the same."""
    assert kiln.load(compiled("llama")).executor.models["decode"] == "prefill_last"
    engine = kiln.load(compiled("llama"), separate_decode=True)
    assert engine.executor.models["decode"] == "decode"
    assert_engine_matches_transformers(engine, "llama")


@pytest.mark.parametrize("quantize", ["int4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_model_matches_the_numpy_reference(compiled, quantize):
    """int4-g32 with offsets (group-sum correction) and int8 per row (two exact int4 MatMulNBits; int4 mode
    makes the embedding and the logits projection int8 too): the same logits as kiln's numpy interpreter
    running the quantized IR."""
    ort_engine = kiln.load(compiled("llama", quantize=quantize))
    reference = kiln.load(kiln.compile(tiny_model("llama"), backend="reference", max_seq_len=48, quantize=quantize))
    ort_res = ort_engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)
    ref_res = reference.generate(PROMPT, max_new_tokens=6, ignore_eos=True, return_logits=True)
    assert ort_res.token_ids == ref_res.token_ids
    assert relative_error(ort_res.logits, ref_res.logits) <= 1e-5


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_model_matches_transformers_with_dequantized_weights(compiled, quantize):
    """ONNX Runtime's int4 / int8 artifacts compute what transformers computes with the same weights quantized
    and dequantized in torch: the same rounding of the same float32 numbers gives the same codes, so only fp32
    rounding is left and the fp32 tolerance holds (measured: 9.2e-7 int4, 5.6e-7 int8), while quantizing moves
    the logits by 0.16 (int4) and 0.015 (int8)."""
    assert_engine_matches_transformers(kiln.load(compiled("llama", quantize=quantize)), "llama",
                                       model=dequantized_tiny_llama(quantize))


# Every cached K and V element is rounded to f16: a relative error of at most 2^-11 (half of f16's 2^-10
# step). Each of the two layers passes that on twice (the keys into the scores, the values into the output),
# so the logits may move by about 4 x 2^-11 = 2.0e-3 of the largest; measured 5.0e-4 (prefill), 3.7e-4 (decode).
F16_KV_TOLERANCE = 4 * 2 ** -11


def test_f16_kv_cache_matches_transformers(compiled):
    engine = kiln.load(compiled("llama", kv_cache_dtype="f16"))
    assert engine.executor.buffers[0][0].dtype == np.float16
    assert_engine_matches_transformers(engine, "llama", tolerance=F16_KV_TOLERANCE)


def _reference_last_logits(arch, ids):
    with torch.no_grad():
        return tiny_model(arch)(torch.as_tensor([ids])).logits[0, -1].numpy()


def test_batches_of_sequences_in_any_buffer_rows(compiled):
    """Sequences of different lengths decode together whatever rows of the KV buffers they hold: in row
    order, out of order (their contents are swapped into consecutive rows first) and as a subset."""
    engine = kiln.load(compiled("llama"))
    prompts = {"a": [3, 4, 5, 6, 7], "b": [9, 8], "c": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}
    history = {k: list(v) for k, v in prompts.items()}
    seqs = {k: engine.pages.add_sequence() for k in prompts}
    rng = np.random.default_rng(0)
    try:
        for name, ids in prompts.items():
            logits = engine._step("prefill", [seqs[name]], np.array([ids]))
            assert relative_error(logits[0, -1], _reference_last_logits("llama", ids)) <= FP32_TOLERANCE
        for order in (["a", "b", "c"], ["c", "a"], ["b", "a", "c"], ["c"], ["a", "c", "b"]):
            tokens = rng.integers(0, 128, len(order))
            logits = engine._step("decode", [seqs[n] for n in order], tokens[:, None])
            for row, name in enumerate(order):
                history[name].append(int(tokens[row]))
                ref = _reference_last_logits("llama", history[name])
                assert relative_error(logits[row, 0], ref) <= FP32_TOLERANCE, (order, name)
    finally:
        for s in seqs.values():
            engine.pages.remove_sequence(s)


def test_decode_writes_the_kv_buffers_in_place(compiled):
    """GroupQueryAttention's present K/V are the executor's own buffers (bound as past and present): each
    step's key lands in the sequence's buffer row at its position, with no copy back."""
    engine = kiln.load(compiled("llama"))
    seq = engine.pages.add_sequence()
    keys = engine.executor.buffers[0][0]  # layer 0's K: [slots, kv_heads, max_seq_len, head_dim]
    before = keys.ctypes.data
    try:
        engine._step("prefill", [seq], np.array([[3, 1, 4, 1, 5]]))
        slot = engine.executor.slots.find(int(engine.pages.page_table([seq])[0, 0]))
        assert np.all(np.abs(keys[slot, :, :5]).sum(-1) > 0) and np.all(keys[slot, :, 5:] == 0)
        engine._step("decode", [seq], np.array([[9]]))
        assert np.all(np.abs(keys[slot, :, 5]).sum(-1) > 0) and np.all(keys[slot, :, 6:] == 0)
    finally:
        engine.pages.remove_sequence(seq)
    assert engine.executor.buffers[0][0].ctypes.data == before


def test_chunked_prefill_and_padding_rows(compiled):
    """A prefill that continues a sequence (positions from its cached length), and a batch row of padding
    (-1 positions) that computes nothing."""
    engine = kiln.load(compiled("llama"))
    ids = [7, 1, 8, 2, 8, 1, 8, 2, 8]
    seq = engine.pages.add_sequence()
    try:
        engine._step("prefill", [seq], np.array([ids[:4]]))
        logits = engine._step("prefill", [seq], np.array([ids[4:]]))
    finally:
        engine.pages.remove_sequence(seq)
    with torch.no_grad():
        ref = tiny_model("llama")(torch.as_tensor([ids])).logits[0, 4:].numpy()
    assert relative_error(logits[0], ref) <= FP32_TOLERANCE
    table = np.zeros((2, engine.pages.pages_per_seq), dtype=np.int32)
    out = engine.executor.run("prefill", np.array([[3, 4], [0, 0]]), np.array([[0, 1], [-1, -1]]), table)
    assert np.all(out[1] == 0)
    assert relative_error(out[0, 1], _reference_last_logits("llama", [3, 4])) <= FP32_TOLERANCE


def test_more_live_sequences_than_buffer_rows_is_refused(compiled):
    engine = kiln.load(compiled("llama", max_num_seqs=2))
    assert engine.executor.slots.num_slots == 2
    seqs = [engine.pages.add_sequence() for _ in range(3)]
    for s in seqs:
        engine._step("prefill", [s], np.array([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="no longer holds"):
        engine._step("decode", [seqs[0]], np.array([[4]]))


def test_artifact_holds_onnx_models_checked_and_hashed(compiled, tmp_path):
    import shutil

    import onnx

    path = compiled("llama")
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["backend"] == "onnxruntime"
    for name in ("prefill.onnx", "decode.onnx", "model.onnx.data"):
        assert name in manifest["files"]
    for name in ("prefill.onnx", "decode.onnx"):
        onnx.checker.check_model(os.path.join(path, name), full_check=True)
        ops = {(n.domain, n.op_type) for n in onnx.load(os.path.join(path, name), load_external_data=False).graph.node}
        assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "RotaryEmbedding"),
                ("com.microsoft", "SkipSimplifiedLayerNormalization"), ("", "RMSNormalization")} <= ops
    for name in os.listdir(path):
        data = open(os.path.join(path, name), "rb").read(2)
        assert not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name
    copy = tmp_path / "copy.kiln"
    shutil.copytree(path, copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="model.onnx.data does not match its sha256"):
        kiln.load(str(copy))


def test_runtime_never_imports_torch(compiled):
    assert_generates_without_torch(compiled("llama"))


def test_cuda_target_runs_on_the_cuda_provider_or_is_refused(tmp_path):
    import onnxruntime as ort

    path = kiln.compile(tiny_model("llama"), backend="onnxruntime", target="cuda", max_seq_len=48,
                        output=tmp_path / "cuda.kiln").path
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ArtifactError, match="compiled for cuda, but this onnxruntime has no CUDAExecutionProvider"):
            kiln.load(path)
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})")
    assert_engine_matches_transformers(kiln.load(path), "llama")


# TVM and ONNX Runtime against each other ------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_tvm_and_onnxruntime_agree_on_random_sequences(compiled, tmp_path, arch):
    pytest.importorskip("tvm")
    ort_engine = kiln.load(compiled(arch))
    tvm_engine = kiln.load(kiln.compile(tiny_model(arch), backend="tvm", max_seq_len=48, output=tmp_path / "t.kiln"))
    rng = np.random.default_rng(1)
    for length in (1, 5, 17, 40):
        ids = rng.integers(0, 128, length).tolist()
        a, b = ort_engine.logits(ids), tvm_engine.logits(ids)
        assert relative_error(a, b) <= FP32_TOLERANCE, length
    prompts = [rng.integers(0, 128, (1, 9)), rng.integers(0, 128, (1, 3))]
    tokens = rng.integers(0, 128, (4, 2, 1))

    def batched_decode(engine):  # two sequences of different lengths decoded in one batch
        seqs = [engine.pages.add_sequence(), engine.pages.add_sequence()]
        try:
            for seq, prompt in zip(seqs, prompts):
                engine._step("prefill", [seq], prompt)
            return [engine._step("decode", seqs, step) for step in tokens]
        finally:
            for seq in seqs:
                engine.pages.remove_sequence(seq)

    for a, b in zip(batched_decode(ort_engine), batched_decode(tvm_engine)):
        assert relative_error(a, b) <= FP32_TOLERANCE


# the Engine API with a tokenizer -----------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template, as a checkpoint directory."""
    import transformers

    from kiln.frontend.gguf_file import GGUFFile
    from kiln.frontend.sources import default_model_path
    from kiln.frontend.tokenizer import tokenizer_from_gguf

    try:
        gguf = default_model_path()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 (for its tokenizer) is not installed: {err}")
    bundle = tokenizer_from_gguf(GGUFFile(gguf))
    directory = tmp_path_factory.mktemp("chat_ckpt")
    vocab = json.loads(bundle.tokenizer_json)
    size = max(len(vocab["model"]["vocab"]), 1 + max(t["id"] for t in vocab.get("added_tokens", [])))
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=bundle.bos_token_id,
                                      eos_token_id=bundle.eos_token_ids[0])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(bundle.tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bundle.bos_token, "eos_token": bundle.eos_token, "chat_template": bundle.chat_template}))
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                        bos_token=bundle.bos_token, eos_token=bundle.eos_token)
    hf_tokenizer.chat_template = bundle.chat_template
    art = kiln.compile(str(directory), backend="onnxruntime", max_seq_len=96,
                       output=tmp_path_factory.mktemp("chat") / "chat.kiln")
    return kiln.load(art), model, hf_tokenizer


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.as_tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_generate_stream_and_stop_strings(chat_model):
    engine, model, hf_tokenizer = chat_model
    prompt = "The capital of France is"
    res = engine.generate(prompt, max_new_tokens=16, ignore_eos=True)
    assert res.prompt_token_ids == hf_tokenizer(prompt)["input_ids"]
    assert res.token_ids == _hf_greedy(model, res.prompt_token_ids, 16)
    assert res.text == hf_tokenizer.decode(res.token_ids, skip_special_tokens=True)
    pieces = list(engine.stream(prompt, max_new_tokens=16, ignore_eos=True))
    assert len(pieces) > 1 and "".join(pieces) == res.text
    stop = res.text[len(res.text) // 2:len(res.text) // 2 + 3]
    stopped = engine.generate(prompt, max_new_tokens=16, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == res.text[:res.text.index(stop)]
    sampled = [engine.generate(prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=s).token_ids for s in (1, 1)]
    assert sampled[0] == sampled[1]


def test_engine_chat(chat_model):
    engine, model, hf_tokenizer = chat_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    res = engine.chat(messages, max_new_tokens=8, ignore_eos=True)
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert res.prompt_token_ids == list(ids)
    assert res.token_ids == _hf_greedy(model, list(ids), 8)
    assert "".join(engine.chat(messages, max_new_tokens=8, ignore_eos=True, stream=True)) == res.text


# SmolLM2 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["none", "gguf"])
def smollm2(tmp_path_factory, request):
    from smollm2 import smollm2_source

    source = smollm2_source()
    path = tmp_path_factory.mktemp("smol") / "smollm2.kiln"
    kiln.compile("smollm2", backend="onnxruntime", max_seq_len=128, max_num_seqs=1, output=path,
                 quantize=request.param)
    return path, kiln.load(path), source


@pytest.mark.slow
def test_smollm2_prefill_logits_match_transformers(smollm2):
    """fp32 ("none") through 30 layers: within 2.8e-6 of the largest logit (measured). The GGUF's Q4_1 blocks
    ("gguf") reach 1.2e-5: MatMulNBits applies each group's offset as offset x sum(x) beside scale x
    sum(x * nibble), so the terms it rounds are larger than the products; 5e-5 allows that."""
    from smollm2 import assert_prefill_logits_match_transformers

    engine = smollm2[1]
    tolerance = FP32_TOLERANCE if engine.manifest["options"]["quantize"] == "none" else 5e-5
    assert_prefill_logits_match_transformers(engine, tolerance)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
    """fp32 ("none") and the GGUF's own blocks ("gguf", MatMulNBits at accuracy_level 0) both compute what
    transformers computes with the dequantized weights: greedy tokens identical (a near-tie, transformers'
    top two logits within 1e-4, may differ once)."""
    from smollm2 import assert_greedy_matches_transformers

    print("ties:", assert_greedy_matches_transformers(smollm2[1]))


@pytest.mark.slow
def test_smollm2_chat_answers_paris(smollm2):
    _, engine, _ = smollm2
    reply = engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply.text
