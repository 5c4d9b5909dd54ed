"""Save a module to a directory and load it back, without pickle.

The directory holds ``module.kir`` (the IR text, metadata included) and
``weights.safetensors``. Writing goes to a temporary sibling that is renamed
into place, so a failed save never leaves a half-written directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from .errors import ArtifactError, KilnError, ParseError
from .graph import Module
from .parser import parse_module
from .printer import print_module
from .verifier import verify_module

IR_FILE = "module.kir"
WEIGHTS_FILE = "weights.safetensors"


def replace_directory(staged: str, path: str) -> None:
    """Move the complete directory ``staged`` to ``path``; an existing ``path`` is swapped out only
    after, and restored if the rename fails (callers stage next to ``path``, on one filesystem)."""
    if not os.path.exists(path):
        os.rename(staged, path)
        return
    old = path + ".old-" + os.path.basename(staged)
    os.rename(path, old)
    try:
        os.rename(staged, path)
    except BaseException:
        os.rename(old, path)  # put the previous directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_module(module: Module, path: str) -> None:
    from safetensors.numpy import save_file

    verify_module(module)  # never write a directory that load_module would refuse
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kiln-tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, IR_FILE), "w", encoding="utf-8") as f:
            f.write(print_module(module))
        # np.ascontiguousarray turns a 0-d array into shape (1,); reshape back (a view, no copy)
        arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in module.weight_data.items()}
        save_file(arrays, os.path.join(tmp, WEIGHTS_FILE))
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_module(path: str) -> Module:
    from safetensors.numpy import load_file

    ir_path = os.path.join(path, IR_FILE)
    if not os.path.isfile(ir_path):
        raise KilnError(f"{path}: no {IR_FILE}; expected a directory written by kiln's save_module")
    try:
        with open(ir_path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{ir_path}: not UTF-8 text ({err}); the file is damaged, "
                            f"save the module again") from None
    try:
        module = parse_module(text)
    except ParseError as err:
        raise ParseError(f"{ir_path}: {err}") from None
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if os.path.exists(weights_path):
        try:
            arrays = load_file(weights_path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ArtifactError(f"{weights_path}: cannot read weights ({err}); the file is damaged, "
                                f"save the module again") from None
        for name, array in arrays.items():
            if name not in module.weights:
                raise KilnError(f"{weights_path}: tensor {name!r} is not a weight of the module")
            module.weight_data[name] = array
    verify_module(module)
    return module
