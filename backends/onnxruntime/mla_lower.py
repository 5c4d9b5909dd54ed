"""ONNX lowering of DeepSeek's latent attention: ``latent_attention`` as plain attention over the latent (one KV
head, values its first ``value_dim`` columns); ``paged_latent_attention`` is refused.

Registered into ``lower.LOWERINGS`` on import. The executor keeps GroupQueryAttention's separate K and V buffers
per layer, so a latent cache there would be held twice (K and V); the step over a latent cache compiles with the
tvm or reference backend instead (``compile.kv_layers`` refuses it before lowering).
"""

from __future__ import annotations

from kiln.ir.errors import UnsupportedOpError
from kiln.ir.types import TensorType

from .lower import _plain_attention, lowering


@lowering("latent_attention")
def _lower_latent_attention(ctx, node):
    latent_type = ctx.in_type(1)
    keys = ctx.add("Unsqueeze", [ctx.input(1), ctx.const([1], "i64")])  # [b, 1, s, L]: one KV head
    values = ctx.add("Slice", [keys, ctx.const([0], "i64"), ctx.const([node.attrs["value_dim"]], "i64"),
                               ctx.const([3], "i64")])
    keys_type = TensorType(latent_type.dtype, (latent_type.shape[0], 1) + tuple(latent_type.shape[1:]))
    return _plain_attention(ctx, ctx.input(0), keys, values, ctx.in_type(0), keys_type, node.attrs["scale"], True,
                            None)


@lowering("paged_latent_attention")
def _lower_paged_latent_attention(ctx, node):
    raise UnsupportedOpError(f"{ctx.where()}: the ONNX Runtime backend keeps no latent (MLA) KV cache; compile "
                             "DeepSeek-V2/V3 models with --backend tvm or reference")
