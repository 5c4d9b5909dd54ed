"""Quantize weights: ``linear``, ``gated_mlp``, ``embedding`` and ``moe_experts`` over fp32 weights -> ``linear_q`` /
``embedding_q`` / ``moe_experts_q``.

Round-to-nearest, weight-only; the fp32 weights nothing reads any more leave the module. A stack of experts'
weights [E, N, K] is quantized row by row as a linear's [E * N, K] would be (every format is per row), so each
expert's blocks are what its own linear_q would hold; a stack whose K fits no int4 group stays float.
Options (PassOptions.extra):

- ``quantize``: None / "none", "int8" (per output channel), "int4" (groups of 32), "int4-g128"
  (groups of 128, or the largest of 64 / 32 that divides a row whose length 128 does not), or "gguf": the blocks a GGUF file holds, as they are (``prequantized``, from the frontend).
- ``quantize_zero_points`` (int4, default True): a per-group offset (the group's minimum) beside the
  scale, as GGUF Q4_1 does; False gives symmetric groups, (nibble - 8) * scale, as Q4_0 does.
- ``quantize_embedding`` (int8 / int4 modes, default True): the embedding table and the logits
  projection as int8 per row (the format llama.cpp's Q4 files keep for token_embd); False keeps fp32.
- ``prequantized``: {weight name: QuantizedWeight} for "gguf" (an expert stack's arrays with a leading E axis).

int4 scales and offsets are stored in f16 (as GGUF blocks are), the nibbles computed against the
rounded values, so the kernels reproduce exactly what the quantizer chose.
"""

from __future__ import annotations

import re

import numpy as np

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Function, Module, Node, Value
from kiln.ir.moe_ops import QUANTIZED_WEIGHTS
from kiln.ir.quant_mlp_ops import ACTIVATION_OPS
from kiln.ir.quant_ops import QuantizedWeight, pack_int4
from kiln.ir.types import is_float

from .manager import PassOptions, register_pass
from .patterns import weight_name

# mode -> (bits, group_size); group_size 0 is one scale per output channel.
MODES = {"int8": (8, 0), "int4": (4, 32), "int4-g128": (4, 128)}
GGUF = "gguf"
# Ops a value may pass through on its way to being returned and still be "the logits".
_PASS_THROUGH = ("reshape", "slice", "cast", "permute", "index")


