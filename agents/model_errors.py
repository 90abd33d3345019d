"""Typed errors raised while resolving a model reference (one-line messages for the CLI)."""

from __future__ import annotations


class ModelReferenceError(ValueError):
    """A model reference that names no bundled model, no local folder/GGUF file and no cached Hub id."""


class ChecksumMismatchError(ValueError):
    """Model weights whose SHA-256 is not the pinned one; they are refused."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: SHA-256 mismatch, refusing to load (expected {expected}, got {actual})")
        self.what = what
        self.expected = expected
        self.actual = actual


class BundledModelNotInstalledError(ModelReferenceError):
    """A bundled model whose data package is not installed."""
