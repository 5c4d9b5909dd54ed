"""Tests for loading Hugging Face checkpoint directories.

Tiny random transformers models are saved with save_pretrained and their logits
are the reference; planted defects must give one-line typed errors.
"""

import copy
import json
import pickle
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kiln.frontend.hf_checkpoint import LoadedCheckpoint, load_hf_checkpoint
from kiln.frontend.safetensors_file import SafetensorsFile, write_safetensors
from kiln.frontend.tokenizer import TokenizerBundle
from kiln.ir.errors import ConfigError, ModelFormatError

VOCAB = 128
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**TINY_DECODER, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**TINY_DECODER, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "phi3": lambda: transformers.Phi3Config(**TINY_DECODER),
    "gemma": lambda: transformers.GemmaConfig(**TINY_DECODER, head_dim=8),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
NATIVE = {"llama", "mistral", "qwen2"}


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch):
    """Loading a checkpoint must not reach torch.load or pickle at all."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint loader tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def make_reference(model_type: str, seed: int = 0) -> torch.nn.Module:
    config = CONFIGS[model_type]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    # Default inits leave norms at 1 and biases at 0; nudge every tensor so a weight left at its
    # initial value, or loaded into the wrong slot, changes the logits.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def save_reference(model_type: str, directory, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    model = make_reference(model_type, seed)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return model


def logits_of(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = module(input_ids)
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def assert_same_logits(reference: torch.nn.Module, loaded: LoadedCheckpoint) -> float:
    input_ids = torch.tensor([[1, 5, 9, 33, 77, 100, 127], [2, 3, 4, 64, 65, 66, 0]])
    expected = logits_of(reference, input_ids)
    got = logits_of(loaded.module, input_ids)
    assert got.shape == expected.shape
    max_diff = (got - expected).abs().max().item()
    assert max_diff <= 1e-5 * expected.abs().max().item(), max_diff
    return max_diff


def read_config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def write_config(directory, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def load_error(directory, error=ModelFormatError, *fragments: str) -> str:
    with pytest.raises(error) as info:
        load_hf_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- logits against transformers ---------------------------------------------------------


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_logits_match_transformers(tmp_path, model_type):
    reference = save_reference(model_type, tmp_path)
    loaded = load_hf_checkpoint(tmp_path)
    assert loaded.model_type == model_type
    assert loaded.native == (model_type in NATIVE)
    assert loaded.config == read_config(tmp_path)
    assert loaded.tokenizer is None
    assert not loaded.module.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.module.parameters())
    if model_type in NATIVE:
        assert loaded.module.__class__.__module__ == "kiln.frontend.llama"
    assert_same_logits(reference, loaded)


def test_sharded_checkpoint(tmp_path):
    reference = save_reference("llama", tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(reference, load_hf_checkpoint(tmp_path))


def test_sharded_checkpoint_through_transformers(tmp_path):
    reference = save_reference("gpt2", tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_logits(reference, load_hf_checkpoint(tmp_path))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_bf16_checkpoint_loads_as_fp32(tmp_path, model_type):
    reference = make_reference(model_type)
    # Round the fp32 reference's weights to bf16 values (exact in fp32), keeping its fp32 buffers.
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    stored = SafetensorsFile(tmp_path / "model.safetensors")
    assert {info.dtype_name for info in stored.tensors.values()} == {"BF16"}
    loaded = load_hf_checkpoint(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert_same_logits(reference, loaded)


def test_tied_embeddings_share_one_tensor(tmp_path):
    reference = save_reference("qwen2", tmp_path)
    assert "lm_head.weight" not in safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    loaded = load_hf_checkpoint(tmp_path)
    head = dict(loaded.module.named_parameters(remove_duplicate=False))
    assert head["lm_head.weight"].data_ptr() == head["model.embed_tokens.weight"].data_ptr()
    assert_same_logits(reference, loaded)


def test_tied_weights_stored_twice_must_agree(tmp_path):
    reference = save_reference("qwen2", tmp_path)
    weights = dict(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")))
    embedding = weights["model.embed_tokens.weight"]
    # An identical copy is what some exporters write; it loads.
    write_safetensors(tmp_path / "model.safetensors", {**weights, "lm_head.weight": embedding.copy()})
    assert_same_logits(reference, load_hf_checkpoint(tmp_path))
    # A different one means the config's tying is wrong; one of them would silently be dropped.
    write_safetensors(tmp_path / "model.safetensors", {**weights, "lm_head.weight": embedding + 1})
    load_error(tmp_path, ModelFormatError, "'lm_head.weight'", "tied")


def test_loading_leaves_the_global_rng_alone(tmp_path):
    save_reference("gpt2", tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_hf_checkpoint(tmp_path)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_no_random_weights_are_materialised(tmp_path, monkeypatch, model_type):
    # Every initialiser draws through these in-place ops; on the meta device they cost nothing.
    reference = save_reference(model_type, tmp_path)
    for op in ("uniform_", "normal_"):
        original = getattr(torch.Tensor, op)

        def guarded(tensor, *args, _original=original, _op=op, **kwargs):
            assert tensor.device.type == "meta", f"{_op} drew {tuple(tensor.shape)} random values on {tensor.device}"
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, op, guarded)
    assert_same_logits(reference, load_hf_checkpoint(tmp_path))


def test_tokenizer_json_is_loaded(tmp_path):
    save_reference("llama", tmp_path)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(["hello world, hello kiln"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = load_hf_checkpoint(tmp_path)
    assert isinstance(loaded.tokenizer, TokenizerBundle)
    assert loaded.tokenizer.eos_token_ids == [tokenizer.token_to_id("</s>")]
    text = "hello kiln world"
    assert loaded.tokenizer.tokenizer().encode(text).ids == tokenizer.encode(text).ids


# --- refused sources ----------------------------------------------------------------------


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "consolidated.pth", "model.pt"])
def test_pickle_only_directory_is_refused(tmp_path, weights_name):
    write_config(tmp_path, {"model_type": "llama"})
    # Not a real pickle: the loader must refuse on the name alone, without opening it.
    (tmp_path / weights_name).write_bytes(b"this is not a pickle")
    load_error(tmp_path, ModelFormatError, weights_name, "never unpickles", "safetensors", "save_pretrained", "python -c")


def test_auto_map_code_is_never_imported(tmp_path):
    reference = save_reference("llama", tmp_path)
    marker = tmp_path / "imported.marker"
    for module_name in ("modeling_evil", "configuration_evil", "__init__"):
        (tmp_path / f"{module_name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    config = read_config(tmp_path)
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    write_config(tmp_path, config)
    loaded = load_hf_checkpoint(tmp_path)
    assert_same_logits(reference, loaded)
    assert loaded.config["auto_map"] == config["auto_map"]
    assert not marker.exists()
    assert "modeling_evil" not in sys.modules and "configuration_evil" not in sys.modules


def test_auto_map_is_ignored_for_transformers_models(tmp_path):
    reference = save_reference("gpt2", tmp_path)
    marker = tmp_path / "imported.marker"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    config = read_config(tmp_path)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    write_config(tmp_path, config)
    loaded = load_hf_checkpoint(tmp_path)
    assert type(loaded.module) is transformers.GPT2LMHeadModel
    assert_same_logits(reference, loaded)
    assert not marker.exists()


def test_custom_model_type_is_refused_without_running_its_code(tmp_path):
    save_reference("gpt2", tmp_path)
    marker = tmp_path / "imported.marker"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    config = read_config(tmp_path)
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    write_config(tmp_path, config)
    load_error(tmp_path, ConfigError, "'evil'", "llama, mistral, qwen2", "auto_map")
    assert not marker.exists()


def test_without_transformers_only_native_types_load(tmp_path, monkeypatch):
    llama_dir, gpt2_dir = tmp_path / "llama", tmp_path / "gpt2"
    reference = save_reference("llama", llama_dir)
    save_reference("gpt2", gpt2_dir)
    # A None entry in sys.modules makes `import transformers` raise ImportError.
    for name in [name for name in sys.modules if name == "transformers" or name.startswith("transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    load_error(gpt2_dir, ConfigError, "'gpt2'", "llama, mistral, qwen2", "pip install transformers")
    assert_same_logits(reference, load_hf_checkpoint(llama_dir))


def test_quantized_checkpoint_is_refused(tmp_path):
    save_reference("llama", tmp_path)
    config = read_config(tmp_path)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    write_config(tmp_path, config)
    load_error(tmp_path, ConfigError, "quantization_config", "gptq")


# --- malformed directories ----------------------------------------------------------------


def test_not_a_directory(tmp_path):
    load_error(tmp_path / "nowhere", ModelFormatError, "nowhere", "directory")


@pytest.mark.parametrize(
    "config_text, fragment",
    [
        (None, "config.json"),
        ("[1, 2]", "JSON object"),
        ("{not json", "JSON config.json"),
        ('{"hidden_size": 4}', "model_type"),
        ('{"model_type": 7}', "model_type"),
        ('{"model_type": "llama", "model_type": "gpt2"}', "'model_type' twice"),
    ],
    ids=["missing", "list", "not-json", "no-model-type", "model-type-not-str", "duplicate-key"],
)
def test_bad_config_json(tmp_path, config_text, fragment):
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    load_error(tmp_path, ModelFormatError, fragment)


def test_no_weights_at_all(tmp_path):
    write_config(tmp_path, {"model_type": "llama"})
    load_error(tmp_path, ModelFormatError, "model.safetensors", "found neither")


def test_shards_without_index(tmp_path):
    save_reference("llama", tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").unlink()
    load_error(tmp_path, ModelFormatError, "model.safetensors.index.json", "model-0000")


def _rewrite_index(directory, edit) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "shard_name", ["../x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "model.bin"],
    ids=["dotdot", "absolute", "subdirectory", "parent", "not-safetensors"],
)
def test_index_shard_names_must_stay_in_the_directory(tmp_path, shard_name):
    checkpoint = tmp_path / "ckpt"
    save_reference("llama", checkpoint, max_shard_size="20KB")
    # A real file at the traversal target, so only the name check can refuse it.
    write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)})

    def edit(index):
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = shard_name

    _rewrite_index(checkpoint, edit)
    load_error(checkpoint, ModelFormatError, repr(shard_name), "plain")


def test_index_names_a_missing_shard(tmp_path):
    save_reference("llama", tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    load_error(tmp_path, ModelFormatError, shard.name, "no such file")


def test_index_points_at_the_wrong_shard(tmp_path):
    save_reference("llama", tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))

    def edit(index):
        name = next(tensor for tensor, shard in index["weight_map"].items() if shard == shards[0])
        index["weight_map"][name] = shards[1]

    _rewrite_index(tmp_path, edit)
    load_error(tmp_path, ModelFormatError, shards[1], "missing there")


@pytest.mark.parametrize("weight_map", [[], {}, {"model.norm.weight": 3}], ids=["list", "empty", "not-str"])
def test_index_weight_map_must_be_str_to_str(tmp_path, weight_map):
    save_reference("llama", tmp_path, max_shard_size="20KB")
    _rewrite_index(tmp_path, lambda index: index.update(weight_map=weight_map))
    load_error(tmp_path, ModelFormatError, "model.safetensors.index.json")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_missing_tensor(tmp_path, model_type):
    save_reference(model_type, tmp_path)
    weights = dict(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")))
    victim = sorted(weights)[len(weights) // 2]
    del weights[victim]
    write_safetensors(tmp_path / "model.safetensors", weights)
    load_error(tmp_path, ModelFormatError, repr(victim), "found in no weight file")


def test_unexpected_tensor(tmp_path):
    save_reference("llama", tmp_path)
    weights = dict(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")))
    weights["model.layers.9.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
    write_safetensors(tmp_path / "model.safetensors", weights)
    load_error(tmp_path, ModelFormatError, "'model.layers.9.mlp.up_proj.weight'", "no such weight")


def test_legacy_rotary_tables_are_ignored(tmp_path):
    reference = save_reference("llama", tmp_path)
    weights = dict(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_safetensors(tmp_path / "model.safetensors", weights)
    assert_same_logits(reference, load_hf_checkpoint(tmp_path))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_shape_mismatch(tmp_path, model_type):
    save_reference(model_type, tmp_path)
    weights = dict(safetensors.numpy.load_file(str(tmp_path / "model.safetensors")))
    victim = next(name for name in sorted(weights) if weights[name].ndim == 2)
    original_shape = weights[victim].shape
    weights[victim] = weights[victim][:, :-1].copy()
    write_safetensors(tmp_path / "model.safetensors", weights)
    load_error(tmp_path, ModelFormatError, repr(victim), str(tuple(original_shape)), str(weights[victim].shape))


def test_config_sizes_disagree_with_weights(tmp_path):
    save_reference("llama", tmp_path)
    config = read_config(tmp_path)
    config["intermediate_size"] = 48
    write_config(tmp_path, config)
    load_error(tmp_path, ModelFormatError, "mlp", "(48, 32)", "(64, 32)")


def test_corrupt_weights_file(tmp_path):
    save_reference("llama", tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    load_error(tmp_path, ModelFormatError, "model.safetensors", "truncated")


def test_model_type_without_a_causal_lm_class_is_refused(tmp_path):
    write_config(tmp_path, {"model_type": "vit"})
    write_safetensors(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    load_error(tmp_path, ConfigError, "'vit'", "built-in transformers")


def test_config_transformers_rejects_is_a_config_error(tmp_path):
    write_config(tmp_path, {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": "wide", "n_layer": 1, "n_head": 4})
    write_safetensors(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    load_error(tmp_path, ConfigError, "config.json", "GPT2LMHeadModel", "n_embd")


def test_checkpoints_transformers_must_merge_are_refused(tmp_path):
    # Mixtral's per-expert tensors are stacked by transformers while loading; kiln does not copy that logic.
    config = transformers.MixtralConfig(**TINY_DECODER, num_local_experts=2, num_experts_per_tok=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    load_error(tmp_path, ConfigError, "experts", "not supported")


def test_oversized_json_is_refused_before_reading(tmp_path, monkeypatch):
    from kiln.frontend import hf_checkpoint

    save_reference("llama", tmp_path)
    monkeypatch.setattr(hf_checkpoint, "MAX_JSON_BYTES", 64)
    load_error(tmp_path, ModelFormatError, "config.json", "more than the 64")


def test_native_config_errors_name_the_directory(tmp_path):
    save_reference("llama", tmp_path)
    config = read_config(tmp_path)
    config["hidden_act"] = "gelu"
    write_config(tmp_path, config)
    load_error(tmp_path, ConfigError, str(tmp_path), "hidden_act")
