"""kiln's own torch implementation of the Llama family (llama, mistral, qwen2).

Parameter names match transformers' LlamaForCausalLM so its state dicts load as
they are; the forward is written in transformers' plain style because later
passes pattern-match these forms (RMSNorm, rotate_half RoPE, repeat_kv, SDPA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kiln.ir.errors import ConfigError, ModelFormatError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# transformers' rope types kiln computes (rope_type in a config.json's rope_parameters / rope_scaling).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# kiln's own rope type for GGUF's rope_freqs tensor (how llama.cpp stores Llama 3.1's scaling): the default
# frequencies divided per dimension by the tensor's values. Never read from a config.json.
ROPE_FREQS = "rope_freqs"
# Types whose frequencies transformers recomputes from the length of each sequence.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Types that scale relative to the pretraining context, original_max_position_embeddings.
_ORIGINAL_LENGTH_ROPE_TYPES = ("llama3", "yarn", "longrope")
_MAX_CONTEXT = 2**30

# Upper bounds far above any released model (largest today: vocab ~262k, width ~53k, ~130 layers,
# head_dim 512, context ~10M). They refuse a hostile config before anything is sized from it; the
# tensors a checkpoint actually holds are checked against the config afterwards (check_llama_tensors).
_MAX_SIZES = {
    "vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**20, "num_hidden_layers": 4096,
    "num_attention_heads": 4096, "num_key_value_heads": 4096, "max_position_embeddings": 2**30,
}
MAX_HEAD_DIM = 4096

# transformers' class defaults for keys a config.json may leave out.
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
}


@dataclass
class LlamaConfig:
    """Shape and numerics of one Llama-family model; kiln's own, JSON-able."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # llama's attention_bias also puts a bias on o_proj; qwen2 has q/k/v bias only.
    attention_output_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name, limit in _MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ConfigError(f"model config: expected {name} to be a positive integer of at most {limit:,}, "
                                  f"found {value!r}; fix the config")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads} and no head_dim is given; set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or not 0 < self.head_dim <= MAX_HEAD_DIM
                or self.head_dim % 2):
            raise ConfigError(f"model config: expected head_dim to be a positive even integer of at most {MAX_HEAD_DIM}, "
                              f"found {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}; fix the config")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model config: expected model_type in {SUPPORTED_MODEL_TYPES}, found {self.model_type!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ConfigError(f"model config: expected sliding_window to be a positive integer or None, found {self.sliding_window!r}")
        if not (_finite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1 and _finite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(
                f"model config: expected rms_norm_eps in (0, 1) and a positive finite rope_theta, found "
                f"{self.rms_norm_eps!r} and {self.rope_theta!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"model config: expected {name} to be a token id (or list of ids) below vocab_size "
                                  f"{self.vocab_size}, found {value!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.head_dim, self.max_position_embeddings,
                                                self.rope_theta)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        """Read a transformers config.json dict (4.x or 5.x rope spelling)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: expected model_type in {SUPPORTED_MODEL_TYPES}, found {model_type!r}; "
                "kiln supports only the Llama family")
        defaults = _DEFAULTS[model_type]

        def required(key: str) -> Any:
            if key not in d:
                raise ConfigError(f"config.json: required key {key!r} is missing (model_type {model_type!r})")
            return d[key]

        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"config.json: expected hidden_act 'silu', found {hidden_act!r}; kiln has no other MLP activation")
        for key in ("pretraining_tp",):
            if d.get(key, 1) != 1:
                raise ConfigError(f"config.json: expected {key} 1, found {d[key]!r}")

        num_attention_heads = required("num_attention_heads")
        rope_theta, rope_scaling = _read_rope(d, defaults["rope_theta"])

        if model_type == "qwen2":
            attention_bias, attention_output_bias, mlp_bias = True, False, False
            sliding_window = _qwen2_sliding_window(d, required("num_hidden_layers"))
        elif model_type == "mistral":
            attention_bias, attention_output_bias, mlp_bias = False, False, False
            sliding_window = d.get("sliding_window")
        else:
            attention_bias = bool(d.get("attention_bias", False))
            attention_output_bias = attention_bias
            mlp_bias = bool(d.get("mlp_bias", False))
            sliding_window = None

        return cls(
            vocab_size=required("vocab_size"),
            hidden_size=required("hidden_size"),
            intermediate_size=required("intermediate_size"),
            num_hidden_layers=required("num_hidden_layers"),
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_attention_heads if d.get("num_key_value_heads") is None else d["num_key_value_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=_number(d, "rms_norm_eps", defaults["rms_norm_eps"]),
            rope_theta=rope_theta,
            max_position_embeddings=d.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_output_bias=attention_output_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
            rope_scaling=rope_scaling,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            model_type=model_type,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Inverse of to_dict (kiln's own spelling, not transformers')."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"kiln model config: unknown keys {unknown}; expected only {sorted(names)}")
        return cls(**d)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: expected {key} to be a number, found {value!r}")
    return float(value)


def _read_rope(d: dict, default_theta: float) -> tuple[float, dict | None]:
    # transformers 5 writes rope_parameters (with rope_theta inside); 4.x wrote rope_theta + rope_scaling.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: expected rope_parameters to be an object, found {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("config.json: per-layer-type rope_parameters are not supported; expected one rope dict")
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"config.json: expected rope_theta to be a number, found {theta!r}")
    theta = float(theta)
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor other than 1.0 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"config.json: rope_type {rope_type!r} is not supported; expected one of "
                          f"{SUPPORTED_ROPE_TYPES}")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = rope_type
    # As transformers 5 reads it, a top-level original_max_position_embeddings (Phi-3 keeps it there) wins over
    # the rope dict's (and max_position_embeddings stands in for both: _check_rope_scaling).
    if rope_type in _ORIGINAL_LENGTH_ROPE_TYPES and "original_max_position_embeddings" in d:
        scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    return theta, scaling


def _check_rope_scaling(scaling: dict | None, head_dim: int, max_position_embeddings: int,
                        rope_theta: float) -> dict | None:
    """kiln's spelling of a rope scaling dict: its type's keys only, transformers' defaults filled in (yarn's and
    longrope's factor and attention factor resolved), every value checked; idempotent."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"model config: expected rope_scaling to be an object or None, found {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES + (ROPE_FREQS,):
        raise ConfigError(
            f"model config: rope_scaling rope_type {rope_type!r} is not supported; expected one of "
            f"{SUPPORTED_ROPE_TYPES}")
    if rope_type in _ORIGINAL_LENGTH_ROPE_TYPES and scaling.get("original_max_position_embeddings") is None:
        # transformers' default: the model was pretrained on its whole context.
        scaling = dict(scaling, original_max_position_embeddings=max_position_embeddings)
    fields = _RopeFields(rope_type, scaling)
    if rope_type in ("linear", "dynamic"):
        return {"rope_type": rope_type, "factor": fields.positive("factor")}
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_ROPE_KEYS if k not in scaling]
        if missing:
            raise ConfigError(f"model config: llama3 rope scaling is missing {missing}")
        out = {"rope_type": "llama3", **{key: fields.positive(key) for key in _LLAMA3_ROPE_KEYS[:3]},
               "original_max_position_embeddings": fields.length("original_max_position_embeddings")}
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError(
                f"model config: llama3 rope scaling needs high_freq_factor > low_freq_factor, found "
                f"{out['high_freq_factor']} and {out['low_freq_factor']}")
        return out
    if rope_type == ROPE_FREQS:
        return {"rope_type": ROPE_FREQS, "divisors": fields.positive_list("divisors", head_dim // 2)}
    original = fields.length("original_max_position_embeddings")
    # A factor left out (None) is the ratio of the two context lengths, as in transformers.
    factor = scaling.get("factor")
    factor = max_position_embeddings / original if factor is None else fields.positive("factor")
    attention_factor = scaling.get("attention_factor")
    if rope_type == "yarn":
        if attention_factor is None:
            mscale, mscale_all_dim = fields.number("mscale", 0.0), fields.number("mscale_all_dim", 0.0)
            attention_factor = _yarn_mscale(factor)
            if mscale and mscale_all_dim:
                numerator, denominator = _yarn_mscale(factor, mscale), _yarn_mscale(factor, mscale_all_dim)
                if not (numerator > 0 and denominator > 0):
                    raise ConfigError(f"model config: yarn rope scaling mscale {mscale} and mscale_all_dim "
                                      f"{mscale_all_dim} give a non-positive attention factor; fix them")
                attention_factor = numerator / denominator
        else:
            attention_factor = fields.positive("attention_factor")
        truncate = scaling.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"model config: yarn rope scaling truncate must be true or false, found {truncate!r}")
        if rope_theta == 1.0:
            raise ConfigError("model config: yarn rope scaling needs a rope_theta other than 1 (its ramp divides by "
                              "log rope_theta), found 1.0")
        # transformers reads a missing, null or zero beta as its default (32 and 1).
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "attention_factor": float(attention_factor),
                "beta_fast": fields.positive("beta_fast") if scaling.get("beta_fast") else 32.0,
                "beta_slow": fields.positive("beta_slow") if scaling.get("beta_slow") else 1.0, "truncate": truncate}
    if attention_factor is None:
        if factor > 1.0 and original == 1:
            raise ConfigError("model config: longrope rope scaling with original_max_position_embeddings 1 has no "
                              "default attention_factor (log 1 = 0); set attention_factor")
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        attention_factor = fields.positive("attention_factor")
    return {"rope_type": "longrope", "short_factor": fields.positive_list("short_factor", head_dim // 2),
            "long_factor": fields.positive_list("long_factor", head_dim // 2),
            "original_max_position_embeddings": original, "attention_factor": float(attention_factor)}


class _RopeFields:
    """Typed reads of one rope scaling dict, each refusal naming the type, the key and the value found."""

    def __init__(self, rope_type: str, scaling: dict) -> None:
        self.rope_type, self.scaling = rope_type, scaling

    def _refuse(self, key: str, expected: str) -> ConfigError:
        found = repr(self.scaling[key]) if key in self.scaling else "nothing"
        if len(found) > 80:
            found = found[:77] + "..."
        return ConfigError(f"model config: {self.rope_type} rope scaling {key} must be {expected}, found {found}")

    def number(self, key: str, default: float) -> float:
        value = self.scaling.get(key)
        if value is None:
            return default
        if not _finite(value):
            raise self._refuse(key, "a finite number")
        return float(value)

    def positive(self, key: str) -> float:
        value = self.scaling.get(key)
        if not _finite(value) or value <= 0:
            raise self._refuse(key, "a positive finite number")
        return float(value)

    def length(self, key: str) -> int:
        value = self.scaling.get(key)
        if not _is_int(value) or not 0 < value <= _MAX_CONTEXT:
            raise self._refuse(key, f"a positive integer of at most {_MAX_CONTEXT:,}")
        return value

    def positive_list(self, key: str, count: int) -> list[float]:
        values = self.scaling.get(key)
        if not isinstance(values, list) or len(values) != count or not all(_finite(v) and v > 0 for v in values):
            raise self._refuse(key, f"a list of {count} positive finite numbers (one per rotary frequency, "
                                    "head_dim / 2)")
        return [float(v) for v in values]


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (none for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_length_limit(rope_scaling: dict | None, max_position_embeddings: int) -> tuple[str, int] | None:
    """(config field, length) up to which a rope that depends on the sequence length keeps the frequencies
    transformers computes for short sequences, the ones kiln compiles: dynamic NTK rescales beyond
    max_position_embeddings, longrope switches to its long factors beyond original_max_position_embeddings.
    None for a rope that does not depend on the length."""
    rope_type = (rope_scaling or {}).get("rope_type")
    if rope_type == "dynamic":
        return "max_position_embeddings", max_position_embeddings
    if rope_type == "longrope":
        return "original_max_position_embeddings", rope_scaling["original_max_position_embeddings"]
    return None


def check_rope_length(rope_scaling: dict | None, max_position_embeddings: int, max_seq_len: int) -> None:
    """Refuse a compile whose sequences (up to max_seq_len tokens) would reach past the length where the rope's
    frequencies change (rope_length_limit): a compiled model holds one set of frequencies."""
    limit = rope_length_limit(rope_scaling, max_position_embeddings)
    if limit is not None and max_seq_len > limit[1]:
        field, length = limit
        raise ConfigError(
            f"model config: rope_scaling rope_type {rope_scaling['rope_type']!r} changes its frequencies for sequences "
            f"longer than {field} {length}, and this compile's max_seq_len is {max_seq_len}; kiln compiles one set "
            f"of frequencies, so compile with --max-seq-len {length} or less")


def _qwen2_sliding_window(d: dict, num_layers: int) -> int | None:
    # Qwen2 can mix full and sliding layers; kiln's module has one attention kind for all layers.
    if not d.get("use_sliding_window", False) or d.get("sliding_window") is None:
        return None
    layer_types = d.get("layer_types")
    if layer_types is None:
        first_sliding = d.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return d["sliding_window"]
    raise ConfigError(
        "config.json: qwen2 mixes sliding-window and full-attention layers (use_sliding_window with "
        "max_window_layers); kiln supports only one attention kind for all layers")


def rope_parameters(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq[head_dim/2] in fp32, attention factor on cos/sin) as transformers computes them for the
    config's rope scaling; for dynamic NTK and longrope, those of sequences up to rope_length_limit."""
    dim = config.head_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = config.rope_scaling
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "dynamic":
        # transformers rescales the base for a length L: base * (factor * L / max_pos - (factor - 1)) ** (dim /
        # (dim - 2)), with L never below max_pos. Up to the limit that is L = max_pos. (A 2-wide head has no
        # exponent to rescale; transformers divides by zero there.)
        length, factor = config.max_position_embeddings, scaling["factor"]
        if dim > 2:
            base = base * ((factor * length / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == ROPE_FREQS:
        return inv_freq / torch.tensor(scaling["divisors"], dtype=torch.float32), 1.0
    if rope_type == "longrope":
        # Short factors: transformers' choice for sequences up to original_max_position_embeddings.
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
        return 1.0 / (short * base**exponents), scaling["attention_factor"]
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(scaling, base, dim), scaling["attention_factor"]
    return _llama3_inverse_frequencies(scaling, inv_freq), 1.0


def _yarn_inverse_frequencies(scaling: dict, base: float, dim: int) -> torch.Tensor:
    # Dimensions that turn more than beta_fast times over the original context keep their frequency, those that
    # turn fewer than beta_slow times are divided by the factor, and a linear ramp blends the band between.
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(scaling["original_max_position_embeddings"] / (rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (scaling["factor"] * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_inverse_frequencies(scaling: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin from fixed frequencies; capture checks the compile's max_seq_len against the rope's length limit
    (check_rope_length)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_parameters(config)
        # Not persistent: transformers' state dicts do not carry it either.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = config.rope_scaling
        self.max_position_embeddings = config.max_position_embeddings

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            # yarn's and longrope's attention factor; fuse_rope takes it into the rope op's scaling.
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * n_rep, seq, head_dim]."""
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def sliding_window_causal_mask(seq_len: int, sliding_window: int, device: torch.device) -> torch.Tensor:
    """bool[seq, seq]: key j is visible from query i when i - window < j <= i (transformers' rule)."""
    q_idx = torch.arange(seq_len, device=device)[:, None]
    kv_idx = torch.arange(seq_len, device=device)[None, :]
    return (kv_idx <= q_idx) & (kv_idx > q_idx - sliding_window)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        # A window at least as long as any position reachable is plain causal attention.
        window = config.sliding_window
        self.sliding_window = window if window is not None and window < config.max_position_embeddings else None
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=config.attention_output_bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)

        if self.sliding_window is None:
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, is_causal=True, scale=self.scaling)
        else:
            mask = sliding_window_causal_mask(hidden_states.shape[1], self.sliding_window, hidden_states.device)
            attn_output = F.scaled_dot_product_attention(
                query_states, key_states, value_states, attn_mask=mask, scale=self.scaling)

        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, position_embeddings)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """input_ids[batch, seq] -> fp32 logits[batch, seq, vocab], causal, positions 0..seq-1."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(input_ids)
        return self.lm_head(hidden_states).float()


# A layer index of more than 9 digits names no real layer (and int() refuses 4300+ digits outright).
_LAYER_PREFIX = re.compile(r"model\.layers\.(\d{1,9})\.")


def llama_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config's module holds, by transformers' name (a tied lm_head included)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_layer_count(config: LlamaConfig, names: Iterable[str], where: str) -> None:
    """Refuse a config with more layers than the tensor names (transformers' model.layers.N.*) hold, before
    anything is expanded from it; extra layers in the tensors are named by the checks that follow."""
    layers = {int(match.group(1)) for name in names if (match := _LAYER_PREFIX.match(name))}
    if config.num_hidden_layers > len(layers):
        raise ModelFormatError(
            f"{where}: expected tensors for the {config.num_hidden_layers} layers of the config, found tensors for "
            f"{len(layers)} layers; the config does not match the weights")


def check_llama_tensors(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], where: str = "state dict") -> None:
    """Refuse tensors (transformers' name -> shape) that are not exactly the ones the config asks for.

    Runs before any tensor is read or the module built: a layer count above the layers the tensors
    name is refused first, so a config with a huge num_hidden_layers is never expanded.
    lm_head.weight may be left out when tied.
    """
    check_layer_count(config, shapes, where)
    expected = llama_tensor_shapes(config)
    present = dict(shapes)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in present:
        present.setdefault("lm_head.weight", present["model.embed_tokens.weight"])
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{where}: expected the {config.model_type} tensors of the config, found missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''} and unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for name, shape in expected.items():
        if tuple(present[name]) != shape:
            raise ModelFormatError(
                f"{where}: tensor {name!r}: expected shape {list(shape)} from the config, found {list(present[name])}")


def llama_from_state_dict(config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                          where: str = "state dict") -> LlamaForCausalLM:
    """Build kiln's module around tensors named as in transformers, without random initialisation.

    Every parameter must be present with its exact shape (lm_head.weight may be left out when
    tied); `where` names the source in error messages.
    """
    check_llama_tensors(config, {name: tuple(tensor.shape) for name, tensor in state_dict.items()}, where)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = dict(state_dict)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers are not in state dicts: compute the rotary frequencies for real.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model.eval()
