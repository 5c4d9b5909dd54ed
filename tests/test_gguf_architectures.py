"""GGUF architectures beyond llama (qwen2, qwen3, phi3, gemma, gemma2, gpt2, qwen2moe, qwen3moe, and Mixtral
written as llama): tiny random transformers models written as llama.cpp's converter writes them, loaded and
compiled by kiln, and compared with the transformers model itself and with llama.cpp running the same file.

The writer below follows convert_hf_to_gguf.py per architecture (tensor names, which q/k rows it permutes:
llama's only, Gemma's 1 + w norms, GPT-2's transposed Conv1D weights and duplicated output, stacked experts,
metadata keys); llama.cpp loading each file and computing the transformers model's logits is the check that
the writer is right. Compiling every architecture takes minutes: the default suite compiles a representative few,
`python -m pytest -m slow tests/test_gguf_architectures.py` the rest.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.frontend.gguf_file import GGUFFile
from kiln.frontend.sources import load_source
from kiln.ir.errors import ModelFormatError

from test_gguf import _gpt2_bytes, llama_cpp_permute
from tiny_models import FP32_TOLERANCE, assert_engine_matches_transformers, relative_error

Q = gguf.GGMLQuantizationType
VOCAB = 259
PROMPT = [0, 5, 77, 120, 3, 200, 255, 17, 42, 99, 140, 64]
NEW_TOKENS = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=0,
               eos_token_id=1, pad_token_id=None)
# Widths multiples of 32, so that llama.cpp's quantizer makes Q8_0 blocks of every row.
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# name -> (GGUF general.architecture, transformers config class, config fields)
ARCHS = {
    "qwen2": ("qwen2", "Qwen2Config", {}),
    # A head size (32) other than width / heads (16): the file says so in attention.key_length.
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=32)),
    # Rope over half of each head, as Phi-4-mini's 0.75 does (llama.cpp: rope.dimension_count).
    "phi3": ("phi3", "Phi3Config", dict(partial_rotary_factor=0.5)),
    "gemma": ("gemma", "GemmaConfig", dict(head_dim=16)),
    # A window of 4 (the 12-token prompt crosses it on the sliding layers) and caps small enough to matter;
    # llama.cpp scales queries by 1/sqrt(head size), so query_pre_attn_scalar is the head size.
    "gemma2": ("gemma2", "Gemma2Config", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gpt2": ("gpt2", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB,
                                        bos_token_id=0, eos_token_id=1)),
    "qwen2moe": ("qwen2moe", "Qwen2MoeConfig", dict(**_MOE, shared_expert_intermediate_size=64)),
    "qwen3moe": ("qwen3moe", "Qwen3MoeConfig", dict(**_MOE, head_dim=16, norm_topk_prob=True)),
    "mixtral": ("llama", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
# transformers' std-0.02 weights leave tiny attention almost uniform (a wrong rope or row order would barely
# show) and two experts' router probabilities within 1e-4 (1e-7 differences could then pick another expert):
# q/k projections 8x and routers 4x larger (as tests/tiny_models.py and tests/test_moe.py do), norms random.
QK_SCALE, ROUTER_SCALE = 8.0, 4.0


def tiny_model(name: str):
    _, config_class, fields = ARCHS[name]
    kwargs = fields if name == "gpt2" else {**_COMMON, **fields}
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "c_attn.weight")):
                param.mul_(QK_SCALE)
            elif param_name.endswith("mlp.gate.weight"):
                param.mul_(ROUTER_SCALE)
            elif "norm" in param_name or ".ln_" in param_name:
                param.add_(torch.randn_like(param) * 0.5)
    return model


# --- the converter's names and transforms ----------------------------------------------------------------

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight", "transformer.wte.weight": "token_embd.weight",
           "transformer.wpe.weight": "position_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
           "transformer.ln_f.bias": "output_norm.bias"}
_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.experts.down_proj": "ffn_down_exps",
    # GPT-2
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
# Gemma-2's four norms per layer.
_GEMMA2_BLOCK = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def converted_tensors(name: str, model) -> dict[str, np.ndarray]:
    """{GGUF name: values} as convert_hf_to_gguf.py writes ``model``."""
    arch = ARCHS[name][0]
    config = model.config
    out = {}
    for hf_name, tensor in model.state_dict().items():
        values = tensor.detach().numpy().copy()
        if arch in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
            values = values + 1  # llama.cpp multiplies by the weight; Gemma by 1 + weight
        if hf_name in _GLOBAL:
            if hf_name != "lm_head.weight" or not config.tie_word_embeddings:
                out[_GLOBAL[hf_name]] = values
            continue
        _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest or transformer.h.N.rest
        if rest == "mlp.experts.gate_up_proj":  # stacked [experts, 2 * ffn, width]: gate rows, then up rows
            half = values.shape[1] // 2
            out[f"blk.{layer}.ffn_gate_exps.weight"] = values[:, :half]
            out[f"blk.{layer}.ffn_up_exps.weight"] = values[:, half:]
            continue
        module, _, suffix = rest.rpartition(".")
        if rest == "mlp.experts.down_proj":
            module, suffix = rest, "weight"
        table = {**_BLOCK, **_GEMMA2_BLOCK} if arch == "gemma2" else _BLOCK
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            values = llama_cpp_permute(values, heads)
        if arch == "gpt2" and rest in _GPT2_TRANSPOSED:
            values = values.T  # Conv1D holds [in, out]
        out[f"blk.{layer}.{table[module]}.{suffix}"] = values
    if arch == "gpt2":  # the converter writes GPT-2's tied output as a tensor of its own
        out["output.weight"] = out["token_embd.weight"]
    return out


def write_gguf(path, name: str, model, metadata: dict | None = None, tensors: dict | None = None) -> str:
    """``model`` as llama.cpp's converter writes it (F32), with a byte-level vocabulary; ``metadata`` and
    ``tensors`` replace or add entries (a value of None drops one)."""
    arch = ARCHS[name][0]
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    keys = {}
    if arch == "gpt2":
        keys.update({"block_count": config.n_layer, "context_length": config.n_positions,
                     "embedding_length": config.n_embd, "feed_forward_length": 4 * config.n_embd,
                     "attention.head_count": config.n_head, "attention.layer_norm_epsilon": config.layer_norm_epsilon})
    else:
        keys.update({"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
                     "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
                     "attention.head_count": config.num_attention_heads,
                     "attention.head_count_kv": config.num_key_value_heads,
                     "rope.freq_base": float(config.rope_parameters["rope_theta"]),
                     "attention.layer_norm_rms_epsilon": config.rms_norm_eps})
        if "head_dim" in ARCHS[name][2] or arch in ("gemma", "gemma2"):
            keys.update({"attention.key_length": config.head_dim, "attention.value_length": config.head_dim})
    if arch in ("qwen2moe", "qwen3moe"):
        keys.update({"expert_count": config.num_experts, "expert_used_count": config.num_experts_per_tok,
                     "expert_feed_forward_length": config.moe_intermediate_size})
    if arch == "qwen2moe":
        keys["expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    if name == "mixtral":
        keys.update({"expert_count": config.num_local_experts, "expert_used_count": config.num_experts_per_tok,
                     "rope.dimension_count": config.head_dim})
    if arch == "phi3":
        head_dim = config.hidden_size // config.num_attention_heads
        # The converter writes the config's sliding_window; llama.cpp ignores it for Phi-3 (the reference
        # model attends to everything: transformers with this window differs by 110% of the largest logit).
        keys.update({"rope.dimension_count": int(head_dim * config.partial_rotary_factor),
                     "rope.scaling.original_context_length": config.original_max_position_embeddings,
                     "attention.sliding_window": 4})
    if arch == "gemma2":
        keys.update({"attn_logit_softcapping": config.attn_logit_softcapping,
                     "final_logit_softcapping": config.final_logit_softcapping,
                     "attention.sliding_window": config.sliding_window})
    keys = {f"{arch}.{key}": value for key, value in keys.items()}
    keys.update(metadata or {})
    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, tuple):  # (value, GGUFValueType) for a type the writer would not infer
            writer.add_key_value(key, *value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    byte_map = dict(zip(*_gpt2_bytes()))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<s>", "</s>"] + [byte_map[b] for b in range(256)] + ["ab"])
    writer.add_token_types([3, 3] + [1] * 257)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    values = {**converted_tensors(name, model), **(tensors or {})}
    for tensor_name, array in values.items():
        if array is not None:
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# --- references -------------------------------------------------------------------------------------------

def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor([list(ids)])).logits[0].numpy()


def greedy(model, ids, steps=NEW_TOKENS) -> list[int]:
    ids = torch.as_tensor([list(ids)])
    # An explicit mask: the prompt starts with token 0, which generate would otherwise take for padding.
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def llama_cpp_logits(path, ids=PROMPT) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF reference")
    # f32 K/V: llama.cpp's default f16 cache would round the keys and values.
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=1,
                          n_threads_batch=1, type_k=0, type_v=0, verbose=False)
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


_FILES: dict = {}


def fixture_file(name, tmp_path_factory) -> tuple[str, object]:
    """(the F32 GGUF of tiny model ``name``, the transformers model), made once per session."""
    if name not in _FILES:
        model = tiny_model(name)
        path = write_gguf(tmp_path_factory.mktemp(name) / f"{name}.gguf", name, model)
        _FILES[name] = (path, model)
    return _FILES[name]


# --- tests ----------------------------------------------------------------------------------------------------

# llama.cpp on the same F32 file (f32 K/V cache), relative to the largest logit. It computes in f32 too, and
# the SiLU models agree to 1e-6 (measured: 4e-7 to 1e-6), but its CPU GELU reads a table indexed by the input
# rounded to f16, so the GELU models do not: measured 6e-6 (gemma), 8e-5 (gpt2), 2e-4 (gemma2, whose soft caps
# amplify it). A file read wrongly moves these logits far more (measured: q/k rows in the other order 47-70%,
# Gemma's norms off by one 96-146%, Gemma-2's window missed 101%, Phi-3's applied 110%).
LLAMA_CPP_TOLERANCE = {"gelu": 1e-3, "silu": 1e-5}
GELU_ARCHS = ("gemma", "gemma2", "gpt2")


@pytest.mark.parametrize("name", list(ARCHS))
def test_loaded_module_matches_transformers_and_llama_cpp(name, tmp_path_factory):
    """kiln's module from the file gives the transformers model's logits (fp32: 1e-5 of the largest), and
    llama.cpp reading the same file agrees (LLAMA_CPP_TOLERANCE) with the same greedy next tokens."""
    path, model = fixture_file(name, tmp_path_factory)
    source = load_source(path)
    assert source.kind == "gguf"
    expected = logits(model, PROMPT)
    with torch.no_grad():
        got = source.model(torch.as_tensor([PROMPT]))
    got = (got.logits if hasattr(got, "logits") else got)[0].numpy()
    assert relative_error(got, expected) <= FP32_TOLERANCE
    reference = llama_cpp_logits(path)
    tolerance = LLAMA_CPP_TOLERANCE["gelu" if name in GELU_ARCHS else "silu"]
    assert relative_error(reference, expected) <= tolerance
    assert (reference.argmax(-1) == expected.argmax(-1)).all()


# Compiling takes 5-9 s an architecture: by default one kiln-module file (qwen2), one transformers-class file with
# GELU and transposed weights (gpt2) and one MoE (qwen3moe); the rest with -m slow.
# qwen3moe runs with -m slow: tests/test_moe_quant.py compiles a qwen3moe GGUF (Q4_K_M) by default
DEFAULT_COMPILED = ("qwen2", "gpt2")


def _by_default(names, default):
    return [name if name in default else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.parametrize("name", _by_default(list(ARCHS), DEFAULT_COMPILED))
def test_compiled_engine_matches_transformers(name, tmp_path_factory, tmp_path):
    """The file compiled with TVM: prefill and every decode step within 1e-5 of the transformers model's
    logits, greedy tokens identical (assert_engine_matches_transformers)."""
    path, model = fixture_file(name, tmp_path_factory)
    artifact = kiln.compile(path, backend="tvm", max_seq_len=64, max_num_seqs=1, output=tmp_path / "m.kiln")
    assert artifact.manifest["options"]["quantize"] == "none"
    assert_engine_matches_transformers(kiln.load(artifact.path), name, new_tokens=NEW_TOKENS, model=model)


# --- quantized files ------------------------------------------------------------------------------------------

# Architectures transformers' own GGUF loader reads (gemma and Mixtral-as-llama it does not).
TRANSFORMERS_GGUF = ("qwen2", "qwen3", "phi3", "gemma2", "gpt2", "qwen2moe", "qwen3moe")


def quantize(source: str, ftype: str) -> str:
    """llama.cpp's own quantizer (llama_model_quantize) on ``source``."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's quantizer makes the quantized files")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    path = source.replace(".gguf", f"-{ftype}.gguf")
    assert llama_cpp.llama_model_quantize(source.encode(), path.encode(), ctypes.byref(params)) == 0
    return path


