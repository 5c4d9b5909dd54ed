"""Tests for the activation-memory planner and its checker.

Hand-built functions whose best arena is worked out by hand, planted corruptions the checker
must name, random DAGs against brute-force lifetimes and exact optima, and a captured tiny Llama.
"""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest

from kiln.ir.graph import Module
from kiln.ir.printer import print_function
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType
from kiln.passes import PassOptions, run_pass
from kiln.passes.plan_activation_memory import (ALIGNMENT, ActivationPlanError, Buffer, check_activation_plan,
                                                pack_buffers, plan_activation_memory)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _chain(length: int = 4, width: int = 64):
    """x -> neg -> neg -> ... ; each value feeds only the next."""
    module = Module()
    fn = module.add_function("forward")
    value = fn.add_param("x", TensorType("f32", (width,)))
    names = []
    for i in range(length):
        value = fn.emit("neg", value, value_name=f"v{i}")
        names.append(value.name)
    fn.set_results([value])
    return module, fn, names


def _assert_no_overlap_by_hand(plan, pairs):
    for a, b in pairs:
        ba, bb = plan.buffers[a], plan.buffers[b]
        assert ba.offset + ba.size <= bb.offset or bb.offset + bb.size <= ba.offset, (a, b)


# hand-built functions ------------------------------------------------------------------------


def test_chain_ping_pongs_between_two_buffers():
    _, fn, names = _chain(length=5, width=64)  # 256 bytes each
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    assert [tuple(plan.buffers[n])[2:] for n in names] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert all(plan.buffers[n].size == 256 for n in names)
    assert plan.peak_bytes == 2 * 256  # only neighbours are ever live together
    assert plan.naive_bytes == 5 * 256
    assert plan.lower_bound_bytes == 512
    assert len({plan.buffers[n].offset for n in names}) == 2


def test_results_stay_live_to_the_end():
    module = Module()
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (64,)))
    early = fn.emit("neg", x, value_name="early")  # a result made first and never read again
    a = fn.emit("exp", x, value_name="a")
    b = fn.emit("neg", a, value_name="b")
    c = fn.emit("neg", b, value_name="c")
    fn.set_results([early, c])
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    assert plan.buffers["early"].last == len(fn.nodes) == 4
    # At node 2: early, a, b. Without the result rule it would die at node 0 and the peak be 512.
    assert plan.peak_bytes == 3 * 256
    _assert_no_overlap_by_hand(plan, [("early", "a"), ("early", "b"), ("early", "c")])


def test_diamond_with_unaligned_sizes():
    # 25 floats = 100 bytes, padded to 128 in the arena; 50 floats = 200 -> 256.
    module = Module()
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (50,)))
    a = fn.emit("neg", x, value_name="a")                                   # 0: 200 B, read at 1, 2
    b = fn.emit("slice", a, axis=0, start=0, end=25, value_name="b")        # 1: 100 B, read at 3
    c = fn.emit("slice", a, axis=0, start=25, end=50, value_name="c")       # 2: 100 B, read at 3
    d = fn.emit("add", b, c, value_name="d")                                # 3: 100 B, read at 4
    e = fn.emit("concat", d, d, axis=0, value_name="e")                     # 4: 200 B, result
    fn.set_results([e])
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    assert {n: plan.buffers[n].size for n in "abcde"} == {"a": 200, "b": 100, "c": 100, "d": 100, "e": 200}
    assert plan.naive_bytes == 256 + 4 * 128 + 256 - 128  # a, e padded to 256; b, c, d to 128
    # Live sets: {a}, {a,b}, {a,b,c}, {b,c,d}, {d,e}: the worst is node 2 with 256 + 128 + 128.
    assert plan.peak_bytes == 512
    assert all(plan.buffers[n].offset % 64 == 0 for n in "abcde")


def test_big_dead_buffer_is_reused_by_two_small_ones():
    module = Module()
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (16,)))
    big = fn.emit("expand", x, shape=(32, 16), value_name="big")            # 0: 2048 B, read at 1
    small = fn.emit("sum", big, axes=(0,), value_name="small")              # 1: 64 B
    p = fn.emit("concat", small, small, small, small, axis=0, value_name="p")  # 2: 256 B
    q = fn.emit("concat", p, p, axis=0, value_name="q")                     # 3: 512 B
    r = fn.emit("concat", q, q, axis=0, value_name="r")                     # 4: 1024 B
    fn.set_results([r])
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    # {big, small} = 2112 B is the worst moment; afterwards q + r = 1536 fit in big's dead bytes.
    assert plan.peak_bytes == 2048 + 64
    assert plan.naive_bytes == 2048 + 64 + 256 + 512 + 1024


