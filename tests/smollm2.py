"""SmolLM2 (the embedded default) loaded and captured once per test process."""

from __future__ import annotations

import functools

import pytest


def _require():
    from kiln.frontend.sources import default_model_path
    from kiln.ir.errors import ConfigError

    try:
        return default_model_path()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")


@functools.lru_cache(maxsize=None)
def smollm2_source():
    _require()
    from kiln.frontend.sources import load_source

    return load_source("smollm2")


@functools.lru_cache(maxsize=None)
def smollm2_captured(max_seq: int = 256):
    from kiln.frontend.capture import capture

    return capture(smollm2_source().model, max_seq=max_seq)

