"""Plan the paged KV cache: page size, number of pages, bytes per token and capacity, from the fused attentions.

Layout: one tensor ``[num_layers, 2, num_pages, num_kv_heads, page_size, head_dim]``.
Without a memory budget the cache holds ``max_num_seqs`` sequences of
``max_seq_len`` tokens; with one, as many pages as fit. A configuration that
cannot hold one sequence of ``max_seq_len`` tokens is refused with the numbers.
The plan goes into ``module.metadata["kv_cache"]`` and is checked by
:func:`check_kv_plan`, which recomputes everything independently.
"""

from __future__ import annotations

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Module
from kiln.ir.types import itemsize

from .manager import PassOptions, register_pass

LAYOUT = "[num_layers, 2, num_pages, num_kv_heads, page_size, head_dim]"


def attention_shapes(module: Module, function: str = "forward") -> list:
    """(num_heads, num_kv_heads, head_dim) of every fused attention, in order."""
    fn = module.functions[function]
    out = []
    for node in fn.nodes:
        if node.op in ("attention", "paged_attention"):
            out.append((node.attrs["num_heads"], node.attrs["num_kv_heads"], node.inputs[1].type.shape[3]))
    return out


def make_plan(num_layers: int, num_kv_heads: int, head_dim: int, options: PassOptions) -> dict:
    page_size = options.page_size
    if page_size < 1 or options.max_seq_len < 1 or options.max_num_seqs < 1:
        raise ConfigError(f"KV cache: page size {page_size}, max sequence length {options.max_seq_len} and "
                          f"max sequences {options.max_num_seqs} must all be positive")
    dtype = options.kv_cache_dtype
    bytes_per_token = num_layers * 2 * num_kv_heads * head_dim * itemsize(dtype)
    pages_per_seq = -(-options.max_seq_len // page_size)
    if options.memory_budget_bytes is None:
        num_pages = options.max_num_seqs * pages_per_seq
    else:
        num_pages = options.memory_budget_bytes // (page_size * bytes_per_token)
    if num_pages < pages_per_seq:
        need = pages_per_seq * page_size * bytes_per_token
        raise ConfigError(
            f"KV cache budget of {options.memory_budget_bytes:,} bytes holds {num_pages} pages of {page_size} tokens "
            f"({bytes_per_token:,} bytes per token), but one sequence of {options.max_seq_len} tokens needs "
            f"{pages_per_seq} pages ({need:,} bytes); raise the budget or lower --max-seq-len")
    return {
        "layout": LAYOUT, "dtype": dtype, "num_layers": num_layers, "num_kv_heads": num_kv_heads,
        "head_dim": head_dim, "page_size": page_size, "num_pages": num_pages, "pages_per_seq": pages_per_seq,
        "bytes_per_token": bytes_per_token, "max_tokens": num_pages * page_size,
        "max_seq_len": options.max_seq_len, "max_num_seqs": options.max_num_seqs,
        "total_bytes": num_pages * page_size * bytes_per_token,
        "budget_bytes": options.memory_budget_bytes,
    }


def check_kv_plan(plan: dict) -> None:
    """Independent check: sizes add up, one max-length sequence fits, and the per-(layer, K/V) regions
    of the cache tensor are disjoint and inside it."""
    elem = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8}[plan["dtype"]]
    layers, heads, dim, page, pages = (plan[k] for k in ("num_layers", "num_kv_heads", "head_dim", "page_size",
                                                          "num_pages"))
    assert plan["bytes_per_token"] == layers * 2 * heads * dim * elem, "bytes per token"
    assert plan["max_tokens"] == pages * page, "capacity"
    total = layers * 2 * pages * heads * page * dim * elem
    assert total == plan["total_bytes"] == plan["max_tokens"] * plan["bytes_per_token"], "total bytes"
    assert plan["pages_per_seq"] * page >= plan["max_seq_len"], "pages per sequence"
    assert plan["pages_per_seq"] <= pages, "one maximum-length sequence must fit"
    if plan["budget_bytes"] is not None:
        assert total <= plan["budget_bytes"], "over budget"
    region = pages * heads * page * dim * elem
    spans = sorted(((layer * 2 + kv) * region, (layer * 2 + kv + 1) * region)
                   for layer in range(layers) for kv in range(2))
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, f"regions [{a0}, {a1}) and [{b0}, {b1}) overlap"
    assert spans[0][0] >= 0 and spans[-1][1] <= total, "region outside the cache"


@register_pass("plan_kv_cache")
def run(module: Module, options: PassOptions) -> bool:
    """Records the paged KV-cache plan (layout, pages, bytes per token, capacity) in the module metadata."""
    function = "forward" if "forward" in module.functions else "prefill"
    shapes = attention_shapes(module, function)
    if not shapes:
        raise ConfigError("no fused attention in the model: kiln cannot plan a KV cache "
                          f"(unfused: {module.metadata.get('unfused_attention') or 'none found'})")
    kv = {(h, d) for _, h, d in shapes}
    if len(kv) != 1:
        raise ConfigError(f"layers differ in KV heads/head size {sorted(kv)}; kiln's cache needs one shape")
    (num_kv_heads, head_dim), = kv
    plan = make_plan(len(shapes), num_kv_heads, head_dim, options)
    check_kv_plan(plan)
    module.metadata["kv_cache"] = plan
    return False
