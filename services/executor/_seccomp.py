"""The sandbox's seccomp filter, compiled to a BPF program by libseccomp.

The filter allows every system call except those a sandboxed development
tool has no business making and that widen the kernel's attack surface or
reach outside the sandbox: mounts, ptrace and cross-process memory access,
kernel modules, clock changes, the kernel keyring, bpf, perf, io_uring, new
namespaces, raw and packet sockets, kexec, reboot, swap, handle-based opens,
userfaultfd, dangerous personality flags, process accounting, quotas, and
terminal input injection. Each is refused with ``EPERM``; ``clone3`` gets
``ENOSYS`` instead, because its flags live in memory a filter cannot read,
and C libraries fall back to ``clone``, whose flags the filter checks.

libseccomp (``libseccomp.so.2``, Debian's ``libseccomp2``, which bubblewrap
itself depends on) generates the program; this module only calls it through
ctypes, so no compiled Python binding is needed. Arguments are compared on
their low 32 bits wherever the kernel reads an ``int``: the upper half of
the register is garbage the kernel ignores, and an exact 64-bit comparison
would let ``0x1_00000011`` slip past a rule for ``AF_PACKET`` (17).

The program is for the host's native architecture only; a system call made
through another ABI (``int 0x80`` on x86_64) gets ``ENOSYS``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from devsilo.protocol import SandboxError

__all__ = [
    "DENIED_SYSCALLS",
    "DenyRule",
    "build_filter",
    "deny_rules",
    "oci_profile",
    "probe",
]

# fmt: off
DENIED_SYSCALLS: tuple[str, ...] = (
    # Mounts and root changes: no caps inside makes them fail anyway; this
    # keeps the kernel's mount code out of reach altogether.
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # Another process's memory and descriptors.
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # Kernel modules.
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms",
    # The clock is the host's.
    "clock_settime", "clock_settime64", "settimeofday", "stime", "adjtimex",
    "clock_adjtime", "clock_adjtime64",
    # The kernel keyring is not namespaced.
    "keyctl", "add_key", "request_key",
    # Kernel programs, tracing, and the io_uring interface (a large, young
    # attack surface that also bypasses per-syscall filtering).
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # Joining namespaces (creating them is checked per flag below).
    "setns",
    # The machine itself.
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "quotactl_fd", "syslog", "vhangup", "nfsservctl", "lookup_dcookie",
    "uselib", "ustat", "sysfs", "_sysctl", "iopl", "ioperm", "vm86", "vm86old",
    "sethostname", "setdomainname", "fanotify_init",
    # File handles bypass path permissions ("shocker"); userfaultfd stalls
    # the kernel at will, a favourite exploit primitive.
    "open_by_handle_at", "name_to_handle_at", "userfaultfd",
)
# fmt: on
"""System calls the filter refuses with EPERM whatever their arguments."""

# Namespace flags of clone(2) and unshare(2). CLONE_NEWTIME shares its bit
# with clone's exit-signal byte, so it is checked for unshare only.
_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
_CLONE_NEWTIME = 0x00000080

_AF_INET, _AF_INET6, _AF_PACKET = 2, 10, 17
_AF_VSOCK = 40  # reaches a VM's host, network namespace or not
_SOCK_RAW, _SOCK_PACKET = 3, 10
_SOCK_TYPE_MASK = 0xF  # the rest of socket(2)'s type is SOCK_NONBLOCK | SOCK_CLOEXEC

_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into (or read) the terminal

# personality(2): Docker's allow-list. Only PER_LINUX32 (bit 3) and
# UNAME26 (bit 17) may be set, or the value may be the query 0xffffffff.
# ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO… are refused.
_PERSONALITY_ALLOWED_BITS = 0x00000008 | 0x00020000
_PERSONALITY_QUERY = 0xFFFFFFFF
_BIT31 = 0x80000000
_LOW32 = 0xFFFFFFFF

# libseccomp's ABI (seccomp.h).
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_CMP_MASKED_EQ = 7
_FLTATR_ACT_BADARCH = 2
_ARCH_S390 = 0x00000016
_ARCH_S390X = 0x80000016

_LIBRARY = "libseccomp.so.2"


class _ArgCmp(ctypes.Structure):
    """``struct scmp_arg_cmp``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class DenyRule:
    """Refuse ``syscall`` with ``errno_value`` when every ``(arg, mask, value)`` holds."""

    syscall: str
    errno_value: int = errno.EPERM
    masked: tuple[tuple[int, int, int], ...] = ()


_Rule = DenyRule


