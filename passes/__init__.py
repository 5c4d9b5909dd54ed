"""kiln's compiler passes: IR -> IR rewrites and plans, one pass per file.

Importing this package registers every pass module found in it.
"""

import importlib
import pkgutil

from .manager import PASSES, PassManager, PassOptions, register_pass, run_pass


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("manager", "pipeline", "patterns"):
            importlib.import_module(f"{__name__}.{info.name}")


_load_all()

__all__ = ["PASSES", "PassManager", "PassOptions", "register_pass", "run_pass"]
