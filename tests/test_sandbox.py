"""The HumanEval sandbox: only code that ran to the end passes, and each way out of the sandbox fails.

The token tests run under whatever isolation this machine has. The isolation tests run under each mechanism that
works here (bubblewrap, the child's own namespaces) and skip, saying why, where one does not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from latent_relay.tasks import sandbox
from latent_relay.tasks.registry import TaskItem, get_task
from latent_relay.tasks.sandbox import (
    NETWORK_BLOCKED_MESSAGE,
    SPAWN_BLOCKED_MESSAGE,
    SandboxConfigError,
    SandboxIsolationWarning,
    forget_isolation,
    isolation_problem,
    run_python,
)

pytestmark = pytest.mark.filterwarnings("ignore::latent_relay.tasks.sandbox_isolation.SandboxIsolationWarning")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ITEM = TaskItem(
    id="toy/0",
    question=PROMPT,
    gold="    return a + b\n",
    raw={"prompt": PROMPT, "test": TEST, "entry_point": "add", "canonical_solution": "    return a + b\n"},
)
CORRECT = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def humaneval():
    task = get_task("humaneval")
    task.timeout_s = 5.0
    return task


@pytest.fixture(params=["bwrap", "namespaces"])
def isolation(request):
    """Each isolating mechanism that works on this machine; the others skip with the reason."""
    problem = isolation_problem(request.param)
    if problem:
        pytest.skip(f"{request.param} isolation is not available on this machine: {problem}")
    return request.param


@pytest.fixture
def writable_dirs(tmp_path):
    """World-writable folders outside the sandbox's private /tmp (so that only the sandbox can stop a write):
    one in the repository, one in the host's temporary folder."""
    in_repository = Path(tempfile.mkdtemp(dir=ROOT, prefix=".sandbox-escape-"))
    for folder in (in_repository, tmp_path):
        folder.chmod(0o777)
    yield [in_repository, tmp_path]
    shutil.rmtree(in_repository, ignore_errors=True)


# --- passed means the tests ran to the end ------------------------------------------------------------------

EARLY_EXITS = {
    "SystemExit(0) at module level": "raise SystemExit(0)\n",
    "sys.exit() at module level": "import sys\nsys.exit()\n",
    "exit(0) at module level": "exit(0)\n",
    "os._exit(0) at module level": "import os\nos._exit(0)\n",
    "posix._exit(0) at module level": "import posix\nposix._exit(0)\n",
    "os._exit(0) from a thread": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
    "time.sleep(5)\n",
}


@pytest.mark.parametrize("exit_code", list(EARLY_EXITS.values()), ids=list(EARLY_EXITS))
def test_exiting_with_status_0_before_the_tests_is_a_failure(humaneval, exit_code):
    result = humaneval.run_tests(ITEM, f"```python\n{exit_code}{CORRECT}```")
    assert result.status == "failed" and result.returncode == 0, result
    assert "before the tests finished" in result.detail


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "import os; os._exit(0)"])
def test_exiting_with_status_0_inside_the_tests_is_a_failure(humaneval, body):
    result = humaneval.run_tests(ITEM, f"```python\ndef add(a, b):\n    {body}\n```")
    assert result.status == "failed" and "before the tests finished" in result.detail


def test_printed_success_markers_and_guessed_tokens_do_not_pass(humaneval):
    """Whatever the program can read about its run (arguments, environment, stdin, its open files) holds no token."""
    snoop = (
        "import os, sys\n"
        "print('passed')\nprint('ALL TESTS PASSED')\n"
        "for _ in range(3):\n    print(os.urandom(16).hex())\n"
        "def grab(path):\n    try:\n        return open(path, 'rb').read()\n    except OSError:\n        return b''\n"
        "seen = [grab('/proc/self/cmdline'), grab('/proc/self/environ'), repr(dict(os.environ)).encode()]\n"
        "seen += [sys.stdin.buffer.read()] + [grab(f'/proc/self/fd/{fd}') for fd in range(64)]\n"
        "for data in seen:\n    sys.stdout.buffer.write(data + b'\\n')\n"
        "print(os.urandom(16).hex())\nsys.stdout.flush()\nos._exit(0)\n"
    )
    result = humaneval.run_tests(ITEM, f"```python\n{CORRECT}{snoop}```")
    assert result.status == "failed" and "before the tests finished" in result.detail


def test_verdict_needs_the_exact_token_and_status_0():
    token = "ab" * 16
    verdict = sandbox._verdict
    assert verdict(0, f"\n{token}\n".encode(), b"", token, "none").passed
    assert not verdict(0, f"\n{'cd' * 16}\n".encode(), b"", token, "none").passed
    assert not verdict(0, f"\n{token}".encode(), b"", token, "none").passed
    assert not verdict(1, f"\n{token}\n".encode(), b"boom", token, "none").passed
    assert verdict(-9, b"", b"", token, "none").detail.startswith("killed by signal SIGKILL")