def test_symbolic_sizes_follow_env():
    module = Module()
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (sym("batch"), sym("seq"), 8)))
    a = fn.emit("neg", x, value_name="a")
    b = fn.emit("exp", a, value_name="b")
    c = fn.emit("add", a, b, value_name="c")
    fn.set_results([c])
    for batch, seq in [(1, 1), (2, 3), (4, 128)]:
        env = {"batch": batch, "seq": seq}
        plan = plan_activation_memory(fn, env)
        check_activation_plan(fn, plan, env)
        size = batch * seq * 8 * 4
        assert plan.buffers["a"].size == size
        assert plan.peak_bytes == 3 * _align(size)  # a, b and c are all live at node 2
        assert plan.env == env


def test_missing_symbol_is_a_config_error():
    from kiln.ir.errors import ConfigError

    module = Module()
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (sym("seq"), 8)))
    fn.set_results([fn.emit("neg", x)])
    with pytest.raises(ConfigError, match="seq"):
        plan_activation_memory(fn, {"batch": 1})


def test_weights_constants_and_params_take_no_arena_bytes():
    module = Module()
    module.add_weight("w", np.ones(16, dtype=np.float32))
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (16,)))
    w = fn.emit("weight", name="w", value_name="w")
    two = fn.emit("constant", value=2.0, dtype="f32", value_name="two")
    scaled = fn.emit("mul", x, two, value_name="scaled")
    out = fn.emit("add", scaled, w, value_name="out")
    fn.set_results([out])
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    assert set(plan.buffers) == {"scaled", "out"}
    assert plan.peak_bytes == 128


def test_two_output_node_and_unused_output():
    module = Module()
    module.add_weight("w", np.ones(16, dtype=np.float32))
    fn = module.add_function("forward")
    x = fn.add_param("x", TensorType("f32", (4, 16)))
    w = fn.emit("weight", name="w")
    y = fn.emit("neg", x, value_name="y")                                           # 1
    node = fn.add_node("add_rms_norm", [y, x, w], {"eps": 1e-5}, name="arn")        # 2: (sum, normed)
    total, normed = node.outputs
    out = fn.emit("exp", normed, value_name="out")                                  # 3
    fn.set_results([out])
    plan = plan_activation_memory(fn, {})
    check_activation_plan(fn, plan, {})
    assert (plan.buffers[total.name].first, plan.buffers[total.name].last) == (2, 2)  # never read: one node
    assert (plan.buffers[normed.name].first, plan.buffers[normed.name].last) == (2, 3)
    # At node 2: y (read there), total and normed, 256 B each.
    assert plan.peak_bytes == 3 * 256


def _two_layer_step(tokens=4, heads=2, kv_heads=1, head_dim=8, v_head_dim=4, pages=64, page_size=16):
    """A step's attention core: two paged_attention layers over one K and one V pool, each updated in place."""
    module = Module()
    fn = module.add_function("step")
    q = fn.add_param("q", TensorType("f32", (1, heads, tokens, head_dim)))
    k = fn.add_param("k", TensorType("f32", (1, kv_heads, tokens, head_dim)))
    v = fn.add_param("v", TensorType("f32", (1, kv_heads, tokens, v_head_dim)))
    k_pool = fn.add_param("k_cache_0", TensorType("f32", (2, pages, kv_heads, page_size, head_dim)))
    v_pool = fn.add_param("v_cache_0", TensorType("f32", (2, pages, kv_heads, page_size, v_head_dim)))
    table = fn.add_param("page_table", TensorType("i32", (sym("seqs"), 4)))
    positions = fn.add_param("positions", TensorType("i64", (1, tokens)))
    token_seq = fn.add_param("token_seq", TensorType("i32", (tokens,)))
    outs, pool_values = [], []
    for layer in range(2):
        node = fn.add_node("paged_attention", [q, k, v, k_pool, v_pool, table, positions, token_seq],
                           {"num_heads": heads, "num_kv_heads": kv_heads, "scale": 0.35, "layer": layer,
                            "index": layer}, name=f"attn{layer}")
        outs.append(node.outputs[0])
        k_pool, v_pool = node.outputs[1], node.outputs[2]  # the same pool bytes, updated in place
        pool_values += [k_pool, v_pool]
    total = fn.emit("add", outs[0], outs[1], value_name="total")
    fn.set_results([total, k_pool, v_pool])
    return fn, outs, pool_values


