"""kiln IR: types, graphs, the op registry and its numpy references. The registry is imported first, so that any
op module reached directly (``kiln.ir.mla_ops``) finds the others registered in order."""

from . import ops  # noqa: F401
