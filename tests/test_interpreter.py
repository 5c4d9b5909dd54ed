"""Tests for the reference interpreter: small hand-built functions against torch eager, and input binding errors.

One function per model piece (MLP block, grouped causal attention) runs at several
(batch, seq) values of its symbolic shape; torch computes the same block its own way.
"""

import math

import numpy as np
import pytest
import torch

from kiln.ir.errors import KilnError
from kiln.ir.graph import Module
from kiln.ir.interpreter import bind_symbols, run_function
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify_module

batch, seq = sym("batch"), sym("seq")
SIZES = [(1, 1), (2, 5), (3, 7)]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 4


def weights(seed=0) -> dict:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {"fc1.weight": w(32, HIDDEN), "fc1.bias": w(32), "fc2.weight": w(HIDDEN, 32), "fc2.bias": w(HIDDEN),
            "ln.weight": 1 + w(HIDDEN), "ln.bias": w(HIDDEN), "q.weight": w(HEADS * HEAD_DIM, HIDDEN),
            "k.weight": w(KV_HEADS * HEAD_DIM, HIDDEN), "v.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            "o.weight": w(HIDDEN, HEADS * HEAD_DIM)}


def build_module() -> Module:
    module = Module()
    for name, array in weights().items():
        module.add_weight(name, array)

    mlp = module.add_function("mlp")
    x = mlp.add_param("x", TensorType("f32", (batch, seq, HIDDEN)))
    W = {name: mlp.emit("weight", name=name) for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                                           "ln.weight", "ln.bias")}
    h = mlp.emit("gelu", mlp.emit("linear", x, W["fc1.weight"], W["fc1.bias"]), approximate="tanh")
    h = mlp.emit("add", mlp.emit("linear", h, W["fc2.weight"], W["fc2.bias"]), x)
    normed = mlp.emit("layer_norm", h, W["ln.weight"], W["ln.bias"], eps=1e-5)
    mlp.set_results([normed, mlp.emit("softmax", normed)])

    attn = module.add_function("attention")
    x = attn.add_param("x", TensorType("f32", (batch, seq, HIDDEN)))

    def heads(name, count):
        flat = attn.emit("linear", x, attn.emit("weight", name=name))
        split = attn.emit("reshape", flat, shape=(batch, seq, count, HEAD_DIM))
        return attn.emit("permute", split, perm=(0, 2, 1, 3))

    q, k, v = heads("q.weight", HEADS), heads("k.weight", KV_HEADS), heads("v.weight", KV_HEADS)
    # causal mask built in the graph from positions, so arange/compare run on symbolic shapes
    positions = attn.emit("arange", end=seq)
    keep = attn.emit("ge", attn.emit("reshape", positions, shape=(seq, 1)),
                     attn.emit("reshape", positions, shape=(1, seq)))
    out = attn.emit("sdpa", q, k, v, keep, enable_gqa=True)
    merged = attn.emit("reshape", attn.emit("permute", out, perm=(0, 2, 1, 3)), shape=(batch, seq, HEADS * HEAD_DIM))
    attn.set_results([attn.emit("add", attn.emit("linear", merged, attn.emit("weight", name="o.weight")), x)])
    verify_module(module)
    return module


def torch_mlp(x: torch.Tensor, w: dict) -> tuple:
    fc1 = torch.nn.Linear(HIDDEN, 32)
    fc2 = torch.nn.Linear(32, HIDDEN)
    ln = torch.nn.LayerNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        fc1.weight.copy_(w["fc1.weight"]), fc1.bias.copy_(w["fc1.bias"])
        fc2.weight.copy_(w["fc2.weight"]), fc2.bias.copy_(w["fc2.bias"])
        ln.weight.copy_(w["ln.weight"]), ln.bias.copy_(w["ln.bias"])
        normed = ln(fc2(torch.nn.GELU(approximate="tanh")(fc1(x))) + x)
        return normed, torch.softmax(normed, dim=-1)


def torch_attention(x: torch.Tensor, w: dict) -> torch.Tensor:
    """Grouped causal attention written out: repeat KV heads, mask above the diagonal, softmax, weighted sum."""
    b, s, _ = x.shape
    q = (x @ w["q.weight"].T).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
    k = (x @ w["k.weight"].T).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = (x @ w["v.weight"].T).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1), float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
    return out @ w["o.weight"].T + x


@pytest.fixture(scope="module")
def module():
    return build_module()


@pytest.mark.parametrize("size", SIZES)
def test_mlp_matches_torch(module, size):
    x = np.random.default_rng(sum(size)).standard_normal(size + (HIDDEN,)).astype(np.float32)
    normed, probs = run_function(module, "mlp", [x])
    w = {k: torch.from_numpy(v) for k, v in weights().items()}
    expected_normed, expected_probs = torch_mlp(torch.from_numpy(x), w)
    assert normed.dtype == np.float32 and normed.shape == size + (HIDDEN,)
    np.testing.assert_allclose(normed, expected_normed.numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(probs, expected_probs.numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("size", SIZES)
def test_attention_matches_torch(module, size):
    x = np.random.default_rng(10 + sum(size)).standard_normal(size + (HIDDEN,)).astype(np.float32)
    (out,) = run_function(module, "attention", [x])
    expected = torch_attention(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in weights().items()})
    assert out.dtype == np.float32 and out.shape == size + (HIDDEN,)
    np.testing.assert_allclose(out, expected.numpy(), rtol=2e-6, atol=2e-6)


def test_weights_argument_overrides_module_arrays(module):
    other = weights(seed=5)
    x = np.random.default_rng(3).standard_normal((2, 3, HIDDEN)).astype(np.float32)
    (out,) = run_function(module, "attention", [x], weights=other)
    expected = torch_attention(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in other.items()})
    np.testing.assert_allclose(out, expected.numpy(), rtol=2e-6, atol=2e-6)


