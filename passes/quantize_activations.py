"""Quantize activations: mark quantized linears to take int8 activations (``linear_q {activations=int8}``).

With ``PassOptions.extra["activations"] == "int8"`` every ``linear_q`` whose K and weight group are multiples
of 32 quantizes its input rows per block of 32 (see ``kiln.ir.quant_ops``), which lets a backend multiply
with integer dot products (VNNI ``vpdpbusd`` on the TVM CPU backend, MatMulNBits accuracy_level 4 on ONNX
Runtime). It is a decision in the IR, not a backend flag: the interpreter, every backend and ``kiln inspect``
read the same attribute. Runs before merge_sibling_linears, so merged projections carry it. A ``moe_experts_q``
whose two stacks are quantized with K and groups multiples of 32 takes int8 activations too (both matmuls).
"""

from __future__ import annotations

from kiln.ir.errors import ConfigError
from kiln.ir.graph import Module
from kiln.ir.moe_ops import int8_activations_fit_experts
from kiln.ir.quant_ops import ACTIVATIONS, int8_activations_fit

from .manager import PassOptions, register_pass


@register_pass("quantize_activations")
def run(module: Module, options: PassOptions) -> bool:
    """Sets activations=int8 on every linear_q that can take it (when asked)."""
    mode = options.extra.get("activations") or "float"
    if mode == "auto":  # kiln.compile settles auto by backend and target (api.resolve_activations); unsettled: float
        mode = "float"
    if mode not in ACTIVATIONS:
        raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, found {mode!r}")
    if mode == "float":
        return False
    marked, kept, experts_marked, experts_kept = 0, 0, 0, 0
    for fn in module.functions.values():
        for node in fn.nodes:
            if node.op not in ("linear_q", "moe_experts_q") or node.attrs.get("activations") == mode:
                continue
            if node.op == "moe_experts_q":
                hidden = node.inputs[0].type.shape[-1]
                inter = node.inputs[3].type.shape[1] // 2  # gate_up's rows, in every format
                if int8_activations_fit_experts(hidden, inter, node.attrs):
                    node.attrs["activations"] = mode
                    experts_marked += 1
                else:
                    experts_kept += 1
            elif int8_activations_fit(node.inputs[0].type.shape[-1], node.attrs["group_size"]):
                node.attrs["activations"] = mode
                marked += 1
            else:
                kept += 1
    module.metadata["activations_quantized"] = {"mode": mode, "linear_q": marked, "kept_float": kept}
    if experts_marked or experts_kept:
        module.metadata["activations_quantized"].update(moe_experts_q=experts_marked,
                                                        moe_experts_q_kept_float=experts_kept)
    return marked + experts_marked > 0
