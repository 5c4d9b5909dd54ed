"""kiln: a compiler and standalone runtime for large language models.

``import kiln`` is cheap: torch, TVM and the compiler load only when used.
"""

__version__ = "0.1.0"

__all__ = ["compile", "load", "Artifact", "__version__"]


def __getattr__(name):
    if name in ("compile", "load", "Artifact"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
