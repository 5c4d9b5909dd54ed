"""Inputs that once made a fuzz target fail (tests/fuzz/corpus/<target>/), replayed as regression tests:
each must end in one of kiln's typed errors or succeed, within a time and memory limit."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz", "corpus")
TIME_LIMIT_S = 60
MEMORY_LIMIT = 4 * 2**30


def _cases():
    if not os.path.isdir(CORPUS):
        return []
    cases = []
    for target in sorted(os.listdir(CORPUS)):
        folder = os.path.join(CORPUS, target)
        for name in sorted(os.listdir(folder)):
            cases.append(pytest.param(target, os.path.join(folder, name), id=f"{target}/{name}"))
    return cases


_RUNNER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("target", sys.argv[1])
target = importlib.util.module_from_spec(spec)
spec.loader.exec_module(target)
from kiln.ir.errors import KilnError
with open(sys.argv[2], "rb") as f:
    data = f.read()
try:
    target.check(data)
except KilnError:
    pass
"""


@pytest.mark.parametrize("target,path", _cases())
def test_fuzz_regression(target, path):
    module = os.path.join(HERE, "fuzz", f"fuzz_{target}.py")
    assert os.path.isfile(module), f"no fuzz target for corpus folder {target}"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([sys.executable, "-c", _RUNNER, module, path], capture_output=True, text=True,
                          timeout=TIME_LIMIT_S, preexec_fn=limit)
    assert proc.returncode == 0, f"{target} on {os.path.basename(path)} escaped kiln's errors:\n{proc.stderr[-3000:]}"