# binding errors ---------------------------------------------------------------------------
def two_input_module() -> Module:
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (batch, seq, 8)))
    ids = fn.add_param("ids", TensorType("i64", (batch, seq)))
    fn.set_results([fn.emit("add", x, fn.emit("reshape", fn.emit("cast", ids, dtype="f32"), shape=(batch, seq, 1)))])
    return module


def test_binding_solves_symbols():
    module = two_input_module()
    fn = module.functions["f"]
    assert bind_symbols(fn, [np.zeros((2, 3, 8), np.float32), np.zeros((2, 3), np.int64)]) == {"batch": 2, "seq": 3}
    x = np.arange(48, dtype=np.float32).reshape(2, 3, 8)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    (out,) = run_function(module, "f", [x, ids])
    np.testing.assert_array_equal(out, x + ids[..., None])


@pytest.mark.parametrize("inputs,message", [
    ([np.zeros((2, 3, 8), np.float32)], "takes 2 inputs, got 1"),
    ([np.zeros((2, 3, 8), np.float32), np.zeros((2, 3), np.int64), np.zeros(1)], "takes 2 inputs, got 3"),
    ([np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64)], "expected rank 3"),
    ([np.zeros((2, 3, 8), np.float32), np.zeros((2, 3, 1), np.int64)], "expected rank 2"),
    ([np.zeros((2, 3, 8), np.float32), np.zeros((2, 4), np.int64)], "symbol seq is 3 and 4"),
    ([np.zeros((2, 3, 8), np.float32), np.zeros((1, 3), np.int64)], "symbol batch is 2 and 1"),
    ([np.zeros((2, 3, 9), np.float32), np.zeros((2, 3), np.int64)], "expected f32[batch, seq, 8]"),
    ([np.zeros((2, 3, 8), np.float64), np.zeros((2, 3), np.int64)], "expected f32, got float64"),
    ([np.zeros((2, 3, 8), np.float32), np.zeros((2, 3), np.int32)], "expected i64, got int32"),
    ([np.zeros((2, 0, 8), np.float32), np.zeros((2, 0), np.int64)], "symbols must be >= 1"),
])
def test_binding_errors(inputs, message):
    with pytest.raises(KilnError) as info:
        run_function(two_input_module(), "f", inputs)
    text = str(info.value)
    assert message in text and "@f" in text and "\n" not in text, text


def test_compound_dims():
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (seq,)))
    y = fn.add_param("y", TensorType("f32", (2 * seq + 1,)))
    fn.set_results([fn.emit("concat", x, x, y, axis=0)])
    x_arr, y_arr = np.ones(3, np.float32), np.arange(7, dtype=np.float32)
    (out,) = run_function(module, "f", [x_arr, y_arr])
    np.testing.assert_array_equal(out, np.concatenate([x_arr, x_arr, y_arr]))
    with pytest.raises(KilnError,
                       match=r"input %y: expected f32\[2\*seq \+ 1\] \(dim 2\*seq \+ 1 = 7\), got shape \[6\]"):
        run_function(module, "f", [x_arr, np.zeros(6, np.float32)])

    only = Module()
    g = only.add_function("g")
    z = g.add_param("z", TensorType("f32", (2 * seq,)))
    g.set_results([g.emit("neg", z)])
    with pytest.raises(KilnError, match=r"dim 2\*seq of f32\[2\*seq\] cannot be solved"):
        run_function(only, "g", [np.zeros(4, np.float32)])


def test_weight_array_errors():
    module = Module()
    module.add_weight("w", type=TensorType("f32", (4,)))
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (4,)))
    fn.set_results([fn.emit("add", x, fn.emit("weight", name="w"))])
    x_arr = np.ones(4, np.float32)
    with pytest.raises(KilnError, match="weight 'w' has no array"):
        run_function(module, "f", [x_arr])
    with pytest.raises(KilnError, match=r"weight 'w' is declared f32\[4\], its array is float32\[5\]"):
        run_function(module, "f", [x_arr], weights={"w": np.ones(5, np.float32)})
    with pytest.raises(KilnError, match=r"weight 'w' is declared f32\[4\], its array is float16\[4\]"):
        run_function(module, "f", [x_arr], weights={"w": np.ones(4, np.float16)})
    (out,) = run_function(module, "f", [x_arr], weights={"w": np.full(4, 2.5, np.float32)})
    np.testing.assert_array_equal(out, np.full(4, 3.5, np.float32))
