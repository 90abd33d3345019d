"""The user cache folder: where it is, folders made owner-only, and the refusal of anything others can write.

Everything latent-relay caches (compiled kernels, converted models, the hash index) lives under one root:
``RELAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/latent-relay``, else ``~/.cache/latent-relay``. What is loaded from it
runs as code (a kernel library) or decides what a model computes (weights), so:

- folders are created owner-only (``0700``, whatever the umask) and files owner-only (``0600`` / ``0700``);
- a folder or file that another user (root aside) owns, or that group or others can write, is refused with
  :class:`UntrustedCacheError` (a ``PermissionError``) whose one-line message says how to fix it. An existing folder
  that only its owner can write (say ``0755`` from an older version) is accepted as it is.

Folders above the cache root are not checked: a folder there that others could write could only swap the root for
one they own, which the ownership check refuses.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UntrustedCacheError(PermissionError):
    """A cache folder or file that another user owns or that group or others can write: nothing is loaded from it."""


def cache_root() -> Path:
    """``RELAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/latent-relay``, else ``~/.cache/latent-relay``."""
    explicit = os.environ.get("RELAY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "latent-relay"


def trusted_owners() -> set[int]:
    """This user and root (who could change anything anyway; a cache that root set up read-only for all is fine)."""
    return {os.geteuid(), 0}


def refuse_untrusted(path: Path, info: os.stat_result | None = None) -> os.stat_result:
    """``path``'s stat (following links), after checking that this user (or root) owns it and that no one else can
    write it."""
    info = os.stat(path) if info is None else info
    what = "folder" if stat.S_ISDIR(info.st_mode) else "file"
    if info.st_uid not in trusted_owners():
        raise UntrustedCacheError(
            f"cache {what} {path} belongs to another user (uid {info.st_uid}); latent-relay loads nothing from it: "
            "use a cache folder of your own (set RELAY_CACHE_DIR)"
        )
    if info.st_mode & _WRITABLE_BY_OTHERS:
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}.get(
            info.st_mode & _WRITABLE_BY_OTHERS, "group and others"
        )
        raise UntrustedCacheError(
            f"cache {what} {path} is writable by {who} (mode {stat.S_IMODE(info.st_mode):o}); latent-relay loads "
            f"nothing from it: check its contents, then run chmod go-w {path} (or delete it)"
        )
    return info


def private_folder(path: Path, root: Path | None = None) -> Path:
    """``path``, created owner-only where missing, with ``root`` (an ancestor) and each folder between them; every
    one of them, new or old, must pass :func:`refuse_untrusted`. Folders above ``root`` (above ``path`` without a
    ``root``) are created as ``mkdir -p`` would and not checked."""
    path = Path(path)
    root = path if root is None else Path(root)
    between = path.relative_to(root).parts
    chain = [root, *(root.joinpath(*between[: i + 1]) for i in range(len(between)))]
    root.parent.mkdir(parents=True, exist_ok=True)
    for folder in chain:
        try:
            folder.mkdir(mode=FOLDER_MODE)
            os.chmod(folder, FOLDER_MODE)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass
        info = refuse_untrusted(folder)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(f"cache path {folder} is not a folder")
    return path


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a temporary sibling renamed over it), owner-only (``0600``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created owner-only if needed) for the block;
    ``on_wait`` is called once if another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
