"""Inputs that once made a fuzz target fail (tests/fuzz/corpus/<target>/), replayed as regression tests: each
must end in one of kiln's typed errors or succeed, within a time limit per input and a memory limit. One
process per target replays its whole corpus (the targets' imports are paid once)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz", "corpus")
SECONDS_PER_INPUT = 20
MEMORY_LIMIT = 8 * 2**30  # address space: torch and TVM map a few GiB of it just by loading


def _targets():
    return sorted(os.listdir(CORPUS)) if os.path.isdir(CORPUS) else []


_RUNNER = r"""
import importlib.util, json, os, signal, sys, traceback

class InputTimeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise InputTimeout()

signal.signal(signal.SIGALRM, on_alarm)
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as when the target runs as a script: harness importable
spec = importlib.util.spec_from_file_location("target", sys.argv[1])
target = importlib.util.module_from_spec(spec)
spec.loader.exec_module(target)
from kiln.ir.errors import KilnError
folder, seconds = sys.argv[2], int(sys.argv[3])
for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
        data = f.read()
    outcome = "ok"
    signal.alarm(seconds)
    try:
        target.check(data)
    except KilnError:
        pass
    except InputTimeout:
        outcome = f"ran past {seconds} s"
    except BaseException as err:
        outcome = "".join(traceback.format_exception_only(type(err), err)).strip()[-500:]
    finally:
        signal.alarm(0)
    print(json.dumps({"input": name, "outcome": outcome}), flush=True)
"""


@pytest.mark.parametrize("target", _targets())
def test_fuzz_corpus_replays_cleanly(target):
    module = os.path.join(HERE, "fuzz", f"fuzz_{target}.py")
    assert os.path.isfile(module), f"no fuzz target for corpus folder {target}"
    folder = os.path.join(CORPUS, target)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    count = len(os.listdir(folder))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, module, folder, str(SECONDS_PER_INPUT)],
                          capture_output=True, text=True, timeout=60 + 2 * SECONDS_PER_INPUT * count,
                          preexec_fn=limit, cwd=HERE)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [f"{r['input']}: {r['outcome']}" for r in results if r["outcome"] != "ok"]
    assert proc.returncode == 0 and len(results) == count, proc.stderr[-3000:]
    assert not failures, f"{target}: inputs escaped kiln's errors:\n" + "\n".join(failures)
