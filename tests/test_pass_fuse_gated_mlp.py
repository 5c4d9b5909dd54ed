"""fuse_gated_mlp: golden IR for SwiGLU, GeGLU (tanh and exact) and Phi-3's fused gate_up projection (split into
two weights, checked against numpy slicing); biases and mismatched inputs stay; the rewritten functions agree with
the originals through the interpreter, and the gated_mlp reference with transformers' Llama, Gemma and Phi-3 MLPs.
"""

import numpy as np
import pytest
import torch

from kiln.ir.interpreter import run_function
from kiln.ir.llm_ops import _gated_mlp_ref
from kiln.ir.parser import parse_module

from golden import check_golden, check_unchanged

PASS = "fuse_gated_mlp"
# Expected IR keeps the nodes a fusion replaced: the pass only rewires their uses, eliminate_dead_code
# (next in the pipeline) removes them.
X = "f32[batch, seq, 16]"
H = "f32[batch, seq, 24]"
WEIGHTS = """
  weight "gate" : f32[24, 16]
  weight "up" : f32[24, 16]
  weight "down" : f32[16, 24]"""
LOAD = """
    %wg = weight() {name="gate"} : f32[24, 16]
    %wu = weight() {name="up"} : f32[24, 16]
    %wd = weight() {name="down"} : f32[16, 24]"""


def module_text(body: str, ret: str = "%y", params: str = f"%x: {X}", weights: str = WEIGHTS) -> str:
    return f"""
module {{{weights}
  func @f({params}) -> ({X}) {{{body}
    return {ret}
  }}
}}
"""


def random_weights(shapes: dict) -> dict:
    rng = np.random.default_rng(5)
    return {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in shapes.items()}


def check_same_results(before_text: str, after, weights: dict) -> None:
    before = parse_module(before_text)
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 1), (2, 5)):
        inputs = [rng.standard_normal((batch, seq, 16)).astype(np.float32) for _ in before.functions["f"].params]
        (expected,) = run_function(before, "f", inputs, weights)
        (got,) = run_function(after, "f", inputs, after.weight_data)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def mlp(activation: str, gated_first: bool = True) -> str:
    product = "mul(%act, %u)" if gated_first else "mul(%u, %act)"
    return LOAD + f"""
    %g = linear(%x, %wg) : {H}
    %act = {activation} : {H}
    %u = linear(%x, %wu) : {H}
    %h = {product} : {H}
    %y = linear(%h, %wd) : {X}"""


@pytest.mark.parametrize("activation,kind,gated_first", [
    ("silu(%g)", "silu", True),
    ("silu(%g)", "silu", False),
    ('gelu(%g) {approximate="tanh"}', "gelu_tanh", True),
    ("gelu(%g)", "gelu", True),
], ids=["swiglu", "swiglu_up_first", "geglu_tanh", "geglu_exact"])
def test_gated_mlp(activation, kind, gated_first):
    weights = random_weights({"gate": (24, 16), "up": (24, 16), "down": (16, 24)})
    body = mlp(activation, gated_first)
    before = module_text(body)
    expected = body.replace("    %y = linear", f"""\
    %fused = gated_mlp(%x, %wg, %wu, %wd) {{activation="{kind}"}} : {X}
    %y = linear""")
    module = check_golden(PASS, before, module_text(expected, ret="%fused"), weights=weights)
    check_same_results(before, module, weights)


PHI3_WEIGHTS = """
  weight "gate_up" : f32[48, 16]
  weight "down" : f32[16, 24]"""
PHI3 = f"""
    %wgu = weight() {{name="gate_up"}} : f32[48, 16]
    %wd = weight() {{name="down"}} : f32[16, 24]
    %gu = linear(%x, %wgu) : f32[batch, seq, 48]
    %g = slice(%gu) {{axis=2, end=24}} : {H}
    %u = slice(%gu) {{axis=2, start=24, end=48}} : {H}
    %act = silu(%g) : {H}
    %h = mul(%u, %act) : {H}
    %y = linear(%h, %wd) : {X}"""


