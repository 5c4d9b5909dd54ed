"""kiln's backends. Each has a lowering side (optimized IR -> files in an artifact) and an
execution side (``executor.load_executor``) that the runtime uses to run prefill and decode;
the execution side imports only its own runtime library, never torch, frontend or passes.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from kiln.ir.errors import ConfigError

BACKENDS = {
    "tvm": "apache-tvm",
    "onnxruntime": "onnxruntime",
    "reference": None,  # the numpy reference interpreter: slow, for checking and debugging
}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(sorted(BACKENDS))}")
    return name


def backend_version(name: str) -> str:
    check_backend(name)
    dist = BACKENDS[name]
    if dist is None:
        from kiln import __version__

        return __version__
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"backend {name!r} needs the {dist} package; pip install {dist}") from None


def load_executor(info, **options):
    """The execution side of the artifact's backend, ready to run prefill/decode."""
    module = importlib.import_module(f"kiln.backends.{check_backend(info.backend)}.executor")
    return module.load_executor(info, **options)


def lowering(name: str):
    """The lowering side (import only at compile time)."""
    return importlib.import_module(f"kiln.backends.{check_backend(name)}.compile")
