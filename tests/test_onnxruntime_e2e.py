"""The ONNX Runtime backend end to end: the compiled ragged step computes what transformers computes.

At the executor level (``executor.step`` on named inputs, as the engine calls it): every tiny architecture's
logits at every position within 1e-5 of transformers' (relative to the largest logit); ragged steps that mix
prompts, a continued prefill chunk and decode tokens of other sequences, in any flat order; a prompt in
chunks; sequences ending and new ones taking their buffer rows; steps that need several GroupQueryAttention
batches (a continued chunk beside decode tokens, a sequence at the end of its buffer row); quantized models
against transformers running the same quantized-and-dequantized weights; an f16 cache. The artifact holds one
checked ``step.onnx`` and refuses damaged manifest fields. SmolLM2 (slow): logits and greedy tokens against
transformers.
"""

import json
import os

import numpy as np
import pytest
import torch

import kiln
from kiln.backends import load_executor
from kiln.ir.errors import ArtifactError, ConfigError
from kiln.runtime.artifact import open_artifact

from tiny_checkpoint import read_manifest, write_manifest
from tiny_models import FP32_TOLERANCE, TINY_ARCHS, dequantized_tiny_llama, relative_error, tiny_model

pytest.importorskip("onnxruntime")

MAX_SEQ_LEN = 48
PROMPT = [5, 17, 99, 3, 42, 7, 64, 2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = {}

    def get(arch, **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(arch) / "model.kiln"
            options = {"max_seq_len": MAX_SEQ_LEN, "max_num_seqs": 3, "page_size": 4, **options}
            cache[key] = kiln.compile(tiny_model(arch), backend="onnxruntime", output=path, **options).path
        return cache[key]

    return get


def executor_of(path, **options):
    return load_executor(open_artifact(path), **options)


def reference(arch, ids, model=None) -> np.ndarray:
    """transformers' logits at every position of ``ids`` [len, vocab]."""
    model = tiny_model(arch) if model is None else model
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([list(ids)]), use_cache=False).logits[0].numpy()


class Sequences:
    """The engine's side of a step, for tests: each sequence name owns page-table row ``pages_per_seq`` pages
    long (its first page names it to the executor); ``step`` flattens chunks into one ragged batch."""

    def __init__(self, executor, path):
        self.executor = executor
        self.pages_per_seq = open_artifact(path).manifest["kv_cache"]["pages_per_seq"]
        self.first_page: dict = {}
        self.history: dict = {}
        self.started = 0

    def start(self, name, first_page=None):
        self.first_page[name] = self.started * self.pages_per_seq if first_page is None else first_page
        self.history[name] = []
        self.started += 1

    def end(self, name):
        self.executor.end_sequence(self.first_page.pop(name))
        del self.history[name]

    def step(self, chunks: dict, order=None, function="step") -> dict:
        """Run ``chunks`` {name: token ids} (each continuing its sequence; all rows' logits), the flat batch in
        ``order`` (a permutation of the tokens; None keeps each chunk together). Returns {name: logits}."""
        ids, positions, seqs, owner = [], [], [], []
        names = list(chunks)
        for row, name in enumerate(names):
            start = len(self.history[name])
            ids += list(chunks[name])
            positions += range(start, start + len(chunks[name]))
            seqs += [row] * len(chunks[name])
            owner += [name] * len(chunks[name])
            self.history[name] += list(chunks[name])
        order = np.arange(len(ids)) if order is None else np.asarray(order)
        table = np.stack([self.first_page[n] + np.arange(self.pages_per_seq) for n in names]).astype(np.int32)
        inputs = {"token_ids": np.asarray(ids, np.int64)[order], "positions": np.asarray(positions, np.int64)[order],
                  "token_seq": np.asarray(seqs, np.int32)[order], "page_table": table,
                  "logit_rows": np.arange(len(ids), dtype=np.int64)}
        logits = self.executor.step(function, inputs)
        assert logits.shape == (len(ids), self.executor.vocab_size) and logits.dtype == np.float32
        owners = np.asarray(owner)[order]
        return {name: logits[owners == name] for name in names}


def assert_matches(arch, seqs: Sequences, name, logits, tolerance=FP32_TOLERANCE, model=None):
    """``logits`` are the last rows of sequence ``name``'s history: transformers' logits there."""
    ref = reference(arch, seqs.history[name], model)[-len(logits):]
    error = relative_error(logits, ref)
    assert error <= tolerance, f"{arch} {name}: logits differ by {error:.2e} of the largest"


def run_prompt_and_decode(arch, path, tolerance=FP32_TOLERANCE, model=None, **options):
    """A prompt in one step, then six decode steps: every position's logits against transformers."""
    seqs = Sequences(executor_of(path, **options), path)
    seqs.start("a")
    assert_matches(arch, seqs, "a", seqs.step({"a": PROMPT})["a"], tolerance, model)
    rng = np.random.default_rng(0)
    for _ in range(6):
        assert_matches(arch, seqs, "a", seqs.step({"a": [int(rng.integers(0, 128))]})["a"], tolerance, model)
    return seqs


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_architecture_matches_transformers(compiled, arch):
    run_prompt_and_decode(arch, compiled(arch))


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_ragged_step_mixes_prompts_a_prefill_chunk_and_decode_tokens(compiled, arch):
    """Two prompts of different lengths in one step (padded to one length for attention only); then a prompt
    chunk of a third sequence beside decode tokens of the two, in an interleaved flat order; then its second
    chunk (a continued prefill: its own GroupQueryAttention batch) beside their decode tokens. Mistral's
    sliding window (4) is shorter than most sequences; GPT-2 reads the positions in its position embedding."""
    seqs = Sequences(executor_of(compiled(arch)), compiled(arch))
    rng = np.random.default_rng(1)
    for name in "bca":
        seqs.start(name)
    out = seqs.step({"b": [3, 1, 4, 1, 5, 9, 2], "c": [6, 5]})
    for name in "bc":
        assert_matches(arch, seqs, name, out[name])
    chunks = {"a": rng.integers(0, 128, 5).tolist(), "b": [7], "c": [8]}
    out = seqs.step(chunks, order=[0, 5, 1, 2, 6, 3, 4])  # a0 b a1 a2 c a3 a4
    for name in "abc":
        assert_matches(arch, seqs, name, out[name])
    for _ in range(2):
        out = seqs.step({"b": [int(rng.integers(0, 128))], "a": rng.integers(0, 128, 4).tolist(),
                         "c": [int(rng.integers(0, 128))]}, function="step_decode")
        for name in "abc":
            assert_matches(arch, seqs, name, out[name])


def test_chunked_prefill_equals_one_shot(compiled):
    prompt = np.random.default_rng(2).integers(0, 128, 15).tolist()
    one = Sequences(executor_of(compiled("llama")), compiled("llama"))
    one.start("p")
    whole = one.step({"p": prompt})["p"]
    chunked = Sequences(executor_of(compiled("llama")), compiled("llama"))
    chunked.start("p")
    parts = [chunked.step({"p": prompt[i:i + 5]})["p"] for i in (0, 5, 10)]
    assert relative_error(np.concatenate(parts), whole) <= FP32_TOLERANCE
    assert relative_error(whole, reference("llama", prompt)) <= FP32_TOLERANCE


def test_ended_sequences_free_their_rows_for_new_ones(compiled):
    """Three buffer rows: a decode step over sequences with a prefilling sequence or a free row between them
    writes a dummy token there that nothing reads; a sequence that ends frees its row, and new ones take the
    lowest free rows (one may reuse an ended sequence's first page); a fourth live sequence drops the least
    recently used one, and continuing that one is refused in one line."""
    executor = executor_of(compiled("llama"))
    assert executor.shares_pages is False and executor.slots.num_slots == 3
    seqs = Sequences(executor, compiled("llama"))
    rng = np.random.default_rng(3)
    for name in "abc":
        seqs.start(name)
    seqs.step({name: rng.integers(0, 128, n).tolist() for name, n in zip("abc", (4, 6, 3))})
    assert executor.slots.page_of == [seqs.first_page[n] for n in "abc"]
    for chunks in ({"a": [1], "b": rng.integers(0, 128, 3).tolist(), "c": [2]}, {"a": [3], "b": [4], "c": [5]}):
        out = seqs.step(chunks)  # first b's row takes a dummy token in a and c's decode batch
        for name in "abc":
            assert_matches("llama", seqs, name, out[name])
    seqs.end("b")
    out = seqs.step({"a": [11], "c": [12]})  # a free row between them
    for name in "ac":
        assert_matches("llama", seqs, name, out[name])
    seqs.end("a")
    seqs.start("d", first_page=seqs.pages_per_seq)  # b's first page again
    seqs.start("e")
    out = seqs.step({"d": [5, 6, 7], "c": [13]})
    assert executor.slots.page_of == [seqs.first_page["d"], -1, seqs.first_page["c"]]
    for name in "dc":
        assert_matches("llama", seqs, name, out[name])
    out = seqs.step({"e": [9, 9], "c": [14], "d": [15]})
    assert executor.slots.page_of == [seqs.first_page[n] for n in "dec"]
    for name in "ecd":
        assert_matches("llama", seqs, name, out[name])
    seqs.step({"d": [1], "e": [2]})
    seqs.start("f")
    seqs.step({"f": [4, 4]})  # a fourth live sequence: c, the least recently used, is dropped
    assert executor.slots.page_of == [seqs.first_page[n] for n in "def"]
    with pytest.raises(ConfigError, match=r"continues a sequence \(first page \d+\) at position 8 that the ONNX "
                                          r"Runtime backend does not hold"):
        seqs.step({"c": [1]})


def test_steps_a_padded_batch_would_overflow_run_as_several_calls(compiled, monkeypatch):
    """A sequence at the last position of its buffer row decodes beside a 20-token prompt (padding its row to
    20 tokens would run past the row), and then a full row between two decoding sequences cannot take a dummy
    token: each step runs as several GroupQueryAttention batches, each sequence's logits still transformers',
    the full sequence's cache untouched."""
    executor = executor_of(compiled("llama"))
    calls = []  # (rows, first slot, padded length) of each ONNX Runtime call
    run = executor._session_run

    def recorded(batch, first, feeds, out):
        calls.append((batch, first, feeds["pad_index"].shape[1]))
        run(batch, first, feeds, out)

    monkeypatch.setattr(executor, "_session_run", recorded)
    seqs = Sequences(executor, compiled("llama"))
    rng = np.random.default_rng(4)
    for name in "abc":
        seqs.start(name)
    seqs.step({"a": rng.integers(0, 128, 3).tolist(), "b": rng.integers(0, 128, MAX_SEQ_LEN - 1).tolist(),
               "c": rng.integers(0, 128, 5).tolist()})
    assert calls == [(3, 0, MAX_SEQ_LEN - 1)]
    seqs.end("a")
    seqs.start("a2")
    calls.clear()
    out = seqs.step({"a2": rng.integers(0, 128, 20).tolist(), "b": [7], "c": [8]})
    assert calls == [(1, 0, 20), (2, 1, 1)] and len(seqs.history["b"]) == MAX_SEQ_LEN
    for name in ("a2", "b", "c"):
        assert_matches("llama", seqs, name, out[name])
    full = [buffer[1].copy() for pair in executor.buffers for buffer in pair]
    calls.clear()
    out = seqs.step({"a2": [1], "c": [2]})  # b's full row between them: two calls, no dummy row
    assert calls == [(1, 0, 1), (1, 2, 1)]
    for name in ("a2", "c"):
        assert_matches("llama", seqs, name, out[name])
    assert all(np.array_equal(before, buffer[1]) for before, buffer in
               zip(full, [b for pair in executor.buffers for b in pair]))


def test_decode_writes_the_kv_buffers_in_place(compiled):
    """GroupQueryAttention's present K/V are the executor's own buffers (bound as past and present): each
    step's key lands in the sequence's buffer row at its position, with no copy back."""
    executor = executor_of(compiled("llama"))
    keys = executor.buffers[0][0]  # layer 0's K: [slots, kv_heads, max_seq_len, head_dim]
    before = keys.ctypes.data
    seqs = Sequences(executor, compiled("llama"))
    seqs.start("a")
    seqs.step({"a": [3, 1, 4, 1, 5]})
    slot = executor.slots.find(seqs.first_page["a"])
    assert np.all(np.abs(keys[slot, :, :5]).sum(-1) > 0) and np.all(keys[slot, :, 5:] == 0)
    seqs.step({"a": [9]})
    assert np.all(np.abs(keys[slot, :, 5]).sum(-1) > 0) and np.all(keys[slot, :, 6:] == 0)
    assert executor.buffers[0][0].ctypes.data == before


def test_logit_rows_select_and_repeat_rows(compiled):
    """logit_rows picks any rows of the flat batch (here none, then some twice, across two calls)."""
    executor = executor_of(compiled("llama"))
    ids = [4, 8, 15, 16, 23, 42]
    table = np.arange(2 * 12, dtype=np.int32).reshape(2, 12)
    base = {"token_ids": np.array(ids), "positions": np.array([0, 1, 2, 3, 0, 1]),
            "token_seq": np.array([0, 0, 0, 0, 1, 1], np.int32), "page_table": table}
    assert executor.step("step", {**base, "logit_rows": np.zeros(0, np.int64)}).shape == (0, 128)
    for first_page in (0, 12):
        executor.end_sequence(first_page)
    out = executor.step("step", {**base, "logit_rows": np.array([5, 0, 5, 3])})
    ref_a, ref_b = reference("llama", ids[:4]), reference("llama", ids[4:])
    assert relative_error(out, np.stack([ref_b[1], ref_a[0], ref_b[1], ref_a[3]])) <= FP32_TOLERANCE


@pytest.mark.parametrize("inputs, message", [
    ({"positions": np.array([1, 2])}, "continues a sequence (first page 0) at position 1"),
    ({"positions": np.array([0, 2])}, "must be consecutive positions, found [0, 2]"),
    ({"positions": np.array([0, 48])}, "positions holds 48, outside [0, 48)"),
    ({"token_ids": np.array([1, 128])}, "token_ids holds 128, outside [0, 128)"),
    ({"token_seq": np.array([0, 1], np.int32)}, "token_seq holds 1, outside [0, 1)"),
    ({"logit_rows": np.array([2])}, "logit_rows holds 2, outside [0, 2)"),
    ({"token_ids": np.array([1.0, 2.0])}, "token_ids must be a 1-D integer array, found float64[2]"),
    ({"page_table": None}, "page_table is missing"),
])
def test_malformed_steps_are_refused_in_one_line(compiled, inputs, message):
    executor = executor_of(compiled("llama"))
    step = {"token_ids": np.array([1, 2]), "positions": np.array([0, 1]), "token_seq": np.zeros(2, np.int32),
            "page_table": np.zeros((1, 12), np.int32), "logit_rows": np.array([1]), **inputs}
    with pytest.raises(ConfigError) as err:
        executor.step("step", {k: v for k, v in step.items() if v is not None})
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="expected the function step or step_decode, found 'prefill'"):
        executor.step("prefill", step)


