"""Any head size on both backends: tiny Llamas whose head size is not a multiple of the TVM kernel's 16 lanes or of
ONNX Runtime GroupQueryAttention's 8 generate what transformers generates (prefill and every decode step within the
fp32 tolerance, greedy tokens identical). The attention kernels alone are checked against numpy for more head sizes
in tests/test_tvm_kernels.py."""

import functools

import pytest

import kiln

from tiny_models import assert_engine_matches_transformers, build_tiny_model

# (head size, query heads, KV heads, width): below one 16-lane chunk and not a multiple of 8; one chunk and a tail
# with three query heads per KV head and a width that is not heads x head size.
HEAD_CONFIGS = [(12, 4, 2, 64), (20, 6, 2, 48)]


@functools.lru_cache(maxsize=None)
def _model(head_dim, heads, kv_heads, hidden):
    return build_tiny_model("llama", head_dim=head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            hidden_size=hidden)


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
@pytest.mark.parametrize("config", HEAD_CONFIGS, ids=lambda c: "D{}_H{}_Hkv{}_W{}".format(*c))
def test_head_size_matches_transformers(tmp_path, backend, config):
    model = _model(*config)
    engine = kiln.load(kiln.compile(model, backend=backend, max_seq_len=48, output=tmp_path / "model.kiln"))
    assert_engine_matches_transformers(engine, "llama", model=model)


def test_onnxruntime_pads_an_odd_head_size_in_its_buffers(tmp_path):
    """GroupQueryAttention takes multiples of 8: the head size 12 is kept as 16 in ONNX Runtime's K/V buffers, and
    the manifest says so."""
    artifact = kiln.compile(_model(*HEAD_CONFIGS[0]), backend="onnxruntime", max_seq_len=48,
                            output=tmp_path / "model.kiln")
    assert artifact.manifest["backend_info"]["kv_layers"] == [{"num_kv_heads": 2, "head_dim": 16, "dtype": "f32"}] * 2
