"""Plan the paged KV cache: page size, number of pages, bytes per token and capacity, from the fused attentions.

Layout: one tensor ``[num_layers, 2, num_pages, num_kv_heads, page_size, head_dim]``.
Without a memory budget the cache holds ``max_num_seqs`` sequences of
``max_seq_len`` tokens; with one, as many pages as fit. A configuration that
cannot hold one sequence of ``max_seq_len`` tokens is refused with the numbers.
The plan goes into ``module.metadata["kv_cache"]`` and is checked by
:func:`check_kv_plan`, which derives what the cache must hold from the module's attention
ops and the options, not from the plan.
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


class KVPlanError(AssertionError):
    """A KV-cache plan that does not fit its module or options (a bug in the planner, never the user's fault)."""


# written out here rather than taken from kiln.ir.types, so the checker shares no arithmetic with the planner
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def check_kv_plan(plan: dict, module: Module, options: PassOptions | None = None) -> None:
    """Prove ``plan`` right for ``module`` (and the ``options`` it was made for); raise :class:`KVPlanError`.

    What the cache must hold comes from the module's attention ops, not from the plan: one layer per
    attention, each attention's K/V heads and head size (K's and V's alike). Once the cache is inserted,
    every ``paged_attention`` reads a cache of the plan's dtype and shape, and the (K, V) byte regions its
    ``layer`` selects in that row-major tensor are disjoint between the attentions of a function, inside
    the cache, and cover every layer. From ``options``: page size, lengths, sequences, dtype and budget as
    asked. Then the arithmetic: bytes per token, pages per sequence (ceil(max_seq_len / page_size)),
    pages (max_num_seqs sequences, or as many whole pages as the budget holds, never fewer than one
    sequence needs), capacity and total bytes.
    """
    def expect(field: str, expected, found, why: str) -> None:
        if expected != found:
            raise KVPlanError(f"KV plan {field}: expected {expected} ({why}), found {found}")

    expect("layout", LAYOUT, plan.get("layout"), "the only layout the backends implement")
    if plan.get("dtype") not in _ELEMENT_BYTES:
        raise KVPlanError(f"KV plan dtype: expected one of {', '.join(_ELEMENT_BYTES)}, found {plan.get('dtype')!r}")
    elem = _ELEMENT_BYTES[plan["dtype"]]

    attentions = {name: [n for n in fn.nodes if n.op in ("attention", "paged_attention")]
                  for name, fn in module.functions.items()}
    attentions = {name: nodes for name, nodes in attentions.items() if nodes}
    if not attentions:
        raise KVPlanError("KV plan: the module has no attention to hold a cache for")
    for name, nodes in attentions.items():
        expect("num_layers", len(nodes), plan["num_layers"], f"one per attention in @{name}")
        for node in nodes:
            key, value = node.inputs[1].type.shape, node.inputs[2].type.shape
            where = f"{node.op} %{node.outputs[0].name} in @{name}"
            expect("num_kv_heads", key[1], plan["num_kv_heads"], f"K heads of {where}")
            expect("head_dim", key[3], plan["head_dim"], f"K head size of {where}")
            expect("head_dim", value[3], plan["head_dim"], f"V head size of {where}")

    layers, heads, dim = plan["num_layers"], plan["num_kv_heads"], plan["head_dim"]
    page, pages = plan["page_size"], plan["num_pages"]
    if options is not None:
        for field, asked in (("page_size", options.page_size), ("max_seq_len", options.max_seq_len),
                             ("max_num_seqs", options.max_num_seqs), ("dtype", options.kv_cache_dtype),
                             ("budget_bytes", options.memory_budget_bytes)):
            expect(field, asked, plan[field], "as asked")
    per_token = layers * 2 * heads * dim * elem
    expect("bytes_per_token", per_token, plan["bytes_per_token"], "layers x 2 x kv heads x head_dim x itemsize")
    pages_per_seq = -(-plan["max_seq_len"] // page)
    expect("pages_per_seq", pages_per_seq, plan["pages_per_seq"], "ceil(max_seq_len / page_size)")
    page_bytes = page * per_token
    budget = plan["budget_bytes"]
    if budget is None:
        expect("num_pages", plan["max_num_seqs"] * pages_per_seq, pages, "max_num_seqs x pages_per_seq")
    else:
        expect("num_pages", budget // page_bytes, pages, f"whole pages of {page_bytes} bytes in the budget")
    if pages < pages_per_seq:
        raise KVPlanError(f"KV plan num_pages: {pages} pages cannot hold one sequence of {plan['max_seq_len']} "
                          f"tokens ({pages_per_seq} pages)")
    expect("max_tokens", pages * page, plan["max_tokens"], "num_pages x page_size")
    total = layers * 2 * pages * heads * page * dim * elem
    expect("total_bytes", total, plan["total_bytes"], f"the {LAYOUT} tensor's size")

    region = pages * heads * page * dim * elem  # one (layer, K or V) slice of the row-major cache
    for name, nodes in attentions.items():
        spans = []
        for node in nodes:
            if node.op != "paged_attention":
                continue
            cache, table = node.inputs[3].type, node.inputs[4].type
            where = f"paged_attention %{node.outputs[0].name} in @{name}"
            expect("dtype", cache.dtype, plan["dtype"], f"the cache {where} reads")
            expect("cache shape", (layers, 2, pages, heads, page, dim), tuple(cache.shape), f"the cache {where} reads")
            expect("pages_per_seq", table.shape[1], plan["pages_per_seq"], f"the page table {where} reads")
            layer = node.attrs["layer"]
            spans += [((layer * 2 + kv) * region, (layer * 2 + kv + 1) * region, where) for kv in range(2)]
        if not spans:
            continue
        spans.sort()
        for (start_a, end_a, a), (start_b, end_b, b) in zip(spans, spans[1:]):
            if end_a > start_b:
                raise KVPlanError(f"KV plan: {a} and {b} write overlapping cache bytes [{start_a}, {end_a}) and "
                                  f"[{start_b}, {end_b})")
        if spans[0][0] < 0 or spans[-1][1] > total:
            raise KVPlanError(f"KV plan: a cache region [{spans[-1][0]}, {spans[-1][1]}) of {spans[-1][2]} lies "
                              f"outside the {total}-byte cache")
        if len(spans) != 2 * layers:
            raise KVPlanError(f"KV plan: @{name} uses {len(spans) // 2} of the cache's {layers} layers")


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
    check_kv_plan(plan, module, options)
    module.metadata["kv_cache"] = plan
    return False
