"""How the sandbox isolates its child: the mechanisms, the command that starts the child under each, the warning.

- `bwrap`: bubblewrap (`apt-get install bubblewrap`) builds the namespaces: a read-only bind of /, private tmpfs
  on /tmp, /var/tmp, /run and /dev/shm, a minimal /dev, its own /proc, no network, no capabilities, and it dies
  with its parent. The child then bans new processes itself (`sandbox_confine.ban_processes`).
- `namespaces`: the child sets up the same namespaces and mounts itself (`sandbox_confine`), where the kernel
  allows unprivileged user namespaces; nothing needs to be installed.
- `none`: limits only (memory, CPU, file size, the process ban where seccomp is available); the harness warns
  once per process that solutions can read and write the user's files and use the network.

`auto` (the default, or `$RELAY_SANDBOX`) takes the first of `bwrap`, `namespaces` that works here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENV_VAR = "RELAY_SANDBOX"
MODES = ("bwrap", "namespaces", "none")
ISOLATED = ("bwrap", "namespaces")  # in the order `auto` tries them
CHILD = Path(__file__).with_name("sandbox_child.py")
TMPFS_BYTES = 64 << 20
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run")


class SandboxIsolationWarning(RuntimeWarning):
    """Solutions run without namespace isolation on this machine."""


class SandboxConfigError(ValueError):
    """`$RELAY_SANDBOX` names no mechanism, or one that does not work on this machine."""


def requested_mode() -> str:
    """`$RELAY_SANDBOX` (`auto` when unset or empty), checked."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value != "auto" and value not in MODES:
        raise SandboxConfigError(f"{ENV_VAR}={value!r} is not a sandbox; choose one of auto, {', '.join(MODES)}")
    return value


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def _bwrap_version() -> tuple[int, ...]:
    try:
        text = subprocess.run([bwrap_path(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else ()


def bwrap_arguments() -> list[str]:
    """bubblewrap's options for the sandbox (`--size` needs 0.7 or later; without it tmpfs is unbounded)."""
    size = ["--size", str(TMPFS_BYTES)] if _bwrap_version() >= (0, 7) else []
    arguments = ["--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in (*PRIVATE_DIRS, "/dev/shm"):
        if path == "/dev/shm" or (os.path.isdir(path) and not os.path.islink(path)):
            arguments += [*size, "--tmpfs", path]
    arguments += ["--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp", "--chdir", "/tmp"]
    return [*arguments, "--cap-drop", "ALL"]


def child_command(mode: str) -> list[str]:
    """The command that starts the sandbox's child under `mode`."""
    python = [sys.executable, "-I", "-B", str(CHILD), mode]
    if mode == "bwrap":
        return [bwrap_path() or "bwrap", *bwrap_arguments(), "--", *python]
    return python


def no_isolation_message(problems: dict[str, str]) -> str:
    """The one warning given where no mechanism works: what that means, why, and how to get isolation."""
    why = "; ".join(f"{mode}: {problem}" for mode, problem in problems.items())
    return (
        f"HumanEval solutions run without isolation here ({why}): they can read and write your files and use the "
        "network. Install bubblewrap, or allow unprivileged user namespaces (on Ubuntu 24.04: "
        "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`)."
    )