def test_continuing_past_the_cached_length_is_refused(compiled):
    seqs = Sequences(executor_of(compiled("llama")), compiled("llama"))
    seqs.start("a")
    seqs.step({"a": [1, 2, 3]})
    seqs.history["a"].append(0)  # a token the executor never saw
    with pytest.raises(ConfigError, match="continues at position 4, but only 3 tokens of that sequence are cached"):
        seqs.step({"a": [4]})


def test_executor_contract_and_options(compiled):
    executor = executor_of(compiled("llama"), num_threads=1, spin=True)
    assert executor.has_function("step") and executor.has_function("step_decode")
    assert not executor.has_function("prefill")
    with pytest.raises(ConfigError, match="takes the options num_threads, provider, spin, not separate_decode"):
        executor_of(compiled("llama"), separate_decode=True)
    executor.close()
    with pytest.raises(ConfigError, match="this ONNX Runtime executor was closed"):
        executor.step("step", {})


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_model_matches_transformers_with_dequantized_weights(compiled, quantize):
    """ONNX Runtime's int4 / int8 artifacts compute what transformers computes with the same weights quantized
    and dequantized in torch: the same rounding of the same float32 numbers gives the same codes, so only fp32
    rounding is left and the fp32 tolerance holds (measured: 9.2e-7 int4, 5.6e-7 int8), while quantizing moves
    the logits by 0.16 (int4) and 0.015 (int8). int4 groups of 32 with offsets take the group-sum correction;
    int8 per row runs as two exact int4 MatMulNBits."""
    run_prompt_and_decode("llama", compiled("llama", quantize=quantize, activations="float"),
                          model=dequantized_tiny_llama(quantize))


