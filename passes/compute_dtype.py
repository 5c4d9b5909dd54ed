"""Compute dtype: a model captured with f16 / bf16 weights becomes the f32 graph of ``model.float()``.

The half weights are widened once, here (exactly: every f16 and bf16 value is an f32 value), and every half
value and dtype attribute becomes f32, so the graph computes what torch computes from ``model.float()``. The
fusions see that one graph whatever the source's dtype; for f16 / bf16 compute (``PassOptions.extra["dtype"]``)
narrow_compute_dtype narrows it again after them.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Module

from .manager import register_pass

HALF_DTYPES = ("f16", "bf16")


@register_pass("set_compute_dtype")
def run(module: Module, options) -> bool:
    """rewrites f16 / bf16 weights, values and dtype attributes into f32."""
    changed = False
    for name, type_ in list(module.weights.items()):
        if type_.dtype in HALF_DTYPES:
            module.weights[name] = type_.with_dtype("f32")
            if name in module.weight_data:
                module.weight_data[name] = np.asarray(module.weight_data[name], dtype=np.float32)
            changed = True
    for fn in module.functions.values():
        for value in fn.params:
            if value.type.dtype in HALF_DTYPES:
                value.type = value.type.with_dtype("f32")
                changed = True
        for node in fn.nodes:
            if node.attrs.get("dtype") in HALF_DTYPES:
                node.attrs["dtype"] = "f32"
                changed = True
            for value in node.outputs:
                if value.type.dtype in HALF_DTYPES:
                    value.type = value.type.with_dtype("f32")
                    changed = True
        # A cast between f32 and a half dtype is now f32 -> f32: dropped here, before constant folding can
        # turn one of a weight into a second copy, so the graph is the one captured from model.float().
        for node in list(fn.nodes):
            if node.op == "cast" and node.inputs[0].type == node.output.type:
                fn.replace_all_uses(node.output, node.inputs[0])
                fn.erase(node)
                changed = True
    return changed
