"""Capture of real architectures: the interpreter on the captured IR gives torch eager's logits."""

import numpy as np
import pytest
import torch

from kiln.frontend.capture import capture
from kiln.ir.errors import UnsupportedOpError
from kiln.ir.interpreter import run_function
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify_module

from tiny_models import PROMPT_SHAPES, TINY_ARCHS, VOCAB, assert_forward_matches, captured


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_architecture_logits_match_torch(arch):
    module = captured(arch)
    verify_module(module)
    (fn,) = module.functions.values()
    assert fn.params[0].type == TensorType("i64", (sym("batch"), sym("seq")))
    rng = np.random.default_rng(0)
    for shape in PROMPT_SHAPES:
        assert_forward_matches(module, arch, rng.integers(0, VOCAB, size=shape))


class _PlainLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + torch.cumsum(h, dim=1) * 0.5
        return self.head(torch.nn.functional.gelu(self.norm(h), approximate="tanh"))


def test_plain_module_capture():
    torch.manual_seed(1)
    model = _PlainLM().eval()
    module = capture(model, max_seq=64)
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).numpy()
    (out,) = run_function(module, "forward", [ids])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


class _Sorter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return torch.sort(h, dim=-1).values


def test_unsupported_op_names_op_node_and_source_line():
    with pytest.raises(UnsupportedOpError) as info:
        capture(_Sorter(), max_seq=64)
    message = str(info.value)
    assert "aten.sort" in message
    assert "graph node %sort" in message
    assert "test_capture.py" in message and "torch.sort(h, dim=-1)" in message
    assert "\n" not in message


class _TilesAndStacks(torch.nn.Module):
    """repeat, repeat_interleave (with and without a dim), stack and baddbmm with alpha/beta: the ops BLOOM, GPT-J
    and Cohere build their position terms from."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids):
        h = self.embed(input_ids)  # [b, s, 8]
        tiled = h.repeat(2, 1, 1)  # [2b, s, 8]
        pairs = torch.stack([-h[..., 1::2], h[..., ::2]], dim=-1).flatten(-2)  # GPT-J's rotate_every_two
        spread = torch.repeat_interleave(h[..., :4], 2, dim=-1)  # [b, s, 8]
        flat = torch.repeat_interleave(h[0, 0, :3], 2)  # [6]
        scores = torch.baddbmm(tiled[:, :, :1], tiled, tiled.transpose(1, 2), beta=0.5, alpha=0.25)
        return (scores.sum(-1, keepdim=True)[: h.shape[0]] + pairs * spread) * flat.sum(-1)


def test_tiles_stacks_and_baddbmm_capture():
    torch.manual_seed(2)
    model = _TilesAndStacks().eval()
    module = capture(model, max_seq=16)
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).numpy()
    (out,) = run_function(module, "forward", [ids])
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


class _SizeExtremaAndScalarPowers(torch.nn.Module):
    """max(0, 1 - seq) (MPT slices its ALiBi table so) is 0 for every length export allows; 2 ** x is
    aten.pow.Scalar."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        start = max(0, 1 - h.shape[1])
        return h[:, start:] * torch.pow(2.0, h)


def test_size_extrema_decided_by_the_export_ranges_and_scalar_powers_capture():
    torch.manual_seed(3)
    model = _SizeExtremaAndScalarPowers().eval()
    module = capture(model, max_seq=16)
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).numpy()
    (out,) = run_function(module, "forward", [ids])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
