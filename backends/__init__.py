"""kiln's backends. Each has a lowering side (optimized IR -> files in an artifact) and an
execution side (``executor.load_executor``) that the runtime uses to run the step; the execution
side imports only its own runtime library, never torch, frontend or passes.

The execution side's contract (every executor):

- ``step(function, inputs) -> logits``: run ``@step`` (or ``@step_decode``) on ``inputs``, a dict of the
  step's inputs by name (``ir.kv_cache.STEP_INPUTS``: token_ids i64[T], positions i64[T], token_seq
  i32[T], page_table i32[S, P], logit_rows i64[R]); returns float32 logits [R, vocab]. The cache pools
  (``KVCacheSpec.pools()``) live inside the executor, allocated from the spec and bound by name.
- ``shares_pages``: whether two sequences' page tables may name the same page (prefix caching);
  where it is False the runtime never shares a page.
- ``max_sequences`` (optional): how many sequences the executor holds at once, when it keeps state per
  sequence (ONNX Runtime's buffer rows); the runtime never runs more together.
- ``has_function(name)``, ``end_sequence(first_page)`` (the sequence whose page table starts with
  ``first_page`` has released its pages), ``close()``.
"""

from __future__ import annotations

import importlib
import inspect
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
    """The execution side of the artifact's backend, ready to run the step; ``options`` are the
    backend's own (every backend takes ``num_threads``), each checked here."""
    return _load(info, "executor", "load_executor", (), options)


def load_embedding_executor(info, function: str, inputs: list, **options):
    """The artifact's backend's executor of an embedding entry ``function`` taking ``inputs``; ``options`` as for
    :func:`load_executor`."""
    return _load(info, "encoder_executor", "load_embedding_executor", (function, inputs), options)


def _load(info, module_name: str, factory_name: str, args: tuple, options: dict):
    module = importlib.import_module(f"kiln.backends.{check_backend(info.backend)}.{module_name}")
    factory = getattr(module, factory_name)
    accepted = list(inspect.signature(factory).parameters)[1 + len(args):]  # after info and the fixed arguments
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"the {info.backend} backend takes the options {', '.join(accepted)}, not "
                          f"{', '.join(unknown)}")
    threads = options.get("num_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"num_threads must be None or an integer >= 1, got {threads!r}")
    return factory(info, *args, **options)


def lowering(name: str):
    """The lowering side (import only at compile time)."""
    return importlib.import_module(f"kiln.backends.{check_backend(name)}.compile")
