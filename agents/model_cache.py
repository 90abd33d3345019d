"""The user cache of converted models: where it lives, and building a folder there exactly once.

`build_once` makes a folder atomically (built in a temporary sibling, then `os.rename`d into place) under an
`fcntl` lock, so two processes racing to convert the same model do the work once: the loser waits for the lock
and reuses the winner's folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE_MARKER = "latent_relay.json"
_CHUNK = 1 << 20


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[latent-relay] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """`RELAY_CACHE_DIR`, else `$XDG_CACHE_HOME/latent-relay`, else `~/.cache/latent-relay`."""
    explicit = os.environ.get("RELAY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "latent-relay"


@contextmanager
def file_lock(lock_path: Path, waiting_message: str | None = None) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `lock_path` (created if needed) for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                log(waiting_message)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first with `build(staging_dir)` unless a complete copy already exists.

    `build` must write everything, including the `latent_relay.json` marker, into the staging folder it is
    given; the folder only appears at `final` (by an atomic rename) once `build` has returned.
    """
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f"{final.name}.lock"
    with file_lock(lock, waiting_message=f"waiting for another process building {final}"):
        if is_complete(final):
            return final
        for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete leftover without the marker
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        try:
            build(staging)
            if not is_complete(staging):
                raise RuntimeError(f"builder for {final} did not write {COMPLETE_MARKER}")
            _share_like_umask(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _share_like_umask(folder: Path) -> None:
    """Give a folder made by `mkdtemp` (0700) and its files the permissions a plain mkdir/open would."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON, never leaving a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of_files(paths: list[Path]) -> str:
    """SHA-256 of the concatenation of `paths`, streamed."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def file_stamps(paths: list[Path]) -> list[list]:
    """(absolute path, size, mtime_ns) per file: cheap evidence that files are unchanged since last hashed."""
    stamps = []
    for path in paths:
        stat = path.stat()
        stamps.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return stamps


def cached_sha256(paths: list[Path]) -> str:
    """SHA-256 of the concatenated files, remembered in the cache keyed by path, size and mtime.

    A file that is replaced or modified changes its size or mtime and is hashed again.
    """
    index_path = cache_dir() / "sha256-index.json"
    key = json.dumps(file_stamps(paths))
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    started = time.perf_counter()
    sha = sha256_of_files(paths)
    log(f"hashed {len(paths)} file(s) in {time.perf_counter() - started:.1f}s: sha256 {sha[:16]}...")
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(index_path.with_suffix(".lock")):
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        index[key] = sha
        write_json_atomic(index_path, index)
    return sha
