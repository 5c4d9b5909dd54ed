"""ONNX lowering of DeepSeek's latent attention: ``latent_attention`` as plain attention over the latent (one KV
head, values its first ``value_dim`` columns); ``paged_latent_attention`` as GroupQueryAttention with one KV head
whose keys and values are the latent itself, over one buffer per layer that the executor binds as both past_key and
past_value (``compile.kv_layers`` marks it shared), the output cut to ``value_dim`` columns per head.

Registered into ``lower.LOWERINGS`` on import.
"""

from __future__ import annotations

from kiln.ir.types import TensorType

from .lower import (EXECUTOR_OPERANDS, _from_tokens_flat, _plain_attention, _tokens_flat, check_executor_operands,
                    group_query_attention, lowering)

EXECUTOR_OPERANDS["paged_latent_attention"] = {2: "latent pool", 3: "page table", 5: "token_seq"}


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
    check_executor_operands(ctx, EXECUTOR_OPERANDS[node.op])
    q_type, latent_type = ctx.in_type(0), ctx.in_type(1)
    q, tokens = _tokens_flat(ctx, 0)  # [1, T, H * L]
    latent_dim, value_dim = latent_type.shape[2], node.attrs["value_dim"]
    out = group_query_attention(ctx, node, q, ctx.input(1), "same as k", tokens, q_type.dtype, ctx.in_type(2).dtype,
                                1, latent_dim, value_dim)
    return [_from_tokens_flat(ctx, out, tokens[:3] + (value_dim,)), ctx.raw(2)]
