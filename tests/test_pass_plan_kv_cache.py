"""plan_kv_cache: plan numbers worked out by hand (f32 / f16, with and without a budget), the golden metadata it
records, the refusal when a budget cannot hold one maximum-length sequence, and check_kv_plan refusing planted
plans: sizes that disagree, self-consistent plans wrong for the module's attentions or the options, too few
pages, and (after insert_kv_cache) two attentions writing one layer's cache region.
"""

import copy
import re

import pytest

from kiln.ir.errors import ConfigError
from kiln.ir.parser import parse_module
from kiln.ir.printer import print_module
from kiln.passes import PassOptions, run_pass
from kiln.passes.plan_kv_cache import LAYOUT, KVPlanError, check_kv_plan

from golden import check_golden

PASS = "plan_kv_cache"


def attention_module(kv_heads=(2, 2), head_dims=(16, 16), function="forward", metadata="", heads=4) -> str:
    """One function with an attention per layer; layer i has kv_heads[i] K/V heads of head_dims[i]."""
    params, body, rets, types = [], [], [], []
    for i, (kv, d) in enumerate(zip(kv_heads, head_dims)):
        params += [f"%q{i}: f32[batch, {heads}, seq, {d}]", f"%k{i}: f32[batch, {kv}, seq, {d}]",
                   f"%v{i}: f32[batch, {kv}, seq, {d}]"]
        body.append(f"    %a{i} = attention(%q{i}, %k{i}, %v{i}) {{num_heads={heads}, num_kv_heads={kv}, "
                    f"scale=0.25}} : f32[batch, {heads}, seq, {d}]")
        rets.append(f"%a{i}")
        types.append(f"f32[batch, {heads}, seq, {d}]")
    return f"""
module {{{metadata and chr(10) + '  metadata ' + metadata}
  func @{function}({", ".join(params)}) -> ({", ".join(types)}) {{
{chr(10).join(body)}
    return {", ".join(rets)}
  }}
}}
"""


def plan_for(options: PassOptions, **shape) -> dict:
    module = parse_module(attention_module(**shape))
    assert run_pass(PASS, module, options) is False  # a plan is metadata; the IR stays as it is
    return module.metadata["kv_cache"]


def test_golden_metadata_with_default_options():
    # 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes = 512 bytes per token; 2048 / 16 = 128 pages per
    # sequence; 4 sequences -> 512 pages = 8192 tokens = 4 MiB
    plan = ('{"kv_cache": {"budget_bytes": null, "bytes_per_token": 512, "dtype": "f32", "head_dim": 16, '
            f'"layout": "{LAYOUT}", "max_num_seqs": 4, "max_seq_len": 2048, "max_tokens": 8192, '
            '"num_kv_heads": 2, "num_layers": 2, "num_pages": 512, "page_size": 16, "pages_per_seq": 128, '
            '"total_bytes": 4194304}}')
    check_golden(PASS, attention_module(), attention_module(metadata=plan), expect_changed=False)


@pytest.mark.parametrize("options,expected", [
    # f32, 32 tokens in pages of 4 -> 8 pages a sequence, 3 sequences
    (PassOptions(max_seq_len=32, max_num_seqs=3, page_size=4),
     dict(bytes_per_token=512, pages_per_seq=8, num_pages=24, max_tokens=96, total_bytes=96 * 512)),
    # f16 halves the bytes; 30 tokens still need 2 pages of 16 (the last one part-used)
    (PassOptions(max_seq_len=30, max_num_seqs=4, page_size=16, kv_cache_dtype="f16"),
     dict(bytes_per_token=256, pages_per_seq=2, num_pages=8, max_tokens=128, total_bytes=128 * 256)),
    # a budget of 100,000 bytes: pages of 4 tokens x 512 bytes = 2,048 bytes -> 48 whole pages (98,304 bytes)
    (PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=100_000),
     dict(bytes_per_token=512, pages_per_seq=8, num_pages=48, max_tokens=192, total_bytes=98_304)),
    # the same budget in f16: pages of 1,024 bytes -> 97 pages
    (PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=100_000, kv_cache_dtype="f16"),
     dict(bytes_per_token=256, pages_per_seq=8, num_pages=97, max_tokens=388, total_bytes=99_328)),
])
def test_plan_numbers_by_hand(options, expected):
    plan = plan_for(options)
    assert {key: plan[key] for key in expected} == expected
    assert (plan["num_layers"], plan["num_kv_heads"], plan["head_dim"]) == (2, 2, 16)
    assert plan["dtype"] == options.kv_cache_dtype and plan["budget_bytes"] == options.memory_budget_bytes