def transformers_from_gguf(path, model):
    """A copy of ``model`` holding the weights transformers' own GGUF loader reads from ``path`` (dequantized by
    the gguf package): the reference for a quantized file, independent of kiln's reader."""
    import copy

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    loaded = {}
    for name, tensor in tensors.items():
        # Its loader gives Qwen2-MoE's shared-expert gate an extra axis; the values are the file's.
        loaded[name] = torch.as_tensor(tensor, dtype=torch.float32).reshape(state[name].shape)
    missing, unexpected = reference.load_state_dict(loaded, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or model.config.tie_word_embeddings)
    return reference.eval()


# llama.cpp multiplies Q8_0 weights by activations it rounds to Q8_0 blocks of 32 (kiln's activations="float"
# does not round them): measured 1.1% (qwen3) to 2.6% (phi3) of the largest logit from transformers on the same
# dequantized weights. The exact check is the one against transformers (1e-5); this one shows llama.cpp reads
# the quantized file as kiln does, well below what a wrong row order or norm would move (47% and more).
LLAMA_CPP_Q8_0_TOLERANCE = 0.05


# 2-D tensors llama.cpp's quantizer keeps F32 ({} is the layer): GPT-2's position table, MoE routers.
KEPT_F32 = {"gpt2": {"position_embd.weight": "transformer.wpe.weight"},
            "qwen2moe": {"blk.{}.ffn_gate_inp.weight": "model.layers.{}.mlp.gate.weight",
                         "blk.{}.ffn_gate_inp_shexp.weight": "model.layers.{}.mlp.shared_expert_gate.weight"},
            "qwen3moe": {"blk.{}.ffn_gate_inp.weight": "model.layers.{}.mlp.gate.weight"}}


