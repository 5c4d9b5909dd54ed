"""Fuse rotary position embeddings: ``x * cos + rotate_half(x) * sin`` (cos/sin from positions * inv_freq) -> ``rope``.

GPT-J-style rotation of interleaved pairs (``rotate_every_two``, tables built with ``repeat_interleave``) fuses
into ``rope`` with ``interleaved``.

A partial rotary (``concat(rope(x[..., :d]), x[..., d:])``) becomes one ``rope`` with
``rotary_dim = d``. The positions the tables were built from become the op's
input, which is what lets KV-cache insertion feed real token positions.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Function, Module, Node, Value

from .manager import PassOptions, register_pass
from .patterns import operands, producer, scalar_value, skip

_VIEWS = ("cast", "reshape", "expand", "permute")


def _rotate_source(value: Value):
    """(x, interleaved) for rotate_half(x) = concat(neg(x[..., h:]), x[..., :h]) or GPT-J's rotate_every_two(x) =
    stack(neg(x[..., 1::2]), x[..., ::2], -1).flatten(-2); None otherwise."""
    x = _rotate_half_source(value)
    return (x, False) if x is not None else (_rotate_pairs_source(value), True)


def _rotate_pairs_source(value: Value):
    """reshape(concat(reshape(neg(x[..., 1::2])), reshape(x[..., ::2])) on a new last axis) -> x, or None."""
    merged = producer(value, "reshape")
    cat = merged and producer(merged.inputs[0], "concat")
    if cat is None or len(cat.inputs) != 2 or cat.attrs["axis"] != cat.output.type.rank - 1 or \
            cat.output.type.shape[-1] != 2:
        return None
    odd, even = (producer(v, "reshape") for v in cat.inputs)
    neg = odd and producer(odd.inputs[0], "neg")
    hi = neg and producer(neg.inputs[0], "slice")
    lo = even and producer(even.inputs[0], "slice")
    if not (hi and lo) or hi.inputs[0] is not lo.inputs[0]:
        return None
    x = lo.inputs[0]
    width, last = x.type.shape[-1], x.type.rank - 1
    if not isinstance(width, int) or width % 2 or value.type.shape != x.type.shape:
        return None
    ok = (hi.attrs["axis"] == last and hi.attrs["start"] == 1 and hi.attrs["step"] == 2 and
          lo.attrs["axis"] == last and lo.attrs["start"] == 0 and lo.attrs["step"] == 2 and
          hi.output.type.shape[-1] == width // 2 and lo.output.type.shape[-1] == width // 2)
    return x if ok else None


def _rotate_half_source(value: Value):
    """concat(neg(x[..., h:]), x[..., :h]) -> x, or None."""
    cat = producer(value, "concat")
    if cat is None or len(cat.inputs) != 2 or cat.attrs["axis"] != value.type.rank - 1:
        return None
    neg = producer(cat.inputs[0], "neg")
    hi = neg and producer(neg.inputs[0], "slice")
    lo = producer(cat.inputs[1], "slice")
    if not (hi and lo) or hi.inputs[0] is not lo.inputs[0]:
        return None
    x = lo.inputs[0]
    width = x.type.shape[-1]
    last = x.type.rank - 1
    if not isinstance(width, int) or width % 2:
        return None
    half = width // 2
    ok = (hi.attrs["axis"] == last and hi.attrs["start"] == half and hi.attrs["end"] == width and
          lo.attrs["axis"] == last and lo.attrs["start"] == 0 and lo.attrs["end"] == half and
          hi.attrs["step"] == 1 and lo.attrs["step"] == 1)
    return x if ok else None


def _positions_from(value: Value, seq):
    """Walk up views to an integer [P, seq] (or [seq]) tensor: the token positions."""
    while True:
        t = value.type
        if t.dtype in ("i64", "i32") and t.rank in (1, 2) and t.shape[-1] == seq:
            return value
        node = producer(value, *_VIEWS)
        if node is None:
            return None
        value = node.inputs[0]


def _repeated_pairs_source(value: Value):
    """repeat_interleave(f, 2, -1) = reshape(expand(reshape(f, [..., h, 1]), [..., h, 2]), [..., 2h]) -> f, or
    None."""
    merged = producer(value, "reshape")
    spread = merged and producer(merged.inputs[0], "expand")
    split = spread and producer(spread.inputs[0], "reshape")
    if split is None or spread.output.type.shape[-1] != 2 or split.output.type.shape[-1] != 1:
        return None
    half = value.type.shape[-1] // 2
    if split.output.type.shape != value.type.shape[:-1] + (half, 1) or value.type.shape[-1] % 2:
        return None
    return split.inputs[0]  # f, in whatever view of [..., half] it had before the unit axes


def _trace_table(value: Value, trig: str, seq, interleaved: bool = False):
    """cos/sin table -> (positions, inv_freq, scaling) or None; ``interleaved`` tables repeat each frequency for
    the two features of a pair (repeat_interleave) where rotate-half tables concatenate them."""
    table = skip(value, *_VIEWS)
    unviewed = skip(value, "cast")  # a looked-up table's repeat_interleave is made of views
    scaling = 1.0
    mul = producer(table, "mul")
    if mul is not None:
        pair = operands(mul, lambda v: scalar_value(v) is not None)
        if pair is None:
            return None
        scaling = float(scalar_value(pair[0]))
        table, unviewed = skip(pair[1], *_VIEWS), skip(pair[1], "cast")
    op = producer(table, trig)
    if op is None:
        return _looked_up_table(unviewed if interleaved else table, trig, seq, interleaved, scaling)
    if interleaved:
        source = _repeated_pairs_source(op.inputs[0])
    else:
        emb = producer(op.inputs[0], "concat")
        source = emb.inputs[0] if emb and len(emb.inputs) == 2 and emb.inputs[0] is emb.inputs[1] else None
    freqs = source and producer(source, "mul")
    if freqs is None:
        return None
    for a, b in (freqs.inputs, freqs.inputs[::-1]):
        inv = skip(b, *_VIEWS)
        if producer(inv, "weight") is None or inv.type.rank != 1:
            continue
        positions = _positions_from(a, seq)
        if positions is not None:
            return positions, inv, scaling
    return None


def _looked_up_table(table: Value, trig: str, seq, interleaved: bool, scaling: float):
    """GPT-J's tables: rows of a constant [max_positions, 2h] buffer of sin | cos (one half each) looked up by
    position, (repeat_interleave'd) -> (positions, inv_freq, scaling) or None. The frequencies are read off the
    buffer and every row checked against sin/cos of position * frequency, so the fused rope computes the buffer."""
    if interleaved:
        table = _repeated_pairs_source(table)
        if table is None:
            return None
    part = producer(skip(table, *_VIEWS), "slice")
    lookup = part and producer(part.inputs[0], "index")
    buffer = lookup and producer(lookup.inputs[0], "weight")
    if buffer is None or len(lookup.inputs) != 2 or lookup.attrs.get("axis", 0) != 0 or \
            buffer.output.type.rank != 2 or part.attrs["axis"] != part.output.type.rank - 1 or part.attrs["step"] != 1:
        return None
    width = buffer.output.type.shape[1]
    half = part.attrs["end"] - part.attrs["start"]
    if width != 2 * half or part.attrs["start"] not in (0, half):
        return None
    positions = _positions_from(lookup.inputs[1], seq)
    if positions is None:
        return None
    mine = (part.attrs["start"], part.attrs["end"])
    other = (half, width) if mine[0] == 0 else (0, half)
    sin_cols, cos_cols = (mine, other) if trig == "sin" else (other, mine)
    fn = table.function
    name = f"{buffer.attrs['name']}.inv_freq.{sin_cols[0]}"
    module = fn.module
    if name not in module.weights:
        data = np.asarray(module.weight_data[buffer.attrs["name"]], np.float64)
        inv_freq = _sinusoid_frequencies(data[:, slice(*sin_cols)], data[:, slice(*cos_cols)])
        if inv_freq is None:
            return None
        module.add_weight(name, inv_freq)
    cached = fn.__dict__.setdefault("_rope_frequency_values", {})
    if name not in cached:
        cached[name] = fn.emit("weight", name=name, insert_before=fn.nodes[0])
    return positions, cached[name], scaling


def _sinusoid_frequencies(sines: np.ndarray, cosines: np.ndarray):
    """f32 inv_freq [h] with sines[p] = sin(p * inv_freq) and cosines[p] = cos(p * inv_freq) for every row p
    (within float32 rounding of the angle), or None. Read off row 1, then refined on later rows (unwrapping
    their angles), so the frequency is known to a fraction of a float32 step."""
    rows = sines.shape[0]
    if rows < 2 or not (np.all(np.isfinite(sines)) and np.all(np.isfinite(cosines))):
        return None
    inv = np.arctan2(sines[1], cosines[1])
    for p in (8, 64, 512, rows - 1):
        if p < rows:
            angle = np.arctan2(sines[p], cosines[p])
            turns = np.round((p * inv - angle) / (2 * np.pi))
            inv = (angle + 2 * np.pi * turns) / p
    inv32 = inv.astype(np.float32)
    angles = np.arange(rows, dtype=np.float32)[:, None] * inv32[None, :]
    # an angle of size a is rounded to float32 by up to a * 2^-24: the tables agree to that
    tolerance = 1e-6 + np.abs(angles).astype(np.float64) * 2.0 ** -23
    if np.any(np.abs(np.sin(angles) - sines) > tolerance) or np.any(np.abs(np.cos(angles) - cosines) > tolerance):
        return None
    return inv32


def _seq_axis(x: Value, table: Value):
    if table.type.rank != 4:
        return None
    for axis in (2, 1):
        if table.type.shape[axis] == x.type.shape[axis] and table.type.shape[3 - axis] == 1:
            return axis
    return None


def _fuse_rotary(fn: Function, node: Node) -> bool:
    a, b = node.inputs
    for first, second in ((a, b), (b, a)):
        m_cos, m_sin = producer(first, "mul"), producer(second, "mul")
        if not (m_cos and m_sin):
            continue
        for x, cos_b in (m_cos.inputs, m_cos.inputs[::-1]):
            for rot, sin_b in (m_sin.inputs, m_sin.inputs[::-1]):
                source, interleaved = _rotate_source(rot)
                if source is not x or x.type.rank != 4:
                    continue
                axis = _seq_axis(x, cos_b)
                if axis is None or _seq_axis(x, sin_b) != axis:
                    continue
                seq = x.type.shape[axis]
                cos_info = _trace_table(cos_b, "cos", seq, interleaved)
                sin_info = _trace_table(sin_b, "sin", seq, interleaved)
                if cos_info is None or sin_info is None or cos_info[0] is not sin_info[0] or \
                        cos_info[1] is not sin_info[1] or cos_info[2] != sin_info[2]:
                    continue
                positions, inv_freq, scaling = cos_info
                if inv_freq.type.shape[0] * 2 != x.type.shape[-1]:
                    continue
                if positions.type.rank == 1:
                    positions = fn.emit("reshape", positions, shape=(1, seq), insert_before=node)
                if positions.type.shape[0] not in (1, x.type.shape[0]):
                    continue
                if positions.type.dtype != "i64":
                    positions = fn.emit("cast", positions, dtype="i64", insert_before=node)
                inv = inv_freq if inv_freq.type.dtype == "f32" else fn.emit("cast", inv_freq, dtype="f32",
                                                                               insert_before=node)
                rope = fn.add_node("rope", [x, positions, inv], {"rotary_dim": x.type.shape[-1],
                                                                  "seq_axis": axis, "scaling": scaling,
                                                                  "interleaved": interleaved},
                                   before=node, name="rope", meta=node.meta)
                fn.replace_all_uses(node.output, rope.output)
                return True
    return False


def _fuse_partial(fn: Function, node: Node) -> bool:
    """concat(rope(x[..., :d]), x[..., d:]) -> rope(x) with rotary_dim d."""
    if len(node.inputs) != 2 or node.attrs["axis"] != node.output.type.rank - 1:
        return False
    rope = producer(node.inputs[0], "rope")
    rest = producer(node.inputs[1], "slice")
    head = rope and producer(rope.inputs[0], "slice")
    if not (rope and rest and head) or head.inputs[0] is not rest.inputs[0]:
        return False
    x = head.inputs[0]
    d = rope.attrs["rotary_dim"]
    last = x.type.rank - 1
    if not (head.attrs["axis"] == last and head.attrs["start"] == 0 and head.attrs["end"] == d and
            rest.attrs["axis"] == last and rest.attrs["start"] == d and rest.attrs["end"] == x.type.shape[-1]
            and head.attrs["step"] == 1 and rest.attrs["step"] == 1):
        return False
    fused = fn.add_node("rope", [x, rope.inputs[1], rope.inputs[2]], dict(rope.attrs), before=node,
                        name="rope", meta=node.meta)
    fn.replace_all_uses(node.output, fused.output)
    return True


@register_pass("fuse_rope")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites x*cos + rotate_half(x)*sin (tables from positions * inv_freq) into rope(x, positions, inv_freq)."""
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op == "add":
                changed |= _fuse_rotary(fn, node)
        for node in list(fn.nodes):
            if node.op == "concat":
                changed |= _fuse_partial(fn, node)
    return changed
