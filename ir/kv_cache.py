"""The KV cache, declared once: page size, pages, dtype and, per group of layers, what each token keeps.

Every stage reads this one value: the planner makes it (``passes/plan_kv_cache.py``), the step
function's cache parameters are its pools, the backends allocate and bind those pools by name, the
runtime pages sequences through it, the manifest stores it and ``kiln inspect`` prints it. Nothing
rebuilds the cache's shape from loose keys.

A group's layers share one pool per tensor kind, indexed by the layer's place in the group:

- ``kv``: ``k_cache_<g>[layers, pages, kv_heads, page_size, k_head_dim]`` and
  ``v_cache_<g>[layers, pages, kv_heads, page_size, v_head_dim]`` (K and V head dims may differ);
- ``latent``: ``latent_cache_<g>[layers, pages, page_size, latent_dim]``, one compressed vector per
  token (DeepSeek's MLA keeps its latent and decoupled RoPE key there).

Token ``p`` of a sequence lives in page ``page_table[seq, p // page_size]`` at offset ``p % page_size``
of every pool. :func:`check_kv_cache_spec` proves a spec right for a module, sharing no arithmetic
with the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Module

KINDS = ("kv", "latent")
DTYPES = ("f32", "f16", "bf16")
# written out here rather than taken from ir.types, so the checker shares no arithmetic with anyone
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
ATTENTION_OPS = ("attention", "paged_attention", "latent_attention", "paged_latent_attention")
# the cache-reading ops: their pool operands (operand index, pool kind) in the order of their pool outputs
PAGED_POOL_OPERANDS = {"paged_attention": ((3, "k"), (4, "v")), "paged_latent_attention": ((2, "latent"),)}
POOL_PREFIXES = ("k_cache_", "v_cache_", "latent_cache_")


@dataclass(frozen=True)
class Pool:
    """One tensor the backends allocate: its step-function parameter name, shape and dtype."""

    name: str
    shape: tuple
    dtype: str

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * _ELEMENT_BYTES[self.dtype]


@dataclass(frozen=True)
class CacheGroup:
    """Layers whose cache entries have one shape. ``layers`` are attention indices in model order;
    ``window`` is the sliding window those layers attend over (None: the whole sequence)."""

    kind: str
    layers: tuple
    num_kv_heads: int = 0
    k_head_dim: int = 0
    v_head_dim: int = 0
    latent_dim: int = 0
    window: int | None = None

    def values_per_token(self) -> int:
        """Cache elements one token takes in one layer of this group."""
        if self.kind == "kv":
            return self.num_kv_heads * (self.k_head_dim + self.v_head_dim)
        return self.latent_dim


@dataclass(frozen=True)
class KVCacheSpec:
    page_size: int
    num_pages: int
    dtype: str
    groups: tuple  # tuple[CacheGroup, ...]
    max_seq_len: int  # the longest sequence; a page table row has ceil(max_seq_len / page_size) entries
    max_num_seqs: int = 1  # the pool was sized for this many sequences of max_seq_len (without a budget)
    budget_bytes: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))

    # derived sizes ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    @property
    def element_bytes(self) -> int:
        return _ELEMENT_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return sum(len(g.layers) * g.values_per_token() for g in self.groups) * self.element_bytes

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.bytes_per_token

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_seq_len // self.page_size)

    @property
    def max_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def total_bytes(self) -> int:
        return sum(pool.nbytes for pool in self.pools())

    # layout ------------------------------------------------------------------------
    def pools(self) -> list:
        out = []
        for index, group in enumerate(self.groups):
            count = len(group.layers)
            if group.kind == "kv":
                out.append(Pool(f"k_cache_{index}", (count, self.num_pages, group.num_kv_heads, self.page_size,
                                                     group.k_head_dim), self.dtype))
                out.append(Pool(f"v_cache_{index}", (count, self.num_pages, group.num_kv_heads, self.page_size,
                                                     group.v_head_dim), self.dtype))
            else:
                out.append(Pool(f"latent_cache_{index}", (count, self.num_pages, self.page_size, group.latent_dim),
                                self.dtype))
        return out

    def locate(self, layer: int) -> tuple:
        """(group index, index of the layer inside its group's pools)."""
        for index, group in enumerate(self.groups):
            if layer in group.layers:
                return index, group.layers.index(layer)
        raise KeyError(f"layer {layer} is in no group of the KV-cache spec")

    def pool_names(self, layer: int) -> tuple:
        group, _ = self.locate(layer)
        if self.groups[group].kind == "kv":
            return f"k_cache_{group}", f"v_cache_{group}"
        return (f"latent_cache_{group}",)

    # text --------------------------------------------------------------------------
    def to_json(self) -> dict:
        groups = []
        for g in self.groups:
            entry = {"kind": g.kind, "layers": list(g.layers), "window": g.window}
            if g.kind == "kv":
                entry.update(num_kv_heads=g.num_kv_heads, k_head_dim=g.k_head_dim, v_head_dim=g.v_head_dim)
            else:
                entry.update(latent_dim=g.latent_dim)
            groups.append(entry)
        return {
            "page_size": self.page_size, "num_pages": self.num_pages, "dtype": self.dtype, "groups": groups,
            "max_seq_len": self.max_seq_len, "max_num_seqs": self.max_num_seqs, "budget_bytes": self.budget_bytes,
            # derived, for readers of the manifest; from_json checks them against the spec
            "bytes_per_token": self.bytes_per_token, "pages_per_seq": self.pages_per_seq,
            "max_tokens": self.max_tokens, "total_bytes": self.total_bytes,
        }

    @classmethod
    def from_json(cls, data) -> "KVCacheSpec":
        """The spec a manifest or module metadata holds; raises ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"kv_cache: expected an object, found {type(data).__name__}")

        def count(field, value, minimum=1, optional=False):
            if optional and value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value > 2 ** 40:
                raise ValueError(f"kv_cache.{field}: expected an integer >= {minimum}, found {value!r}")
            return value

        if data.get("dtype") not in DTYPES:
            raise ValueError(f"kv_cache.dtype: expected one of {', '.join(DTYPES)}, found {data.get('dtype')!r}")
        raw_groups = data.get("groups")
        if not isinstance(raw_groups, list) or not raw_groups or len(raw_groups) > 4096:
            raise ValueError("kv_cache.groups: expected a non-empty list of layer groups")
        groups = []
        for i, g in enumerate(raw_groups):
            where = f"groups[{i}]"
            if not isinstance(g, dict) or g.get("kind") not in KINDS:
                raise ValueError(f"kv_cache.{where}.kind: expected one of {', '.join(KINDS)}")
            layers = g.get("layers")
            if not isinstance(layers, list) or not layers or len(layers) > 4096:
                raise ValueError(f"kv_cache.{where}.layers: expected a non-empty list of layer indices")
            layers = tuple(count(f"{where}.layers", layer, 0) for layer in layers)
            window = count(f"{where}.window", g.get("window"), 1, optional=True)
            if g["kind"] == "kv":
                groups.append(CacheGroup("kv", layers, count(f"{where}.num_kv_heads", g.get("num_kv_heads")),
                                         count(f"{where}.k_head_dim", g.get("k_head_dim")),
                                         count(f"{where}.v_head_dim", g.get("v_head_dim")), window=window))
            else:
                groups.append(CacheGroup("latent", layers, latent_dim=count(f"{where}.latent_dim",
                                                                            g.get("latent_dim")), window=window))
        spec = cls(page_size=count("page_size", data.get("page_size")),
                   num_pages=count("num_pages", data.get("num_pages")), dtype=data["dtype"], groups=tuple(groups),
                   max_seq_len=count("max_seq_len", data.get("max_seq_len")),
                   max_num_seqs=count("max_num_seqs", data.get("max_num_seqs")),
                   budget_bytes=count("budget_bytes", data.get("budget_bytes"), optional=True))
        layers = sorted(layer for g in spec.groups for layer in g.layers)
        if layers != list(range(len(layers))):
            raise ValueError(f"kv_cache.groups: the groups' layers must be 0..{len(layers) - 1}, each once, "
                             f"found {layers}")
        if spec.num_pages < spec.pages_per_seq:
            raise ValueError(f"kv_cache.num_pages: expected at least {spec.pages_per_seq} (one sequence of "
                             f"max_seq_len {spec.max_seq_len} tokens), found {spec.num_pages}")
        for field in ("bytes_per_token", "pages_per_seq", "max_tokens", "total_bytes"):
            if field in data and data[field] != getattr(spec, field):
                raise ValueError(f"kv_cache.{field}: expected {getattr(spec, field)} (from the spec), "
                                 f"found {data[field]!r}")
        return spec

    def describe(self) -> list:
        """Lines for ``kiln inspect`` and the CLI's summary."""
        lines = [f"KV cache: {self.num_pages:,} pages of {self.page_size} tokens ({self.max_tokens:,} tokens, "
                 f"{self.total_bytes / 2 ** 20:,.1f} MiB {self.dtype}); {self.bytes_per_token:,} bytes per token; "
                 f"a sequence up to {self.max_seq_len:,} tokens"]
        for pool in self.pools():
            lines.append(f"  {pool.name}: {self.dtype}[{', '.join(str(d) for d in pool.shape)}]")
        for index, g in enumerate(self.groups):
            what = (f"{g.num_kv_heads} KV heads x (K {g.k_head_dim} + V {g.v_head_dim})" if g.kind == "kv"
                    else f"latent {g.latent_dim}")
            window = f", sliding window {g.window}" if g.window else ""
            lines.append(f"  group {index} ({g.kind}): layers {_ranges(g.layers)}: {what}{window}")
        return lines


def _ranges(layers) -> str:
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


class KVCacheSpecError(AssertionError):
    """A spec that does not fit its module (a bug in the planner or a pass, never the user's fault)."""


def group_key(group: CacheGroup) -> tuple:
    """What one token of a group's layers keeps, without the layers: (kind, num_kv_heads, k_head_dim, v_head_dim,
    window) for ``kv``, (kind, latent_dim, window) for ``latent``."""
    if group.kind == "latent":
        return ("latent", group.latent_dim, group.window)
    return (group.kind, group.num_kv_heads, group.k_head_dim, group.v_head_dim, group.window)


def group_of_key(key: tuple, layers: tuple) -> CacheGroup:
    """The group of ``layers`` whose cache entries are ``key`` (:func:`group_key`'s form)."""
    if key[0] == "latent":
        return CacheGroup("latent", layers, latent_dim=key[1], window=key[2])
    kind, heads, k_dim, v_dim, window = key
    return CacheGroup(kind, layers, num_kv_heads=heads, k_head_dim=k_dim, v_head_dim=v_dim, window=window)


def attention_layers(module: Module, function: str) -> list:
    """The fused attentions of ``@function`` in order, as (node, group key) with the key in :func:`group_key`'s
    form: (kind, num_kv_heads, k_head_dim, v_head_dim, window), or (kind, latent_dim, window) for latent
    attention (DeepSeek's MLA: no window)."""
    out = []
    for node in module.functions[function].nodes:
        if node.op in ("latent_attention", "paged_latent_attention"):
            out.append((node, ("latent", node.inputs[1].type.shape[-1], None)))
        elif node.op in ATTENTION_OPS:
            k, v = node.inputs[1].type.shape, node.inputs[2].type.shape
            out.append((node, ("kv", k[1], k[3], v[3], node.attrs["window"])))
    return out


def check_kv_cache_spec(spec: KVCacheSpec, module: Module) -> None:
    """Prove ``spec`` right for ``module``; raise :class:`KVCacheSpecError` naming the first mismatch.

    From the module, not the spec: one layer per fused attention of each function, in order; each
    layer's kind, K/V heads, K and V head sizes and window are those of its group. Once the cache is
    inserted, every function's cache parameters are exactly the spec's pools (names, shapes, dtype);
    every ``paged_attention`` reads its own layer's pools at its layer's index; no two attentions of a
    function write the same (pool, index); and every layer is written. Then the arithmetic: bytes per
    token, pages per sequence and the total are recomputed from the pools' shapes.
    """
    def expect(field: str, expected, found, why: str) -> None:
        if expected != found:
            raise KVCacheSpecError(f"KV-cache spec {field}: expected {expected} ({why}), found {found}")

    if spec.dtype not in _ELEMENT_BYTES:
        raise KVCacheSpecError(f"KV-cache spec dtype: expected one of {', '.join(_ELEMENT_BYTES)}, found {spec.dtype}")
    owner = {}
    for index, group in enumerate(spec.groups):
        if group.kind not in KINDS:
            raise KVCacheSpecError(f"KV-cache spec group {index}: kind {group.kind!r} is not one of {KINDS}")
        for layer in group.layers:
            if layer in owner:
                raise KVCacheSpecError(f"KV-cache spec: layer {layer} is in groups {owner[layer]} and {index}")
            owner[layer] = index
    expect("layers", list(range(len(owner))), sorted(owner), "each layer 0..n-1 in exactly one group")

    attended = {name: attention_layers(module, name) for name in module.functions}
    attended = {name: nodes for name, nodes in attended.items() if nodes}
    if not attended:
        raise KVCacheSpecError("KV-cache spec: the module has no attention to hold a cache for")
    pools = {pool.name: pool for pool in spec.pools()}
    for name, nodes in attended.items():
        expect("num_layers", len(nodes), len(owner), f"one per attention in @{name}")
        fn = module.functions[name]
        cache_params = {p.name: p for p in fn.params if p.name.startswith(POOL_PREFIXES)}
        if any(node.op in PAGED_POOL_OPERANDS for node, _ in nodes):
            expect("pools", sorted(pools), sorted(cache_params), f"the cache parameters of @{name}")
            for pname, param in cache_params.items():
                pool = pools[pname]
                expect(f"pool {pname}", (pool.dtype, tuple(pool.shape)), (param.type.dtype, tuple(param.type.shape)),
                       f"the parameter of @{name}")
        written = set()
        for position, (node, key) in enumerate(nodes):
            group = spec.groups[owner[position]]
            where = f"{node.op} %{node.outputs[0].name} (layer {position}) in @{name}"
            expect("group", group_key(group), key, ("kind, latent width" if group.kind == "latent" else
                                                     "kind, KV heads, K/V head sizes") + f" and window of {where}")
            if node.op not in PAGED_POOL_OPERANDS:
                continue
            index = group.layers.index(position)
            expect("layer", position, node.attrs["layer"], f"the layer attribute of {where}")
            expect("pool index", index, node.attrs["index"], f"{where}'s place in group {owner[position]}")
            for operand, kind in PAGED_POOL_OPERANDS[node.op]:
                root = node.inputs[operand]
                while root.producer is not None and root.producer.op == node.op:
                    root = root.producer.inputs[operand]
                expect("pool", f"{kind}_cache_{owner[position]}", root.name,
                       f"the {kind.upper() if kind in ('k', 'v') else kind} pool {where} reads")
                slot = (root.name, index)
                if slot in written:
                    raise KVCacheSpecError(f"KV-cache spec: {where} writes {root.name}[{index}], which another "
                                           f"attention of @{name} writes too")
                written.add(slot)
        slots = sum(2 if spec.groups[group].kind == "kv" else 1 for group in owner.values())
        if written and len(written) != slots:
            raise KVCacheSpecError(f"KV-cache spec: @{name} writes {len(written)} of the cache's {slots} (pool, "
                                   f"layer) slots")

    per_token = 0
    for pool in pools.values():
        layers, pages, *rest = pool.shape
        expect(f"pool {pool.name} pages", spec.num_pages, pages, "num_pages")
        size = 1
        for d in rest:
            size *= d
        per_token += layers * size // spec.page_size * _ELEMENT_BYTES[spec.dtype]
    expect("bytes_per_token", per_token, spec.bytes_per_token, "the pools' bytes per token")
    expect("pages_per_seq", (spec.max_seq_len + spec.page_size - 1) // spec.page_size, spec.pages_per_seq,
           "ceil(max_seq_len / page_size)")
    if spec.num_pages < spec.pages_per_seq:
        raise KVCacheSpecError(f"KV-cache spec num_pages: {spec.num_pages} pages cannot hold one sequence of "
                               f"{spec.max_seq_len} tokens ({spec.pages_per_seq} pages)")


# the step signature ------------------------------------------------------------------
STEP = "step"
# The same signature built for decoding (one token per sequence, each needing logits): backends may compile
# it with small-row kernels. The engine calls it for steps of at most DECODE_STEP_MAX_TOKENS tokens: on TVM
# (SmolLM2, 2 threads) it beats @step for one token (Q4_1 11.9 vs 14.0 ms, fp32 23.7 vs 29.8 ms), but its
# quantized small-row kernels lose from two rows on (Q4_1, 4 rows: 24.9 vs 16.3 ms).
DECODE_STEP = "step_decode"
DECODE_STEP_MAX_TOKENS = 1
STEP_INPUTS = ("token_ids", "positions", "token_seq", "page_table", "logit_rows")
LOGITS = "logits"


def step_inputs(spec: KVCacheSpec, tokens="tokens", rows="rows") -> list:
    """(name, type) of the step's inputs in order: the flat batch, then the spec's pools.

    token_ids/positions/token_seq [tokens]: each new token, its position in its sequence and its sequence's row
    of page_table [seqs, pages_per_seq]; logit_rows [rows]: the tokens whose logits the step returns."""
    from .symbolic import sym
    from .types import TensorType

    t, r = sym(tokens), sym(rows)
    return [("token_ids", TensorType("i64", (t,))), ("positions", TensorType("i64", (t,))),
            ("token_seq", TensorType("i32", (t,))),
            ("page_table", TensorType("i32", (sym("seqs"), spec.pages_per_seq))),
            ("logit_rows", TensorType("i64", (r,)))] + \
        [(pool.name, TensorType(pool.dtype, pool.shape)) for pool in spec.pools()]