# Every cached K and V element is rounded to f16: a relative error of at most 2^-11 (half of f16's 2^-10
# step). Each of the two layers passes that on twice (the keys into the scores, the values into the output),
# so the logits may move by about 4 x 2^-11 = 2.0e-3 of the largest; measured 5.0e-4 (prefill), 3.7e-4 (decode).
F16_KV_TOLERANCE = 4 * 2 ** -11


def test_f16_kv_cache_matches_transformers(compiled):
    seqs = run_prompt_and_decode("llama", compiled("llama", kv_cache_dtype="f16"), tolerance=F16_KV_TOLERANCE)
    assert seqs.executor.buffers[0][0].dtype == np.float16


def test_artifact_holds_one_checked_step_model(compiled, tmp_path):
    import shutil

    import onnx

    path = compiled("llama")
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["backend"] == "onnxruntime"
    assert {"step.onnx", "model.onnx.data"} <= set(manifest["files"])
    assert not [name for name in manifest["files"] if name.endswith(".onnx") and name != "step.onnx"]
    backend = manifest["backend_info"]
    assert backend["files"] == {"model": "step.onnx", "data": "model.onnx.data"}
    assert backend["inputs"] == ["token_ids", "positions", "logit_rows", "pad_index", "unpad_index", "seqlens_k",
                                 "total_sequence_length", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert backend["kv_layers"] == [{"num_kv_heads": 2, "head_dim": 16, "dtype": "f32"}] * 2
    onnx.checker.check_model(os.path.join(path, "step.onnx"), full_check=True)
    graph = onnx.load(os.path.join(path, "step.onnx"), load_external_data=False).graph
    ops = [(n.domain, n.op_type) for n in graph.node]
    assert {("com.microsoft", "RotaryEmbedding"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
            ("", "RMSNormalization")} <= set(ops)
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 2
    assert ops.count(("", "MatMul")) == 2 * 4 + 1  # fused q/k/v, o, fused gate/up, down; lm_head
    # the embedding; per layer q, k, v into the padded view and the output back; the logit rows of the residual
    # and of the last MLP's output (select_logit_rows moved them above the final add + norm)
    assert ops.count(("", "Gather")) == 1 + 2 * 4 + 2
    for name in os.listdir(path):
        data = open(os.path.join(path, name), "rb").read(2)
        assert not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name
    copy = tmp_path / "copy.kiln"
    shutil.copytree(path, copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="model.onnx.data does not match its sha256"):
        executor_of(copy)


def _edited(path, tmp_path, edit):
    import shutil

    copy = tmp_path / "edited.kiln"
    shutil.copytree(path, copy)
    manifest = read_manifest(copy)
    edit(manifest["backend_info"])
    write_manifest(copy, manifest)
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["inputs"].insert(3, "attention_mask"),
     "the step model takes the input 'attention_mask', which this executor does not feed"),
    (lambda b: b["inputs"].remove("pad_index"), "backend_info.inputs must be token_ids, positions, logit_rows, "
                                                "pad_index"),
    (lambda b: b["inputs"].reverse(), "in that order"),
    (lambda b: b.update(inputs="token_ids"), "backend_info.inputs must be the list of the step model's input names"),
    (lambda b: b.update(logits=3), "backend_info.logits must be the name of the logits output"),
    (lambda b: b["kv_layers"].pop(), "backend_info.kv_layers must be a list of 2"),
    (lambda b: b["kv_layers"][0].update(dtype={}), "backend_info.kv_layers must be a list of 2"),
    (lambda b: b["kv_layers"][1].update(head_dim=8), "backend_info.kv_layers[1] must be {'num_kv_heads': 2, "
                                                     "'head_dim': 16, 'dtype': 'f32'}"),
    (lambda b: b["files"].update(model="prefill.onnx"), "backend_info.files.model names 'prefill.onnx', which is "
                                                        "not among the artifact's hashed files"),
    (lambda b: b["files"].pop("data"), "backend_info.files.data names None"),
])
def test_damaged_backend_info_is_refused_in_one_line(compiled, tmp_path, edit, message):
    art = _edited(compiled("llama"), tmp_path, edit)
    with pytest.raises(ArtifactError) as err:
        executor_of(art)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_whose_inputs_differ_from_the_manifest_is_refused(compiled, tmp_path):
    """Inputs bind by name: a step.onnx taking an input the manifest does not list (hashes redone) is refused
    when loaded, naming both lists."""
    import onnx

    from tiny_checkpoint import rehash

    art = _edited(compiled("llama"), tmp_path, lambda backend: None)
    model = onnx.load(os.path.join(art, "step.onnx"), load_external_data=False)
    model.graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [None]))
    onnx.save(model, os.path.join(art, "step.onnx"))
    rehash(art, ["step.onnx"])
    with pytest.raises(ArtifactError, match="step.onnx takes the inputs token_ids, .*, attention_mask, the manifest "
                                            "says token_ids, "):
        executor_of(art)


