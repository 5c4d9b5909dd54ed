"""Typed errors shared by every stage of kiln.

Users see these as one line (the CLI prints ``str(err)``); each message says
what was expected, what was found, and where.
"""


class KilnError(Exception):
    """Base of every error kiln reports to a user."""


class ModelFormatError(KilnError):
    """A model file (GGUF, safetensors, config.json, ...) is malformed or unsupported."""


class UnsupportedOpError(KilnError):
    """Capture met an operation kiln has no mapping for."""


class VerificationError(KilnError):
    """The IR verifier found a broken invariant."""


class ParseError(KilnError):
    """IR text could not be parsed."""


class ArtifactError(KilnError):
    """A compiled artifact is missing, damaged or from an incompatible version."""


class ConfigError(KilnError):
    """Options or a model configuration kiln cannot honour."""
