"""kiln's default optimization pipeline, as one readable list.

A tuple is a group the manager repeats until no pass in it changes anything.
"""

PIPELINE = [
    # f16 / bf16 weights and values become f32: every pass below sees the f32 graph.
    "set_compute_dtype",
    # Cleanup: fold constants, one canonical form, no shared or dead code.
    ("fold_constants", "canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code"),
    # Fusions: attention (with its mask proven), RoPE, norms, gated MLPs.
    "fuse_attention",
    "fuse_rope",
    "fuse_rms_norm",
    "fuse_gated_mlp",
    "eliminate_dead_code",
    # Quantization (only when PassOptions.extra["quantize"] asks): weight-only int8 / int4 linears.
    "quantize_weights",
    # int8 activations on the quantized linears (only when PassOptions.extra["activations"] asks).
    "quantize_activations",
    # Projections of one activation (q/k/v; gate/up once quantized) as one wide matmul.
    "merge_sibling_linears",
    # The quantized MLP's matmuls and activation (split by quantize_weights) as one gated_mlp_q again.
    "fuse_quantized_gated_mlp",
    # KV cache: declare the cache (its spec), then turn forward into @step, one ragged batch over it.
    "plan_kv_cache",
    "insert_kv_cache",
    # A step returns the logits of the rows asked for: select them before the output projection.
    "select_logit_rows",
    # Half compute (only when PassOptions.extra["dtype"] is f16 / bf16): the step in the half type, its norm
    # statistics, softmax, RoPE angles and logits in f32.
    "narrow_compute_dtype",
    # @step_decode runs one token of one sequence: fix its sizes.
    "specialize_decode_step",
    # batch = 1 makes some permutes plain reshapes.
    ("canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code"),
    # Memory: plan activation buffers of each entry function.
    "plan_activation_memory",
]

# Encoder-only embedding models (kiln/embedding.py): no KV cache and no step; attention stays one sdpa per
# layer over the padding mask, and the entry is renamed @embed by the driver.
EMBEDDING_PIPELINE = [
    ("fold_constants", "canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code"),
    # q/k/v projections of one activation as one wide matmul.
    "merge_sibling_linears",
    ("canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code"),
]
