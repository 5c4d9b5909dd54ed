"""Pass registry and pass manager.

A pass is a function ``run(module, options) -> bool`` (True when it changed
the module) registered under a stable name with :func:`register_pass`. The
manager runs a pipeline (a list of names, or tuples of names to repeat to a
fixed point), verifies before and after each pass, times each one, can print
the IR after a pass and stop after any pass. A failing pass is reported with
its name and the passes that ran before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kiln.ir.errors import KilnError
from kiln.ir.graph import Module
from kiln.ir.printer import print_module
from kiln.ir.verifier import verify_module


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: Callable  # (Module, PassOptions) -> bool
    summary: str  # one line: what it rewrites into what


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str):
    """Decorator: register ``run(module, options) -> bool`` under ``name``; its docstring's first line is the summary."""

    def wrap(fn: Callable) -> Callable:
        if name in PASSES:
            raise AssertionError(f"pass {name} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        PASSES[name] = PassInfo(name, fn, summary)
        return fn

    return wrap


@dataclass
class PassOptions:
    """Options every pass may read (planning sizes and the like)."""

    max_seq_len: int = 2048
    max_num_seqs: int = 4
    page_size: int = 16
    kv_cache_dtype: str = "f32"
    memory_budget_bytes: int | None = None
    activation_seq_len: int | None = None  # prefill length the activation plan is made for
    extra: dict = field(default_factory=dict)


@dataclass
class PassRecord:
    name: str
    milliseconds: float
    modified: bool


class PassError(KilnError):
    """A pass failed; says which and what ran before it."""


class PassManager:
    def __init__(self, pipeline: Sequence, *, verify: bool = True, print_after: str | None = None,
                 stop_after: str | None = None, max_fixed_point_rounds: int = 10, printer=print):
        self.pipeline = list(pipeline)
        self.verify = verify
        self.print_after = print_after
        self.stop_after = stop_after
        self.max_rounds = max_fixed_point_rounds
        self.printer = printer
        self.records: list[PassRecord] = []
        for entry in self.pipeline:
            for name in (entry if isinstance(entry, tuple) else (entry,)):
                if name not in PASSES:
                    raise KilnError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
        if stop_after is not None and stop_after not in self.names():
            raise KilnError(f"--stop-after {stop_after!r} is not in the pipeline: {', '.join(self.names())}")

    def names(self) -> list:
        out = []
        for entry in self.pipeline:
            out.extend(entry if isinstance(entry, tuple) else (entry,))
        return out

    def run(self, module: Module, options: PassOptions | None = None) -> Module:
        options = options or PassOptions()
        if self.verify:
            self._verify(module, "before the first pass")
        for entry in self.pipeline:
            if isinstance(entry, tuple):
                for _ in range(self.max_rounds):
                    changed = False
                    for name in entry:
                        changed |= self._run_one(name, module, options)
                        if self._stopped:
                            return module
                    if not changed:
                        break
            else:
                self._run_one(entry, module, options)
                if self._stopped:
                    return module
        return module

    _stopped = False

    def _run_one(self, name: str, module: Module, options: PassOptions) -> bool:
        info = PASSES[name]
        start = time.perf_counter()
        try:
            modified = bool(info.run(module, options))
        except KilnError as err:
            raise type(err)(f"{err} (in pass {name}; after {self._history()})") from None
        except Exception as err:
            raise PassError(f"pass {name} failed: {type(err).__name__}: {err} (after {self._history()})") from err
        self.records.append(PassRecord(name, (time.perf_counter() - start) * 1000.0, modified))
        if self.verify:
            self._verify(module, f"after pass {name}")
        if self.print_after in (name, "all"):
            self.printer(f"// IR after {name}\n{print_module(module)}")
        if self.stop_after == name:
            self._stopped = True
        return modified

    def _history(self) -> str:
        done = [r.name for r in self.records]
        return ", ".join(done) if done else "no earlier pass"

    def _verify(self, module: Module, when: str) -> None:
        try:
            verify_module(module)
        except KilnError as err:
            raise PassError(f"IR invalid {when}: {err} (passes run: {self._history()})") from None


def run_pass(name: str, module: Module, options: PassOptions | None = None, *, verify: bool = True) -> bool:
    """Run one registered pass (tests and `kiln` use this to run a pass alone)."""
    manager = PassManager([name], verify=verify)
    manager.run(module, options)
    return manager.records[-1].modified
