"""plan_kv_cache and the KV-cache spec: numbers worked out by hand (f32 / f16, with and without a budget), the
golden metadata it records, layer groups for layers of different shapes or windows, the refusal when a budget
cannot hold one maximum-length sequence, the spec's JSON round trip and its refusals, and check_kv_cache_spec
refusing planted specs: wrong for the module's attentions, pools that do not match the step's parameters, two
attentions writing one layer's pool slice.
"""

import dataclasses
import json
import re

import pytest

from kiln.ir.errors import ConfigError
from kiln.ir.kv_cache import CacheGroup, KVCacheSpec, KVCacheSpecError, check_kv_cache_spec
from kiln.ir.parser import parse_module
from kiln.ir.printer import print_module
from kiln.passes import PassOptions, run_pass
from kiln.passes.plan_kv_cache import check_spec_options

from golden import check_golden

PASS = "plan_kv_cache"


def attention_module(kv_heads=(2, 2), head_dims=(16, 16), function="forward", metadata="", heads=4,
                     windows=None) -> str:
    """One function with an attention per layer; layer i has kv_heads[i] K/V heads of head_dims[i]."""
    params, body, rets, types = [], [], [], []
    windows = windows or (None,) * len(kv_heads)
    for i, (kv, d, window) in enumerate(zip(kv_heads, head_dims, windows)):
        params += [f"%q{i}: f32[batch, {heads}, seq, {d}]", f"%k{i}: f32[batch, {kv}, seq, {d}]",
                   f"%v{i}: f32[batch, {kv}, seq, {d}]"]
        extra = f", window={window}" if window else ""
        body.append(f"    %a{i} = attention(%q{i}, %k{i}, %v{i}) {{num_heads={heads}, num_kv_heads={kv}, "
                    f"scale=0.25{extra}}} : f32[batch, {heads}, seq, {d}]")
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


def spec_for(options: PassOptions, **shape) -> KVCacheSpec:
    module = parse_module(attention_module(**shape))
    assert run_pass(PASS, module, options) is False  # a spec is metadata; the IR stays as it is
    return KVCacheSpec.from_json(module.metadata["kv_cache"])


def test_golden_metadata_with_default_options():
    # 2 layers x (K 16 + V 16) x 2 heads x 4 bytes = 512 bytes per token; 2048 / 16 = 128 pages per
    # sequence; 4 sequences' worth -> 512 pages = 8192 tokens = 4 MiB
    spec = {"budget_bytes": None, "bytes_per_token": 512, "dtype": "f32",
            "groups": [{"k_head_dim": 16, "kind": "kv", "layers": [0, 1], "num_kv_heads": 2, "v_head_dim": 16,
                        "window": None}],
            "max_num_seqs": 4, "max_seq_len": 2048, "max_tokens": 8192, "num_pages": 512, "page_size": 16,
            "pages_per_seq": 128, "total_bytes": 4194304}
    check_golden(PASS, attention_module(), attention_module(metadata=json.dumps({"kv_cache": spec}, sort_keys=True)),
                 expect_changed=False)


@pytest.mark.parametrize("options,expected", [
    # f32, 32 tokens in pages of 4 -> 8 pages a sequence, 3 sequences' worth
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
def test_spec_numbers_by_hand(options, expected):
    spec = spec_for(options)
    assert {key: getattr(spec, key) for key in expected} == expected
    assert spec.groups == (CacheGroup("kv", (0, 1), num_kv_heads=2, k_head_dim=16, v_head_dim=16),)
    assert spec.dtype == options.kv_cache_dtype and spec.budget_bytes == options.memory_budget_bytes
    pools = spec.pools()
    assert [(p.name, p.shape) for p in pools] == [("k_cache_0", (2, spec.num_pages, 2, options.page_size, 16)),
                                                   ("v_cache_0", (2, spec.num_pages, 2, options.page_size, 16))]


def test_smollm2_shape_bytes_per_token():
    # 30 layers x 2 x 3 KV heads x 64 dims: 46,080 bytes a token in f32
    spec = spec_for(PassOptions(max_seq_len=64, max_num_seqs=1), kv_heads=(3,) * 30, head_dims=(64,) * 30, heads=9)
    assert spec.bytes_per_token == 30 * 2 * 3 * 64 * 4 == 46_080
    assert spec.num_pages == 4 and spec.total_bytes == 64 * 46_080


def test_layers_of_different_shapes_and_windows_form_groups():
    # layer 0 and 2: 2 heads of 16, global; layer 1: 1 head of 16; layer 3: 2 heads of 16 in a window of 8
    spec = spec_for(PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4), kv_heads=(2, 1, 2, 2),
                    head_dims=(16,) * 4, windows=(None, None, None, 8))
    assert [(g.layers, g.num_kv_heads, g.window) for g in spec.groups] == [((0, 2), 2, None), ((1,), 1, None),
                                                                          ((3,), 2, 8)]
    # (2 x 2 + 1 + 2) layers-heads x (16 + 16) x 4 bytes
    assert spec.bytes_per_token == (2 * 2 + 1 + 2) * 32 * 4
    assert spec.locate(2) == (0, 1) and spec.locate(3) == (2, 0)
    assert [p.name for p in spec.pools()] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1", "k_cache_2",
                                               "v_cache_2"]
    assert "group 2 (kv): layers 3: 2 KV heads x (K 16 + V 16), sliding window 8" in "\n".join(spec.describe())


