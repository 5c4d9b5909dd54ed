"""Save a module to a directory and load it back, without pickle.

The directory holds ``module.kir`` (the IR text, metadata included) and
``weights.safetensors``. Writing goes to a temporary sibling that is renamed
into place, so a failed save never leaves a half-written directory.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from .errors import ArtifactError, KilnError, ParseError
from .files import check_replaceable, install_directory, make_staging_directory
from .graph import Module
from .parser import parse_module
from .printer import print_module
from .verifier import verify_module

IR_FILE = "module.kir"
WEIGHTS_FILE = "weights.safetensors"


def save_module(module: Module, path: str) -> None:
    from safetensors.numpy import save_file

    verify_module(module)  # never write a directory that load_module would refuse
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise KilnError(f"the output path {path!r} is empty; give a directory name for the module")
    path = os.path.abspath(os.fspath(path))
    check_replaceable(path, _is_module_dir, "saved kiln module", KilnError)
    tmp = make_staging_directory(path)
    try:
        with open(os.path.join(tmp, IR_FILE), "w", encoding="utf-8") as f:
            f.write(print_module(module))
        # np.ascontiguousarray turns a 0-d array into shape (1,); reshape back (a view, no copy)
        arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in module.weight_data.items()}
        save_file(arrays, os.path.join(tmp, WEIGHTS_FILE))
        install_directory(tmp, path, _is_module_dir, "saved kiln module", KilnError)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_module_dir(path: str) -> bool:
    """A directory :func:`save_module` wrote: its two files and nothing else."""
    try:
        return sorted(os.listdir(path)) == sorted([IR_FILE, WEIGHTS_FILE])
    except OSError:
        return False


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