def test_cuda_target_runs_on_the_cuda_provider_or_is_refused(tmp_path):
    import onnxruntime as ort

    path = kiln.compile(tiny_model("llama"), backend="onnxruntime", target="cuda", max_seq_len=MAX_SEQ_LEN,
                        output=tmp_path / "cuda.kiln").path
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ArtifactError, match="compiled for cuda, but this onnxruntime has no CUDAExecutionProvider"):
            executor_of(path)
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})")
    run_prompt_and_decode("llama", path)


# the Engine API -----------------------------------------------------------------------------------
def test_runtime_never_imports_torch(compiled):
    from runtime_check import assert_generates_without_torch

    assert_generates_without_torch(compiled("llama"))


def test_engine_batches_prompts_like_transformers_with_prefix_caching_off(compiled):
    """Prompts of different lengths generated together (several GroupQueryAttention calls per step) give
    transformers' greedy tokens; the backend cannot share pages, so prefix caching is off with a notice."""
    engine = kiln.load(compiled("llama"))
    assert not engine.prefix_caching and "prefix caching is off" in engine.notices[0]
    prompts = [[5, 9, 33, 40, 41, 7, 100], [64, 3], [17, 18, 19, 20, 21], [99]]
    results = engine.generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in results] == [_hf_greedy(tiny_model("llama"), p, 8) for p in prompts]
    assert all(r.stats["cached_prompt_tokens"] == 0 for r in results)
    assert engine.pool.num_in_use() == 0


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
    kiln.compile("smollm2", backend="onnxruntime", max_seq_len=128, max_num_seqs=2, output=path,
                 quantize=request.param, activations="float")
    from tokenizers import Tokenizer

    return path, executor_of(path), Tokenizer.from_str(source.tokenizer.tokenizer_json), request.param


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2):
    """fp32 ("none") through 30 layers: every prompt position within 2.8e-6 of the largest logit (measured).
    The GGUF's Q4_1 blocks ("gguf") reach 1.2e-5: MatMulNBits applies each group's offset as offset x sum(x)
    beside scale x sum(x * nibble), so the terms it rounds are larger than the products; 5e-5 allows that.
    Then two prompts decode greedily together, 24 tokens: transformers' argmax at every step (a near-tie, the
    top two within 1e-4, may differ once, after which that prompt is no longer compared)."""
    from smollm2 import SMOL_PROMPTS, transformers_smollm2

    path, executor, tokenizer, quantize = smollm2
    tolerance = FP32_TOLERANCE if quantize == "none" else 5e-5
    model = transformers_smollm2()
    seqs = Sequences(executor, path)
    for pair in (SMOL_PROMPTS[:2], SMOL_PROMPTS[2:4]):
        prompts = {text: tokenizer.encode(text).ids for text in pair}
        for text in prompts:
            seqs.start(text)
        out = seqs.step(prompts)
        for text in prompts:
            assert_matches(None, seqs, text, out[text], tolerance, model)
        tokens = {text: [int(np.argmax(out[text][-1]))] for text in prompts}
        ties = []
        for _ in range(24):
            out = seqs.step({text: token for text, token in tokens.items()}, function="step_decode")
            tokens = {text: [int(np.argmax(out[text][-1]))] for text in prompts}
        for text in prompts:
            ids = seqs.history[text] + tokens[text]
            with torch.no_grad():
                ref = model(torch.as_tensor([ids])).logits[0].numpy()
            start = len(prompts[text])
            for step, token in enumerate(ids[start:]):
                row = ref[start - 1 + step]
                if token != int(np.argmax(row)):
                    top2 = np.sort(row)[-2:]
                    assert top2[1] - top2[0] <= 1e-4, (text, step, token, int(np.argmax(row)))
                    ties.append((text, step))
                    break
            seqs.end(text)
        assert len(ties) <= 1, ties