def test_correct_wrong_and_crashing_solutions(humaneval):
    assert humaneval.run_tests(ITEM, CORRECT).passed
    wrong = humaneval.run_tests(ITEM, "    return a - b\n")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail and "candidate(2, 3) == 5" in wrong.detail
    crash = run_python("import sys\nsys.exit('gave up')\n", timeout_s=5)
    assert crash.status == "failed" and crash.returncode == 1 and crash.detail == "gave up"


def test_tests_are_compiled_apart_from_the_program():
    """Test code cannot be swallowed by the program's text: an unclosed string is the program's syntax error."""
    result = run_python('x = 1\ns = """\n', tests="print('tests ran')\n", timeout_s=5)
    assert result.status == "failed" and "SyntaxError" in result.detail


def test_limits_and_a_throwaway_folder_without_isolation():
    """`none` still isolates the interpreter (`-I`), limits memory, works in a folder deleted afterwards, and
    names what it blocks."""
    probe = run_python(
        "import os, sys\nassert sys.flags.isolated == 1\n"
        "assert os.environ['HOME'] == os.getcwd() and 'relay-sandbox-' in os.getcwd(), dict(os.environ)\n"
        "open('scratch.txt', 'w').write('x')\nraise SystemExit(os.getcwd())\n",
        timeout_s=5,
        isolation="none",
    )
    assert probe.status == "failed" and probe.returncode == 1 and probe.isolation == "none"
    assert "relay-sandbox-" in probe.detail and not os.path.exists(probe.detail)
    hog = run_python("x = bytearray(2 << 30)\n", timeout_s=5, memory_bytes=512 << 20, isolation="none")
    assert hog.status == "failed" and "MemoryError" in hog.detail
    raw = run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n", isolation="none")
    assert raw.status == "failed" and NETWORK_BLOCKED_MESSAGE in raw.detail


# --- choosing the isolation -----------------------------------------------------------------------------------


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.delenv("RELAY_SANDBOX", raising=False)
    forget_isolation()
    yield monkeypatch
    forget_isolation()


def test_no_isolation_warns_once_and_still_runs(fresh_choice):
    fresh_choice.setattr(sandbox, "_probe", lambda mode: "" if mode == "none" else f"no {mode} in this test")
    with pytest.warns(SandboxIsolationWarning) as caught:
        first = run_python("print('hi')\n", timeout_s=5)
        second = run_python("print('hi')\n", timeout_s=5)
    assert len([w for w in caught if w.category is SandboxIsolationWarning]) == 1
    message = str(caught[0].message)
    assert "without isolation" in message and "no bwrap in this test" in message and "no namespaces" in message
    assert first.passed and second.passed and first.isolation == second.isolation == "none"


def test_relay_sandbox_variable(fresh_choice):
    fresh_choice.setenv("RELAY_SANDBOX", "docker")
    with pytest.raises(SandboxConfigError, match="RELAY_SANDBOX='docker' is not a sandbox; choose one of auto,"):
        run_python("pass\n")
    forget_isolation()
    fresh_choice.setenv("RELAY_SANDBOX", "none")
    with pytest.warns(SandboxIsolationWarning, match="RELAY_SANDBOX: set to none"):
        assert run_python("pass\n", timeout_s=5).isolation == "none"


# --- isolation: each way out fails -----------------------------------------------------------------------------


def test_solutions_pass_fail_and_time_out_under(isolation):
    assert run_python(CORRECT, tests=TEST + "check(add)\n", isolation=isolation, timeout_s=5).passed
    wrong = run_python("def add(a, b):\n    return a - b\n", tests=TEST + "check(add)\n", isolation=isolation)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail and wrong.isolation == isolation
    loop = run_python("while True:\n    pass\n", isolation=isolation, timeout_s=1)
    assert loop.status == "timeout"


def test_private_home_and_tmp_and_memory_limit_under(isolation):
    probe = (
        "import os\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd() == '/tmp', dict(os.environ)\n"
        "open('/tmp/scratch.txt', 'w').write('x')\n"
        "assert os.listdir('/tmp') == ['scratch.txt'], os.listdir('/tmp')\n"  # the host's /tmp is not visible
    )
    assert run_python(probe, isolation=isolation, timeout_s=5).passed
    hog = run_python("x = bytearray(2 << 30)\n", timeout_s=5, memory_bytes=512 << 20, isolation=isolation)
    assert hog.status == "failed" and "MemoryError" in hog.detail


def test_writing_outside_the_private_tmp_fails_under(isolation, writable_dirs):
    targets = [folder / "escaped.txt" for folder in writable_dirs]
    cache = Path.home() / ".cache"
    if cache.is_dir():
        targets.append(cache / f"relay-sandbox-escape-{uuid.uuid4().hex}")
    program = (
        f"errors = []\nfor target in {[str(t) for t in targets]!r}:\n"
        "    try:\n        open(target, 'w').write('x')\n        errors.append('wrote ' + target)\n"
        "    except OSError as exc:\n        errors.append(exc.strerror)\n"
        "raise SystemExit(' | '.join(errors))\n"
    )
    result = run_python(program, isolation=isolation, timeout_s=5)
    assert result.status == "failed" and "wrote" not in result.detail, result.detail
    assert result.detail.startswith("Read-only file system"), result.detail  # the repository: read-only
    assert not any(target.exists() for target in targets)


