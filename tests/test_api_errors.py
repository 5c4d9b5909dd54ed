"""The Python API refuses inconsistent inputs with kiln's typed errors, one line each, never a bare
TypeError, KeyError or AttributeError from deep inside."""

from __future__ import annotations

import pytest

import kiln
from kiln.ir.errors import ArtifactError, ConfigError

from tiny_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def artifact(checkpoint):
    return kiln.compile(checkpoint, backend="reference", max_seq_len=32)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"source": 123}, ConfigError, "expected a model name, a path or a torch.nn.Module, found int"),
    ({"frobnicate": 1}, ConfigError, "unknown compile option frobnicate"),
    ({"backend": 5}, ConfigError, "unknown backend 5"),
    ({"target": ["cpu"]}, ConfigError, "unknown target"),
    ({"quantize": 4}, ConfigError, "quantize must be None or one of"),
    ({"max_seq_len": 32.0}, ConfigError, "max_seq_len must be a positive integer"),
    ({"max_num_seqs": True}, ConfigError, "max_num_seqs must be a positive integer"),
    ({"activation_seq_len": -3}, ConfigError, "activation_seq_len must be a positive integer"),
    ({"output": 5}, ConfigError, "the output path must be a path"),
    ({"output": ""}, ConfigError, "the output path '' is empty"),
    ({"kv_cache_budget": "1GB"}, ConfigError, "kv_cache_budget must be None or a positive, finite number"),
    ({"kv_cache_budget": float("inf")}, ConfigError, "kv_cache_budget must be None or a positive, finite number"),
    ({"kv_cache_dtype": "f8"}, ConfigError, "kv_cache_dtype must be"),
])
def test_compile_refuses_inconsistent_arguments(checkpoint, kwargs, error, message):
    kwargs = {"source": checkpoint, "backend": "reference", "max_seq_len": 32, **kwargs}
    with pytest.raises(error, match=message.replace("(", r"\(")):
        kiln.compile(**kwargs)


@pytest.mark.parametrize("target, options, error, message", [
    (123, {}, ConfigError, "kiln.load takes an artifact directory or a kiln.Artifact, got int"),
    (None, {}, ConfigError, "got NoneType"),
    ("/no/such/artifact", {}, ArtifactError, "not a directory"),
    ("ART", {"frobnicate": 1}, ConfigError, "the reference backend takes the options num_threads, not frobnicate"),
    ("ART", {"num_threads": 0}, ConfigError, "num_threads must be None or an integer >= 1, got 0"),
    ("ART", {"num_threads": "2"}, ConfigError, "num_threads must be None or an integer >= 1"),
])
def test_load_refuses_inconsistent_arguments(artifact, target, options, error, message):
    with pytest.raises(error, match=message):
        kiln.load(artifact if target == "ART" else target, **options)
