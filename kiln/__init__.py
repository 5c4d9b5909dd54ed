"""kiln: a compiler and standalone runtime for large language models."""

__version__ = "0.1.0"
