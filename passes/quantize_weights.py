"""Quantize weights: ``linear(x, W)`` and ``gated_mlp(x, Wg, Wu, Wd)`` -> ``linear_q`` over int8 / int4 weights.

Round-to-nearest, weight-only; the fp32 weights nothing reads any more leave the module. Options (PassOptions.extra):
``quantize`` (None, "int8", "int4", "int4-g128"), ``quantize_zero_points``, ``quantize_output`` (the logits projection).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Function, Module, Node, Value
from kiln.ir.quant_ops import pack_int4
from kiln.ir.types import is_float

from .manager import PassOptions, register_pass
from .patterns import weight_name

# mode -> (bits, group_size); group_size 0 is one scale per output channel.
MODES = {"int8": (8, 0), "int4": (4, 32), "int4-g128": (4, 128)}
# Ops a value may pass through on its way to being returned and still be "the logits".
_PASS_THROUGH = ("reshape", "slice", "cast", "permute", "index")
_ACTIVATION_OPS = {"silu": ("silu", {}), "gelu": ("gelu", {"approximate": "none"}),
                   "gelu_tanh": ("gelu", {"approximate": "tanh"})}


def quantize_int8(weight: np.ndarray) -> tuple:
    """w[N, K] -> (q i8[N, K], scale f32[N]) with w ~ q * scale, |q| <= 127."""
    w = weight.astype(np.float32)
    scale = (np.max(np.abs(w), axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row: any scale reproduces it
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_int4(weight: np.ndarray, group_size: int, zero_points: bool = False) -> tuple:
    """w[N, K] -> (q u32[N, K / 8], scale f32[N, G], zero f32[N, G] or None), G = K / group_size.

    Symmetric: scale = max|w| / 7, nibble = clip(rint(w / scale), -8, 7) + 8.
    Zero points: the group's [min, max] split into 15 steps, scale = (max - min) / 15,
    nibble = rint((w - min) / scale), zero = -min / scale kept in float (not rounded), so
    (nibble - zero) * scale reproduces min and max (to float rounding) and a weight on a 16-level
    grid per group (a GGUF Q4_1 source) comes back unchanged.
    """
    rows, k = weight.shape
    w = weight.astype(np.float32).reshape(rows, k // group_size, group_size)
    if zero_points:
        low, high = w.min(axis=2), w.max(axis=2)
        scale = ((high - low) / np.float32(15)).astype(np.float32)
        scale[scale == 0] = 1.0
        zero = (-low / scale).astype(np.float32)
        nibbles = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 15)
    else:
        scale = (np.max(np.abs(w), axis=2) / np.float32(7)).astype(np.float32)
        scale[scale == 0] = 1.0
        zero = None
        nibbles = np.clip(np.rint(w / scale[..., None]), -8, 7) + 8
    return pack_int4(nibbles.reshape(rows, k).astype(np.uint8)), scale, zero


class _Quantizer:
    """Quantizes each fp32 weight once and emits the weight nodes a linear_q reads."""

    def __init__(self, module: Module, bits: int, group_size: int, zero_points: bool):
        self.module, self.bits, self.group_size, self.zero_points = module, bits, group_size, zero_points
        self.layers = 0
        self.kept = set()  # weights left in fp32 because they do not fit the format
        self.replaced = set()

    def fits(self, weight: Value) -> bool:
        name = weight_name(weight)
        t = weight.type
        ok = (name is not None and name in self.module.weight_data and t.rank == 2 and is_float(t.dtype)
              and t.is_static and (self.bits == 8 or t.shape[1] % max(self.group_size, 8) == 0))
        if not ok and name is not None:
            self.kept.add(name)
        return ok

    def _tensors(self, name: str) -> list:
        suffixes = ["qweight", "scales"] + (["zeros"] if self.bits == 4 and self.zero_points else [])
        names = [f"{name}.{s}" for s in suffixes]
        if names[0] not in self.module.weights:
            data = self.module.weight_data[name]
            if self.bits == 8:
                arrays = quantize_int8(data)
            else:
                arrays = quantize_int4(data, self.group_size, self.zero_points)[:len(names)]
            for tensor_name, array in zip(names, arrays):
                self.module.add_weight(tensor_name, np.ascontiguousarray(array))
        return names

    def dense(self, fn: Function, x: Value, weight: Value, before: Node, meta) -> Value:
        """x @ weight.T as linear_q when the weight fits the format, else as the plain linear."""
        if not self.fits(weight):
            return fn.add_node("linear", [x, weight], {}, before=before, meta=meta).output
        name = weight_name(weight)
        self.replaced.add(name)
        self.layers += 1
        inputs = [x] + [fn.emit("weight", name=n, insert_before=before) for n in self._tensors(name)]
        attrs = {"bits": self.bits, "group_size": self.group_size}
        return fn.add_node("linear_q", inputs, attrs, before=before, name="linear_q", meta=meta).output


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
    if not quantizer.fits(weight):
        return False
    y = quantizer.dense(fn, x, weight, node, node.meta)
    if len(node.inputs) == 3:
        y = fn.emit("add", y, node.inputs[2], insert_before=node)
    fn.replace_all_uses(node.output, y)
    fn.erase(node)
    return True


def _rewrite_gated_mlp(quantizer: _Quantizer, fn: Function, node: Node) -> bool:
    x, w_gate, w_up, w_down = node.inputs
    if not any([quantizer.fits(w) for w in (w_gate, w_up, w_down)]):
        return False
    gate = quantizer.dense(fn, x, w_gate, node, node.meta)
    up = quantizer.dense(fn, x, w_up, node, node.meta)
    op, attrs = _ACTIVATION_OPS[node.attrs["activation"]]
    hidden = fn.emit("mul", fn.emit(op, gate, insert_before=node, **attrs), up, insert_before=node)
    fn.replace_all_uses(node.output, quantizer.dense(fn, hidden, w_down, node, node.meta))
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
    """Rewrites linear and gated_mlp over fp32 weights into linear_q over int8 / int4 weights (when asked)."""
    mode = options.extra.get("quantize")
    if mode in (None, "none"):
        return False
    if mode not in MODES:
        raise ConfigError(f"expected quantize to be one of none, {', '.join(MODES)}, found {mode!r}")
    bits, group_size = MODES[mode]
    zero_points = bool(options.extra.get("quantize_zero_points", False))
    if zero_points and bits == 8:
        raise ConfigError("expected quantize_zero_points only with int4 modes, found it with int8; "
                          "int8 is symmetric per output channel")
    quantize_output = bool(options.extra.get("quantize_output", False))
    quantizer = _Quantizer(module, bits, group_size, zero_points)
    changed = False
    for fn in module.functions.values():
        for node in list(fn.nodes):
            if node.op == "linear" and (quantize_output or not _is_output_projection(fn, node)):
                changed |= _rewrite_linear(quantizer, fn, node)
            elif node.op == "gated_mlp":
                changed |= _rewrite_gated_mlp(quantizer, fn, node)
    _drop_unused_weights(module, quantizer.replaced)
    if changed:
        module.metadata["quantization"] = {
            "mode": mode, "bits": bits, "group_size": group_size, "zero_points": zero_points,
            "quantize_output": quantize_output, "quantized_layers": quantizer.layers,
            "fp32_weights_kept": sorted(quantizer.kept - quantizer.replaced)}
    return changed
