"""The user cache of converted models: where it lives, building a folder there exactly once, the hash index.

`build_once` makes a folder atomically (built in an owner-only temporary sibling, then `os.rename`d into place)
under an `fcntl` lock, so two processes racing to convert the same model do the work once: the loser waits for the
lock and reuses the winner's folder. The cache's folders are owner-only; one that another user owns or that others
can write is refused (`latent_relay.kernels.cache_folder`, shared with the compiled kernels).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from latent_relay.kernels import cache_folder
from latent_relay.kernels.cache_folder import cache_root, private_folder, refuse_untrusted, write_private

COMPLETE_MARKER = "latent_relay.json"
_CHUNK = 1 << 20


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[latent-relay] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """`RELAY_CACHE_DIR`, else `$XDG_CACHE_HOME/latent-relay`, else `~/.cache/latent-relay`."""
    return cache_root()


def models_dir() -> Path:
    """`<cache>/models`, created owner-only where missing; refused where it or the cache root is not this user's."""
    return private_folder(cache_root() / "models", cache_root())


@contextmanager
def file_lock(lock_path: Path, waiting_message: str | None = None) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `lock_path` (created owner-only if needed; its folder must exist)."""
    with cache_folder.file_lock(lock_path, on_wait=(lambda: log(waiting_message)) if waiting_message else None):
        yield


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def build_once(final: Path, build: Callable[[Path], None], is_valid: Callable[[Path], bool] = is_complete) -> Path:
    """Return `final`, building it first with `build(staging_dir)` unless a valid copy already exists.

    `build` must write everything, including the `latent_relay.json` marker, into the staging folder it is
    given (owner-only, `0700`); the folder only appears at `final` (by an atomic rename) once `build` has returned.
    `is_valid` (default: the marker exists) decides whether an existing `final` is kept; one that is not (a killed
    build's leftover, or a folder made by an older latent-relay) is deleted and built again. The folder holding
    `final` is created owner-only and refused where another user owns it or others can write it.
    """
    private_folder(final.parent)
    if is_valid(final):
        return final
    lock = final.parent / f"{final.name}.lock"
    with file_lock(lock, waiting_message=f"waiting for another process building {final}"):
        if is_valid(final):
            return final
        for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete leftover, or made by an older version
            log(f"rebuilding {final}: incomplete, or made by an older latent-relay")
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        try:
            build(staging)
            if not is_complete(staging):
                raise RuntimeError(f"builder for {final} did not write {COMPLETE_MARKER}")
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON, owner-only, never leaving a half-written file."""
    write_private(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def sha256_of_files(paths: list[Path]) -> str:
    """SHA-256 of the concatenation of `paths`, streamed."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path) -> list[int]:
    """(size, mtime_ns, ctime_ns, inode): cheap evidence that a file is unchanged since it was hashed. The inode
    change time cannot be set back (`touch -d` or `cp -p` restore the mtime, not it), so a file whose bytes were
    swapped for others of the same size and mtime still shows a new stamp."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def file_stamps(paths: list[Path]) -> list[list]:
    """(absolute path, *`file_stamp`) per file."""
    return [[str(path.resolve()), *file_stamp(path)] for path in paths]


def cached_sha256(paths: list[Path]) -> str:
    """SHA-256 of the concatenated files, remembered in the cache keyed by path and `file_stamp`.

    A file that is replaced or modified changes its stamp and is hashed again. The index is an owner-only file in
    the cache root; one that others can write is refused.
    """
    root = private_folder(cache_dir())
    index_path = root / "sha256-index.json"
    key = json.dumps(file_stamps(paths))
    if index_path.exists():
        refuse_untrusted(index_path)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    started = time.perf_counter()
    sha = sha256_of_files(paths)
    log(f"hashed {len(paths)} file(s) in {time.perf_counter() - started:.1f}s: sha256 {sha[:16]}...")
    try:
        with file_lock(index_path.with_suffix(".lock")):
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = {}
            index[key] = sha
            write_json_atomic(index_path, index)
    except OSError as exc:  # a read-only cache: hashed again next time
        log(f"could not record the SHA-256 in {index_path}: {exc}")
    return sha
