"""Fuse rotary position embeddings: ``x * cos + rotate_half(x) * sin`` (cos/sin from positions * inv_freq) -> ``rope``.

A partial rotary (``concat(rope(x[..., :d]), x[..., d:])``) becomes one ``rope`` with
``rotary_dim = d``. The positions the tables were built from become the op's
input, which is what lets KV-cache insertion feed real token positions.
"""

from __future__ import annotations

from kiln.ir.graph import Function, Module, Node, Value

from .manager import PassOptions, register_pass
from .patterns import operands, producer, scalar_value, skip

_VIEWS = ("cast", "reshape", "expand", "permute")


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


def _trace_table(value: Value, trig: str, seq):
    """cos/sin table -> (positions, inv_freq, scaling) or None."""
    table = skip(value, *_VIEWS)
    scaling = 1.0
    mul = producer(table, "mul")
    if mul is not None:
        pair = operands(mul, lambda v: scalar_value(v) is not None)
        if pair is None:
            return None
        scaling = float(scalar_value(pair[0]))
        table = skip(pair[1], *_VIEWS)
    op = producer(table, trig)
    emb = op and producer(op.inputs[0], "concat")
    if emb is None or len(emb.inputs) != 2 or emb.inputs[0] is not emb.inputs[1]:
        return None
    freqs = producer(emb.inputs[0], "mul")
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
                if _rotate_half_source(rot) is not x or x.type.rank != 4:
                    continue
                axis = _seq_axis(x, cos_b)
                if axis is None or _seq_axis(x, sin_b) != axis:
                    continue
                seq = x.type.shape[axis]
                cos_info, sin_info = _trace_table(cos_b, "cos", seq), _trace_table(sin_b, "sin", seq)
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
                                                                  "seq_axis": axis, "scaling": scaling},
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