def test_smollm2_shape_bytes_per_token():
    # 30 layers x 2 x 3 KV heads x 64 dims: 46,080 bytes a token in f32
    plan = plan_for(PassOptions(max_seq_len=64, max_num_seqs=1), kv_heads=(3,) * 30, head_dims=(64,) * 30,
                    heads=9)
    assert plan["bytes_per_token"] == 30 * 2 * 3 * 64 * 4 == 46_080
    assert plan["num_pages"] == 4 and plan["total_bytes"] == 64 * 46_080


def test_a_module_without_forward_is_planned_from_prefill():
    text = attention_module(function="prefill")
    module = parse_module(text)
    assert run_pass(PASS, module, PassOptions(max_seq_len=16, max_num_seqs=1, page_size=8)) is False
    assert module.metadata["kv_cache"]["num_pages"] == 2


def test_budget_that_cannot_hold_one_sequence_is_refused_with_the_numbers():
    # 10,000 bytes hold 4 pages of 2,048 bytes; one 32-token sequence needs 8 pages = 16,384 bytes
    options = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=10_000)
    with pytest.raises(ConfigError) as err:
        plan_for(options)
    message = str(err.value)
    assert message.startswith("KV cache budget of 10,000 bytes holds 4 pages of 4 tokens (512 bytes per token), "
                              "but one sequence of 32 tokens needs 8 pages (16,384 bytes); raise the budget or "
                              "lower --max-seq-len")
    assert "\n" not in message


def test_exactly_one_sequence_fits():
    options = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=16_384)
    plan = plan_for(options)
    assert plan["num_pages"] == plan["pages_per_seq"] == 8 and plan["total_bytes"] == 16_384


@pytest.mark.parametrize("shape,expected", [
    (dict(kv_heads=(2, 1)), "layers differ in KV heads/head size [(1, 16), (2, 16)]"),
    (dict(kv_heads=(2, 2), head_dims=(16, 8)), "layers differ in KV heads/head size [(2, 8), (2, 16)]"),
])
def test_layers_of_different_shapes_are_refused(shape, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        plan_for(PassOptions(), **shape)


def test_no_fused_attention_is_refused_with_the_reasons():
    text = """
module {
  metadata {"unfused_attention": ["%o = sdpa(%q, %k, %v) : f32[1, 2, 3, 4]: the mask depends on the input tokens"]}
  func @forward(%x: f32[2, 3]) -> (f32[2, 3]) {
    %y = exp(%x) : f32[2, 3]
    return %y
  }
}
"""
    with pytest.raises(ConfigError, match="no fused attention.*the mask depends on the input tokens"):
        run_pass(PASS, parse_module(text))


@pytest.mark.parametrize("options", [PassOptions(page_size=0), PassOptions(max_seq_len=0),
                                     PassOptions(max_num_seqs=0)])
def test_non_positive_sizes_are_refused(options):
    with pytest.raises(ConfigError, match="must all be positive"):
        plan_for(options)


# the independent checker ----------------------------------------------------------------------------------
GOOD_OPTIONS = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=100_000)


def planned(options: PassOptions = GOOD_OPTIONS):
    """(module, plan) after plan_kv_cache on the two-layer module (2 KV heads of 16)."""
    module = parse_module(attention_module())
    run_pass(PASS, module, options)
    return module, module.metadata["kv_cache"]


def consistent(plan: dict, **changes) -> dict:
    """``plan`` with ``changes`` and every derived size recomputed from them, so that the plan agrees with
    itself and only a check against the module or the options can find it wrong."""
    plan = {**copy.deepcopy(plan), **changes}
    elem = {"f32": 4, "f16": 2}[plan["dtype"]]
    plan["bytes_per_token"] = plan["num_layers"] * 2 * plan["num_kv_heads"] * plan["head_dim"] * elem
    if plan["budget_bytes"] is not None and "num_pages" not in changes:
        plan["num_pages"] = plan["budget_bytes"] // (plan["page_size"] * plan["bytes_per_token"])
    plan["max_tokens"] = plan["num_pages"] * plan["page_size"]
    plan["total_bytes"] = plan["max_tokens"] * plan["bytes_per_token"]
    return plan


@pytest.mark.parametrize("changes,failed", [
    # self-consistent plans for a cache of the wrong shape: the module's attentions say otherwise
    (dict(head_dim=8), "head_dim: expected 16 (K head size of attention"),
    (dict(num_kv_heads=1), "num_kv_heads: expected 2 (K heads of attention"),
    (dict(num_layers=1), "num_layers: expected 2 (one per attention in @forward), found 1"),
    # not what the options asked for
    (dict(dtype="f16"), "dtype: expected f32 (as asked), found f16"),
    (dict(page_size=8, pages_per_seq=4), "page_size: expected 4 (as asked), found 8"),
    # too few pages: fewer than one sequence needs, and fewer than the budget holds
    (dict(budget_bytes=None, num_pages=4), "num_pages: expected 8 (max_num_seqs x pages_per_seq), found 4"),
    (dict(num_pages=40), "num_pages: expected 48 (whole pages of 2048 bytes in the budget), found 40"),
])
def test_checker_refuses_a_plan_wrong_for_its_module_or_options(changes, failed):
    module, plan = planned()
    options = GOOD_OPTIONS
    if "budget_bytes" in changes:
        options = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4)
    with pytest.raises(KVPlanError, match=re.escape(failed)):
        check_kv_plan(consistent(plan, **changes), module, options)


