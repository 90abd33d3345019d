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


class ConvertedFolderChangedError(ValueError):
    """A converted model folder whose files are not the ones recorded when it was converted (changed, missing, added)
    or that records none: refused; the message names the file and how to rebuild the folder."""

    def __init__(self, folder, file: str, what: str) -> None:
        super().__init__(
            f"converted model folder {folder}: {file} {what}; refusing to load it "
            f"(delete the folder to convert the model again: rm -rf {folder})"
        )
        self.folder = folder
        self.file = file


class BundledModelNotInstalledError(ModelReferenceError):
    """A bundled model whose data package is not installed."""
