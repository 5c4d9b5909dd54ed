"""Capture of real architectures: the interpreter on the captured IR gives torch eager's logits."""

import numpy as np
import pytest
import torch

from kiln.frontend.capture import capture
from kiln.ir.errors import ConfigError, KilnError, UnsupportedOpError
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


class _TableTail(torch.nn.Module):
    """Adds the last seq rows of a 16-row table (as MPT slices its ALiBi table, start 16 - seq)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.register_buffer("table", torch.randn(16, 8))

    def forward(self, input_ids):
        return self.embed(input_ids) + self.table[16 - input_ids.shape[1]:]


def test_a_table_slice_is_proven_in_bounds_by_the_declared_length_range():
    """The capture declares the export's batch and length ranges on the module; they prove start 16 - seq >= 0,
    the module matches torch at every length in range and refuses one past it."""
    torch.manual_seed(4)
    model = _TableTail().eval()
    module = capture(model, max_seq=16, max_batch=3)
    assert module.symbol_ranges == {"batch": (1, 3), "seq": (1, 16)}
    for length in range(1, 17):
        ids = np.random.default_rng(length).integers(0, 50, (2, length))
        with torch.no_grad():
            ref = model(torch.as_tensor(ids)).numpy()
        (out,) = run_function(module, "forward", [ids])
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    with pytest.raises(KilnError, match=r"symbol seq would be 17, the module is valid for seq in \[1, 16\]"):
        run_function(module, "forward", [np.zeros((1, 17), np.int64)])


def test_a_model_that_limits_the_length_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        capture(_TableTail().eval(), max_seq=32)
    message = str(info.value)
    assert "max_seq_len 32" in message and "--max-seq-len 16 or less" in message and "\n" not in message
