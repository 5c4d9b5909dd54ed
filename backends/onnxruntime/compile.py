"""Lowering side of the ONNX Runtime backend: prefill, decode (and prefill_last) -> ONNX models in the
artifact that share one external data file (each weight written once, 4 KiB aligned so it can be mapped)."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from kiln.ir.errors import ConfigError

DATA_FILE = "model.onnx.data"
READS_WEIGHTS_FILE = False  # the weights live in DATA_FILE; the artifact needs no weights.safetensors
FUNCTIONS = ("prefill", "decode", "prefill_last")  # prefill_last when the pipeline made one
INLINE_BYTES = 1024  # smaller initializers stay inside the model file
ALIGNMENT = 4096
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def compile_module(module, target: str, out_dir: str, options) -> dict:
    from . import quant_lower  # noqa: F401  (registers linear_q / embedding_q)
    from .lower import LOGITS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, lower_function, make_model

    if target not in ("cpu", "cuda"):
        raise ConfigError(f"unknown target {target!r}; expected cpu or cuda")
    extra = getattr(options, "extra", None) or {}
    accuracy_level = extra.get("onnx_accuracy_level", 0)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"onnx_accuracy_level must be one of {ACCURACY_LEVELS}, found {accuracy_level!r}")
    options = {"accuracy_level": accuracy_level, "derived": {}}
    lowered = {name: lower_function(module, name, options) for name in FUNCTIONS if name in module.functions}
    offsets = _write_data(os.path.join(out_dir, DATA_FILE), lowered)
    models = {}
    for name, fn in lowered.items():
        graph = fn.graph
        for init_name, array in fn.initializers.items():
            graph.initializer.append(_tensor(init_name, array, offsets.get(init_name)))
        model = make_model(graph)
        path = os.path.join(out_dir, f"{name}.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        onnx.checker.check_model(path, full_check=False)
        models[name] = {"file": f"{name}.onnx", "inputs": fn.inputs, "logits_rows": fn.logits_rows}
    layers = lowered["prefill"].layers
    if any(fn.layers != layers for fn in lowered.values()):
        raise AssertionError(f"the functions {sorted(lowered)} attend over different KV layers")
    return {
        "target": target,
        "models": models,
        "data": DATA_FILE,
        "files": {**{name: model["file"] for name, model in models.items()}, "data": DATA_FILE},
        "logits": LOGITS,
        "lengths": [SEQLENS_K, TOTAL_SEQUENCE_LENGTH],
        "kv_layers": [{"num_kv_heads": h, "head_dim": d, "dtype": t} for _, (h, d, t) in sorted(layers.items())],
        "accuracy_level": accuracy_level,
    }


def _write_data(path: str, lowered: dict) -> dict:
    """Write every large initializer once (prefill and decode share them); returns name -> (offset, length)."""
    offsets: dict = {}
    seen: dict = {}
    with open(path, "wb") as f:
        for fn in lowered.values():
            for name, array in fn.initializers.items():
                if array.nbytes < INLINE_BYTES:
                    continue
                if name in seen:
                    if seen[name] is not array and not np.array_equal(seen[name], array):
                        raise AssertionError(f"initializer {name} differs between functions")
                    continue
                seen[name] = array
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
