"""Mixture-of-experts blocks for capture: while a model is exported, its routers and fused experts modules run
as the torch custom ops ``kiln::moe_route`` and ``kiln::moe_experts``, which capture maps to kiln's ops.

transformers' experts modules loop over the experts a batch hit (``nonzero``, a data-dependent loop) and
its routers call ``topk``: neither exports as a graph of shapes kiln can follow. Each module is checked
first on a probe: the custom op must give what the module itself gives, or capture refuses it.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F

from kiln.ir.errors import UnsupportedOpError

# transformers' hidden_act -> moe_experts' activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
_ROUTER_CLASS = re.compile(r"top_?k_?router$", re.IGNORECASE)
PROBE_TOKENS = 7
# The probe runs the module and the custom op on the same inputs in float32: routing is the same torch
# arithmetic (exact); the experts sum in another order (a few ulps).
PROBE_TOLERANCE = 1e-5


@torch.library.custom_op("kiln::moe_route", mutates_args=())
def moe_route(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str,
              normalize: bool, num_groups: int, topk_groups: int, group_score: str,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln's moe_route in torch (what the exported program would run in eager mode)."""
    x = logits.float()
    scores = {"softmax": lambda: x.softmax(dim=-1), "sigmoid": x.sigmoid, "softmax_of_topk": lambda: x}[scoring]()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if num_groups > 1:
        grouped = choice.view(choice.shape[0], num_groups, -1)
        best = grouped.topk(2 if group_score == "top2_sum" else 1, dim=-1).values.sum(dim=-1)
        kept = torch.zeros_like(best).scatter_(1, best.topk(topk_groups, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~kept.repeat_interleave(grouped.shape[2], dim=1).bool(), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if scoring == "softmax_of_topk":
        weights = weights.softmax(dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * scaling).float(), ids


@moe_route.register_fake
def _moe_route_fake(logits, correction_bias, top_k, *args):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)


_TORCH_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@torch.library.custom_op("kiln::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, activation: str) -> torch.Tensor:
    """kiln's moe_experts in torch: each token's selected experts' weights gathered, then batched matmuls."""
    gate, up = torch.einsum("th,tkih->tki", x, gate_up[ids]).chunk(2, dim=-1)
    hidden = _TORCH_ACTIVATIONS[activation](gate) * up
    out = torch.einsum("tki,tkhi->tkh", hidden, down[ids])
    return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1).to(x.dtype)


@moe_experts.register_fake
def _moe_experts_fake(x, *args):
    return torch.empty_like(x)


def _route_attrs(router: torch.nn.Module) -> dict:
    """moe_route's attributes for a transformers router, read from its configuration."""
    attrs = dict(top_k=int(router.top_k), scoring="softmax", normalize=True, num_groups=1, topk_groups=1,
                 group_score="max", scaling=1.0)
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid scores, grouped top-2-sum choice
        attrs.update(scoring="sigmoid", normalize=bool(router.norm_topk_prob), num_groups=int(router.num_group),
                     topk_groups=int(router.topk_group), group_score="top2_sum",
                     scaling=float(router.routed_scaling_factor))
    elif hasattr(router, "topk_method"):  # DeepSeek-V2: softmax scores, grouped by the best expert or not
        grouped = router.topk_method == "group_limited_greedy"
        attrs.update(normalize=False, num_groups=int(router.num_group) if grouped else 1,
                     topk_groups=int(router.topk_group) if grouped else 1,
                     scaling=float(router.routed_scaling_factor))
    elif hasattr(router, "norm_topk_prob"):  # Qwen2/3-MoE; Mixtral always renormalises
        attrs.update(normalize=bool(router.norm_topk_prob))
    return attrs


def _router_forward(router: torch.nn.Module, attrs: dict, weights_dtype: torch.dtype):
    float_router = hasattr(router, "e_score_correction_bias") or hasattr(router, "topk_method")
    bias = getattr(router, "e_score_correction_bias", None)

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.weight.shape[1])
        if float_router:  # DeepSeek's routers compute their logits in float32 whatever the model's dtype
            logits = F.linear(hidden_states.float(), router.weight.float())
        else:
            logits = F.linear(hidden_states, router.weight)
        weights, ids = torch.ops.kiln.moe_route(logits, bias, **attrs)
        return logits, weights.to(weights_dtype), ids

    return forward


