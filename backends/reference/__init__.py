"""The reference backend: runs the optimized IR with kiln's numpy interpreter (slow; for checking)."""