def test_budget_that_cannot_hold_one_sequence_is_refused_with_the_numbers():
    # 10,000 bytes hold 4 pages of 2,048 bytes; one 32-token sequence needs 8 pages = 16,384 bytes
    options = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=10_000)
    with pytest.raises(ConfigError) as err:
        spec_for(options)
    message = str(err.value)
    assert message.startswith("KV cache budget of 10,000 bytes holds 4 pages of 4 tokens (512 bytes per token), "
                              "but one sequence of 32 tokens needs 8 pages (16,384 bytes); raise the budget or "
                              "lower --max-seq-len")
    assert "\n" not in message


def test_exactly_one_sequence_fits():
    spec = spec_for(PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=16_384))
    assert spec.num_pages == spec.pages_per_seq == 8 and spec.total_bytes == 16_384


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
        spec_for(options)


# the spec as JSON ------------------------------------------------------------------------------------------
def test_json_round_trip():
    spec = spec_for(PassOptions(max_seq_len=32, max_num_seqs=2, page_size=4), kv_heads=(2, 1), head_dims=(16, 16))
    assert KVCacheSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize("change,message", [
    (dict(page_size=0), "kv_cache.page_size: expected an integer >= 1, found 0"),
    (dict(num_pages=True), "kv_cache.num_pages: expected an integer >= 1, found True"),
    (dict(dtype="i8"), "kv_cache.dtype: expected one of f32, f16, bf16, found 'i8'"),
    (dict(groups=[]), "kv_cache.groups: expected a non-empty list"),
    (dict(groups=[{"kind": "mla", "layers": [0]}]), "kv_cache.groups[0].kind: expected one of kv, latent"),
    (dict(groups=[{"kind": "kv", "layers": [0, 0], "num_kv_heads": 1, "k_head_dim": 4, "v_head_dim": 4}]),
     "the groups' layers must be 0..1, each once, found [0, 0]"),
    (dict(bytes_per_token=1), "kv_cache.bytes_per_token: expected 512 (from the spec), found 1"),
    (dict(total_bytes=10), "kv_cache.total_bytes: expected"),
])
def test_json_refusals_name_the_field(change, message):
    data = spec_for(PassOptions(max_seq_len=32, max_num_seqs=2, page_size=4)).to_json()
    with pytest.raises(ValueError, match=re.escape(message)):
        KVCacheSpec.from_json({**data, **change})


def test_a_latent_group_sizes_one_vector_per_token():
    # room for DeepSeek's MLA: 512 latent + 64 rope dims per token per layer
    spec = KVCacheSpec(page_size=16, num_pages=4, dtype="f16", groups=(CacheGroup("latent", (0, 1), latent_dim=576),),
                       max_seq_len=64)
    assert spec.bytes_per_token == 2 * 576 * 2
    assert [(p.name, p.shape) for p in spec.pools()] == [("latent_cache_0", (2, 4, 16, 576))]
    assert KVCacheSpec.from_json(spec.to_json()) == spec


# the independent checker ----------------------------------------------------------------------------------
GOOD_OPTIONS = PassOptions(max_seq_len=32, max_num_seqs=1, page_size=4, memory_budget_bytes=100_000)


def planned(options: PassOptions = GOOD_OPTIONS):
    """(module, spec) after plan_kv_cache on the two-layer module (2 KV heads of 16)."""
    module = parse_module(attention_module())
    run_pass(PASS, module, options)
    return module, KVCacheSpec.from_json(module.metadata["kv_cache"])


def regroup(spec: KVCacheSpec, **changes) -> KVCacheSpec:
    return dataclasses.replace(spec, groups=(dataclasses.replace(spec.groups[0], **changes),))


