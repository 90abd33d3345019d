"""What a converted model folder holds, recorded at conversion and checked on every load.

The folder's marker (`latent_relay.json`, format 2) records, per file (weights, config, tokenizer: everything but the
marker itself), its SHA-256, its size and its stamp (size, mtime, ctime, inode). A load checks that the folder holds
exactly those files, that each belongs to this user and only this user can write it, and that each is unchanged:
a file whose stamp is the recorded one is not read again; one whose stamp changed (a copy of the cache, a `touch`)
is hashed again, accepted if its SHA-256 is still the recorded one, and its new stamp recorded. The ctime in the
stamp cannot be set back, so same-size bytes copied in with their old mtime (`cp -p`) are hashed and refused.
Anything else is a :class:`ConvertedFolderChangedError` naming the file and saying how to rebuild the folder.

A marker without file records (format 1, written before these checks existed) vouches for nothing: such a folder
is converted again (`has_file_records` is false for it).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from latent_relay.agents.model_cache import COMPLETE_MARKER, file_stamp, sha256_of_files
from latent_relay.agents.model_errors import ConvertedFolderChangedError
from latent_relay.kernels.cache_folder import FILE_MODE, FOLDER_MODE, refuse_untrusted

MARKER_FORMAT = 2

#: SHA-256 already checked in this process, by absolute path and stamp (a read-only cache is hashed once a process).
_CHECKED: dict[tuple[str, tuple[int, ...]], str] = {}


def _is_marker(name: str) -> bool:
    """The marker, or a temporary copy that a killed marker update left behind."""
    return name == COMPLETE_MARKER or name.startswith(f".{COMPLETE_MARKER}.")


def _listing(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but the marker, by its path relative to `folder`; each (and each subfolder) must
    belong to this user and be writable by no one else. A link or special file is refused."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        relative = path.relative_to(folder).as_posix()
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise ConvertedFolderChangedError(
                folder, relative, "is a link or special file, not written by the conversion"
            )
        refuse_untrusted(path, info)
        if stat.S_ISREG(info.st_mode) and not _is_marker(relative):
            found[relative] = path
    return found


def make_private(folder: Path) -> None:
    """Owner-only modes for a freshly written folder: `0700` folders, `0600` files (before the stamps are taken:
    `chmod` changes the ctime)."""
    folder.chmod(FOLDER_MODE)
    for path in folder.rglob("*"):
        path.chmod(FOLDER_MODE if path.is_dir() else FILE_MODE)


def record_files(folder: Path) -> dict[str, dict]:
    """The file records of a finished folder: `{relative path: {"sha256", "size", "stamp"}}`."""
    records = {}
    for relative, path in _listing(folder).items():
        stamp = file_stamp(path)
        records[relative] = {"sha256": sha256_of_files([path]), "size": stamp[0], "stamp": stamp}
    return records


def has_file_records(folder: Path) -> bool:
    """Whether `folder` is a finished conversion whose marker records its files (format 2 or later)."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return False
    version = marker.get("format")
    return isinstance(version, int) and version >= MARKER_FORMAT


def verify_files(folder: Path, records: dict[str, dict]) -> dict[str, list[int]]:
    """Check `folder` against its file records (see the module); return the new stamps of the files that were
    hashed again and matched, for the caller to record."""
    refuse_untrusted(folder)
    present = _listing(folder)
    for relative in sorted(set(records) - set(present)):
        raise ConvertedFolderChangedError(folder, relative, "is missing")
    for relative in sorted(set(present) - set(records)):
        raise ConvertedFolderChangedError(folder, relative, "was not written by the conversion")
    refreshed = {}
    for relative, path in present.items():
        record = records[relative] if isinstance(records[relative], dict) else {}
        stamp = file_stamp(path)
        if stamp == record.get("stamp"):
            continue
        if stamp[0] != record.get("size"):
            raise ConvertedFolderChangedError(
                folder, relative, f"changed size since conversion ({record.get('size')} -> {stamp[0]} bytes)"
            )
        key = (str(path.resolve()), tuple(stamp))
        actual = _CHECKED.get(key) or sha256_of_files([path])
        if actual != record.get("sha256"):
            expected = str(record.get("sha256"))[:16]
            raise ConvertedFolderChangedError(
                folder, relative, f"changed since conversion (SHA-256 {expected}... -> {actual[:16]}...)"
            )
        _CHECKED[key] = actual
        refreshed[relative] = stamp
    return refreshed
