"""Lowering side of the ONNX Runtime backend for embedding models: ``@embed`` -> embed.onnx beside one
external data file. Attention is the generic ``sdpa`` lowering (MatMul, Where over the padding mask, Softmax):
an encoder keeps no KV cache, so GroupQueryAttention is not involved."""

from __future__ import annotations

from kiln.ir.errors import ConfigError

from .compile import DATA_FILE, write_model

MODEL_FILE = "embed.onnx"
OUTPUT = "embeddings"


def compile_embedding(module, function: str, target: str, out_dir: str) -> dict:
    """Lower ``@function`` into ``out_dir``; returns the manifest's backend_info."""
    from .lower import LOGITS, lower_function, make_model

    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected cpu or cuda")
    lowered = lower_function(module, function, {})
    graph = lowered.graph
    # the lowering names its one result for the step; an embedding model's is the sentence vectors
    for node in graph.node:
        node.output[:] = [OUTPUT if name == LOGITS else name for name in node.output]
    graph.output[0].name = OUTPUT
    write_model(out_dir, MODEL_FILE, graph, lowered.initializers, make_model)
    return {"target": target, "files": {"model": MODEL_FILE, "data": DATA_FILE}, "inputs": lowered.inputs,
            "output": OUTPUT}
