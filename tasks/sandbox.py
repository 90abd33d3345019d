"""Run untrusted Python (HumanEval completions) in a subprocess with a timeout, memory limit and no network.

Layers, each cheap and independent:
- a fresh interpreter in isolated mode (`-I`: no PYTHON* variables, no user site, script dir not on the path)
  with an empty environment, in a throwaway working directory that is deleted afterwards;
- resource limits set in the child before it starts: address space (`RLIMIT_AS`), CPU seconds, file size;
- its own session, so a timeout kills every process it started;
- a network namespace with no interfaces (`unshare -n`) where the machine allows one, and in any case a
  prelude that replaces socket creation with a function that raises, and disables process spawning and file
  removal (after the human-eval harness's `reliability_guard`) before the untrusted code runs.
This keeps honest mistakes (infinite loops, memory blow-ups, stray downloads) contained; it is not a
security boundary against hostile code.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 1 << 30
MAX_OUTPUT_BYTES = 8 << 20
NETWORK_BLOCKED_MESSAGE = "network access is disabled in the sandbox"

# Runs inside the child before the candidate program: blocks sockets and process/file mischief, then
# executes the program file given as argv[1] under a module name that is not "__main__".
PRELUDE = f"""
import builtins, os, shutil, socket, subprocess, sys
import _socket

def _no_network(*args, **kwargs):
    raise PermissionError({NETWORK_BLOCKED_MESSAGE!r})

class _BlockedSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()

for _mod in (socket, _socket):
    _mod.socket = _BlockedSocket
    for _name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _no_network)
socket.SocketType = _BlockedSocket

def _disabled(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")

for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
              "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
              "remove", "unlink", "rmdir", "removedirs", "putenv", "chdir", "fchdir", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, _disabled)
shutil.rmtree = shutil.move = _disabled
subprocess.Popen = _disabled
subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _disabled

_path = sys.argv[1]
with open(_path, encoding="utf-8") as _handle:
    _source = _handle.read()
del _handle
_code = compile(_source, "candidate.py", "exec")
exec(_code, {{"__name__": "__candidate__", "__builtins__": builtins}})
"""


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    detail: str  # last lines of stderr, or why it stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments that give the child an empty network namespace, or () where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-rn",)):
        try:
            probe = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=5, env={})
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return (unshare, *flags)
    return ()


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


def run_python(
    program: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    isolate_network: bool = True,
) -> RunResult:
    """Run `program` (Python source) in the sandbox; "passed" means it exited 0 within `timeout_s`."""
    workdir = Path(tempfile.mkdtemp(prefix="relay-sandbox-"))
    try:
        program_path = workdir / "candidate.py"
        program_path.write_text(program, encoding="utf-8")
        prefix = network_namespace_prefix() if isolate_network else ()
        command = [*prefix, sys.executable, "-I", "-B", "-c", PRELUDE, str(program_path)]
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            child = subprocess.Popen(
                command,
                cwd=workdir,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_limits(memory_bytes, int(timeout_s) + 1),
                start_new_session=True,
            )
            finished = _wait_unreaped(child.pid, timeout_s)
            # The child is not reaped yet (running, or a zombie holding its pid), so its process group id
            # cannot have been reused: killing the group ends the child and anything it started.
            os.killpg(child.pid, signal.SIGKILL)
            returncode = child.wait()
            if not finished:
                return RunResult("timeout", None, f"timed out after {timeout_s:g}s")
        if returncode == 0:
            return RunResult("passed", 0, "")
        detail = _tail(workdir / "stderr") or f"exited with status {returncode}"
        if returncode < 0:
            detail = f"killed by signal {signal.Signals(-returncode).name}; {detail}"
        return RunResult("failed", returncode, detail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until `pid` exits or `timeout_s` passes, without reaping it; True if it exited."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