def test_in_place_kv_cache_updates_take_no_arena_bytes():
    fn, outs, pool_values = _two_layer_step()
    env = {"seqs": 3}
    plan = plan_activation_memory(fn, env)
    check_activation_plan(fn, plan, env)
    # outputs [1, 2, 4, 4] f32 = 128 B each; the K pool (64 KiB) and V pool (32 KiB), read and returned by both
    # layers and by the function, are the caller's storage: neither has a buffer or a byte in the arena
    assert set(plan.buffers) == {outs[0].name, outs[1].name, "total"}
    assert not {v.name for v in pool_values} & set(plan.buffers)
    assert plan.peak_bytes == plan.naive_bytes == plan.lower_bound_bytes == 3 * 128
    assert (plan.buffers[outs[0].name].first, plan.buffers[outs[0].name].last) == (0, 2)
    assert plan.buffers["total"].last == len(fn.nodes)


def test_checker_refuses_a_buffer_for_an_in_place_pool():
    """A planner that gave an updated pool bytes of its own would be planning the cache into the arena."""
    fn, _, pool_values = _two_layer_step()
    env = {"seqs": 1}
    plan = plan_activation_memory(fn, env)
    for value in pool_values[:2]:  # layer 0's updated K and V pools
        planted = plan_activation_memory(fn, env)
        size = int(np.prod(value.type.shape)) * 4
        planted.buffers[value.name] = Buffer(planted.peak_bytes, size, 0, len(fn.nodes))
        planted.peak_bytes += _align(size)
        with pytest.raises(ActivationPlanError, match=value.name):
            check_activation_plan(fn, planted, env)
    check_activation_plan(fn, plan, env)


# the checker ---------------------------------------------------------------------------------


def _corrupt(plan, name, **changes):
    plan.buffers[name] = plan.buffers[name]._replace(**changes)
    return plan


def test_checker_names_both_values_of_a_planted_overlap():
    _, fn, names = _chain(length=4)
    plan = plan_activation_memory(fn, {})
    # v1 and v2 are live together at node 2; put v2 on top of v1.
    _corrupt(plan, "v2", offset=plan.buffers["v1"].offset)
    with pytest.raises(ActivationPlanError, match=r"%v[12]\b.*overlaps %v[12]\b"):
        check_activation_plan(fn, plan, {})


def test_checker_catches_partial_overlap():
    _, fn, _ = _chain(length=3)
    plan = plan_activation_memory(fn, {})
    low, high = sorted([plan.buffers["v0"].offset, plan.buffers["v1"].offset])
    plan.peak_bytes += 1024
    _corrupt(plan, "v0", offset=64)
    _corrupt(plan, "v1", offset=256)  # [64, 320) against [256, 512): 64 bytes shared
    with pytest.raises(ActivationPlanError, match="overlaps"):
        check_activation_plan(fn, plan, {})


def test_checker_uses_its_own_lifetimes():
    # A planner that believed v1 died at node 1 could put v2 on it; the checker knows v1 is read at node 2.
    _, fn, _ = _chain(length=4)
    plan = plan_activation_memory(fn, {})
    _corrupt(plan, "v1", last=1)
    with pytest.raises(ActivationPlanError, match="v1"):
        check_activation_plan(fn, plan, {})


@pytest.mark.parametrize("change, message", [
    (dict(size=255), "needs 256 bytes"),
    (dict(offset=32), "multiple of 64"),
    (dict(offset=-64), "multiple of 64"),
    (dict(offset=4096), "past the arena"),
])
def test_checker_catches_bad_buffers(change, message):
    _, fn, _ = _chain(length=3)
    plan = plan_activation_memory(fn, {})
    _corrupt(plan, "v1", **change)
    with pytest.raises(ActivationPlanError, match=message):
        check_activation_plan(fn, plan, {})