def deny_rules(*, clone_flags_arg: int = 0, clone3: bool = True) -> list[DenyRule]:
    """The sandbox policy as rules, the one source for every backend.

    ``clone_flags_arg`` is 1 on s390 (which swaps clone's first arguments).
    ``clone3=False`` leaves out the ``clone3 -> ENOSYS`` rule, for gVisor,
    which has no clone3 and ignores ``errnoRet`` (the rule would answer EPERM
    and libc would never fall back to ``clone``).
    """
    rules = [_Rule(name) for name in DENIED_SYSCALLS]
    if clone3:
        rules.append(_Rule("clone3", errno.ENOSYS))
    for bit in _NAMESPACE_FLAGS.values():
        rules.append(_Rule("clone", masked=((clone_flags_arg, bit, bit),)))
        rules.append(_Rule("unshare", masked=((0, bit, bit),)))
    rules.append(_Rule("unshare", masked=((0, _CLONE_NEWTIME, _CLONE_NEWTIME),)))
    for family in (_AF_PACKET, _AF_VSOCK):
        rules.append(_Rule("socket", masked=((0, _LOW32, family),)))
    for family in (_AF_INET, _AF_INET6):
        for kind in (_SOCK_RAW, _SOCK_PACKET):
            rules.append(_Rule("socket", masked=((0, _LOW32, family), (1, _SOCK_TYPE_MASK, kind))))
    for request in (_TIOCSTI, _TIOCLINUX):
        rules.append(_Rule("ioctl", masked=((1, _LOW32, request),)))
    # libseccomp allows one comparison per argument and rule, so "a bad bit
    # is set and the value is not the query" is spelt out bit by bit: with
    # bit 31 clear (the query has it set), any bit outside the allowed ones
    # refuses; with bit 31 set, any clear bit refuses (only the query has none).
    for bit_no in range(31):
        bit = 1 << bit_no
        if not bit & _PERSONALITY_ALLOWED_BITS:
            rules.append(_Rule("personality", masked=((0, bit | _BIT31, bit),)))
        rules.append(_Rule("personality", masked=((0, bit | _BIT31, _BIT31),)))
    return rules


def _rules(native_arch: int) -> list[DenyRule]:
    # s390 swaps clone's first two arguments; everywhere else flags come first.
    return deny_rules(clone_flags_arg=1 if native_arch in (_ARCH_S390, _ARCH_S390X) else 0)


def oci_profile(*, clone3: bool = True, architectures: Sequence[str] = ()) -> dict[str, Any]:
    """The same policy as an OCI / Docker seccomp profile (JSON-ready).

    Allows by default and refuses per :func:`deny_rules`; each masked rule is
    its own entry, since several conditions on one argument are ORed by some
    runtimes and ANDed by others. With no ``architectures`` only the native
    ABI passes (32-bit calls would otherwise dodge a by-name deny list).
    """
    plain: dict[int, list[str]] = {}
    syscalls: list[dict[str, Any]] = []
    for rule in deny_rules(clone3=clone3):
        if not rule.masked:
            plain.setdefault(rule.errno_value, []).append(rule.syscall)
            continue
        syscalls.append(
            {
                "names": [rule.syscall],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": rule.errno_value,
                "args": [
                    {"index": arg, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}
                    for arg, mask, value in rule.masked
                ],
            }
        )
    for errno_value, names in plain.items():
        syscalls.insert(0, {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno_value})
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls}
    if architectures:
        profile["architectures"] = list(architectures)
    return profile


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_LIBRARY, use_errno=True)
    except OSError as exc:
        raise SandboxError(
            f"cannot load {_LIBRARY} to build the sandbox's seccomp filter ({exc}); "
            "apt-get install libseccomp2"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_native.argtypes = []
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise SandboxError(f"libseccomp could not {what}: {os.strerror(-rc)}")


def _compile(lib: ctypes.CDLL, rules: Sequence[_Rule]) -> bytes:
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SandboxError("libseccomp could not start a filter (seccomp_init failed)")
    try:
        _check(
            lib.seccomp_attr_set(ctx, _FLTATR_ACT_BADARCH, _ACT_ERRNO | errno.ENOSYS),
            "set the foreign-ABI action",
        )
        for rule in rules:
            number = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            # Negative: not a system call of this architecture (or unknown to
            # this libseccomp), so there is nothing to refuse.
            if number < 0:
                continue
            cmps = (_ArgCmp * max(1, len(rule.masked)))(
                *(_ArgCmp(arg, _CMP_MASKED_EQ, mask, value) for arg, mask, value in rule.masked)
            )
            action = _ACT_ERRNO | rule.errno_value
            _check(
                lib.seccomp_rule_add_array(ctx, action, number, len(rule.masked), cmps),
                f"add the rule for {rule.syscall}",
            )
        read_fd, write_fd = os.pipe()
        try:
            # The program is a few KiB: far below the pipe's buffer, so
            # exporting cannot block before we read.
            rc = lib.seccomp_export_bpf(ctx, write_fd)
            os.close(write_fd)
            write_fd = -1
            _check(rc, "export the filter")
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        lib.seccomp_release(ctx)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SandboxError(f"libseccomp exported a malformed filter ({len(program)} bytes)")
    return program


@functools.cache
def build_filter() -> bytes:
    """The sandbox's filter as a BPF program (``struct sock_filter`` array) for bwrap.

    Built once per process; raises SandboxError when libseccomp is missing
    or refuses a rule.
    """
    lib = _load()
    return _compile(lib, _rules(lib.seccomp_arch_native()))


def probe() -> str | None:
    """None when the filter can be built here, else why not (one line)."""
    try:
        build_filter()
    except SandboxError as exc:
        return str(exc)
    return None