@pytest.mark.parametrize("changes,failed", [
    (dict(bytes_per_token=511), "bytes_per_token: expected 512"),
    (dict(bytes_per_token=1024), "bytes_per_token: expected 512"),
    (dict(max_tokens=191), "max_tokens: expected 192"),
    (dict(total_bytes=98_304 + 2048), "total_bytes: expected 98304"),
    (dict(pages_per_seq=7), "pages_per_seq: expected 8 (ceil(max_seq_len / page_size)), found 7"),
    (dict(pages_per_seq=9), "pages_per_seq: expected 8 (ceil(max_seq_len / page_size)), found 9"),
    (dict(budget_bytes=98_303), "budget_bytes: expected 100000 (as asked), found 98303"),
    (dict(layout="[num_layers, num_pages, 2, num_kv_heads, page_size, head_dim]"), "layout: expected"),
])
def test_checker_refuses_a_plan_whose_sizes_disagree(changes, failed):
    module, plan = planned()
    with pytest.raises(KVPlanError, match=re.escape(failed)):
        check_kv_plan({**plan, **changes}, module, GOOD_OPTIONS)


def test_checker_refuses_fewer_pages_than_one_sequence_needs():
    # a budget that holds 4 pages while a sequence needs 8: the planner refuses it, and so must the checker
    module, plan = planned()
    bad = consistent(plan, budget_bytes=4 * 2048, num_pages=4)
    with pytest.raises(KVPlanError, match="4 pages cannot hold one sequence of 32 tokens"):
        check_kv_plan(bad, module)


def inserted(plan_options: PassOptions = GOOD_OPTIONS):
    """The two-layer module after plan_kv_cache and insert_kv_cache: prefill and decode over the cache."""
    module, plan = planned(plan_options)
    assert run_pass("insert_kv_cache", module, plan_options) is True
    return module, plan


def test_checker_refuses_two_attentions_writing_one_layer():
    module, plan = inserted()
    check_kv_plan(plan, module)
    text = print_module(module)
    assert text.count("layer=1") == 2  # prefill and decode each have layers 0 and 1
    overlapping = parse_module(text.replace("layer=1", "layer=0"))
    # layer 0's K region: 48 pages x 2 heads x 4 tokens x 16 dims x 4 bytes = 24,576 bytes from the start
    with pytest.raises(KVPlanError, match=r"paged_attention %\S+ in @prefill and paged_attention %\S+ in @prefill "
                                          r"write overlapping cache bytes \[0, 24576\) and \[0, 24576\)"):
        check_kv_plan(plan, overlapping)


def test_checker_refuses_a_cache_of_another_dtype_or_shape():
    module, plan = inserted()
    with pytest.raises(KVPlanError, match=re.escape("dtype: expected f32 (the cache paged_attention")):
        check_kv_plan(consistent(plan, dtype="f16"), module)
    with pytest.raises(KVPlanError, match=re.escape("cache shape: expected (2, 2, 40, 2, 4, 16)")):
        check_kv_plan(consistent(plan, budget_bytes=None, max_num_seqs=5, num_pages=40), module)


def test_checker_accepts_the_planners_plans():
    module, plan = planned()
    check_kv_plan(plan, module, GOOD_OPTIONS)
    for dtype in ("f32", "f16"):
        for budget in (None, 50_000, 1 << 20):
            options = PassOptions(max_seq_len=40, max_num_seqs=2, page_size=8, kv_cache_dtype=dtype,
                                  memory_budget_bytes=budget)
            module, plan = inserted(options)
            check_kv_plan(plan, module, options)


def test_checker_accepts_a_whole_pipeline():
    from kiln.passes import PassManager
    from kiln.passes.pipeline import PIPELINE

    from golden import copy_module
    from tiny_models import captured

    module = copy_module(captured("llama"))
    options = PassOptions(max_seq_len=32, max_num_seqs=2, page_size=4, activation_seq_len=16)
    PassManager(PIPELINE).run(module, options)
    assert {"prefill", "decode", "prefill_last"} <= set(module.functions)
    check_kv_plan(module.metadata["kv_cache"], module, options)