@pytest.mark.parametrize("name", _by_default(TRANSFORMERS_GGUF, ("qwen2", "phi3")))
def test_q8_0_file_keeps_its_blocks_and_matches_transformers(name, tmp_path_factory, tmp_path):
    """A Q8_0 file from llama.cpp's quantizer compiles with quantize='gguf' (the default): its 2-D weights arrive
    as the file's int8 blocks; with float activations the logits are transformers' on the gguf package's
    dequantized weights (fp32: 1e-5), greedy tokens identical; llama.cpp agrees within its activation rounding.
    (The expert stacks arrive as their Q8_0 blocks too, in moe_experts_q: tests/test_moe_quant.py.)"""
    path, model = fixture_file(name, tmp_path_factory)
    quantized = quantize(path, "Q8_0")
    artifact = kiln.compile(quantized, backend="tvm", max_seq_len=64, max_num_seqs=1, activations="float",
                            output=tmp_path / "q.kiln")
    quantization = artifact.manifest["quantization"]
    assert list(quantization["weight_formats"]) == ["int8-g32"]
    # Every weight the file holds as Q8_0 arrives as its blocks; the ones llama.cpp's quantizer leaves F32 stay.
    kept = {}
    for layer in range(model.config.num_hidden_layers):
        kept.update({gguf_name.format(layer): module_name.format(layer)
                     for gguf_name, module_name in KEPT_F32.get(name, {}).items()})
    types = GGUFFile(quantized).tensors
    assert all(types[gguf_name].ggml_type == Q.F32 for gguf_name in kept)
    assert quantization["fp32_weights_kept"] == sorted(set(kept.values()))
    reference = transformers_from_gguf(quantized, model)
    assert relative_error(logits(reference, PROMPT), logits(model, PROMPT)) > 1e-4  # the rounding shows
    engine = kiln.load(artifact.path)
    assert_engine_matches_transformers(engine, name, new_tokens=NEW_TOKENS, model=reference)
    assert relative_error(engine.logits(PROMPT), llama_cpp_logits(quantized)) <= LLAMA_CPP_Q8_0_TOLERANCE


