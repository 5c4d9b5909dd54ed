"""Mixture-of-experts models: moe_route's and moe_experts' numpy references against transformers' own routers
and experts modules (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3 routing), tiny random Mixtral / Qwen2-MoE /
Qwen3-MoE compiled for TVM and ONNX Runtime against transformers (prefill and every decode step within 1e-5
of the largest logit, greedy tokens identical), a DeepSeek-V3 MoE block through both backends, and a check
that a decode step reads only the selected experts (the others' weights are NaN and the output stays exact).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.frontend.capture import capture
from kiln.ir.errors import UnsupportedOpError
from kiln.ir.graph import Module
from kiln.ir.moe_ops import experts as experts_reference
from kiln.ir.moe_ops import route
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType

from tiny_models import ENGINE_PROMPT, FP32_TOLERANCE, assert_engine_matches_transformers, relative_error

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128)
# Odd expert widths (44, 36, 24: not multiples of the kernels' 16 lanes), 5 experts and top-3 for Qwen3.
MOE_ARCHS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=44, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=36,
                                         shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=24, num_experts=5,
                                         num_experts_per_tok=3, norm_topk_prob=True, head_dim=16)),
}
# transformers draws router weights with std 0.02: on these tiny models two experts' probabilities then come
# within 2e-4 of each other, and kiln's 1e-7-level differences could swap which one is chosen (a different
# but equally valid model, and a flaky test). Router weights 4x larger keep the chosen experts' scores at
# least 1e-3 above the next one over the whole test run (measured; asserted below at MIN_ROUTING_GAP).
ROUTER_SCALE = 4.0
MIN_ROUTING_GAP = 1e-4
NEW_TOKENS = 12


def tiny_moe_model(name: str):
    cls_name, overrides = MOE_ARCHS[name]
    return seeded_moe_model(getattr(transformers, cls_name)(**_COMMON, **overrides))


def seeded_moe_model(config):
    """transformers' causal LM for ``config`` drawn with seed 0, its routers ROUTER_SCALE times wider."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("mlp.gate.weight"):
                param.mul_(ROUTER_SCALE)
    return model


_MODELS: dict = {}


def moe_model(name: str):
    if name not in _MODELS:
        _MODELS[name] = tiny_moe_model(name)
    return _MODELS[name]