ESCAPES = {
    "posix.system": "import posix\nprint(posix.system(f'echo x > {target}'))\n",
    "posix.fork": "import posix\nif posix.fork() == 0:\n    open(target, 'w').write('x')\n",
    "posix.posix_spawn": "import posix\nposix.posix_spawn('/bin/sh', ['sh', '-c', f'echo x > {target}'], {})\n",
    "posix.execv": "import posix\nposix.execv('/bin/sh', ['sh', '-c', f'echo x > {target}'])\n",
    "_posixsubprocess.fork_exec (a reloaded subprocess)": "import importlib, subprocess\n"
    "importlib.reload(subprocess)\nsubprocess.run(['sh', '-c', f'echo x > {target}'])\n",
    "ctypes libc system": "import ctypes\nprint(ctypes.CDLL(None).system(f'echo x > {target}'.encode()))\n",
    "ctypes libc fork": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\npid = libc.fork()\n"
    "if pid == 0:\n    open(target, 'w').write('x')\nraise SystemExit(f'fork: {pid}, errno {ctypes.get_errno()}')\n",
}


@pytest.mark.parametrize("escape", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escaping_through_new_processes_fails_under(isolation, writable_dirs, escape):
    """Each tries to write a file in a world-writable folder of the repository, past the patched os/subprocess."""
    target = writable_dirs[0] / "escaped.txt"
    program = f"target = {str(target)!r}\n{escape}raise SystemExit('the escape ran without error')\n"
    result = run_python(program, isolation=isolation, timeout_s=5)
    assert result.status == "failed" and not target.exists(), result


def test_fork_bomb_stops_at_the_first_fork_under(isolation):
    started = time.monotonic()
    result = run_python("import posix\nwhile True:\n    posix.fork()\n", isolation=isolation, timeout_s=5)
    assert result.status == "failed" and "Operation not permitted" in result.detail, result
    assert time.monotonic() - started < 4


def test_no_network_under(isolation):
    """A raw socket made through ctypes (past the patched socket module) cannot reach the host's loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = (
            "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
            f"address = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
            "result = libc.connect(fd, address, len(address))\n"
            "raise SystemExit(f'socket {fd}, connect {result}, errno {ctypes.get_errno()}')\n"
        )
        result = run_python(program, isolation=isolation, timeout_s=5)
        assert "connect -1" in result.detail, result
        with pytest.raises(BlockingIOError):
            listener.accept()
    patched = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", isolation=isolation)
    assert patched.status == "failed" and NETWORK_BLOCKED_MESSAGE in patched.detail
    spawn = run_python("import subprocess\nsubprocess.run(['true'])\n", isolation=isolation)
    assert spawn.status == "failed" and SPAWN_BLOCKED_MESSAGE in spawn.detail


# --- nothing outlives the harness ---------------------------------------------------------------------------

# A harness process that runs one program in the sandbox. It imports only the tasks folder (as
# `latent_relay.tasks`), not the package, whose __init__ takes seconds to import torch, transformers and ray.
HARNESS = f"""
import signal, sys, types
# Ctrl-C as at a terminal, even when pytest runs as a background job (which starts with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
for name, folder in (("latent_relay", {str(ROOT / "latent_relay")!r}), ("latent_relay.tasks", {str(ROOT / "tasks")!r})):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [folder]
from latent_relay.tasks.sandbox import run_python
run_python(sys.argv[1], timeout_s=60, isolation=sys.argv[2])
"""


def _processes_with_argument(argument: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            arguments = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in arguments:
            found.append(int(entry))
    return found


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(params=["bwrap", "namespaces", "none"])
def any_isolation(request):
    problem = isolation_problem(request.param)
    if problem:
        pytest.skip(f"{request.param} isolation is not available on this machine: {problem}")
    return request.param


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill -9"])
def test_the_run_ends_with_its_harness(any_isolation, stop):
    """A program still running when its harness gets Ctrl-C (or is killed) is gone right after."""
    marker = f"relay-sandbox-test-{uuid.uuid4().hex}"
    program = (
        "import posix, sys\n"
        f"posix.execv(sys.executable, [sys.executable, '-I', '-c', 'import time; time.sleep(60)', {marker!r}])\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, program, any_isolation], cwd=ROOT)
    try:
        assert _wait_for(lambda: _processes_with_argument(marker), 20), "the program never started"
        harness.send_signal(stop)
        harness.wait(timeout=20)
        assert _wait_for(lambda: not _processes_with_argument(marker), 5), "the program outlived its harness"
    finally:
        harness.kill()
        harness.wait()
        for pid in _processes_with_argument(marker):
            os.kill(pid, signal.SIGKILL)