def quantize_int8(weight: np.ndarray) -> QuantizedWeight:
    """w[N, K] -> q i8[N, K], scale f32[N] with w ~ q * scale, |q| <= 127."""
    w = weight.astype(np.float32)
    scale = (np.max(np.abs(w), axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row: any scale reproduces it
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return QuantizedWeight(8, 0, q, scale)


def _compact(values: np.ndarray) -> np.ndarray:
    """f16 when every value survives the conversion finite (and non-zero ones stay non-zero), else f32."""
    half = values.astype(np.float16)
    if np.all(np.isfinite(half)) and not np.any((half == 0) & (values != 0)):
        return half
    return values.astype(np.float32)


def quantize_int4(weight: np.ndarray, group_size: int, zero_points: bool = True) -> QuantizedWeight:
    """w[N, K] -> q u32[N, K / 8], scale [N, G] (+ offset [N, G]), G = K / group_size; f16 scales.

    With offsets: the group's [min, max] in 15 steps, offset = min, nibble = rint((w - offset) / scale)
    in [0, 15], w ~ nibble * scale + offset. Symmetric: scale = max|w| / 7, nibble = rint(w / scale) + 8
    in [0, 15], w ~ (nibble - 8) * scale. scale/offset are rounded to f16 first and the nibbles computed
    from the rounded values.
    """
    rows, k = weight.shape
    w = weight.astype(np.float32).reshape(rows, k // group_size, group_size)
    if zero_points:
        low, high = w.min(axis=2), w.max(axis=2)
        offset = _compact(low)
        scale = (high - offset.astype(np.float32)) / np.float32(15)
    else:
        offset = None
        scale = np.max(np.abs(w), axis=2) / np.float32(7)
    scale[scale == 0] = 1.0  # a constant group: any scale reproduces it
    scale = _compact(scale)
    if offset is not None and scale.dtype != offset.dtype:  # one dtype for both
        scale, offset = scale.astype(np.float32), offset.astype(np.float32)
    s = scale.astype(np.float32)[..., None]
    if offset is not None:
        nibbles = np.clip(np.rint((w - offset.astype(np.float32)[..., None]) / s), 0, 15)
    else:
        nibbles = np.clip(np.rint(w / s), -8, 7) + 8
    return QuantizedWeight(4, group_size, pack_int4(nibbles.reshape(rows, k).astype(np.uint8)), scale, offset)


def fitting_group(k: int, group_size: int) -> int | None:
    """The group size for a row of K: ``group_size`` when it divides K, else the largest power-of-two
    fraction of it (down to 32) that does (SmolLM2's K = 576 takes groups of 64 under int4-g128);
    None when not even 32 divides K."""
    while group_size >= 32:
        if k % group_size == 0:
            return group_size
        group_size //= 2
    return None


# fuse_gated_mlp's name for rows start:end of a weight (a fused gate_up projection cut in two, as Phi-3's).
_ROW_SLICE = re.compile(r"(.+)\[(\d+):(\d+)\]")


def _prequantized_rows(prequantized: dict, name: str) -> QuantizedWeight | None:
    """The file's blocks for weight ``name``, or the rows of them a row-slice name selects (rows are
    independent in every format)."""
    if name in prequantized:
        return prequantized[name]
    match = _ROW_SLICE.fullmatch(name)
    whole = prequantized.get(match.group(1)) if match else None
    if whole is None:
        return None
    rows = slice(int(match.group(2)), int(match.group(3)))
    return QuantizedWeight(whole.bits, whole.group_size, whole.q[rows], whole.scale[rows],
                           None if whole.offset is None else whole.offset[rows])


def _per_expert(rows: QuantizedWeight, experts: int) -> QuantizedWeight:
    """A weight quantized as [E * N, K] rows -> the same arrays with a leading experts axis."""
    def split(a):
        return None if a is None else a.reshape((experts, a.shape[0] // experts) + a.shape[1:])

    return QuantizedWeight(rows.bits, rows.group_size, split(rows.q), split(rows.scale), split(rows.offset))


class _Quantizer:
    """Decides each weight's format once, quantizes it once and emits the weight nodes that read it."""

    def __init__(self, module: Module, mode: str, zero_points: bool, quantize_embedding: bool,
                 prequantized: dict | None):
        self.module, self.mode = module, mode
        self.zero_points, self.quantize_embedding = zero_points, quantize_embedding
        self.prequantized = prequantized or {}
        self.layers = 0
        self.kept = set()  # weights left in fp32
        self.replaced = set()
        self.formats = {}  # name -> (bits, group_size, has_offset)

    def _quantize(self, name: str, role: str) -> QuantizedWeight | None:
        data = self.module.weight_data.get(name)
        t = self.module.weights.get(name)
        if data is None or t is None or t.rank not in (2, 3) or not is_float(t.dtype) or not t.is_static:
            return None
        if self.mode == GGUF:
            return _prequantized_rows(self.prequantized, name)
        if t.rank == 3:  # an experts stack: quantized as the [E * N, K] rows it is
            rows = self._quantize_rows(data.reshape(-1, t.shape[2]), t.shape[2], role)
            return None if rows is None else _per_expert(rows, t.shape[0])
        return self._quantize_rows(data, t.shape[1], role)

    def _quantize_rows(self, data: np.ndarray, k: int, role: str) -> QuantizedWeight | None:
        if role in ("embedding", "output"):
            return quantize_int8(data) if self.quantize_embedding else None
        bits, group_size = MODES[self.mode]
        if bits == 8:
            return quantize_int8(data)
        group_size = fitting_group(k, group_size)
        if group_size is None:
            return None
        return quantize_int4(data, group_size, self.zero_points)

    def tensors(self, weight: Value, role: str) -> tuple | None:
        """(names of the q/scale[/offset] weights, attrs) for ``weight``, or None to keep it in fp32."""
        name = weight_name(weight)
        if name is None:
            return None
        names = [f"{name}.{s}" for s in ("qweight", "scales", "offsets")]
        if name not in self.formats:
            quantized = self._quantize(name, role)
            if quantized is None:
                self.formats[name] = None
                self.kept.add(name)
            else:
                for tensor_name, array in zip(names, quantized.arrays()):
                    self.module.add_weight(tensor_name, np.ascontiguousarray(array))
                self.formats[name] = (quantized.bits, quantized.group_size, quantized.offset is not None)
        fmt = self.formats[name]
        if fmt is None:
            return None
        self.replaced.add(name)
        bits, group_size, has_offset = fmt
        return names[:3 if has_offset else 2], {"bits": bits, "group_size": group_size}

    def emit(self, fn: Function, op: str, first: Value, weight: Value, role: str, before: Node, meta) -> Value | None:
        found = self.tensors(weight, role)
        if found is None:
            return None
        names, attrs = found
        self.layers += 1
        inputs = [first] + [fn.emit("weight", name=n, insert_before=before) for n in names]
        return fn.add_node(op, inputs, attrs, before=before, name=op, meta=meta).output

    def dense(self, fn: Function, x: Value, weight: Value, before: Node, meta) -> Value:
        """x @ weight.T as linear_q when the weight has a quantized form, else as the plain linear."""
        y = self.emit(fn, "linear_q", x, weight, "linear", before, meta)
        return y if y is not None else fn.add_node("linear", [x, weight], {}, before=before, meta=meta).output


def _is_output_projection(fn: Function, node: Node) -> bool:
    """The logits projection: its result is returned (through views), or its weight is the embedding table."""
    weight = node.inputs[1]
    if any(user.op == "embedding" for user in weight.users):
        return True
    value = node.output
    while not fn.is_result(value):
        users = value.users
        if len(users) != 1 or users[0].op not in _PASS_THROUGH:
            return False
        value = users[0].outputs[0]
    return True


def _rewrite_linear(quantizer: _Quantizer, fn: Function, node: Node) -> bool:
    x, weight = node.inputs[0], node.inputs[1]
    role = "output" if _is_output_projection(fn, node) else "linear"
    y = quantizer.emit(fn, "linear_q", x, weight, role, node, node.meta)
    if y is None:
        return False
    if len(node.inputs) == 3:
        y = fn.emit("add", y, node.inputs[2], insert_before=node)
    fn.replace_all_uses(node.output, y)
    fn.erase(node)
    return True


def _rewrite_embedding(quantizer: _Quantizer, fn: Function, node: Node) -> bool:
    table, ids = node.inputs
    y = quantizer.emit(fn, "embedding_q", ids, table, "embedding", node, node.meta)
    if y is None:
        return False
    if node.output.type.dtype != "f32":
        y = fn.emit("cast", y, dtype=node.output.type.dtype, insert_before=node)
    fn.replace_all_uses(node.output, y)
    fn.erase(node)
    return True


def _rewrite_gated_mlp(quantizer: _Quantizer, fn: Function, node: Node) -> bool:
    x, w_gate, w_up, w_down = node.inputs
    if all(quantizer.tensors(w, "linear") is None for w in (w_gate, w_up, w_down)):
        return False
    gate = quantizer.dense(fn, x, w_gate, node, node.meta)
    up = quantizer.dense(fn, x, w_up, node, node.meta)
    op, attrs = ACTIVATION_OPS[node.attrs["activation"]]
    hidden = fn.emit("mul", fn.emit(op, gate, insert_before=node, **attrs), up, insert_before=node)
    fn.replace_all_uses(node.output, quantizer.dense(fn, hidden, w_down, node, node.meta))
    fn.erase(node)
    return True


def _rewrite_moe_experts(quantizer: _Quantizer, fn: Function, node: Node) -> bool:
    """moe_experts -> moe_experts_q with each stack that has a quantized form in it (a stack without one stays
    float: <w>_bits 0)."""
    x, weights, ids, w_gate_up, w_down = node.inputs
    found = [quantizer.tensors(w, "linear") for w in (w_gate_up, w_down)]
    if all(f is None for f in found):
        return False
    inputs, attrs = [x, weights, ids], {"activation": node.attrs["activation"]}
    for name, weight, quantized in zip(QUANTIZED_WEIGHTS, (w_gate_up, w_down), found):
        if quantized is None:
            inputs.append(weight)
            attrs[f"{name}_bits"] = 0
            continue
        names, format_attrs = quantized
        inputs += [fn.emit("weight", name=n, insert_before=node) for n in names]
        attrs.update({f"{name}_bits": format_attrs["bits"], f"{name}_group_size": format_attrs["group_size"],
                      f"{name}_offset": len(names) == 3})
    quantizer.layers += 1
    y = fn.add_node("moe_experts_q", inputs, attrs, before=node, name="moe_experts_q", meta=node.meta).output
    fn.replace_all_uses(node.output, y)
    fn.erase(node)
    return True


def _drop_unused_weights(module: Module, names: set) -> None:
    for fn in module.functions.values():
        for node in reversed(list(fn.nodes)):
            if node.op == "weight" and node.attrs["name"] in names and not node.output.uses \
                    and not fn.is_result(node.output):
                fn.erase(node)
    referenced = set(module.weight_uses())
    for name in sorted(names - referenced):
        module.remove_weight(name)


@register_pass("quantize_weights")
def run(module: Module, options: PassOptions) -> bool:
    """Rewrites linear / gated_mlp / embedding / moe_experts over fp32 weights into linear_q / embedding_q /
    moe_experts_q (when asked)."""
    mode = options.extra.get("quantize")
    if mode in (None, "none"):
        return False
    if mode not in MODES and mode != GGUF:
        raise ConfigError(f"expected quantize to be one of none, {', '.join(MODES)}, {GGUF}, found {mode!r}")
    prequantized = options.extra.get("prequantized")
    if mode == GGUF and not prequantized:
        raise ConfigError("quantize='gguf' keeps a GGUF file's quantized blocks, but this model did not come "
                          "from a quantized GGUF file; use none, int8, int4 or int4-g128")
    zero_points = bool(options.extra.get("quantize_zero_points", True))
    quantize_embedding = bool(options.extra.get("quantize_embedding", True))
    quantizer = _Quantizer(module, mode, zero_points, quantize_embedding, prequantized)
    before = module.parameter_bytes()
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op == "linear":
                changed |= _rewrite_linear(quantizer, fn, node)
            elif node.op == "gated_mlp":
                changed |= _rewrite_gated_mlp(quantizer, fn, node)
            elif node.op == "embedding":
                changed |= _rewrite_embedding(quantizer, fn, node)
            elif node.op == "moe_experts":
                changed |= _rewrite_moe_experts(quantizer, fn, node)
    _drop_unused_weights(module, quantizer.replaced)
    if changed:
        formats = {}
        for name, fmt in quantizer.formats.items():
            if fmt is not None:
                key = f"int{fmt[0]}" + (f"-g{fmt[1]}" if fmt[1] else "-per-row") + ("+offset" if fmt[2] else "")
                formats[key] = formats.get(key, 0) + 1
        module.metadata["quantization"] = {
            "mode": mode, "zero_points": zero_points, "quantize_embedding": quantize_embedding,
            "quantized_ops": quantizer.layers, "weight_formats": formats,
            "weight_bytes_before": before, "weight_bytes_after": module.parameter_bytes(),
            "fp32_weights_kept": sorted(quantizer.kept - quantizer.replaced)}
    return changed
