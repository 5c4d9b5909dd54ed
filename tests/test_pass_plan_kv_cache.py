"""plan_kv_cache: plan numbers worked out by hand (f32 / f16, with and without a budget), the golden metadata it
records, the refusal when a budget cannot hold one maximum-length sequence, and check_kv_plan catching planted
corruptions.
"""

import copy
import re

import pytest

from kiln.ir.errors import ConfigError
from kiln.ir.parser import parse_module
from kiln.passes import PassOptions, run_pass
from kiln.passes.plan_kv_cache import LAYOUT, check_kv_plan

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
def good_plan() -> dict:
    return plan_for(PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=100_000))


def corrupt(**changes) -> dict:
    plan = copy.deepcopy(good_plan())
    plan.update(changes)
    return plan


@pytest.mark.parametrize("plan,failed", [
    (corrupt(bytes_per_token=511), "bytes per token"),
    (corrupt(head_dim=8), "bytes per token"),
    (corrupt(dtype="f16"), "bytes per token"),
    (corrupt(max_tokens=191), "capacity"),
    (corrupt(num_pages=49), "capacity"),
    (corrupt(total_bytes=98_304 + 2048), "total bytes"),
    (corrupt(pages_per_seq=7), "pages per sequence"),
    (corrupt(max_seq_len=33), "pages per sequence"),
    # consistent sizes, but fewer pages than one sequence needs
    (corrupt(num_pages=4, max_tokens=16, total_bytes=16 * 512), "one maximum-length sequence must fit"),
    (corrupt(budget_bytes=98_303), "over budget"),
])
def test_checker_catches_planted_corruptions(plan, failed):
    with pytest.raises(AssertionError, match=failed):
        check_kv_plan(plan)


def test_checker_accepts_the_plans_above():
    check_kv_plan(good_plan())
    for dtype in ("f32", "f16"):
        for budget in (None, 50_000, 1 << 20):
            check_kv_plan(plan_for(PassOptions(max_seq_len=40, max_num_seqs=2, page_size=8, kv_cache_dtype=dtype,
                                               memory_budget_bytes=budget)))
