"""Shared driver for kiln's coverage-guided fuzz targets (atheris).

Each target is ``tests/fuzz/fuzz_<name>.py`` defining ``check(data: bytes) -> None``: it feeds the
bytes to one of kiln's parsers and lets only kiln's typed errors (``KilnError``) escape; anything
else is a bug. Run a target for a bounded time with

    python tests/fuzz/fuzz_<name>.py -max_total_time=600 -rss_limit_mb=2048 -timeout=10

(any libFuzzer flag works; new crashes land in ``crash-*`` files in the current directory). Inputs that
once failed live in ``tests/fuzz/corpus/<name>/`` and run as ordinary tests in the default suite
(``tests/test_fuzz_corpus.py``), each under the same time and memory limits.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def expect_kiln_errors_only(check, data: bytes) -> None:
    """Run ``check(data)``; swallow kiln's typed errors, let everything else through."""
    from kiln.ir.errors import KilnError

    try:
        check(data)
    except KilnError:
        pass


def main(check, name: str) -> None:
    """atheris entry: instrument kiln's modules, then fuzz ``check`` (seeded from the target's corpus)."""
    import atheris

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    with atheris.instrument_imports(include=["kiln"]):
        import kiln  # noqa: F401  - the modules the targets use are imported (and instrumented) lazily
    atheris.instrument_all()
    corpus = os.path.join(CORPUS, name)
    args = list(sys.argv)
    if os.path.isdir(corpus) and not any(not a.startswith("-") for a in args[1:]):
        args.append(corpus)
    atheris.Setup(args, lambda data: expect_kiln_errors_only(check, data))
    atheris.Fuzz()
