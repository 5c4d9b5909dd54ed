"""Plan activation memory: each intermediate tensor of an entry function gets a byte range in one arena.

Liveness over node order at concrete symbol values, then best-fit placement largest first (as TFLite and
ExecuTorch do; two more orders are tried); :func:`check_activation_plan` independently proves no overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Function, Module
from kiln.ir.symbolic import evaluate
from kiln.ir.types import numpy_dtype

from .manager import PassOptions, register_pass

ALIGNMENT = 64

# Ops whose outputs are not activations: weights live in the weight store, and rank-0 constants
# are immediates the backends fold into kernels, so neither takes arena bytes.
NOT_ACTIVATIONS = ("weight", "constant")

# (op, output index) -> input index whose storage that output updates in place. Such an output is
# the same buffer as its input: no bytes of its own (the KV cache stays in the runtime's pages).
IN_PLACE_OUTPUTS = {("paged_attention", 1): 3, ("paged_attention", 2): 4,  # the K and V pools
                    ("paged_latent_attention", 1): 2}  # the latent pool


class Buffer(NamedTuple):
    """Where one activation lives: byte ``offset`` and ``size`` in the arena, node indices ``first``..``last``."""

    offset: int
    size: int
    first: int
    last: int


@dataclass
class ActivationPlan:
    """Arena offsets for one function at one set of symbol values.

    ``last == len(function.nodes)`` means the value is a result, live through the return.
    ``naive_bytes`` is what giving every buffer its own aligned range would take.
    ``lower_bound_bytes`` is the most aligned bytes live at any one node: no plan can beat it.
    """

    buffers: dict  # value name -> Buffer
    peak_bytes: int
    naive_bytes: int
    lower_bound_bytes: int
    env: dict = field(default_factory=dict)
    alignment: int = ALIGNMENT

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "naive_bytes": self.naive_bytes,
                "lower_bound_bytes": self.lower_bound_bytes, "num_buffers": len(self.buffers),
                "alignment": self.alignment, "env": dict(self.env)}


class ActivationPlanError(AssertionError):
    """An activation plan breaks an invariant (a bug in the planner, never the user's fault)."""


def _align(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def _lifetimes(function: Function, env: dict) -> dict:
    """value name -> [size, first, last] for every activation, from the values' use lists."""
    index = {id(node): i for i, node in enumerate(function.nodes)}
    end = len(function.nodes)
    result_ids = {id(v) for v in function.results}
    storage: dict = {}  # id(value) -> name of the activation holding its bytes, or None (not in the arena)
    lifetimes: dict = {}
    sizes: dict = {}  # TensorType -> bytes; symbolic products are the slow part and types repeat a lot
    for i, node in enumerate(function.nodes):
        for k, value in enumerate(node.outputs):
            source = IN_PLACE_OUTPUTS.get((node.op, k))
            if source is not None:
                holder = storage.get(id(node.inputs[source]))
            elif node.op in NOT_ACTIVATIONS:
                holder = None
            else:
                holder = value.name
                if value.type not in sizes:
                    sizes[value.type] = int(evaluate(value.type.nbytes(), env))
                lifetimes[holder] = [sizes[value.type], i, i]
            storage[id(value)] = holder
            if holder is None:
                continue
            span = lifetimes[holder]
            for user, _ in value.uses:
                span[2] = max(span[2], index[id(user)])
            if id(value) in result_ids:
                span[2] = end
    return lifetimes


# Placement orders tried in turn; the smallest arena wins. Largest first is TFLite's and
# ExecuTorch's default; in execution order packs a diamond whose big buffers die before small ones
# are born; longest-lived first keeps long-lived buffers from splitting the arena's free space.
_ORDERS = (
    lambda n, size, first, last: (-size, first, n),
    lambda n, size, first, last: (first, -size, n),
    lambda n, size, first, last: (first - last, -size, n),
)


_NO_FIT = np.iinfo(np.int64).max


def _best_fit(ranges, need: int) -> int:
    """Offset of the smallest gap of ``need`` bytes between (start, stop) ranges sorted by start, else the top."""
    best_gap, offset, cursor = None, 0, 0
    for start, stop in ranges:
        gap = start - cursor
        if gap >= need and (best_gap is None or gap < best_gap):
            best_gap, offset = gap, cursor
        cursor = max(cursor, stop)
    return offset if best_gap is not None else cursor


def _best_fit_numpy(starts: np.ndarray, stops: np.ndarray, need: int) -> int:
    """:func:`_best_fit` for many ranges at once."""
    reach = np.maximum.accumulate(stops)
    free_from = np.concatenate(([0], reach[:-1]))  # everything in front of range i ends here
    gaps = starts - free_from
    best = int(np.argmin(np.where(gaps >= need, gaps, _NO_FIT)))
    return int(free_from[best]) if gaps[best] >= need else int(reach[-1])


def _place(lifetimes: dict, alignment: int, order_key) -> tuple:
    """Best fit in the given order: each buffer into the smallest gap left by those live with it.

    Returns (buffers, arena bytes).
    """
    order = sorted(lifetimes, key=lambda n: order_key(n, *lifetimes[n]))
    # Placed buffers, kept sorted by offset so the live ones come out in offset order.
    firsts, lasts, starts, stops = (np.empty(len(order), dtype=np.int64) for _ in range(4))
    placed, top = 0, 0
    buffers = {}
    for name in order:
        size, first, last = lifetimes[name]
        need = _align(size, alignment)
        offset = 0
        if need:
            live = np.flatnonzero((firsts[:placed] <= last) & (lasts[:placed] >= first))
            if len(live) > 64:
                offset = _best_fit_numpy(starts[live], stops[live], need)
            elif len(live):
                offset = _best_fit(zip(starts[live].tolist(), stops[live].tolist()), need)
            # Zero-size buffers never conflict, so only sized ones join the search arrays.
            at = int(np.searchsorted(starts[:placed], offset, side="right"))
            for array, item in ((firsts, first), (lasts, last), (starts, offset), (stops, offset + need)):
                array[at + 1:placed + 1] = array[at:placed]
                array[at] = item
            placed += 1
            top = max(top, offset + need)
        buffers[name] = Buffer(offset, size, first, last)
    return buffers, top


def live_bytes_bound(lifetimes: dict, alignment: int = ALIGNMENT) -> int:
    """The most aligned bytes live at any one moment: no arena can be smaller."""
    if not lifetimes:
        return 0
    change = np.zeros(max(last for _, _, last in lifetimes.values()) + 2, dtype=np.int64)
    for size, first, last in lifetimes.values():
        change[first] += _align(size, alignment)
        change[last + 1] -= _align(size, alignment)
    return int(np.cumsum(change).max())


def pack_buffers(lifetimes: dict, alignment: int = ALIGNMENT) -> tuple:
    """Offsets for ``{name: (size, first, last)}`` so that buffers live at once never share a byte.

    Returns ``({name: Buffer}, arena bytes)``: the smallest of the placement orders tried.
    """
    lower = live_bytes_bound(lifetimes, alignment)
    best, peak = {}, 0
    for i, order_key in enumerate(_ORDERS):
        buffers, top = _place(lifetimes, alignment, order_key)
        if i == 0 or top < peak:
            best, peak = buffers, top
        if peak == lower:  # nothing can beat the bytes live at the busiest moment
            break
    return best, peak


def plan_activation_memory(function: Function, env: dict, alignment: int = ALIGNMENT) -> ActivationPlan:
    """Plan the activation arena of ``function`` with every symbol set from ``env``."""
    missing = sorted({s for v in function.values() for s in v.type.symbols} - set(env))
    if missing:
        raise ConfigError(f"activation planning of @{function.name} needs a value for symbol(s) "
                          f"{', '.join(missing)}; found only {sorted(env)}; pass them in env")
    lifetimes = _lifetimes(function, env)
    buffers, peak = pack_buffers(lifetimes, alignment)
    naive = sum(_align(size, alignment) for size, _, _ in lifetimes.values())
    return ActivationPlan(buffers, int(peak), int(naive), live_bytes_bound(lifetimes, alignment), dict(env),
                          alignment)


# ---------------------------------------------------------------------------------------------
# The checker. It shares no liveness code with the planner: lifetimes come from one forward scan
# of node inputs, sizes from concrete shapes, and overlaps from a sweep over start times.


def _checked_activations(function: Function, env: dict) -> dict:
    """value name -> (size, first, last), recomputed by scanning node inputs in order."""
    last_read: dict = {}
    for i, node in enumerate(function.nodes):
        for value in node.inputs:
            last_read[value.name] = i
    for value in function.results:
        last_read[value.name] = len(function.nodes)
    owner: dict = {}  # value name -> name of the activation whose bytes it is, or None
    spans: dict = {}
    for i, node in enumerate(function.nodes):
        for k, value in enumerate(node.outputs):
            if (node.op, k) in IN_PLACE_OUTPUTS:
                owner[value.name] = owner.get(node.inputs[IN_PLACE_OUTPUTS[(node.op, k)]].name)
            elif node.op in NOT_ACTIVATIONS:
                owner[value.name] = None
            else:
                owner[value.name] = value.name
                count = int(np.prod(value.type.concrete(env), dtype=np.int64))
                spans[value.name] = [count * numpy_dtype(value.type.dtype).itemsize, i, i]
            holder = owner[value.name]
            if holder is not None:
                spans[holder][2] = max(spans[holder][2], last_read.get(value.name, i))
    return spans


def check_activation_plan(function: Function, plan: ActivationPlan, env: dict, alignment: int = ALIGNMENT) -> None:
    """Prove ``plan`` is safe for ``function`` at ``env``; raise :class:`ActivationPlanError` naming the culprits.

    Checks: every activation has a buffer of at least its size; offsets are aligned; every
    range lies inside ``[0, peak_bytes)``; the plan names no value that is not an activation;
    and no two activations whose lifetimes overlap share a byte.
    """
    where = f"@{function.name} at {dict(env)}"
    spans = _checked_activations(function, env)
    extra = sorted(set(plan.buffers) - set(spans))
    if extra:
        raise ActivationPlanError(f"{where}: plan has buffers for %{extra[0]} which is not an activation "
                                  f"({len(extra)} such)")
    for name, (size, _, _) in spans.items():
        if name not in plan.buffers:
            raise ActivationPlanError(f"{where}: activation %{name} ({size} bytes) has no buffer")
        buf = plan.buffers[name]
        if buf.size < size:
            raise ActivationPlanError(f"{where}: %{name} needs {size} bytes, its buffer has {buf.size}")
        if not (buf.first <= spans[name][1] and spans[name][2] <= buf.last):
            raise ActivationPlanError(f"{where}: %{name} is live at nodes {spans[name][1]}..{spans[name][2]}, "
                                      f"the plan says {buf.first}..{buf.last}")
        if buf.offset < 0 or buf.offset % alignment:
            raise ActivationPlanError(f"{where}: %{name} at offset {buf.offset} is not a non-negative "
                                      f"multiple of {alignment}")
        if buf.offset + size > plan.peak_bytes:
            raise ActivationPlanError(f"{where}: %{name} ends at byte {buf.offset + size}, past the arena's "
                                      f"{plan.peak_bytes}")
    # Sweep by start time: a pair is live together exactly when one starts while the other has not ended.
    by_start = sorted((first, last, name) for name, (size, first, last) in spans.items() if size)
    active: list = []
    for first, last, name in by_start:
        active = [entry for entry in active if entry[0] >= first]
        low = plan.buffers[name].offset
        high = low + spans[name][0]
        for _, other in active:
            other_low = plan.buffers[other].offset
            other_high = other_low + spans[other][0]
            if low < other_high and other_low < high:
                raise ActivationPlanError(
                    f"{where}: %{name} [{low}, {high}) live at nodes {first}..{last} overlaps %{other} "
                    f"[{other_low}, {other_high}) live at nodes {spans[other][1]}..{spans[other][2]}")
        active.append((last, name))


# ---------------------------------------------------------------------------------------------


def planning_env(function: Function, options: PassOptions) -> tuple:
    """(env, defaulted symbols): @step_decode plans one token for each of max_num_seqs sequences, others (@step,
    an uncompiled forward) one prompt of activation_seq_len tokens with the logits of its last."""
    if function.name == "step_decode":
        known = {"decode_tokens": options.max_num_seqs, "seqs": options.max_num_seqs}
    else:
        length = options.activation_seq_len or options.max_seq_len
        known = {"seq": length, "batch": 1, "tokens": length, "seqs": 1, "rows": 1}
    symbols = sorted({s for v in function.values() for s in v.type.symbols})
    defaulted = [s for s in symbols if s not in known]
    env = {s: known.get(s, 1) for s in symbols}
    return env, defaulted


@register_pass("plan_activation_memory")
def run(module: Module, options: PassOptions) -> bool:
    """Plans each entry function's activation arena (offsets with reuse) into metadata["activations"]; IR unchanged."""
    records = {}
    for name, function in module.functions.items():
        env, defaulted = planning_env(function, options)
        plan = plan_activation_memory(function, env)
        check_activation_plan(function, plan, env)
        record = plan.to_dict()
        if defaulted:
            record["defaulted_symbols"] = defaulted  # set to 1: nothing said how large they are
        records[name] = record
    module.metadata["activations"] = records
    return False
