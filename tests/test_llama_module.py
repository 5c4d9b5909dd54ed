"""kiln's Llama-family torch module against transformers' own classes.

Tiny random configs; transformers builds the reference model, kiln loads its
state dict and must give the same fp32 logits, and must capture with torch.export.
"""

import pytest
import torch
import transformers

from kiln.frontend.llama import LlamaConfig, LlamaForCausalLM, check_llama_tensors, llama_from_state_dict
from kiln.ir.errors import ConfigError, ModelFormatError

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": dict(TINY, model_type="llama", rope_theta=10000.0),
    "llama_tied_bias": dict(TINY, model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3_rope": dict(TINY, model_type="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500000.0),
    "qwen2": dict(TINY, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral": dict(TINY, model_type="mistral", sliding_window=5, head_dim=32),
    "mistral_no_window": dict(TINY, model_type="mistral", sliding_window=None),
}


def _reference(hf_dict: dict) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**hf_dict)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # Random init gives tiny norms; perturb them so norm weights matter in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf_dict = CONFIGS[name]
    reference = _reference(hf_dict)
    config = LlamaConfig.from_hf_dict(reference.config.to_dict())
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits.float()
        got = model(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 11, TINY["vocab_size"])
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_state_dict_names_match_transformers():
    for hf_dict in CONFIGS.values():
        reference = _reference(hf_dict)
        model = LlamaForCausalLM(LlamaConfig.from_hf_dict(reference.config.to_dict()))
        assert sorted(model.state_dict()) == sorted(reference.state_dict())
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_export_dynamic_batch_and_seq(name):
    config = LlamaConfig.from_hf_dict(transformers.AutoConfig.for_model(**CONFIGS[name]).to_dict())
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 9))
    dynamic = {"input_ids": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=4096)}}
    program = torch.export.export(model, (ids,), dynamic_shapes=dynamic)
    # No guard narrowed batch or seq below the requested ranges.
    assert sorted(int(r.upper) for r in program.range_constraints.values()) == [64, 4096]
    # The captured program must serve other batch sizes and lengths, below and above the window.
    for shape in [(1, 1), (3, 4), (2, 17)]:
        other = torch.randint(0, 128, shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_old_rope_spelling():
    old = dict(TINY, model_type="llama", rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    config = LlamaConfig.from_hf_dict(old)
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    assert LlamaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "proportional"}}, "proportional"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "missing"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": None}, "vocab_size"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_theta": None}, "rope_theta"),
    ({"hidden_size": 2**40}, "hidden_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "not divisible"),
    ({"head_dim": 2**20}, "head_dim"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"eos_token_id": 128}, "eos_token_id"),
    ({"bos_token_id": True}, "bos_token_id"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": float("inf"), "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, "factor"),
])
def test_config_refusals(change, fragment):
    d = dict(CONFIGS["llama"], **change)
    with pytest.raises(ConfigError, match=fragment):
        LlamaConfig.from_hf_dict(d)


def test_config_missing_key():
    d = dict(CONFIGS["llama"])
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        LlamaConfig.from_hf_dict(d)


def test_qwen2_mixed_sliding_layers_refused():
    d = dict(CONFIGS["qwen2"], use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ConfigError, match="sliding"):
        LlamaConfig.from_hf_dict(d)


@pytest.mark.parametrize("name", ["llama_tied_bias", "qwen2"])
def test_llama_from_state_dict(name):
    reference = _reference(CONFIGS[name])
    config = LlamaConfig.from_hf_dict(reference.config.to_dict())
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state.pop("lm_head.weight")  # tied: the embedding serves both
    model = llama_from_state_dict(config, state)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_llama_from_state_dict_refusals():
    reference = _reference(CONFIGS["llama"])
    config = LlamaConfig.from_hf_dict(reference.config.to_dict())
    state = dict(reference.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match="up_proj"):
        llama_from_state_dict(config, state, where="ckpt")
    state = dict(reference.state_dict(), **{"model.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ModelFormatError, match="extra"):
        llama_from_state_dict(config, state)
    state = dict(reference.state_dict(), **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ModelFormatError, match="model.norm.weight"):
        llama_from_state_dict(config, state)


def test_check_llama_tensors_refuses_more_layers_than_the_tensors_name():
    # 4000 layers would take seconds to build even on the meta device; refused from the names alone.
    config = LlamaConfig.from_hf_dict(dict(CONFIGS["llama"], num_hidden_layers=4000))
    shapes = {name: tuple(t.shape) for name, t in _reference(CONFIGS["llama"]).state_dict().items()}
    with pytest.raises(ModelFormatError, match="4000 layers of the config, found tensors for 2 layers"):
        check_llama_tensors(config, shapes, where="ckpt")