def _experts_forward(experts: torch.nn.Module, activation: str):
    def forward(hidden_states, top_k_index, top_k_weights):
        return torch.ops.kiln.moe_experts(hidden_states, top_k_weights, top_k_index, experts.gate_up_proj,
                                          experts.down_proj, activation)

    return forward


def _is_fused_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module with stacked [gate; up] and down weights and the default gate."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3 and hasattr(module, "act_fn"))


def _refuse(name: str, module: torch.nn.Module, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"cannot capture the mixture-of-experts module {name} ({type(module).__name__}): "
                              f"{why}; kiln captures softmax/sigmoid top-k routers (Mixtral, Qwen-MoE, DeepSeek) "
                              "and fused experts with stacked [gate; up] and down weights")


def _probe_router(name, router, forward, generator):
    hidden = torch.randn(PROBE_TOKENS, router.weight.shape[1], generator=generator).to(router.weight.dtype)
    _, want_weights, want_ids = router(hidden)
    _, got_weights, got_ids = forward(hidden)
    # transformers' DeepSeek routers pick their top-k unsorted: compare each token's experts as a set.
    want_order, got_order = want_ids.argsort(dim=-1), got_ids.argsort(dim=-1)
    same_ids = torch.equal(want_ids.gather(1, want_order), got_ids.gather(1, got_order))
    if not same_ids or not torch.allclose(
            got_weights.gather(1, got_order).float(), want_weights.gather(1, want_order).float(),
            rtol=PROBE_TOLERANCE, atol=0.0):
        raise _refuse(name, router, "its routing differs from kiln's moe_route on a probe "
                                    f"(attributes tried: {_route_attrs(router)})")
    return want_weights.dtype


def _probe_experts(name, experts, forward, generator):
    hidden = torch.randn(PROBE_TOKENS, experts.gate_up_proj.shape[2], generator=generator)
    hidden = hidden.to(experts.gate_up_proj.dtype)
    count = experts.gate_up_proj.shape[0]
    top_k = min(2, count)
    ids = torch.stack([torch.randperm(count, generator=generator)[:top_k] for _ in range(PROBE_TOKENS)])
    weights = torch.rand(PROBE_TOKENS, top_k, generator=generator)
    want = experts(hidden, ids, weights)
    got = forward(hidden, ids, weights)
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    if want.dtype != got.dtype or float((want - got).abs().max() / scale) > PROBE_TOLERANCE:
        raise _refuse(name, experts, "its output differs from kiln's moe_experts on a probe")


@contextlib.contextmanager
def moe_as_custom_ops(model: torch.nn.Module):
    """While active, every recognised router and fused experts module of ``model`` runs as kiln's custom op
    (checked against the module on a probe first); the modules are restored afterwards."""
    generator = torch.Generator().manual_seed(0)
    patched = []
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                if _ROUTER_CLASS.search(type(module).__name__) and hasattr(module, "top_k"):
                    attrs = _route_attrs(module)
                    dtype = _probe_router(name, module, _router_forward(module, attrs, torch.float32), generator)
                    module.forward = _router_forward(module, attrs, dtype)
                    patched.append(module)
                elif _is_fused_experts(module):
                    act = ACTIVATIONS.get(getattr(getattr(module, "config", None), "hidden_act", None))
                    if act is None:
                        raise _refuse(name, module, "its activation is not one of "
                                                    f"{sorted(ACTIVATIONS)}")
                    forward = _experts_forward(module, act)
                    _probe_experts(name, module, forward, generator)
                    module.forward = forward
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
