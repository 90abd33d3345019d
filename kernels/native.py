"""Compiled CPU kernels: C sources in this folder, built once per machine with the system C compiler, loaded by ctypes.

A kernel's source ``kernels/<name>.c`` is compiled on first use into ``<cache>/kernels/<name>-<hash>.so`` (the hash
covers the source, the flags and the compiler's version), about a second, and loaded from there afterwards. The
cache is ``RELAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/latent-relay``, else ``~/.cache/latent-relay`` (the one the
bundled models use). ``CC`` picks the compiler (default ``cc``).

Where a kernel cannot be used (not x86-64, a CPU without AVX2/FMA/F16C, no compiler, a failed build) the library
is ``None``, one warning says why, and callers take their plain-torch path; ``RELAY_KERNELS=torch`` skips the
compiled kernels altogether. Nothing here is needed for correctness, only for speed.

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

SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LIBS = ("-lm",)
NEEDED_CPU_FLAGS = ("avx2", "fma", "f16c")


class NativeKernelUnavailable(RuntimeError):
    """A compiled CPU kernel cannot be built or loaded here (the message says why)."""


def build_dir() -> Path:
    explicit = os.environ.get("RELAY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "latent-relay" / "kernels"


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


def build(name: str) -> Path:
    """Compile ``kernels/<name>.c`` (unless already built) and return the shared library's path."""
    _check_machine()
    source = SOURCE_DIR / f"{name}.c"
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS + LIBS), version]).encode()).hexdigest()[:16]
    target = build_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[latent-relay] building the compiled CPU kernel {source.name} (once) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [cc, *FLAGS, str(source), "-o", str(partial), *LIBS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise NativeKernelUnavailable(f"building {source.name} failed:\n{done.stderr.strip()}")
        os.replace(partial, target)  # atomic: a concurrent build of the same key writes the same file
    for stale in target.parent.glob(f"{name}-*.so"):  # builds of older sources or other compilers
        if stale != target:
            stale.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
    return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name``, or ``None`` (with one warning saying why) where it cannot be used."""
    try:
        return ctypes.CDLL(str(build(name)))
    except (NativeKernelUnavailable, OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"latent-relay: compiled CPU kernel {name!r} unavailable, using torch: {err}", stacklevel=2)
        return None
