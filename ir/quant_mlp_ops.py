"""``gated_mlp_q``: a gated MLP whose weights are quantized, kept as one op.

``gated_mlp`` is one op over float weights; quantizing its weights used to leave three ``linear_q`` and the
activation between them (``quantize_weights`` splits it, ``merge_sibling_linears`` joins gate and up again),
so a quantized model showed no MLP at all. ``gated_mlp_q`` is that subgraph named as one op again:

    [g, u] = linear_q(x, gate_up)          gate_up: the [2I, K] weight, gate rows then up rows
    y      = linear_q(act(g) * u, down)    down: the [H, I] weight

Each weight is ``linear_q``'s ``(q, scale[, offset])`` described by four attributes, ``<w>_bits``,
``<w>_group_size``, ``<w>_offset`` and ``<w>_activations`` for ``w`` in ``gate_up`` / ``down`` (the two
matmuls may differ: the down projection's K is I, which int8 activations may not fit). The reference is the
subgraph's own references in order, so the op means exactly what the three ``linear_q`` meant.

Backends without a kernel of their own for it lower the subgraph (:func:`decompose`): today the TVM CPU
pipeline runs its pieces inside one thread-pool launch anyway (``backends/tvm/launch_fusion.py``).
"""

from __future__ import annotations

from .ops import REQUIRED, complete_attrs, define_op, fail, get_op
from .quant_ops import ACTIVATIONS, check_quantized, int8_activations_fit
from .types import TensorType, is_float

WEIGHTS = ("gate_up", "down")
# Ops the TVM and ONNX Runtime lowerings rewrite into their subgraphs (decompose) before lowering.
DECOMPOSED_OPS = ("gated_mlp_q",)
# gated_mlp's activation -> the elementwise op (and its attributes) applied to the gate
ACTIVATION_OPS = {"silu": ("silu", {}), "gelu": ("gelu", {"approximate": "none"}),
                  "gelu_tanh": ("gelu", {"approximate": "tanh"})}


def weight_inputs(attrs, name: str) -> int:
    """How many inputs weight ``name`` of a gated_mlp_q takes: q, scale and, with ``<name>_offset``, offset."""
    return 3 if attrs[f"{name}_offset"] else 2


def split_inputs(inputs, attrs) -> tuple:
    """(x, gate_up's inputs, down's inputs) of a gated_mlp_q's inputs."""
    count = weight_inputs(attrs, "gate_up")
    return inputs[0], list(inputs[1:1 + count]), list(inputs[1 + count:])


def linear_attrs(attrs, name: str) -> dict:
    """The attributes of the ``linear_q`` that weight ``name`` stands for."""
    return {"bits": attrs[f"{name}_bits"], "group_size": attrs[f"{name}_group_size"],
            "activations": attrs[f"{name}_activations"]}


def _infer(types, attrs, module):
    if attrs["activation"] not in ACTIVATION_OPS:
        raise fail("gated_mlp_q", f"activation must be one of {', '.join(ACTIVATION_OPS)}, "
                                  f"found {attrs['activation']!r}")
    for name in WEIGHTS:
        if attrs[f"{name}_bits"] not in (4, 8):
            raise fail("gated_mlp_q", f"{name}_bits must be 4 or 8, found {attrs[f'{name}_bits']!r}")
        if attrs[f"{name}_activations"] not in ACTIVATIONS:
            raise fail("gated_mlp_q", f"{name}_activations must be one of {', '.join(ACTIVATIONS)}, "
                                      f"found {attrs[f'{name}_activations']!r}")
    want = 1 + weight_inputs(attrs, "gate_up") + weight_inputs(attrs, "down")
    if len(types) != want:
        raise fail("gated_mlp_q", f"expected {want} inputs for these weight formats, found {len(types)}")
    x, gate_up, down = split_inputs(types, attrs)
    if x.rank < 1 or not is_float(x.dtype) or not isinstance(x.shape[-1], int):
        raise fail("gated_mlp_q", f"expected a float x[..., K] with a fixed K, found {x}")
    shapes = {}
    for name, parts, k in (("gate_up", gate_up, x.shape[-1]), ("down", down, None)):
        offset = parts[2] if len(parts) == 3 else None
        rows, cols = check_quantized("gated_mlp_q", parts[0], parts[1], offset, attrs[f"{name}_bits"],
                                     attrs[f"{name}_group_size"], k=k)
        shapes[name] = (rows, cols)
    rows, _ = shapes["gate_up"]
    if rows % 2 or shapes["down"][1] != rows // 2:
        raise fail("gated_mlp_q", f"expected gate_up with 2I rows and down with I = {rows // 2} columns, found "
                                  f"{rows} rows and {shapes['down'][1]} columns")
    for name, k in (("gate_up", x.shape[-1]), ("down", rows // 2)):
        if attrs[f"{name}_activations"] == "int8" and not int8_activations_fit(k, attrs[f"{name}_group_size"]):
            raise fail("gated_mlp_q", f"int8 activations for {name} do not fit K={k}, "
                                      f"group_size={attrs[f'{name}_group_size']}")
    return [TensorType(x.dtype, tuple(x.shape[:-1]) + (shapes["down"][0],))]


def _run(op: str, inputs: list, attrs: dict):
    definition = get_op(op)
    return definition.reference(inputs, complete_attrs(definition, attrs))[0]


def _reference(xs, attrs):
    x, gate_up, down = split_inputs(xs, attrs)
    wide = _run("linear_q", [x] + gate_up, linear_attrs(attrs, "gate_up"))
    half = wide.shape[-1] // 2
    op, op_attrs = ACTIVATION_OPS[attrs["activation"]]
    hidden = _run("mul", [_run(op, [wide[..., :half]], op_attrs), wide[..., half:]], {})
    return [_run("linear_q", [hidden] + down, linear_attrs(attrs, "down"))]


define_op("gated_mlp_q", infer=_infer, reference=_reference,
          attrs={"activation": REQUIRED, **{f"{w}_{a}": REQUIRED for w in WEIGHTS
                                            for a in ("bits", "group_size", "offset", "activations")}},
          inputs=(5, 7),
          doc="down(act(gate(x)) * up(x)) over quantized weights: linear_q(act(g) * u, down) with [g, u] = "
              "linear_q(x, gate_up), gate rows first; each weight as linear_q's (q, scale[, offset]) with "
              "<w>_bits / _group_size / _offset / _activations")


def decompose(fn) -> bool:
    """Rewrites every gated_mlp_q of ``fn`` into its subgraph (two linear_q, two slices, the activation, a
    mul), for backends that lower it piece by piece. Returns whether anything changed."""
    changed = False
    for node in list(fn.nodes):
        if node.op != "gated_mlp_q":
            continue
        attrs = node.attrs
        x, gate_up, down = split_inputs(node.inputs, attrs)
        wide = fn.emit("linear_q", x, *gate_up, insert_before=node, **linear_attrs(attrs, "gate_up"))
        half = wide.type.shape[-1] // 2
        axis = wide.type.rank - 1
        gate = fn.emit("slice", wide, axis=axis, start=0, end=half, insert_before=node)
        up = fn.emit("slice", wide, axis=axis, start=half, end=2 * half, insert_before=node)
        op, op_attrs = ACTIVATION_OPS[attrs["activation"]]
        hidden = fn.emit("mul", fn.emit(op, gate, insert_before=node, **op_attrs), up, insert_before=node)
        fn.replace_all_uses(node.output, fn.emit("linear_q", hidden, *down, insert_before=node,
                                                 **linear_attrs(attrs, "down")))
        fn.erase(node)
        changed = True
    return changed
