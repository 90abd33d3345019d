"""Compiled CPU kernels: C sources in this folder, built once per machine with the system C compiler, loaded by ctypes.

A kernel's source ``kernels/<name>.c`` is compiled on first use into ``<cache>/kernels/<name>-<hash>.so`` (the hash
covers the source, the flags and the compiler's version), about a second, and loaded from there afterwards. The
cache is :func:`latent_relay.kernels.cache_folder.cache_root` (the one the bundled models use). ``CC`` picks the
compiler (default ``cc``).

A library in the cache runs as code in every relay process, so it is trusted only as far as it can be checked:

- the cache folders are owner-only (``0700``); a folder, library or record that another user owns or that group or
  others can write is refused (:class:`~latent_relay.kernels.cache_folder.UntrustedCacheError`);
- the library's SHA-256 is recorded beside it when it is built (``<name>-<hash>.so.sha256``, ``sha256sum`` format,
  written atomically) and checked before it is loaded, from the very file descriptor that ``dlopen`` then maps
  (``/proc/self/fd/N``), so what was hashed is what runs. A library that does not match its record is not loaded
  (:class:`KernelLibraryMismatch`; delete it to rebuild); a library without a record (built by an older
  latent-relay, or put there by hand) is rebuilt, under a lock, before anything loads it.

Where a kernel cannot be used (not x86-64, a CPU without AVX2/FMA/F16C, no compiler, a failed build, a cache that is
refused or a library that does not match its record) the library is ``None``, one warning says why, and callers take
their plain-torch path; ``RELAY_KERNELS=torch`` skips the compiled kernels altogether. Nothing here is needed for
correctness, only for speed.

torch is imported before any library is loaded, so a kernel built with ``-fopenmp`` binds torch's own OpenMP
runtime (both are ``libgomp.so.1``) and runs on torch's threads, with torch's thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernels share its OpenMP runtime)

from latent_relay.kernels.cache_folder import cache_root, file_lock, private_folder, refuse_untrusted, write_private

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)
NEEDED_CPU_FLAGS = ("avx2", "fma", "f16c")
LIBRARY_MODE = 0o700
RECORD_SUFFIX = ".sha256"
_CHUNK = 1 << 20


class NativeKernelUnavailable(RuntimeError):
    """A compiled CPU kernel cannot be built or loaded here (the message says why)."""


class KernelLibraryMismatch(NativeKernelUnavailable):
    """A cached kernel library whose bytes are not those recorded when it was built: it is not loaded."""


def build_dir() -> Path:
    return cache_root() / "kernels"


def kernel_folder() -> Path:
    """:func:`build_dir`, created owner-only where missing; refused (``UntrustedCacheError``) where it, or the cache
    root, belongs to another user or others can write it."""
    return private_folder(build_dir(), cache_root())


def record_path(library: Path) -> Path:
    """Where the SHA-256 of ``library`` is recorded: ``<library>.sha256``."""
    return library.with_name(library.name + RECORD_SUFFIX)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_machine() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeKernelUnavailable(f"the compiled CPU kernels are x86-64 only (this is {platform.machine()})")
    missing = [f for f in NEEDED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise NativeKernelUnavailable(f"this CPU lacks {', '.join(missing)}")


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise NativeKernelUnavailable(f"no C compiler ({cc!r} is not on PATH; set CC)")
    return path


def _sha256_of_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, _CHUNK):
        digest.update(block)
    return digest.hexdigest()


def _compile(cc: str, source: Path, target: Path) -> None:
    """Compile ``source`` into ``target`` (owner-only) and record its SHA-256 beside it; the caller holds the lock."""
    print(f"[latent-relay] building the compiled CPU kernel {source.name} (once) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [cc, *FLAGS, str(source), "-o", str(partial), *LIBS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise NativeKernelUnavailable(f"building {source.name} failed:\n{done.stderr.strip()}")
        os.chmod(partial, LIBRARY_MODE)
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sha = _sha256_of_fd(fd)
        finally:
            os.close(fd)
        record_path(target).unlink(missing_ok=True)  # never a moment where an old record vouches for new bytes
        os.replace(partial, target)
        write_private(record_path(target), f"{sha}  {target.name}\n".encode())


def build(name: str) -> Path:
    """Compile ``kernels/<name>.c`` (unless already built and recorded) and return the shared library's path."""
    _check_machine()
    folder = kernel_folder()
    source = SOURCE_DIR / f"{name}.c"
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS + LIBS), version]).encode()).hexdigest()[:16]
    target = folder / f"{name}-{key}.so"
    if target.is_file() and record_path(target).is_file():  # built: nothing to write (a read-only cache works)
        return target
    with file_lock(folder / f".{name}.lock"):
        if not (target.is_file() and record_path(target).is_file()):  # a library without its record is rebuilt
            _compile(cc, source, target)
        for stale in folder.glob(f"{name}-*.so*"):  # builds of older sources or other compilers, and their records
            if stale not in (target, record_path(target)):
                stale.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
    return target


def _recorded_sha256(library: Path) -> str:
    record = record_path(library)
    refuse_untrusted(record)
    fields = record.read_text().split()
    if len(fields) != 2 or fields[1] != library.name or len(fields[0]) != 64:
        raise KernelLibraryMismatch(f"{record} is not a SHA-256 record of {library.name}; delete both to rebuild")
    return fields[0].lower()


def open_verified(library: Path) -> int:
    """A read-only descriptor of ``library`` after checking its owner, its mode and its recorded SHA-256 (the caller
    closes it); raises ``UntrustedCacheError`` or :class:`KernelLibraryMismatch`."""
    refuse_untrusted(library.parent)
    expected = _recorded_sha256(library)
    fd = os.open(library, os.O_RDONLY | os.O_CLOEXEC)
    try:
        refuse_untrusted(library, os.fstat(fd))
        actual = _sha256_of_fd(fd)
        if actual != expected:
            raise KernelLibraryMismatch(
                f"{library} does not match the SHA-256 recorded when it was built (expected {expected[:16]}..., "
                f"got {actual[:16]}...); not loading it: delete it to rebuild it"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


#: Descriptors of the loaded libraries, kept open for the process's life: glibc knows a library loaded through
#: ``/proc/self/fd/N`` by that name, so N must never name another library in this process.
_PINNED: list[int] = []


def _dlopen_verified(library: Path) -> ctypes.CDLL:
    """Load the bytes that were checked: ``dlopen`` the checked descriptor through ``/proc/self/fd`` where there is
    one (so a file swapped in after the check is never mapped), else the path."""
    fd = open_verified(library)
    by_fd = f"/proc/self/fd/{fd}"
    try:
        loaded = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(library))
    except BaseException:
        os.close(fd)
        raise
    _PINNED.append(fd)
    return loaded


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name``, or ``None`` (with one warning saying why) where it cannot be used."""
    try:
        return _dlopen_verified(build(name))
    except (NativeKernelUnavailable, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"latent-relay: compiled CPU kernel {name!r} unavailable, using torch: {err}", stacklevel=2)
        return None
