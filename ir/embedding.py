"""The embedding entry's contract, shared by capture, the driver, the backends and the runtime: an encoder-only
model compiles into ``@embed(input_ids i64[batch, seq], attention_mask i64[batch, seq]) -> f32[batch, hidden]``,
pooling and normalisation included, and its manifest's ``embedding`` field says so."""

EMBED = "embed"
EMBED_INPUTS = ("input_ids", "attention_mask")  # 1 in the mask marks a real token, 0 padding
POOLINGS = ("cls", "mean", "max", "mean_sqrt_len")
