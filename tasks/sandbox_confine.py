"""Linux confinement for the sandbox's child, through ctypes: namespaces, mounts, a process ban, no capabilities.

Standard library only: `sandbox_child.py` loads this file by path in an interpreter started with `python -I`, before
any untrusted code runs. Every step raises `ConfineError` (an `OSError` naming the step) when the kernel refuses it.

- `enter_namespaces()`: new user, mount, network, pid, ipc and uts namespaces, the caller's own uid and gid mapped
  (no privilege on the host is needed or gained: this is what `unshare --user --map-current-user` does).
- `confine_filesystem()`: every mount read-only, nosuid and nodev; private tmpfs on /tmp, /var/tmp, /run and
  /dev/shm; a fresh /dev with only null, zero, full, random and urandom; `mount_proc()` gives the pid namespace its
  own read-only /proc.
- `ban_processes()`: a seccomp filter that refuses fork, vfork, clone (except for threads), clone3 (ENOSYS, so
  libc falls back to clone for threads), unshare, setns, ptrace and every mount call. A fork bomb stops at its
  first fork, and nothing can be started that outlives the sandbox. RLIMIT_NPROC cannot do this: it exempts root.
- `drop_capabilities()`: empty capability sets, bounding and ambient sets cleared, no new privileges.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)

PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 22, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECCOMP_MODE_FILTER = 2
SECBIT_NOROOT_AND_LOCK = 0x3

TMPFS_BYTES = 64 << 20
DEVICES = ("null", "zero", "full", "random", "urandom")
PRIVATE_DIRS = ("/var/tmp", "/run")  # beside /tmp: hidden and writable in private; /run holds host sockets


class ConfineError(OSError):
    """A confinement step the kernel refused; the message names the step."""

    def __str__(self) -> str:
        return str(self.strerror)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, step: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise ConfineError(code, f"{step}: {os.strerror(code)}")
    return result


def _prctl(option: int, arg: int = 0, step: str = "prctl") -> int:
    return _check(_libc.prctl(option, arg, 0, 0, 0), step)


# --- namespaces and mounts ----------------------------------------------------------------------------------


def enter_namespaces() -> None:
    """Move this (single-threaded) process into new namespaces; its next child is pid 1 of the new pid namespace."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc.unshare(flags), "unshare (user, mount, network, pid namespaces)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
        except OSError as exc:
            raise ConfineError(exc.errno, f"write /proc/self/{name}: {exc.strerror}") from None


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None, step: str) -> None:
    _check(_libc.mount(_bytes(source), target.encode(), _bytes(fstype), flags, _bytes(data)), step)


def _tmpfs(target: str, mode: str = "1777") -> None:
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMPFS_BYTES},mode={mode}", f"tmpfs on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _set_mount_attr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = False) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"mount_setattr {path} (needs Linux 5.12)")


def confine_filesystem() -> None:
    """Read-only everything, then private writable tmpfs where programs expect to write, and a minimal /dev."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "make / private")
    _set_mount_attr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=True)
    _tmpfs("/tmp")
    for path in PRIVATE_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            _tmpfs(path)
    _fresh_dev()


def _fresh_dev() -> None:
    """A tmpfs /dev holding binds of the harmless host devices (nodev cleared on those binds only). The devices are
    bound through descriptors opened before the host's /dev is covered."""
    handles = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES}
    try:
        _tmpfs("/dev", mode="755")
        for name, handle in handles.items():
            target = f"/dev/{name}"
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
            _mount(f"/proc/self/fd/{handle}", target, None, MS_BIND, None, f"bind {target}")
            _set_mount_attr(target, 0, MOUNT_ATTR_NODEV)
    finally:
        for handle in handles.values():
            os.close(handle)
    os.symlink("/proc/self/fd", "/dev/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", f"/dev/{name}")
    os.mkdir("/dev/shm")
    _tmpfs("/dev/shm")
    _set_mount_attr("/dev", MOUNT_ATTR_RDONLY)


def mount_proc() -> None:
    """A read-only /proc of this pid namespace (call as its pid 1); an empty one where the kernel refuses that."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
    try:
        _mount("proc", "/proc", "proc", flags, None, "mount /proc")
    except ConfineError:
        _mount("tmpfs", "/proc", "tmpfs", flags, "size=4096,mode=555", "hide the host's /proc")


# --- processes, privileges ----------------------------------------------------------------------------------


def die_with_parent(signal_number: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal_number, "prctl(PR_SET_PDEATHSIG)")


#: machine -> (seccomp audit arch, syscall numbers). Numbers 428-433 (the new mount API) and 442 are shared.
_MACHINES = {
    "x86_64": (
        0xC000003E,
        {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "unshare": 272, "setns": 308, "mount": 165}
        | {"umount2": 166, "pivot_root": 155, "ptrace": 101},
    ),
    "aarch64": (
        0xC00000B7,
        {"clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41}
        | {"ptrace": 117},
    ),
}
_NEW_MOUNT_API = (428, 429, 430, 431, 432, 433, 442)
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_X32_BIT = 0x40000000
_EPERM, _ENOSYS = 1, 38


def process_ban_filter(machine: str) -> bytes:
    """The seccomp BPF program of `ban_processes` for `machine` (`platform.machine()`), as bytes."""
    if machine not in _MACHINES or sys.byteorder != "little":
        raise ConfineError(_ENOSYS, f"no process-ban filter for this machine ({machine}, {sys.byteorder}-endian)")
    arch, numbers = _MACHINES[machine]
    program: list[tuple[int, object, object, int]] = []  # (code, jump if true, jump if false, k); None = next
    program.append((_LD_W_ABS, None, None, 4))  # seccomp_data.arch
    program.append((_JEQ, None, "deny", arch))
    program.append((_LD_W_ABS, None, None, 0))  # seccomp_data.nr
    if machine == "x86_64":
        program.append((_JGE, "deny", None, _X32_BIT))  # the x32 ABI's numbers
    program.append((_JEQ, "nosys", None, numbers["clone3"]))
    denied = [number for name, number in numbers.items() if name not in ("clone", "clone3")] + list(_NEW_MOUNT_API)
    program += [(_JEQ, "deny", None, number) for number in denied]
    program.append((_JEQ, None, "allow", numbers["clone"]))
    program.append((_LD_W_ABS, None, None, 16))  # low 32 bits of clone's flags
    program.append((_JSET, "allow", "deny", CLONE_THREAD))
    labels = {"allow": len(program), "deny": len(program) + 1, "nosys": len(program) + 2}
    program += [(_RET, None, None, _ALLOW), (_RET, None, None, _ERRNO | _EPERM), (_RET, None, None, _ERRNO | _ENOSYS)]
    packed = b""
    for index, (code, if_true, if_false, k) in enumerate(program):
        jumps = [0 if target is None else labels[target] - index - 1 for target in (if_true, if_false)]
        packed += struct.pack("=HBBI", code, jumps[0], jumps[1], k)
    return packed


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def ban_processes() -> None:
    """No new processes, namespaces, mounts or tracing from here on (threads still work). Sets no_new_privs."""
    program = process_ban_filter(platform.machine())
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "install seccomp filter")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Empty capability sets now and after any exec (root included: no_new_privs and SECBIT_NOROOT)."""
    _libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_AND_LOCK, 0, 0, 0)  # refused without CAP_SETPCAP: then no caps
    for capability in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) < 0:
            break  # EINVAL past the last capability, EPERM without CAP_SETPCAP (nothing to drop then)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "drop capabilities (capset)")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
