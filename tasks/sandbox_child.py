"""The sandbox's child process: `python -I -B sandbox_child.py MODE`, started by `sandbox.py` (standard library only).

It reads its job from stdin (JSON: the program, the test code, the limits and a per-run random token), empties that
file and puts /dev/null in its place, confines itself (MODE: `namespaces` sets up its own namespaces, `bwrap` checks
what bubblewrap set up, `none` only limits), then runs the program and the test code in one namespace. Only when
both ran to the end does it write the token to stdout, as the last line, and exit 0 at once; every other ending
(SystemExit, os._exit, an exception, a signal, a printed imitation) leaves the token out, and the harness counts that
as a failure. The token is never in the child's arguments, environment or files, so only code that runs to the
end can print it, or code that searches this process's own memory (its frames) for it: no check made inside the
process that runs the program can rule that out.

In `namespaces` mode this process stays outside the new pid namespace: it forks the process that runs the program
(pid 1 there, so when it exits the kernel kills anything left in the namespace) and exits as that process did.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import linecache
import os
import resource
import signal
import sys
import traceback

NETWORK_BLOCKED_MESSAGE = "network access is disabled in the sandbox"
SPAWN_BLOCKED_MESSAGE = "disabled in the sandbox"
SETUP_FAILED_STATUS = 125
SETUP_FAILED_PREFIX = "relay-sandbox: setup failed:"
MODES = ("bwrap", "namespaces", "none")

_write, _exit = os.write, os._exit  # kept before the program runs: it may replace them


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "none"
    strict = mode != "none"  # isolated: every confinement step must succeed; `none`: best effort
    parent = os.getppid()
    job = _read_job()
    confine = None
    try:
        confine = _load_confine()
        if mode == "namespaces":
            _enter_namespaces(confine, parent)  # returns in the pid namespace's pid 1
        if strict:
            _check_isolation()
    except Exception as exc:  # noqa: BLE001 - any failure to confine ends the run before the program starts
        if strict:
            _setup_failed(exc)
    _limit(job, "/tmp" if strict else os.getcwd())
    _confine_process(confine, strict)
    if mode == "none" and os.getppid() != parent:  # the harness died before dying with it was arranged
        _exit(SETUP_FAILED_STATUS)
    _run(job)


def _read_job() -> dict:
    """The job from stdin, which is then emptied (so no one can read it again) and replaced by /dev/null."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    try:
        os.ftruncate(0, 0)
    except OSError:
        pass  # a pipe: reading it emptied it
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return json.loads(b"".join(chunks))


def _load_confine():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_confine.py")
    spec = importlib.util.spec_from_file_location("relay_sandbox_confine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _enter_namespaces(confine, parent: int) -> None:
    """New namespaces and a confined filesystem; fork pid 1 of the new pid namespace, which returns to run."""
    confine.enter_namespaces()
    confine.confine_filesystem()
    confine.die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the harness died before the line above could take effect
        _exit(SETUP_FAILED_STATUS)
    pid = os.fork()
    if pid == 0:
        confine.die_with_parent(signal.SIGKILL)  # this process's parent is the one below
        confine.mount_proc()
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # end the way the program's process ended, so the harness sees the signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    _exit(code & 0xFF if code >= 0 else 128 - code)


def _check_isolation() -> None:
    """Refuse to run the program if the namespaces are not what they should be."""
    import socket

    if not os.statvfs("/").f_flag & os.ST_RDONLY:
        raise RuntimeError("the root filesystem is writable")
    if os.statvfs("/tmp").f_flag & os.ST_RDONLY:
        raise RuntimeError("/tmp is not writable")
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces not in ([], ["lo"]):
        raise RuntimeError(f"network interfaces are visible: {', '.join(interfaces)}")
    if os.getpid() > 2:
        raise RuntimeError("not in a new pid namespace")


def _limit(job: dict, home: str) -> None:
    """Memory, CPU seconds, file size, no core dumps; a private home and temporary folder as the working one."""
    memory, cpu = job["memory_bytes"], job["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_bytes"], job["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.environ.clear()
    os.environ.update(HOME=home, TMPDIR=home)
    os.chdir(home)


def _confine_process(confine, strict: bool) -> None:
    """Die with the parent; no capabilities; no new processes, namespaces or mounts."""
    if confine is None:
        return
    for step in (lambda: confine.die_with_parent(signal.SIGKILL), confine.drop_capabilities, confine.ban_processes):
        try:
            step()
        except Exception as exc:  # noqa: BLE001
            if strict:
                _setup_failed(exc)


def _setup_failed(exc: BaseException) -> None:
    _write(2, f"{SETUP_FAILED_PREFIX} {exc}\n".encode())
    _exit(SETUP_FAILED_STATUS)


def _block_escapes() -> None:
    """Clear messages for the usual ways out (after the human-eval harness's `reliability_guard`); the kernel
    enforces the real limits, these only name them."""
    import _socket
    import shutil
    import socket
    import subprocess

    def no_network(*args, **kwargs):
        raise PermissionError(NETWORK_BLOCKED_MESSAGE)

    class BlockedSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    for module in (socket, _socket):
        module.socket = BlockedSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, no_network)
    socket.SocketType = BlockedSocket

    def disabled(*args, **kwargs):
        raise PermissionError(SPAWN_BLOCKED_MESSAGE)

    for name in (
        *("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe"),
        *("spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir"),
        *("removedirs", "putenv", "chdir", "fchdir", "chroot"),
    ):
        if hasattr(os, name):
            setattr(os, name, disabled)
    shutil.rmtree = shutil.move = disabled
    subprocess.Popen = disabled
    subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = disabled


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have replaced or closed them
            pass


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _run(job: dict) -> None:
    """Run the program, then the test code, in one namespace; the token only if both ran to the end."""
    token = ("\n" + job.pop("token") + "\n").encode()
    sources = [(job.pop("program"), "candidate.py"), (job.pop("tests"), "tests.py")]
    compile_, exec_ = builtins.compile, builtins.exec
    for source, filename in sources:  # so that tracebacks show the lines
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _block_escapes()
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        for source, filename in sources:
            exec_(compile_(source, filename, "exec"), namespace)
    except SystemExit as exc:
        status = _exit_status(exc)
        _flush()
        _exit(status)
    except BaseException:  # noqa: BLE001 - the program's own error: report it and fail
        traceback.print_exc()
        _flush()
        _exit(1)
    _flush()
    _write(1, token)
    _exit(0)


if __name__ == "__main__":
    main()
