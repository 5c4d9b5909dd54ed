"""kiln's default optimization pipeline, as one readable list.

A tuple is a group the manager repeats until no pass in it changes anything.
"""

PIPELINE = [
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
    # KV cache: plan the pages, then split forward into prefill and decode.
    "plan_kv_cache",
    "insert_kv_cache",
    # Generation needs the logits of each prompt's last token only: @prefill_last computes just those.
    "add_prefill_last",
    # decode's seq = 1 makes some permutes plain reshapes.
    ("canonicalize", "eliminate_common_subexpressions", "eliminate_dead_code"),
    # Memory: plan activation buffers of each entry function.
    "plan_activation_memory",
]
