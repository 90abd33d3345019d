"""Run untrusted Python (HumanEval completions and their tests) in an isolated child process.

Passed means the code ran to its end: the child (`sandbox_child.py`) writes a per-run random token to stdout only
after the program and its test code both returned, and the harness checks for it. An exit status of 0 without the
token (`raise SystemExit(0)`, `os._exit(0)`, a printed "passed") is a failure, like every other ending.

Isolation (`sandbox_isolation.py`): bubblewrap where installed, else namespaces the child sets up itself; a
read-only root, private /tmp and home, no network, its own pid namespace, no capabilities, no new processes, and
limits on memory, CPU time and file size. Where neither mechanism works the code runs with the limits only, after
one `SandboxIsolationWarning` per process. However a run ends (timeout, error, Ctrl-C or death of the harness), the
child's process group is killed and the pid namespace goes with it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import IO

from latent_relay.tasks.sandbox_child import NETWORK_BLOCKED_MESSAGE, SETUP_FAILED_PREFIX, SPAWN_BLOCKED_MESSAGE
from latent_relay.tasks.sandbox_isolation import (
    ISOLATED,
    MODES,
    SandboxConfigError,
    SandboxIsolationWarning,
    bwrap_path,
    child_command,
    no_isolation_message,
    requested_mode,
)

__all__ = [
    "NETWORK_BLOCKED_MESSAGE",
    "SPAWN_BLOCKED_MESSAGE",
    "RunResult",
    "SandboxConfigError",
    "SandboxIsolationWarning",
    "chosen_isolation",
    "isolation_problem",
    "run_python",
]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 1 << 30
MAX_OUTPUT_BYTES = 8 << 20
PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RunResult:
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    detail: str  # last lines of stderr, or why it stopped
    isolation: str = ""  # the mechanism it ran under: bwrap, namespaces or none

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(
    program: str,
    *,
    tests: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    isolation: str | None = None,
) -> RunResult:
    """Run `program`, then `tests` (compiled separately, in the same globals), in the sandbox; "passed" when both
    ran to the end within `timeout_s`. `isolation` forces a mechanism (default: `chosen_isolation()`)."""
    mode = isolation or chosen_isolation()
    if mode not in MODES:
        raise SandboxConfigError(f"unknown sandbox isolation {mode!r}; choose one of {', '.join(MODES)}")
    return _run(program, tests, mode, timeout_s, memory_bytes)


_probe_lock = threading.Lock()
_problems: dict[str, str] = {}
_chosen: list[str] = []


def isolation_problem(mode: str) -> str:
    """Why `mode` cannot isolate a run on this machine, or "" when it can (a trivial program must pass under it;
    checked once per process)."""
    with _probe_lock:
        if mode not in _problems:
            _problems[mode] = _probe(mode)
        return _problems[mode]


def _probe(mode: str) -> str:
    if mode == "none":
        return ""
    if mode == "bwrap" and bwrap_path() is None:
        return "bubblewrap (bwrap) is not installed"
    if os.uname().sysname != "Linux":
        return "needs Linux"
    result = _run("pass\n", "", mode, PROBE_TIMEOUT_S, DEFAULT_MEMORY_BYTES)
    if result.passed:
        return ""
    lines = result.detail.strip().splitlines()
    return lines[-1].removeprefix(f"{SETUP_FAILED_PREFIX} ") if lines else result.status


def chosen_isolation() -> str:
    """The mechanism runs use: `$RELAY_SANDBOX`, or (`auto`) the first of bwrap, namespaces that works here, else
    `none` with one `SandboxIsolationWarning` per process."""
    requested = requested_mode()
    with _probe_lock:
        if _chosen:
            return _chosen[0]
    if requested == "none":
        chosen, problems = "none", {"RELAY_SANDBOX": "set to none"}
    elif requested != "auto":
        problem = isolation_problem(requested)
        if problem:
            raise SandboxConfigError(f"RELAY_SANDBOX={requested} does not work here: {problem}")
        chosen, problems = requested, {}
    else:
        problems = {mode: isolation_problem(mode) for mode in ISOLATED}
        chosen = next((mode for mode in ISOLATED if not problems[mode]), "none")
    with _probe_lock:
        if _chosen:  # another thread chose meanwhile
            return _chosen[0]
        _chosen.append(chosen)
    if chosen == "none":
        warnings.warn(no_isolation_message(problems), SandboxIsolationWarning, stacklevel=3)
    return chosen


def forget_isolation() -> None:
    """Probe and choose again on the next run (for tests, or after installing bubblewrap)."""
    with _probe_lock:
        _problems.clear()
        _chosen.clear()


def _run(program: str, tests: str, mode: str, timeout_s: float, memory_bytes: int) -> RunResult:
    token = secrets.token_hex(16)
    job = {
        "token": token,
        "program": program,
        "tests": tests,
        "memory_bytes": memory_bytes,
        "cpu_seconds": max(1, math.ceil(timeout_s)) + 1,
        "file_bytes": MAX_OUTPUT_BYTES,
    }
    # Unnamed files: nothing in a folder for the program to find. The child empties the job file after reading it.
    with (
        tempfile.TemporaryDirectory(prefix="relay-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as job_file,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        job_file.write(json.dumps(job).encode())
        job_file.flush()
        job_file.seek(0)
        child = subprocess.Popen(
            child_command(mode),
            cwd=workdir,
            env={},
            stdin=job_file,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        job_file.close()
        try:
            finished = _wait_unreaped(child.pid, timeout_s)
        finally:
            _kill(child)  # also on KeyboardInterrupt: nothing of the run outlives this call
        if not finished:
            return RunResult("timeout", None, f"timed out after {timeout_s:g}s", mode)
        return _verdict(child.returncode, _tail(out, len(token) + 2), _tail(err, 2000), token, mode)


def _verdict(returncode: int, stdout_end: bytes, stderr_end: bytes, token: str, mode: str) -> RunResult:
    if returncode == 0 and stdout_end == f"\n{token}\n".encode():
        return RunResult("passed", 0, "", mode)
    detail = stderr_end.decode("utf-8", "replace").strip()
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        detail = f"killed by signal {name}; {detail}".rstrip("; ")
    elif returncode == 0:
        detail = f"exited with status 0 before the tests finished; {detail}".rstrip("; ")
    elif not detail:
        detail = f"exited with status {returncode}"
    return RunResult("failed", returncode, detail, mode)


def _tail(handle: IO[bytes], limit: int) -> bytes:
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - limit))
    return handle.read()


def _kill(child: subprocess.Popen) -> None:
    """Kill the child's process group and reap the child. Unreaped until now (running, or a zombie holding its
    pid), its process group id cannot have been reused. Its pid namespace dies with it (`die_with_parent`)."""
    if child.returncode is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.wait()


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
