"""The ONNX Runtime backend: kiln IR lowered to ONNX (contrib ops for attention over the KV cache, RoPE,
norms and quantized matmuls), run by onnxruntime with the KV buffers bound in place."""
