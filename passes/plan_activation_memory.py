"""Plan activation memory: every intermediate tensor of an entry function gets a byte range in one arena.

Liveness over node order at concrete symbol values, then greedy-by-size placement with best-fit
offsets (TFLite's and ExecuTorch's planner), so tensors whose lifetimes do not overlap share bytes.
:func:`check_activation_plan` re-derives lifetimes on its own and proves no two live tensors overlap.
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
IN_PLACE_OUTPUTS = {("paged_attention", 1): 3}


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


def _place(lifetimes: dict, alignment: int) -> dict:
    """Greedy by size, best fit: largest first, each into the smallest gap among the buffers live with it."""
    order = sorted(lifetimes, key=lambda n: (-lifetimes[n][0], lifetimes[n][1], n))
    count = len(order)
    firsts = np.empty(count, dtype=np.int64)
    lasts = np.empty(count, dtype=np.int64)
    starts = np.empty(count, dtype=np.int64)
    stops = np.empty(count, dtype=np.int64)
    placed = 0
    buffers = {}
    for name in order:
        size, first, last = lifetimes[name]
        need = _align(size, alignment)
        offset = 0
        if need:
            live = (firsts[:placed] <= last) & (lasts[:placed] >= first)
            ranges = sorted(zip(starts[:placed][live].tolist(), stops[:placed][live].tolist()))
            best_gap, cursor = None, 0
            for start, stop in ranges:
                gap = start - cursor
                if gap >= need and (best_gap is None or gap < best_gap):
                    best_gap, offset = gap, cursor
                cursor = max(cursor, stop)
            if best_gap is None:
                offset = cursor
            # Zero-size buffers never conflict, so only sized ones join the search arrays.
            firsts[placed], lasts[placed], starts[placed], stops[placed] = first, last, offset, offset + need
            placed += 1
        buffers[name] = Buffer(offset, size, first, last)
    return buffers


def plan_activation_memory(function: Function, env: dict, alignment: int = ALIGNMENT) -> ActivationPlan:
    """Plan the activation arena of ``function`` with every symbol set from ``env``."""
    missing = sorted({s for v in function.values() for s in v.type.symbols} - set(env))
    if missing:
        raise ConfigError(f"activation planning of @{function.name} needs a value for symbol(s) "
                          f"{', '.join(missing)}; found only {sorted(env)}; pass them in env")
    lifetimes = _lifetimes(function, env)
    buffers = _place(lifetimes, alignment)
    peak = max((b.offset + _align(b.size, alignment) for b in buffers.values()), default=0)
    naive = sum(_align(b.size, alignment) for b in buffers.values())
    live_bytes = np.zeros(len(function.nodes) + 2, dtype=np.int64)
    for b in buffers.values():
        live_bytes[b.first] += _align(b.size, alignment)
        live_bytes[b.last + 1] -= _align(b.size, alignment)
    lower = int(np.cumsum(live_bytes).max()) if buffers else 0
    return ActivationPlan(buffers, int(peak), int(naive), lower, dict(env), alignment)


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
                size = int(np.prod(value.type.concrete(env), dtype=np.int64)) * numpy_dtype(value.type.dtype).itemsize
                spans[value.name] = [size, i, i]
            holder = owner[value.name]
            if holder is not None:
                spans[holder][2] = max(spans[holder][2], last_read.get(value.name, i))
    return spans


def check_activation_plan(function: Function, plan: ActivationPlan, env: dict) -> None:
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
        if buf.offset < 0 or buf.offset % plan.alignment:
            raise ActivationPlanError(f"{where}: %{name} at offset {buf.offset} is not a non-negative "
                                      f"multiple of {plan.alignment}")
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
    """(env, defaulted symbols): decode plans one token for max_num_seqs sequences, others one long prompt."""
    if function.name == "decode":
        known = {"seq": 1, "batch": options.max_num_seqs}
    else:
        known = {"seq": options.activation_seq_len or options.max_seq_len, "batch": 1}
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
