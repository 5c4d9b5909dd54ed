"""Fuzz target: a Hugging Face checkpoint directory whose config.json comes from the input.

The weights and tokenizer are those of a tiny valid two-layer llama (written once per process); only
config.json changes. An input starting with ``{`` is the config.json text itself; any other input drives
structured edits of the valid config (set, delete or retype the keys kiln and transformers read, with
numbers at the edges of their ranges, NaN and infinities, other model types). The directory is loaded
as ``kiln.compile`` loads it: a config that does not match the weights must be refused before anything
is sized from it, so every input stays small and fast; only KilnError may escape.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile

import numpy as np

from harness import Choices, run, write_seeds
from kiln.frontend.hf_checkpoint import load_hf_checkpoint
from kiln.frontend.safetensors_file import write_safetensors

VALID = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
KEYS = sorted(VALID) + ["head_dim", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
                        "max_window_layers", "layer_types", "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp",
                        "partial_rotary_factor", "quantization_config", "auto_map", "n_layer", "n_embd", "n_head",
                        "n_positions", "torch_dtype"]
MODEL_TYPES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi3", "gemma", "vit", "", "evil"]
INTERESTING_NUMBERS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 64, 4096, 4097, 2**20, 2**24 + 1, 2**31,
                       2**53 + 1, 2**63, -(2**63), 10**30, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan]
INTERESTING_STRINGS = ["", "llama", "silu", "gelu", "default", "llama3", "yarn", "linear", "sliding_attention",
                       "full_attention", "16", "NaN"]
_state: dict = {}


class ConfigChoices(Choices):
    def value(self, depth: int = 0):
        kind = self.byte() % 8
        if kind <= 1:
            return self.pick(INTERESTING_NUMBERS)
        if kind == 2:
            return self.pick(INTERESTING_STRINGS + MODEL_TYPES)
        if kind == 3:
            return None if self.byte() & 1 else bool(self.byte() & 1)
        if kind == 4:
            return [self.value(depth + 1) for _ in range(self.byte() % 4)] if depth < 2 else []
        if kind == 5:
            keys = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings", "rope_theta", "quant_method"]
            return {self.pick(keys): self.value(depth + 1) for _ in range(self.byte() % 5)} if depth < 2 else {}
        return int.from_bytes(bytes(self.byte() for _ in range(1 + self.byte() % 8)), "little", signed=True)


def config_text(data: bytes) -> bytes:
    if data[:1] == b"{":
        return data
    source = ConfigChoices(data)
    config = dict(VALID)
    for _ in range(source.byte() % 6):
        key, action = source.pick(KEYS), source.byte() % 4
        if action == 0:
            config.pop(key, None)
        elif action == 1 and key == "model_type":
            config[key] = source.pick(MODEL_TYPES)
        else:
            config[key] = source.value()
    return json.dumps(config).encode()


def _checkpoint() -> str:
    """The tiny valid checkpoint, written once; each input only replaces its config.json."""
    if "directory" not in _state:
        directory = tempfile.mkdtemp(prefix="kiln-fuzz-hf-config-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        rng = np.random.default_rng(0)
        hidden, ffn, vocab, kv = 16, 32, 32, 8
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                  "lm_head.weight": (vocab, hidden)}
        for layer in range(2):
            prefix = f"model.layers.{layer}."
            shapes.update({prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight": (hidden,),
                           prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
                           prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
                           prefix + "mlp.gate_proj.weight": (ffn, hidden), prefix + "mlp.up_proj.weight": (ffn, hidden),
                           prefix + "mlp.down_proj.weight": (hidden, ffn)})
        write_safetensors(os.path.join(directory, "model.safetensors"),
                          {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()})
        vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
        tokenizer = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
                     "post_processor": None, "decoder": None, "truncation": None, "padding": None,
                     "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"}}
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump(tokenizer, f)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
        _state["directory"] = directory
    return _state["directory"]


def check(data: bytes) -> None:
    directory = _checkpoint()
    with open(os.path.join(directory, "config.json"), "wb") as f:
        f.write(config_text(data))
    loaded = load_hf_checkpoint(directory)
    assert sum(p.numel() for p in loaded.module.parameters()) > 0
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())


def make_seeds(corpus: str) -> None:
    """Write the seed inputs into the corpus folder: valid configs as JSON text, and edit scripts."""
    seeds = {
        "seed-llama.json": json.dumps(VALID),
        "seed-mistral-window.json": json.dumps({**VALID, "model_type": "mistral", "sliding_window": 8}),
        "seed-llama-head-dim.json": json.dumps({**VALID, "head_dim": 4, "torch_dtype": "bfloat16"}),
        "seed-llama3-rope.json": json.dumps({**VALID, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}}),
        "seed-gpt2.json": json.dumps({"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 2, "n_head": 4,
                                      "n_positions": 64}),
    }
    # Edit scripts (not starting with "{"): no edit, and a few single-key edits.
    write_seeds(corpus, {**seeds, "seed-edits-none.bin": b"\x00", "seed-edits-one.bin": b"\x01\x05\x02\x00\x07",
                         "seed-edits-three.bin": b"\x03\x0a\x02\x01\x02\x03\x00\x00\x01\x00"})


if __name__ == "__main__":
    run(check, "hf_config", make_seeds)
