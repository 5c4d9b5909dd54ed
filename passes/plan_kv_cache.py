"""Plan the KV cache: the fused attentions -> a :class:`KVCacheSpec` (layer groups, pages, dtype) in the metadata.

Layers whose cache entries have one shape (K/V heads, K and V head sizes, window) form a group that
shares one K and one V pool; latent attentions (DeepSeek's MLA) of one latent width share one latent
pool. Without a memory budget the pool holds ``max_num_seqs`` sequences of ``max_seq_len`` tokens'
worth of pages, shared by as many sequences as the runtime admits (pages are handed out as tokens
arrive); with a budget, as many whole pages as fit. A pool that cannot hold one sequence of
``max_seq_len`` tokens is refused with the numbers. The spec goes into
``module.metadata["kv_cache"]`` and is proven by ``ir.kv_cache.check_kv_cache_spec``, which derives
what the cache must hold from the module's attention ops, not from the spec.
"""

from __future__ import annotations

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Module
from kiln.ir.kv_cache import KVCacheSpec, attention_layers, check_kv_cache_spec, group_of_key

from .manager import PassOptions, register_pass


def make_spec(module: Module, function: str, options: PassOptions) -> KVCacheSpec:
    page_size = options.page_size
    if page_size < 1 or options.max_seq_len < 1 or options.max_num_seqs < 1:
        raise ConfigError(f"KV cache: page size {page_size}, max sequence length {options.max_seq_len} and "
                          f"max sequences {options.max_num_seqs} must all be positive")
    layers = attention_layers(module, function)
    if not layers:
        raise ConfigError("no fused attention in the model: kiln cannot plan a KV cache "
                          f"(unfused: {module.metadata.get('unfused_attention') or 'none found'})")
    grouped: dict = {}
    for position, (_, key) in enumerate(layers):
        grouped.setdefault(key, []).append(position)
    groups = tuple(group_of_key(key, tuple(members)) for key, members in grouped.items())
    sizing = KVCacheSpec(page_size, 1, options.kv_cache_dtype, groups, options.max_seq_len, options.max_num_seqs,
                         options.memory_budget_bytes)
    pages_per_seq = sizing.pages_per_seq
    if options.memory_budget_bytes is None:
        num_pages = options.max_num_seqs * pages_per_seq
    else:
        num_pages = options.memory_budget_bytes // sizing.page_bytes
    if num_pages < pages_per_seq:
        need = pages_per_seq * sizing.page_bytes
        raise ConfigError(
            f"KV cache budget of {options.memory_budget_bytes:,} bytes holds {num_pages} pages of {page_size} tokens "
            f"({sizing.bytes_per_token:,} bytes per token), but one sequence of {options.max_seq_len} tokens needs "
            f"{pages_per_seq} pages ({need:,} bytes); raise the budget or lower --max-seq-len")
    return KVCacheSpec(page_size, num_pages, options.kv_cache_dtype, groups, options.max_seq_len,
                       options.max_num_seqs, options.memory_budget_bytes)


def check_spec_options(spec: KVCacheSpec, options: PassOptions) -> None:
    """The spec was made as asked: page size, lengths, dtype, budget, and the pages they give."""
    asked = {"page_size": options.page_size, "max_seq_len": options.max_seq_len, "dtype": options.kv_cache_dtype,
             "max_num_seqs": options.max_num_seqs, "budget_bytes": options.memory_budget_bytes}
    for field, value in asked.items():
        if getattr(spec, field) != value:
            raise AssertionError(f"KV-cache spec {field}: expected {value} (as asked), found {getattr(spec, field)}")
    expected = (options.max_num_seqs * spec.pages_per_seq if options.memory_budget_bytes is None
                else options.memory_budget_bytes // (spec.page_size * spec.bytes_per_token))
    if spec.num_pages != expected:
        raise AssertionError(f"KV-cache spec num_pages: expected {expected} (from the options), found "
                             f"{spec.num_pages}")


@register_pass("plan_kv_cache")
def run(module: Module, options: PassOptions) -> bool:
    """Records the KV-cache spec (layer groups, pages, dtype, bytes per token) in the module metadata."""
    function = "forward" if "forward" in module.functions else "step"
    spec = make_spec(module, function, options)
    check_kv_cache_spec(spec, module)
    check_spec_options(spec, options)
    module.metadata["kv_cache"] = spec.to_json()
    return False