def test_checker_catches_missing_and_stale_buffers():
    _, fn, _ = _chain(length=3)
    plan = plan_activation_memory(fn, {})
    del plan.buffers["v0"]
    with pytest.raises(ActivationPlanError, match="v0 .*has no buffer"):
        check_activation_plan(fn, plan, {})
    plan = plan_activation_memory(fn, {})
    plan.buffers["ghost"] = Buffer(0, 64, 0, 0)
    with pytest.raises(ActivationPlanError, match="ghost"):
        check_activation_plan(fn, plan, {})


def test_checker_accepts_a_no_reuse_plan():
    _, fn, names = _chain(length=4)
    plan = plan_activation_memory(fn, {})
    for i, name in enumerate(names):
        _corrupt(plan, name, offset=i * 256)
    plan.peak_bytes = plan.naive_bytes
    check_activation_plan(fn, plan, {})


# random DAGs ---------------------------------------------------------------------------------


def _random_function(rng: random.Random, num_nodes: int, reach: float = 0.3):
    """A random DAG over [seq, n] f32 values: unary, binary, slice, concat, two-output and weight nodes."""
    module = Module()
    fn = module.add_function("forward")
    seq = sym("seq")
    values = [fn.add_param(f"x{i}", TensorType("f32", (seq, rng.choice([1, 3, 16, 40])))) for i in range(2)]
    for _ in range(num_nodes):
        kind = rng.random()
        a = rng.choice(values if rng.random() < reach else values[-6:])  # mostly recent: short lives
        width = a.type.shape[1]
        if kind < 0.3:
            out = fn.emit(rng.choice(["neg", "exp", "tanh"]), a)
        elif kind < 0.5:
            same = [v for v in values if v.type == a.type]
            out = fn.emit("add", a, rng.choice(same))
        elif kind < 0.65 and width > 1:
            out = fn.emit("slice", a, axis=1, start=0, end=rng.randint(1, width - 1))
        elif kind < 0.8 and width < 200:
            out = fn.emit("concat", a, rng.choice(values), axis=1)
        elif kind < 0.9:
            name = f"w{len(module.weights)}"
            module.add_weight(name, np.ones(width, dtype=np.float32))
            node = fn.add_node("add_rms_norm", [a, a, fn.emit("weight", name=name)], {"eps": 1e-6})
            values.append(node.outputs[0])
            out = node.outputs[1]
        else:
            out = fn.emit("mul", a, fn.emit("constant", value=0.5, dtype="f32"))
        values.append(out)
    produced = [v for v in values if v.producer is not None]
    results = {id(v): v for v in rng.sample(produced, k=min(len(produced), rng.randint(1, 3)))}
    results[id(produced[-1])] = produced[-1]
    fn.set_results(results.values())
    return module, fn


_ITEM_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "u32": 4,
               "bool": 1}


def _brute_force_lifetimes(fn, env):
    """name -> (aligned size, first, last), by asking of every node which values it reads."""
    out = {}
    end = len(fn.nodes)
    for i, node in enumerate(fn.nodes):
        if node.op in ("weight", "constant"):
            continue
        for v in node.outputs:
            readers = [j for j, other in enumerate(fn.nodes) if any(u is v for u in other.inputs)]
            last = end if any(r is v for r in fn.results) else max(readers, default=i)
            # Symbolic dims print as Python arithmetic ("2*seq + 1"), so eval is an independent evaluator.
            dims = [d if isinstance(d, int) else eval(str(d), {}, dict(env)) for d in v.type.shape]
            size = int(np.prod(dims, dtype=np.int64)) * _ITEM_BYTES[v.type.dtype]
            out[v.name] = (_align(size), i, last)
    return out


def _exact_optimum(spans):
    """Smallest arena, by trying every order with lowest-fit placement (an optimal order always exists)."""
    items = list(spans.values())
    best = None
    for order in itertools.permutations(range(len(items))):
        placed = []
        for k in order:
            size, first, last = items[k]
            clash = sorted((o, o + s) for o, s, f, l in placed if f <= last and first <= l)
            offset = 0
            for low, high in clash:
                if offset + size <= low:
                    break
                offset = max(offset, high)
            placed.append((offset, size, first, last))
        top = max(o + s for o, s, _, _ in placed)
        best = top if best is None else min(best, top)
    return best