# --- refusals ------------------------------------------------------------------------------------------------

def _refused(path, *fragments):
    with pytest.raises(ModelFormatError) as caught:
        load_source(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_unsupported_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path):
    from kiln.frontend.gguf_model import SUPPORTED_ARCHITECTURES

    path = write_gguf(tmp_path / "mamba.gguf", "qwen3", tiny_model("qwen3"), metadata={"general.architecture": None})
    data = open(path, "rb").read().replace(b"qwen3", b"mamba")  # every key and the architecture itself
    open(path, "wb").write(data)
    _refused(path, "general.architecture is 'mamba'", ", ".join(SUPPORTED_ARCHITECTURES))
    assert {"llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt2", "qwen2moe", "qwen3moe"} <= set(
        SUPPORTED_ARCHITECTURES)


REFUSALS = {
    "unknown-tensor": ("qwen3", {}, {"blk.0.mystery.weight": np.zeros(4, np.float32)},
                       ["'blk.0.mystery.weight'", "unknown name"]),
    "missing-tensor": ("qwen3", {}, {"blk.1.attn_k_norm.weight": None},
                       ["'blk.1.attn_k_norm.weight'", "model.layers.1.self_attn.k_norm.weight", "missing"]),
    "head-size-vs-tensors": ("qwen3", {"qwen3.attention.key_length": 16, "qwen3.attention.value_length": 16},
                             {}, ["'blk.0.attn_q.weight'", "expected shape [64, 64]", "found [128, 64]"]),
    "expert-gate-width": ("qwen2moe", {"qwen2moe.expert_feed_forward_length": 48}, {},
                          ["'blk.0.ffn_gate_exps.weight'", "[4, 48, 64]", "[4, 32, 64]"]),
    "more-experts-used-than-exist": ("qwen3moe", {"qwen3moe.expert_used_count": 5}, {},
                                     ["qwen3moe.expert_used_count", "[1, 4]", "5"]),
    "missing-expert-width": ("qwen2moe", {"qwen2moe.expert_shared_feed_forward_length": None}, {},
                             ["'qwen2moe.expert_shared_feed_forward_length' is missing"]),
    "block-count-beyond-tensors": ("gemma2", {"gemma2.block_count": 4000}, {},
                                   ["4000 layers", "holds only"]),
    "missing-norm-epsilon": ("phi3", {"phi3.attention.layer_norm_rms_epsilon": None}, {},
                             ["'phi3.attention.layer_norm_rms_epsilon' is missing"]),
    "rope-scaling": ("qwen3", {"qwen3.rope.scaling.type": "yarn"}, {}, ["qwen3.rope.scaling.type", "'yarn'"]),
    "kv-heads-not-dividing": ("phi3", {"phi3.attention.head_count_kv": 3}, {}, ["head_count_kv", "found 3"]),
    "gpt2-width-vs-heads": ("gpt2", {"gpt2.attention.head_count": 5}, {}, ["gpt2.attention.head_count", "5"]),
    "rope-over-part-of-heads": ("gemma2", {"gemma2.rope.dimension_count": 8}, {},
                                ["gemma2.rope.dimension_count", "head size 16", "found 8"]),
    "mixtral-router-missing": ("mixtral", {}, {"blk.0.ffn_gate_inp.weight": None}, ["'blk.0.ffn_gate_inp.weight'"]),
    "qwen2-rope-freqs": ("qwen2", {}, {"rope_freqs.weight": np.ones(8, np.float32)}, ["'rope_freqs.weight'"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_files_are_refused_in_one_line(case, tmp_path):
    """One ModelFormatError line naming the key or tensor, what was expected and what was found; nothing is
    dequantized or built first."""
    name, metadata, tensors, fragments = REFUSALS[case]
    _refused(write_gguf(tmp_path / f"{case}.gguf", name, tiny_model(name), metadata, tensors), *fragments)