def test_phi3_fused_gate_up_projection_is_split_into_two_weights():
    weights = random_weights({"gate_up": (48, 16), "down": (16, 24)})
    before = module_text(PHI3, weights=PHI3_WEIGHTS)
    expected = PHI3.replace("    %y = linear", f"""\
    %wg = weight() {{name="gate_up[0:24]"}} : f32[24, 16]
    %wu = weight() {{name="gate_up[24:48]"}} : f32[24, 16]
    %fused = gated_mlp(%x, %wg, %wu, %wd) {{activation="silu"}} : {X}
    %y = linear""")
    module = check_golden(PASS, before, module_text(expected, ret="%fused", weights=PHI3_WEIGHTS + """
  weight "gate_up[0:24]" : f32[24, 16]
  weight "gate_up[24:48]" : f32[24, 16]"""), weights=weights)
    np.testing.assert_array_equal(module.weight_data["gate_up[0:24]"], weights["gate_up"][:24])
    np.testing.assert_array_equal(module.weight_data["gate_up[24:48]"], weights["gate_up"][24:])
    check_same_results(before, module, weights)


@pytest.mark.parametrize("body,params,weights", [
    # a bias on the gate projection
    (mlp("silu(%g)").replace("%g = linear(%x, %wg)", "%g = linear(%x, %wg, %bg)"), f"%x: {X}, %bg: f32[24]", WEIGHTS),
    # a bias on the down projection
    (mlp("silu(%g)").replace("%y = linear(%h, %wd)", "%y = linear(%h, %wd, %bd)"), f"%x: {X}, %bd: f32[16]", WEIGHTS),
    # gate and up read different inputs
    (mlp("silu(%g)").replace("%u = linear(%x, %wu)", "%u = linear(%x2, %wu)"), f"%x: {X}, %x2: {X}", WEIGHTS),
    # not a gating activation
    (mlp("relu(%g)"), f"%x: {X}", WEIGHTS),
    # the down projection is not a module weight
    (mlp("silu(%g)").replace("%y = linear(%h, %wd)", "%y = linear(%h, %wd_in)"), f"%x: {X}, %wd_in: f32[16, 24]",
     WEIGHTS),
], ids=["gate_bias", "down_bias", "different_inputs", "relu", "runtime_down"])
def test_near_misses_stay(body, params, weights):
    check_unchanged(PASS, module_text(body, params=params, weights=weights))


def test_up_projection_broadcast_against_the_gate_stays():
    # act(x @ Wg.T) [.., 24] * (x @ Wu.T) [.., 1]: valid IR but not a gated MLP (W_gate and W_up differ in shape);
    # the pass must leave it, not build a gated_mlp its type rule refuses
    weights = WEIGHTS.replace('weight "up" : f32[24, 16]', 'weight "up" : f32[1, 16]')
    body = mlp("silu(%g)").replace('%wu = weight() {name="up"} : f32[24, 16]', '%wu = weight() {name="up"} : f32[1, 16]')
    body = body.replace(f"%u = linear(%x, %wu) : {H}", "%u = linear(%x, %wu) : f32[batch, seq, 1]")
    check_unchanged(PASS, module_text(body, weights=weights))


# the reference against transformers' MLP modules -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
def test_gated_mlp_reference_matches_transformers(arch):
    import transformers

    config_cls, module_path, cls_name = {
        "llama": ("LlamaConfig", "transformers.models.llama.modeling_llama", "LlamaMLP"),
        "gemma": ("GemmaConfig", "transformers.models.gemma.modeling_gemma", "GemmaMLP"),
        "phi3": ("Phi3Config", "transformers.models.phi3.modeling_phi3", "Phi3MLP"),
    }[arch]
    config = getattr(transformers, config_cls)(hidden_size=16, intermediate_size=24, num_attention_heads=4,
                                               num_key_value_heads=4)
    torch.manual_seed(0)
    block = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)(config).eval()
    params = {name: p.detach().numpy() for name, p in block.named_parameters()}
    if arch == "phi3":
        gate, up = params["gate_up_proj.weight"][:24], params["gate_up_proj.weight"][24:]
    else:
        gate, up = params["gate_proj.weight"], params["up_proj.weight"]
    activation = {"llama": "silu", "gemma": "gelu_tanh", "phi3": "silu"}[arch]
    x = np.random.default_rng(2).standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        ref = block(torch.as_tensor(x)).numpy()
    (got,) = _gated_mlp_ref([x, gate, up, params["down_proj.weight"]], {"activation": activation})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
