"""Lowering side of the ONNX Runtime backend: ``@step`` -> ``step.onnx`` beside one external data file (each
weight 4 KiB aligned so it can be mapped). ``@step_decode`` is not lowered: the one model runs every step."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from kiln.ir.errors import ConfigError, UnsupportedOpError
from kiln.ir.kv_cache import STEP, KVCacheSpec

from .executor import kv_buffers

MODEL_FILE = "step.onnx"
DATA_FILE = "model.onnx.data"
READS_WEIGHTS_FILE = False  # the weights live in DATA_FILE; the artifact needs no weights.safetensors
INLINE_BYTES = 1024  # smaller initializers stay inside the model file
ALIGNMENT = 4096


def kv_layers(spec: KVCacheSpec) -> list:
    """Per layer, the buffers GroupQueryAttention keeps (executor.kv_buffers), refusing caches it cannot keep."""
    for layer in range(spec.num_layers):
        group = spec.groups[spec.locate(layer)[0]]
        if group.kind == "kv" and group.k_head_dim != group.v_head_dim:
            raise UnsupportedOpError(f"layer {layer} keeps K head dim {group.k_head_dim} != V {group.v_head_dim}; ONNX "
                                     f"Runtime's GroupQueryAttention needs K and V of one head size; use the tvm or "
                                     f"reference backend")
    if spec.dtype not in ("f32", "f16"):
        raise UnsupportedOpError(f"ONNX Runtime's GroupQueryAttention keeps an f32 or f16 cache, not {spec.dtype}; "
                                 f"compile with --kv-cache-dtype f32 or f16")
    return kv_buffers(spec)


def compile_module(module, target: str, out_dir: str, options) -> dict:
    from . import mla_lower, moe_lower  # noqa: F401  (registers the latent attention and MoE lowerings)
    from .quant_lower import accuracy_level  # (importing it registers linear_q / embedding_q)
    from .lower import LOGITS, lower_function, make_model

    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected cpu or cuda")
    layers = kv_layers(KVCacheSpec.from_json(module.metadata["kv_cache"]))
    lowered = lower_function(module, STEP, {})
    buffers = [{"num_kv_heads": h, "head_dim": d, "dtype": t} for _, (h, d, t) in sorted(lowered.layers.items())]
    if buffers != [{k: v for k, v in layer.items() if k != "shared"} for layer in layers]:
        raise AssertionError(f"@{STEP} attends over K/V buffers {buffers}, the KV-cache spec declares {layers}")
    write_model(out_dir, MODEL_FILE, lowered.graph, lowered.initializers, make_model)
    return {
        "target": target,
        "files": {"model": MODEL_FILE, "data": DATA_FILE},
        "inputs": lowered.inputs,
        "logits": LOGITS,
        "kv_layers": layers,
        # MatMulNBits' accuracy_level follows each linear_q's activations attribute (4: int8, 0: float)
        "accuracy_levels": sorted({accuracy_level(n) for fn in module.functions.values() for n in fn.nodes
                                   if n.op == "linear_q"}),
    }


def write_model(out_dir: str, model_file: str, graph, initializers: dict, make_model) -> None:
    """``model_file`` (``graph`` with ``initializers`` stored in DATA_FILE beside it), checked by onnx's
    checker; ``make_model`` is lower.make_model (imported by the callers, which import lower lazily)."""
    offsets = _write_data(os.path.join(out_dir, DATA_FILE), initializers)
    for name, array in initializers.items():
        graph.initializer.append(_tensor(name, array, offsets.get(name)))
    path = os.path.join(out_dir, model_file)
    with open(path, "wb") as f:
        f.write(make_model(graph).SerializeToString())
    onnx.checker.check_model(path, full_check=False)


def _write_data(path: str, initializers: dict) -> dict:
    """Write every large initializer once, aligned; returns name -> (offset, length)."""
    offsets: dict = {}
    with open(path, "wb") as f:
        for name, array in initializers.items():
            if array.nbytes < INLINE_BYTES:
                continue
            array = np.ascontiguousarray(array)
            pad = -f.tell() % ALIGNMENT
            f.write(b"\0" * pad)
            offsets[name] = (f.tell(), array.nbytes)
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offsets


def _tensor(name: str, array: np.ndarray, location) -> onnx.TensorProto:
    if location is None:
        return numpy_helper.from_array(np.asarray(array), name)
    from .lower import ONNX_DTYPES
    from kiln.ir.types import dtype_of_numpy

    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = ONNX_DTYPES[dtype_of_numpy(array.dtype)]
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", str(location[0])), ("length", str(location[1]))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
