"""DeepSeek's multi-head latent attention (MLA) for capture: while a model is exported, each DeepSeek-V2/V3
attention runs with its up-projections absorbed (the K one into the query, the V one after the attention) around
the torch custom op ``kiln::latent_attention``, which capture maps to kiln's ``latent_attention``.

transformers expands the cached latent into per-head K/V and rotates with complex numbers (V2) or an in-place
copy (V3); neither exports. The rewritten forward keeps the latent ``[c_kv, k_pe]`` as the only per-token state,
rotates with real cos/sin tables in the rotate-half form (interleaved pairs de-interleaved first, on the query
and the key alike, so their dot product is unchanged), and is checked against the module on a probe first.
"""

from __future__ import annotations

import contextlib

import torch

from kiln.ir.errors import UnsupportedOpError

PROBE_TOKENS = 7
# The probe runs both forwards in float32 on the same inputs; the absorbed form sums in another order.
PROBE_TOLERANCE = 1e-5
_MLA_PARTS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "kv_lora_rank", "qk_rope_head_dim",
              "qk_nope_head_dim", "v_head_dim", "num_heads", "scaling")


@torch.library.custom_op("kiln::latent_attention", mutates_args=())
def latent_attention(q: torch.Tensor, latent: torch.Tensor, scale: float, value_dim: int, expanded_k_dim: int,
                     expanded_v_dim: int) -> torch.Tensor:
    """kiln's latent_attention in torch: causal attention of q [b, H, s, L] over latent [b, s, L], values
    latent[..., :value_dim]."""
    keys = latent.float().unsqueeze(1)
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    length = q.shape[2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, keys[..., :value_dim]).to(q.dtype)


@latent_attention.register_fake
def _latent_attention_fake(q, latent, scale, value_dim, *args):
    return q.new_empty(tuple(q.shape[:3]) + (value_dim,))


def is_mla_attention(module: torch.nn.Module) -> bool:
    """A transformers DeepSeek-V2/V3-style attention: a compressed KV projection with a decoupled RoPE key."""
    return all(hasattr(module, part) for part in _MLA_PARTS)


def _real_rotary(rotary: torch.nn.Module):
    """The (cos, sin) tables of DeepSeek-V3's rotary (rotate-half layout) from a rotary with inv_freq and
    attention_scaling, in place of DeepSeek-V2's complex ``polar`` ones."""
    def forward(x, position_ids):
        freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * rotary.attention_scaling).to(x.dtype),
                (emb.sin() * rotary.attention_scaling).to(x.dtype))

    return forward


def _rotate(x, cos, sin, interleaved: bool):
    """RoPE in the rotate-half form; interleaved pairs (2i, 2i + 1) are de-interleaved first."""
    if interleaved:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _absorbed_forward(attn: torch.nn.Module, interleaved: bool):
    heads, nope, rope, value = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    rank = attn.kv_lora_rank

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        batch, length = hidden_states.shape[:-1]
        if attn.q_lora_rank is None:
            q = attn.q_proj(hidden_states)
        else:
            q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden_states)))
        q = q.view(batch, length, heads, nope + rope).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [nope, rope], dim=-1)
        c_kv, k_pe = torch.split(attn.kv_a_proj_with_mqa(hidden_states), [rank, rope], dim=-1)
        cos, sin = position_embeddings
        q_pe = _rotate(q_pe, cos, sin, interleaved)
        k_pe = _rotate(k_pe.view(batch, 1, length, rope), cos, sin, interleaved).view(batch, length, rope)
        # kv_b_proj's rows are, per head, its nope-K rows then its V rows: W_UK_h [nope, rank], W_UV_h [value, rank]
        up = attn.kv_b_proj.weight.view(heads, nope + value, rank)
        query = torch.cat((torch.matmul(q_nope, up[:, :nope]), q_pe), dim=-1)
        latent = torch.cat((attn.kv_a_layernorm(c_kv), k_pe), dim=-1)
        out = torch.ops.kiln.latent_attention(query, latent, float(attn.scaling), rank, nope + rope, value)
        out = torch.matmul(out, up[:, nope:].transpose(1, 2))
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, heads * value)), None

    return forward


def _refuse(name: str, module: torch.nn.Module, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"cannot capture the latent attention {name} ({type(module).__name__}): {why}; kiln "
                              "captures DeepSeek-V2/V3 multi-head latent attention (causal, no attention bias on "
                              "kv_b_proj) with its own absorbed form")


def _probe(name, attn, original_rotary, real_rotary, forward, interleaved, generator):
    """The absorbed forward against the module's own on a causal probe, or refuse the module."""
    weight = attn.kv_a_proj_with_mqa.weight
    hidden = torch.randn(1, PROBE_TOKENS, weight.shape[1], generator=generator).to(weight.dtype)
    positions = torch.arange(PROBE_TOKENS).unsqueeze(0)
    mask = torch.full((PROBE_TOKENS, PROBE_TOKENS), float("-inf")).triu(1).to(weight.dtype)[None, None]
    want = attn(hidden, attention_mask=mask, position_embeddings=original_rotary(hidden, positions))[0]
    got = forward(hidden, position_embeddings=real_rotary(hidden, positions))[0]
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    error = float((want - got).abs().max() / scale)
    if not error <= PROBE_TOLERANCE:
        raise _refuse(name, attn, f"its absorbed form differs from the module by {error:.1e} of the largest output "
                                  f"on a probe (rope {'interleaved' if interleaved else 'rotate-half'})")


@contextlib.contextmanager
def mla_as_custom_ops(model: torch.nn.Module):
    """While active, every DeepSeek latent attention of ``model`` runs absorbed around ``kiln::latent_attention``
    (checked against the module on a probe first) and a rotary giving complex tables gives real cos/sin ones;
    the modules are restored afterwards."""
    attentions = [(name, m) for name, m in model.named_modules() if is_mla_attention(m)]
    if not attentions:
        yield
        return
    generator = torch.Generator().manual_seed(0)
    patched = []
    try:
        with torch.no_grad():
            rotaries = [m for _, m in model.named_modules()
                        if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]
            if len(rotaries) != 1:
                raise _refuse(attentions[0][0], attentions[0][1], f"expected one rotary embedding module, found "
                                                                 f"{len(rotaries)}")
            rotary = rotaries[0]
            probe = torch.zeros(1, 2, 1)
            tables = rotary(probe, torch.arange(2).unsqueeze(0))
            complex_tables = isinstance(tables, torch.Tensor) and tables.is_complex()
            # DeepSeek-V2 rotates interleaved pairs as complex numbers; V3 as its config's rope_interleave says
            interleaved = complex_tables or bool(getattr(model.config, "rope_interleave", False))
            real_rotary = _real_rotary(rotary) if complex_tables else rotary
            for name, attn in attentions:
                forward = _absorbed_forward(attn, interleaved)
                _probe(name, attn, rotary, real_rotary, forward, interleaved, generator)
                patched.append((attn, forward))
            for attn, forward in patched:
                attn.forward = forward
            if complex_tables:
                rotary.forward = real_rotary
                patched.append((rotary, None))
        yield
    finally:
        for module, _ in patched:
            module.__dict__.pop("forward", None)
