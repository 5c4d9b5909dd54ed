"""launch_fusion: a decode step's kernels merged into one thread-pool launch per layer.

The merged step is checked against transformers (every decode step's logits, greedy tokens) and against the
same model compiled without the pass; its lowered TIR is checked for the property that makes it correct
with any number of threads: inside the launch, every store happens inside a parallel loop (code outside one
runs on every task).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import kiln
from tiny_models import assert_engine_matches_transformers, build_tiny_model

pytest.importorskip("tvm")

from kiln.backends.tvm.launch_fusion import _cut_points  # noqa: E402


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """The pass is on by default; these tests say so, in case the environment turned it off."""
    monkeypatch.setenv("KILN_FUSE_LAUNCHES", "1")


def test_cut_points_align_with_the_period():
    layer = ["norm", "quant", "qkv", "rope", "append", "attn", "quant", "o", "add", "norm", "quant", "up", "mul",
             "quant", "down"]
    kernels = ["embed"] + layer * 4 + ["norm", "lm_head"]
    cuts = _cut_points(kernels, 24)
    assert cuts == [0, 1, 16, 31, 46, 61, 63]
    # a period longer than a launch holds: each layer splits at the same places
    cuts = _cut_points(kernels, 8)
    assert cuts == [0, 1, 8, 16, 23, 31, 38, 46, 53, 61, 63]
    assert _cut_points(list("abcdefg"), 3) == [0, 2, 4, 7]  # no period: nearly equal chunks


def _launches(path):
    with open(os.path.join(path, "manifest.json")) as f:
        backend = json.load(f)["backend_info"]
    return backend["kernel_launches"], backend["parallel_launches"]


# about 12 s each: int4 by default, fp32 with -m slow
@pytest.mark.parametrize("quantize", [pytest.param("none", marks=pytest.mark.slow), "int4"])
def test_fused_decode_matches_transformers_and_unfused(tmp_path, monkeypatch, quantize):
    model = build_tiny_model("llama", num_hidden_layers=3)
    fused = kiln.compile(model, backend="tvm", max_seq_len=64, quantize=quantize, output=tmp_path / "fused.kiln")
    launches, parallel = _launches(fused.path)
    # one launch per layer, plus the embedding before and the logits after; all of them on the pool
    assert launches["step_decode"] <= 3 + 2 and parallel["step_decode"] == launches["step_decode"]
    engine = kiln.load(fused.path)
    if quantize == "none":
        assert_engine_matches_transformers(engine, "llama", model=model, new_tokens=16)
    monkeypatch.setenv("KILN_FUSE_LAUNCHES", "0")
    plain = kiln.compile(model, backend="tvm", max_seq_len=64, quantize=quantize, output=tmp_path / "plain.kiln")
    assert _launches(plain.path)[0]["step_decode"] > 10 * 3
    prompt = [3, 17, 42, 5, 99, 7, 1, 64, 2, 11, 13]
    got = engine.generate(prompt, max_new_tokens=24, ignore_eos=True, return_logits=True)
    want = kiln.load(plain.path).generate(prompt, max_new_tokens=24, ignore_eos=True, return_logits=True)
    assert got.token_ids == want.token_ids
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))  # the same kernels, in order


def _stores_outside_parallel_loops(stmt, inside_launch=False, in_parallel=False) -> list:
    """BufferStores inside the parallel launch but outside every parallel loop, in lowered TIR."""
    from tvm import tirx

    found = []
    if isinstance(stmt, tirx.AttrStmt):
        inside_launch = inside_launch or stmt.attr_key == "pragma_parallel_launch_point"
    if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL:
        in_parallel = True
    if isinstance(stmt, tirx.BufferStore) and inside_launch and not in_parallel:
        found.append(stmt)
    children = []
    for name in ("body", "then_case", "else_case"):
        child = getattr(stmt, name, None)
        if isinstance(child, tirx.Stmt):
            children.append(child)
    if isinstance(stmt, tirx.SeqStmt):
        children.extend(stmt.seq)
    for child in children:
        found += _stores_outside_parallel_loops(child, inside_launch, in_parallel)
    return found


def _tiny_mixtral():
    import transformers

    from tiny_models import random_model

    # a router of 4 experts: its decode GEMV has one column tile, a parallel loop of one iteration
    return random_model(transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   num_local_experts=4, num_experts_per_tok=2,
                                                   max_position_embeddings=128))


@pytest.mark.parametrize("name", ["llama", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_every_store_of_a_launch_is_inside_a_parallel_loop(name, monkeypatch):
    import tvm

    from kiln.backends.tvm import build
    from kiln.backends.tvm.lower import as_target

    merged = {}
    count = build.count_launches

    def grab(launches):
        @tvm.transform.module_pass(opt_level=0, name="grab")
        def _grab(mod, _ctx):
            merged.update({gvar.name_hint: func for gvar, func in mod.functions_items()
                           if gvar.name_hint.startswith("kiln_launch")})
            return count(launches)(mod)

        return _grab

    monkeypatch.setattr(build, "count_launches", grab)
    model = build_tiny_model("llama") if name == "llama" else _tiny_mixtral()
    kiln.compile(model, backend="tvm", max_seq_len=48, quantize="int4" if name == "llama" else "none")
    assert merged
    target = as_target("cpu")
    pipeline = tvm.tirx.get_default_tir_pipeline(target)[0]
    for name, func in merged.items():
        mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
        lowered = pipeline(tvm.tirx.transform.BindTarget(tvm.target.Target(target).with_host(target))(mod))
        body = lowered[name].body
        assert "pragma_parallel_launch_point" in lowered[name].script()
        assert not _stores_outside_parallel_loops(body), name


def _merged_calls(monkeypatch, model, **options):
    """[(merged call, {Relax var: bound value})] of the decode step after launch fusion."""
    import tvm
    from tvm import relax

    from kiln.backends.tvm import build

    found = []
    count = build.count_launches

    def grab(launches):
        @tvm.transform.module_pass(opt_level=0, name="grab")
        def _grab(mod, _ctx):
            for gvar, func in mod.functions_items():
                if gvar.name_hint != "step_decode" or not isinstance(func, relax.Function):
                    continue
                bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
                found.extend((b.value, bound) for block in func.body.blocks for b in block.bindings
                             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)
                             and b.value.op.name_hint.startswith("kiln_launch"))
            return count(launches)(mod)

        return _grab

    monkeypatch.setattr(build, "count_launches", grab)
    artifact = kiln.compile(model, backend="tvm", max_seq_len=64, **options)
    return found, artifact


def _memory_of(var, bound):
    """The tensor ``var`` is a reshape, view or alias of (followed to the end)."""
    import tvm
    from tvm import relax

    while True:
        value = bound.get(var)
        if isinstance(value, relax.Var):
            var = value
        elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in (
                "relax.reshape", "relax.memory.view"):
            var = value.args[0]
        else:
            return var


def test_fused_qwen3_moe_matches_transformers_and_its_launches_take_distinct_memory(monkeypatch):
    """Qwen3-MoE's QK-norm reads a view of the QKV split's output inside the same launch: with that memory
    passed as two parameters, TVM's LLVM codegen marked both ``noalias`` (it ignores ``tirx.noalias: False``
    in a module of several functions) and the norm read the split's output before it was written."""
    from test_moe import moe_model

    model = moe_model("qwen3_moe")
    calls, artifact = _merged_calls(monkeypatch, model)
    assert calls
    for call, bound in calls:
        memory = [_memory_of(arg, bound) for arg in call.args]
        assert all(not a.same_as(b) for i, a in enumerate(memory) for b in memory[:i]), call.op.name_hint
    assert _launches(artifact.path)[0]["step_decode"] <= 2 * 3 + 2
    assert_engine_matches_transformers(kiln.load(artifact.path), "qwen3_moe", model=model)