@pytest.mark.parametrize("changes,failed", [
    (dict(k_head_dim=8, v_head_dim=8), "group: expected ('kv', 2, 8, 8, None) (kind, KV heads, K/V head sizes and "
                                       "window of attention"),
    (dict(num_kv_heads=1), "group: expected ('kv', 1, 16, 16, None)"),
    (dict(window=4), "group: expected ('kv', 2, 16, 16, 4)"),
    (dict(layers=(0,)), "num_layers: expected 2 (one per attention in @forward), found 1"),
])
def test_checker_refuses_a_spec_wrong_for_its_module(changes, failed):
    module, spec = planned()
    with pytest.raises(KVCacheSpecError, match=re.escape(failed)):
        check_kv_cache_spec(regroup(spec, **changes), module)


@pytest.mark.parametrize("changes,failed", [
    (dict(dtype="f16"), "dtype: expected f32 (as asked), found f16"),
    (dict(page_size=8), "page_size: expected 4 (as asked), found 8"),
    (dict(num_pages=40), "num_pages: expected 48 (from the options), found 40"),
    (dict(budget_bytes=98_303), "budget_bytes: expected 100000 (as asked), found 98303"),
])
def test_checker_refuses_a_spec_not_made_as_asked(changes, failed):
    _, spec = planned()
    with pytest.raises(AssertionError, match=re.escape(failed)):
        check_spec_options(dataclasses.replace(spec, **changes), GOOD_OPTIONS)


def test_checker_refuses_fewer_pages_than_one_sequence_needs():
    module, spec = planned()
    with pytest.raises(KVCacheSpecError, match="4 pages cannot hold one sequence of 32 tokens"):
        check_kv_cache_spec(dataclasses.replace(spec, num_pages=4), module)


def inserted(plan_options: PassOptions = GOOD_OPTIONS):
    """The two-layer module (as one token-ids model) after plan_kv_cache and insert_kv_cache."""
    module, spec = planned(plan_options)
    assert run_pass("insert_kv_cache", module, plan_options) is True
    return module, spec


def test_checker_refuses_two_attentions_writing_one_layer():
    module, spec = llama_step()
    check_kv_cache_spec(spec, module)
    text = print_module(module)
    assert text.count("index=1") == 2  # @step and @step_decode each have layers 0 and 1
    overlapping = parse_module(text.replace("index=1", "index=0"))
    with pytest.raises(KVCacheSpecError, match=re.escape("pool index: expected 1")):
        check_kv_cache_spec(spec, overlapping)
    both_zero = parse_module(text.replace("layer=1, ", "layer=0, ").replace("index=1", "index=0"))
    with pytest.raises(KVCacheSpecError, match="layer: expected 1"):
        check_kv_cache_spec(spec, both_zero)


def test_checker_refuses_pools_that_differ_from_the_step_parameters():
    module, spec = llama_step()
    with pytest.raises(KVCacheSpecError, match=re.escape("pool k_cache_0: expected ('f32', (2, 40, 2, 4, 16))")):
        check_kv_cache_spec(dataclasses.replace(spec, num_pages=40), module)
    with pytest.raises(KVCacheSpecError, match=re.escape("pool k_cache_0: expected ('f16'")):
        check_kv_cache_spec(dataclasses.replace(spec, dtype="f16"), module)


def llama_step(options=PassOptions(max_seq_len=32, max_num_seqs=2, page_size=4, activation_seq_len=16)):
    from kiln.passes import PassManager
    from kiln.passes.pipeline import PIPELINE

    from golden import copy_module
    from tiny_models import captured

    module = copy_module(captured("llama"))
    PassManager(PIPELINE).run(module, options)
    return module, KVCacheSpec.from_json(module.metadata["kv_cache"])


def test_checker_accepts_a_whole_pipeline():
    options = PassOptions(max_seq_len=32, max_num_seqs=2, page_size=4, activation_seq_len=16)
    module, spec = llama_step(options)
    assert set(module.functions) == {"step", "step_decode"}
    check_kv_cache_spec(spec, module)
    check_spec_options(spec, options)
    for dtype in ("f32", "f16"):
        for budget in (None, 50_000, 1 << 20):
            options = PassOptions(max_seq_len=40, max_num_seqs=2, page_size=8, kv_cache_dtype=dtype,
                                  memory_budget_bytes=budget)
            module, spec = planned(options)
            check_kv_cache_spec(spec, module)
            check_spec_options(spec, options)
