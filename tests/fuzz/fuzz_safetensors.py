"""Fuzz target: a safetensors file through kiln's reader.

The input is the file. For a file the reader accepts, every tensor is read (its array must have the
header's shape, dtype and byte count, and its bytes must be the file's at the header's offsets), and
the whole set is written back with ``write_safetensors`` and read again to the same bytes. Only
KilnError may escape. Seeds (numpy and torch files with every dtype kiln reads, metadata, empty
tensors) are written with the safetensors package by ``--make-seeds``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np

from kiln.frontend.safetensors_file import SafetensorsFile, write_safetensors

_SCRATCH = tempfile.mkdtemp(prefix="kiln-fuzz-safetensors-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def check(data: bytes) -> None:
    path = os.path.join(_SCRATCH, "input.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    weights = SafetensorsFile(path)
    assert len(weights) == len(weights.keys())
    arrays = {}
    for name, info in weights.tensors.items():
        array = weights.array(name)
        assert array.shape == info.shape and array.dtype == info.dtype and array.nbytes == info.nbytes, (name, info)
        start = weights.data_offset + info.begin
        assert array.tobytes() == data[start:start + info.nbytes], name
        arrays[name] = array
    again_path = os.path.join(_SCRATCH, "again.safetensors")
    write_safetensors(again_path, arrays, weights.metadata)
    again = SafetensorsFile(again_path)
    assert again.metadata == weights.metadata and set(again.tensors) == set(weights.tensors)
    for name, array in arrays.items():
        assert again.array(name).tobytes() == array.tobytes() and again.array(name).shape == array.shape, name


def make_seeds(corpus: str) -> None:
    """Write the seed inputs into the corpus folder (a few KB in all)."""
    import ml_dtypes
    import safetensors.numpy
    import safetensors.torch
    import torch

    rng = np.random.default_rng(0)
    safetensors.numpy.save_file({
        "f64": rng.standard_normal((2, 2)), "f32": rng.standard_normal((3, 2)).astype(np.float32),
        "f16": rng.standard_normal(3).astype(np.float16), "i64": np.arange(3, dtype=np.int64),
        "i8": np.arange(-2, 2, dtype=np.int8), "u8": np.arange(4, dtype=np.uint8), "bool": np.array([True, False]),
        "scalar": np.array(1.5, np.float32), "empty": np.zeros((0, 3), np.float32),
    }, os.path.join(corpus, "seed-numpy-dtypes.safetensors"), metadata={"format": "np", "note": "seed"})
    safetensors.torch.save_file({
        "bf16": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "e4m3": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn), "e5m2": torch.tensor([2.0]).to(torch.float8_e5m2),
    }, os.path.join(corpus, "seed-torch-dtypes.safetensors"))
    write_safetensors(os.path.join(corpus, "seed-kiln-writer.safetensors"),
                      {"w": rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16), "b": np.ones(4, np.float32)})


if __name__ == "__main__":
    from harness import run

    run(check, "safetensors", make_seeds)
