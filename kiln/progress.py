"""Stage progress on stderr: one line per stage with its time, so long work is visible."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict = {}

    @contextmanager
    def stage(self, label: str):
        if self.enabled:
            self.stream.write(f"kiln: {label}...")
            self.stream.flush()
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                self.stream.write(" failed\n")
            raise
        elapsed = time.perf_counter() - start
        self.timings[label] = elapsed
        if self.enabled:
            self.stream.write(f" {elapsed:.1f} s\n")
            self.stream.flush()


QUIET = Progress(enabled=False)