def test_random_dags_are_checked_and_never_worse_than_no_reuse():
    rng = random.Random(1234)
    for trial in range(150):
        module, fn = _random_function(rng, rng.randint(1, 40))
        env = {"seq": rng.choice([1, 2, 7, 33])}
        plan = plan_activation_memory(fn, env)
        check_activation_plan(fn, plan, env)
        spans = _brute_force_lifetimes(fn, env)
        assert {n: (_align(b.size), b.first, b.last) for n, b in plan.buffers.items()} == spans, trial
        assert plan.naive_bytes == sum(s for s, _, _ in spans.values())
        live_max = max((sum(s for s, f, l in spans.values() if f <= t <= l) for t in range(len(fn.nodes) + 1)),
                       default=0)
        assert plan.lower_bound_bytes == live_max
        assert live_max <= plan.peak_bytes <= plan.naive_bytes, trial


def test_packing_random_intervals_against_exact_optimum():
    rng = random.Random(3)
    optimal = 0
    trials = 100
    for _ in range(trials):
        horizon = rng.randint(2, 8)
        lifetimes = {}
        for i in range(rng.randint(3, 6)):
            first = rng.randint(0, horizon)
            lifetimes[f"b{i}"] = (rng.choice([64, 128, 192, 256, 320, 640]), first, rng.randint(first, horizon))
        buffers, peak = pack_buffers(lifetimes)
        for (a, ba), (b, bb) in itertools.combinations(buffers.items(), 2):
            if ba.first <= bb.last and bb.first <= ba.last:
                assert ba.offset + ba.size <= bb.offset or bb.offset + bb.size <= ba.offset, (a, b, lifetimes)
        best = _exact_optimum(lifetimes)
        assert best <= peak <= 1.25 * best, lifetimes
        optimal += peak == best
    # Greedy packing is a heuristic; on instances this small it should almost always find the optimum.
    assert optimal >= 0.95 * trials, optimal


def test_three_thousand_nodes_plan_fast():
    # Lifetimes here are longer than in a real model (SmolLM2's 2031-node forward plans in ~50 ms),
    # so every placement order runs; ~0.3 s on an idle core, the bound leaves room for a busy machine.
    rng = random.Random(7)
    module, fn = _random_function(rng, 3000, reach=0.02)
    env = {"seq": 2048}
    start = time.perf_counter()
    plan = plan_activation_memory(fn, env)
    elapsed = time.perf_counter() - start
    check_activation_plan(fn, plan, env)
    assert elapsed < 2.0, f"planning {len(fn.nodes)} nodes took {elapsed:.2f} s"


# the pass ------------------------------------------------------------------------------------


def _entry_module():
    """@step and @step_decode over their planning symbols (tokens / rows / seqs, decode_tokens / seqs), and a
    function with a symbol nothing sizes."""
    module = Module()
    shapes = {"step": [(sym("tokens"), 8), (sym("rows"), 8), (sym("seqs"), 2)],
              "step_decode": [(sym("decode_tokens"), 8), (sym("seqs"), 2)],
              "other": [(sym("tokens"), 8), (sym("num_pages"),)]}
    for name, params in shapes.items():
        fn = module.add_function(name)
        values = [fn.add_param(f"x{i}", TensorType("f32", shape)) for i, shape in enumerate(params)]
        first = fn.emit("neg", values[0])
        fn.set_results([fn.emit("exp", first)] + [fn.emit("neg", v) for v in values[1:]])
    return module


