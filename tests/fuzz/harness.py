"""Shared driver for kiln's coverage-guided fuzz targets (atheris).

Each target is ``tests/fuzz/fuzz_<name>.py`` defining ``check(data: bytes) -> None``: it feeds the
bytes to one of kiln's parsers and lets only kiln's typed errors (``KilnError``) escape; anything
else is a bug. Run a target for a bounded time with

    python tests/fuzz/fuzz_<name>.py -max_total_time=600 -rss_limit_mb=2048 -timeout=10

(any libFuzzer flag works). Run it from a scratch directory: new inputs go to ``./corpus-<name>/`` and
crashes to ``./crash-*``, while ``tests/fuzz/corpus/<name>/`` is only read, as seeds. Before fuzzing, the
target runs once so that every module it reaches is imported and then instrumented (kiln imports
lazily). Inputs that once failed live in ``tests/fuzz/corpus/<name>/`` and run as ordinary tests in the
default suite (``tests/test_fuzz_corpus.py``): one process per target under a memory limit, each input
under a time limit.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


class Choices:
    """Structured choices read from the fuzzer's bytes, one byte at a time (zeros once they run out), so that
    libFuzzer's byte mutations become edits of a valid input. Targets add a ``value()`` of their own."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def pick(self, items):
        return items[self.byte() % len(items)] if items else None


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
    try:  # one run imports every module the target reaches (kiln imports lazily), so that all get instrumented
        expect_kiln_errors_only(check, b"")
    except BaseException:  # noqa: BLE001 - the fuzzer reports it again on its own first input
        pass
    atheris.instrument_all()
    corpus = os.path.join(CORPUS, name)
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        # libFuzzer writes new inputs into the first directory: a scratch one here, the repository's
        # corpus (inputs that once failed) only read as seeds
        work = os.path.abspath(f"corpus-{name}")
        os.makedirs(work, exist_ok=True)
        args.append(work)
        if os.path.isdir(corpus):
            args.append(corpus)
    atheris.Setup(args, lambda data: expect_kiln_errors_only(check, data))
    atheris.Fuzz()


def run(check, name: str, make_seeds=None) -> None:
    """A target's command line: ``--make-seeds`` writes its seed inputs into ``tests/fuzz/corpus/<name>/``
    (``make_seeds(folder)``), anything else fuzzes it (:func:`main`)."""
    if "--make-seeds" in sys.argv and make_seeds is not None:
        folder = os.path.join(CORPUS, name)
        os.makedirs(folder, exist_ok=True)
        make_seeds(folder)
    else:
        main(check, name)


def write_seeds(folder: str, seeds: dict) -> None:
    """Seed inputs: file name -> bytes (or text, written as UTF-8)."""
    for file_name, content in seeds.items():
        with open(os.path.join(folder, file_name), "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