def routing_gap(model) -> float:
    """The smallest gap between a chosen expert's probability and the best unchosen one, over every router
    call of transformers' greedy generation of the engine test."""
    gaps, hooks = [], []

    def record(router, inputs, outputs):
        top = outputs[0].float().softmax(dim=-1).topk(router.top_k + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            out = model.generate(torch.as_tensor([ENGINE_PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            model(out)
    finally:
        for hook in hooks:
            hook.remove()
    return min(gaps)


# the ops' numpy references against transformers ----------------------------------------------------------
def _router(kind: str):
    """(transformers router, kiln moe_route attributes written out from the model's documented routing)."""
    if kind == "mixtral":
        config = transformers.MixtralConfig(hidden_size=64, num_local_experts=6, num_experts_per_tok=2)
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as cls
        attrs = dict(top_k=2, scoring="softmax", normalize=True)
    elif kind in ("qwen2_moe", "qwen3_moe"):
        norm = kind == "qwen3_moe"
        config = getattr(transformers, "Qwen2MoeConfig" if kind == "qwen2_moe" else "Qwen3MoeConfig")(
            hidden_size=64, num_experts=7, num_experts_per_tok=3, norm_topk_prob=norm)
        if kind == "qwen2_moe":
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as cls
        else:
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as cls
        attrs = dict(top_k=3, scoring="softmax", normalize=norm)
    elif kind == "deepseek_v2":
        config = transformers.DeepseekV2Config(hidden_size=64, n_routed_experts=8, n_group=4, topk_group=2,
                                               num_experts_per_tok=3, topk_method="group_limited_greedy",
                                               routed_scaling_factor=1.5)
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as cls
        attrs = dict(top_k=3, scoring="softmax", num_groups=4, topk_groups=2, group_score="max", scaling=1.5)
    else:
        config = transformers.DeepseekV3Config(hidden_size=64, n_routed_experts=8, n_group=4, topk_group=2,
                                               num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.5)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as cls
        attrs = dict(top_k=3, scoring="sigmoid", normalize=True, num_groups=4, topk_groups=2,
                     group_score="top2_sum", scaling=2.5)
    torch.manual_seed(1)
    router = cls(config).eval()
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(0.0, 0.1)
    return router, attrs


def _by_expert(ids, weights):
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_route_reference_matches_transformers_router(kind):
    """Same experts per token (DeepSeek's routers return them unsorted: compared as sets) and the same
    weights within 2e-6 relative (float64 reference vs transformers' float32)."""
    router, attrs = _router(kind)
    hidden = torch.randn(33, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, want_weights, want_ids = router(hidden)
    bias = router.e_score_correction_bias.numpy() if hasattr(router, "e_score_correction_bias") else None
    weights, ids = route(logits.numpy(), bias, **attrs)
    assert ids.dtype == np.int64 and weights.dtype == np.float32
    want_ids, want_weights = _by_expert(want_ids.numpy(), want_weights.numpy())
    ids, weights = _by_expert(ids, weights)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-6, atol=0)


@pytest.mark.parametrize("hidden_act, activation", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_experts_reference_matches_transformers_experts(hidden_act, activation):
    """moe_experts' reference vs MixtralExperts' own loop: within 1e-6 of the largest output."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = transformers.MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=5,
                                        hidden_act=hidden_act)
    config._experts_implementation = "eager"
    torch.manual_seed(3)
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0.0, 0.2)
        module.down_proj.normal_(0.0, 0.2)
        hidden = torch.randn(9, 24)
        ids = torch.stack([torch.randperm(5)[:3] for _ in range(9)])
        weights = torch.rand(9, 3)
        want = module(hidden, ids, weights).numpy()
    got = experts_reference(hidden.numpy(), weights.numpy(), ids.numpy(), module.gate_up_proj.detach().numpy(),
                            module.down_proj.detach().numpy(), activation)
    assert relative_error(got, want) <= 1e-6


# capture ------------------------------------------------------------------------------------------------
def test_capture_maps_routers_and_experts_to_moe_ops():
    module = capture(moe_model("qwen2_moe"), max_seq=64)
    ops = [node.op for node in module.functions["forward"].nodes]
    assert ops.count("moe_route") == 2 and ops.count("moe_experts") == 2
    assert "topk" not in " ".join(ops)


def test_capture_refuses_a_router_it_does_not_know():
    """A router whose routing is none of kiln's (here top-k of the raw logits, weights = their sigmoid) is
    refused in one line naming the module, not captured wrong."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    class SigmoidOfLogitsTopKRouter(MixtralTopKRouter):
        def forward(self, hidden_states):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            values, indices = logits.topk(self.top_k, dim=-1)
            return logits, values.sigmoid(), indices

    model = tiny_moe_model("mixtral")
    layer = model.model.layers[0].mlp
    old = layer.gate
    layer.gate = SigmoidOfLogitsTopKRouter(model.config)
    layer.gate.load_state_dict(old.state_dict())
    with pytest.raises(UnsupportedOpError, match=r"model\.layers\.0\.mlp\.gate \(SigmoidOfLogitsTopKRouter\): its "
                                                 r"routing differs from kiln's moe_route"):
        capture(model, max_seq=64)


# whole models against transformers ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_routing_has_no_near_ties(arch):
    """The precondition of the engine tests: no routing decision of the run is a near-tie."""
    assert routing_gap(moe_model(arch)) >= MIN_ROUTING_GAP


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
@pytest.mark.parametrize("arch", sorted(MOE_ARCHS))
def test_tiny_moe_model_matches_transformers(tmp_path, backend, arch):
    if backend == "tvm":
        pytest.importorskip("tvm")
    model = moe_model(arch)
    engine = kiln.load(kiln.compile(model, backend=backend, max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, arch, new_tokens=NEW_TOKENS, model=model)


# a DeepSeek-V3 MoE block (sigmoid scores, correction bias, grouped top-k, routed scaling) op by op --------
TOKENS = sym("tokens")


def _deepseek_v3_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(hidden_size=64, n_routed_experts=8, n_group=4, topk_group=2,
                                           num_experts_per_tok=3, moe_intermediate_size=20, norm_topk_prob=True,
                                           routed_scaling_factor=2.5, n_shared_experts=1)
    config._experts_implementation = "eager"
    torch.manual_seed(4)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.3)
        block.gate.e_score_correction_bias.normal_(0.0, 0.1)
        block.experts.gate_up_proj.normal_(0.0, 0.2)
        block.experts.down_proj.normal_(0.0, 0.2)
    return block


def _routed_experts_module(block, poison=()):
    """kiln's routed half of the block: linear router -> moe_route -> moe_experts, with the weights of the
    experts in ``poison`` replaced by NaN."""
    gate_up = block.experts.gate_up_proj.detach().numpy().copy()
    down = block.experts.down_proj.detach().numpy().copy()
    gate_up[list(poison)] = np.nan
    down[list(poison)] = np.nan
    module = Module()
    for name, array in (("router", block.gate.weight), ("bias", block.gate.e_score_correction_bias)):
        module.add_weight(name, array.detach().numpy())
    module.add_weight("gate_up", gate_up)
    module.add_weight("down", down)
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (TOKENS, 64)))
    routed = fn.add_node("moe_route", [fn.emit("linear", x, fn.emit("weight", name="router")),
                                       fn.emit("weight", name="bias")],
                         dict(top_k=3, scoring="sigmoid", normalize=True, num_groups=4, topk_groups=2,
                              group_score="top2_sum", scaling=2.5))
    fn.set_results([fn.emit("moe_experts", x, *routed.outputs, fn.emit("weight", name="gate_up"),
                            fn.emit("weight", name="down"), activation="silu", value_name="logits")])
    return module


def _run_tvm(module, x):
    pytest.importorskip("tvm")
    from kiln.backends.tvm import llm_lower, moe_lower  # noqa: F401  (registers the lowerings)
    from kiln.backends.tvm.build import TVMFunction

    return TVMFunction.from_module(module, "f")(x)[0]


def _run_onnxruntime(module, x):
    import onnx
    import onnxruntime as ort

    from kiln.backends.onnxruntime import moe_lower  # noqa: F401  (registers the lowerings)
    from kiln.backends.onnxruntime.lower import lower_function, make_model

    lowered = lower_function(module, "f")
    for name, array in lowered.initializers.items():
        lowered.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
    session = ort.InferenceSession(make_model(lowered.graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("run", [_run_tvm, _run_onnxruntime], ids=["tvm", "onnxruntime"])
@pytest.mark.parametrize("tokens, poison", [(1, True), (2, True), (9, False)])
def test_deepseek_v3_routed_experts_match_transformers(run, tokens, poison):
    """The block's routed experts (transformers' gate then experts modules) within 1e-5 of the largest
    output. With ``poison`` every expert that no token selected has NaN weights, so an output computed from
    all experts then masked would be NaN: the kernels read the selected experts only (one token: a decode
    step; nine tokens select every expert, a prefill)."""
    block = _deepseek_v3_block()
    hidden = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, weights, ids = block.gate(hidden)
        want = block.experts(hidden, ids, weights).numpy()
    unused = sorted(set(range(8)) - set(ids.flatten().tolist())) if poison else []
    assert unused or not poison, "every expert was selected: nothing to poison"
    got = run(_routed_experts_module(block, poison=unused), hidden.numpy())
    assert np.isfinite(got).all()
    assert relative_error(got, want) <= FP32_TOLERANCE


def test_inspect_reports_expert_bytes_read_per_decoded_token():
    """kiln inspect's expert line: per decoded token, top-k experts' gate/up/down weights per MoE layer,
    counted here from transformers' parameters (f32; quantized experts: tests/test_moe_quant.py)."""
    from kiln.cli import format_summary
    from kiln.driver import summarize

    model = moe_model("qwen3_moe")
    experts = [layer.mlp.experts for layer in model.model.layers]
    per_expert = sum(4 * (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) for e in experts)
    summary = summarize(capture(model, max_seq=64))
    assert summary["experts"] == {"layers": 2, "top_k": 3, "experts": 5, "expert_weight_bytes": 5 * per_expert,
                                  "expert_bytes_per_decoded_token": 3 * per_expert, "formats": {"f32": 4}}
    assert (f"experts: 2 MoE layers, top-3 of 5; expert weights {5 * per_expert / 2**20:.2f} MiB, read per decoded "
            f"token {3 * per_expert / 2**20:.2f} MiB") in format_summary(summary)