def test_pass_records_a_checked_plan_per_function_and_leaves_ir_alone():
    module = _entry_module()
    before = [print_function(fn) for fn in module.functions.values()]
    options = PassOptions(max_seq_len=512, max_num_seqs=3, activation_seq_len=100)
    assert run_pass("plan_activation_memory", module, options) is False
    assert [print_function(fn) for fn in module.functions.values()] == before
    records = module.metadata["activations"]
    # @step: one prompt of activation_seq_len tokens, the logits of its last; @step_decode: one token for each
    # of max_num_seqs sequences
    assert records["step"]["env"] == {"rows": 1, "seqs": 1, "tokens": 100}
    assert records["step_decode"]["env"] == {"decode_tokens": 3, "seqs": 3}
    assert records["other"]["env"] == {"num_pages": 1, "tokens": 100}
    assert records["other"]["defaulted_symbols"] == ["num_pages"]
    assert "defaulted_symbols" not in records["step"] and "defaulted_symbols" not in records["step_decode"]
    # neg(x0) and exp of it are live together at node 1; the other inputs' negs come after neg(x0) died
    assert records["step"]["peak_bytes"] == 2 * 100 * 8 * 4
    assert records["step"]["naive_bytes"] == 2 * 100 * 8 * 4 + _align(1 * 8 * 4) + _align(1 * 2 * 4)
    assert records["step"]["num_buffers"] == 4
    assert records["step_decode"]["peak_bytes"] == 2 * _align(3 * 8 * 4)
    assert records["step_decode"]["naive_bytes"] == 2 * _align(3 * 8 * 4) + _align(3 * 2 * 4)
    assert records["step_decode"]["num_buffers"] == 3
    assert records["other"]["naive_bytes"] == 2 * 100 * 8 * 4 + _align(1 * 4)
    import json

    assert json.loads(json.dumps(records)) == records


def test_pass_falls_back_to_max_seq_len():
    module = _entry_module()
    run_pass("plan_activation_memory", module, PassOptions(max_seq_len=64, max_num_seqs=5))
    assert module.metadata["activations"]["step"]["env"] == {"rows": 1, "seqs": 1, "tokens": 64}
    assert module.metadata["activations"]["step_decode"]["env"] == {"decode_tokens": 5, "seqs": 5}


def test_compiled_steps_plan_no_pool_bytes():
    """The pipeline's @step and @step_decode of a captured tiny Llama: the recorded plans are at the planning
    sizes, and their buffers are exactly the brute-force activations less the updated pools (paged_attention's
    outputs 1 and 2, the caller's K and V pools): no pool is ever in the arena."""
    from golden import copy_module
    from tiny_models import captured

    from kiln.ir.kv_cache import KVCacheSpec
    from kiln.passes import PassManager
    from kiln.passes.pipeline import PIPELINE

    module = copy_module(captured("llama"))
    options = PassOptions(max_seq_len=64, max_num_seqs=3, activation_seq_len=40)
    PassManager(PIPELINE).run(module, options)
    spec = KVCacheSpec.from_json(module.metadata["kv_cache"])
    pool_bytes = {pool.nbytes for pool in spec.pools()}
    records = module.metadata["activations"]
    assert set(records) == {"step", "step_decode"}
    envs = {"step": {"tokens": 40, "seqs": 1, "rows": 1}, "step_decode": {}}  # step_decode: static sizes
    for name, env in envs.items():
        fn = module.functions[name]
        assert records[name]["env"] == env and "defaulted_symbols" not in records[name]
        plan = plan_activation_memory(fn, env)
        check_activation_plan(fn, plan, env)
        assert plan.to_dict() == records[name]
        attentions = [n for n in fn.nodes if n.op == "paged_attention"]
        assert len(attentions) == spec.num_layers
        in_place = {v.name for n in attentions for v in n.outputs[1:]}
        spans = {n: span for n, span in _brute_force_lifetimes(fn, env).items() if n not in in_place}
        assert {n: (_align(b.size), b.first, b.last) for n, b in plan.buffers.items()} == spans, name
        assert plan.naive_bytes == sum(size for size, _, _ in spans.values())
        assert not any(b.size in pool_bytes for b in plan.buffers.values()), name


# a captured model ----------------------------------------------------------------------------


def test_captured_tiny_llama_reuses_memory():
    from tiny_models import captured

    module = captured("llama")
    fn = module.functions["forward"]
    env = {"batch": 1, "seq": 128}
    plan = plan_activation_memory(fn, env)
    check_activation_plan(fn, plan, env)
    spans = _brute_force_lifetimes(fn, env)
    assert plan.naive_bytes == sum(s for s, _, _ in spans.values())
    live_max = max(sum(s for s, f, l in spans.values() if f <= t <= l) for t in range(len(fn.nodes) + 1))
    assert live_max <= plan.peak_bytes < plan.naive_bytes / 4
    # The logits [1, 128, 128] f32 are a result, so the arena holds at least them.
    assert plan.peak_bytes >= 128 * 128 * 4
