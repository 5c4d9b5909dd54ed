"""Lowering side of the reference backend: the artifact's module.kir and weights are all it needs."""

from __future__ import annotations


def compile_module(module, target: str, out_dir: str, options) -> dict:
    if target != "cpu":
        from kiln.ir.errors import ConfigError

        raise ConfigError(f"the reference backend runs on the CPU only, not {target!r}")
    return {"target": "cpu", "files": {}}
