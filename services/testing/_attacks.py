"""The sandbox attack battery: attacks as data, the host-side bait they aim at, and a runner.

Every attack is a shell command (many of them a small Python program fed to
the sandbox's ``python3``) that the agent could run: it goes in through the
sandbox's helper like any tool call. An attack **fails for the right
reason** when its output matches the attack's ``blocked_if`` pattern (an
``EPERM`` from the seccomp filter, a path that does not exist inside, a
refused connection…) and nothing else gave it away:

- the bait's secret never appears in its output;
- it never printed a ``SUCCEEDED`` line (the programs print ``BLOCKED
  <errno>`` or ``SUCCEEDED <what>``);
- on the host, no planted listener saw a connection, no file appeared in the
  bait directory or the host's root, ``/usr`` or ``/etc``, the ssh secret is
  unchanged, and the host process that attacks aim at still runs,
  untraced;
- for resource bombs, a bare command on the host never took longer than
  :data:`HOST_STALL_LIMIT_S` while the bomb ran, and the sandbox still
  answers afterwards.

Anything else is a failed test: an attack that succeeds, and an attack that
was stopped for a reason nobody expected (which would mean the check proves
nothing). Attacks print ``NOT-APPLICABLE <why>`` where they cannot apply
(a 32-bit system call on a host without that ABI); bait the host could not
provide (a test network namespace without root) makes them not applicable too.

Use: ``with plant_bait(tmp_path, ...) as bait``, then for each attack
``await run_attack(started_sandbox, attack, bait)``; or
``await run_battery(sandbox, bait)`` for all of them. Run the bombs with
small limits (:data:`BOMB_LIMITS`).

An attack that does succeed harms at most the sandbox's own namespaces:
clock and hostname calls set the current values, the kernel calls carry
invalid arguments that the kernel only checks after the permission check,
the sysrq write asks for help. Still, the battery is for sandboxes only:
run unconfined as root, the mount and /etc/passwd attacks would hit the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from devsilo.executor._helper_client import ExecResult
from devsilo.executor._sandbox import Sandbox
from devsilo.executor._spec import WORKSPACE, SandboxLimits
from devsilo.protocol import SandboxError, ToolError

from ._netns import socket_in_netns

__all__ = [
    "ATTACKS",
    "BOMB_LIMITS",
    "HOST_STALL_LIMIT_S",
    "Attack",
    "Bait",
    "Outcome",
    "plant_bait",
    "run_attack",
    "run_battery",
]

HOST_STALL_LIMIT_S = 1.5
"""Longest a bare ``true`` on the host may take while a bomb runs in the sandbox."""

BOMB_LIMITS = SandboxLimits(memory_bytes=256 * 1024**2, cpus=1.0, pids=128)
"""Limits to run the battery under: small enough that the bombs hit them fast."""

Verdict = Literal["blocked", "succeeded", "wrong-reason", "not-applicable"]

_PLANTED_NAMES = ("planted", "planted-link")
_HOST_ROOT_TARGETS = ("/usr/devsilo-attack", "/devsilo-attack", "/etc/devsilo-attack")
_ENV_NAME = "DEVSILO_ATTACK_ENV"
_ALIVE_WAIT_S = 5.0


# -- the bait -----------------------------------------------------------------


@dataclass
class Bait:
    """What a test planted on the host for the attacks to aim at.

    Paths are host paths; none of them may be visible inside a sandbox.
    Fields left ``None`` make the attacks that need them not applicable.
    """

    secret: str
    """Text that must never come out of a sandbox (it is in every secret file)."""
    ssh_secret: str
    """A file holding the secret in the host user's ``~/.ssh``."""
    bait_dir: str
    """A host directory (0700) holding ``secret.txt``; nothing may appear in it."""
    host_pid: int
    """A host process (a ``sleep``) that attacks try to trace, signal and enter."""
    host_port: int
    """A listener on the host's 127.0.0.1."""
    nats_port: int
    """A second host listener, standing for the NATS server's port."""
    abstract_socket: str
    """The name (after the NUL) of an abstract unix socket the host listens on."""
    host_port6: int | None = None
    """A listener on the host's ::1, when the host has IPv6."""
    netns_addr: str | None = None
    """An address in a test network namespace, with a listener at ``netns_port``."""
    netns_port: int | None = None
    state_dir: str | None = None
    """A service state directory (keys, roster…)."""
    state_file: str | None = None
    """A file in ``state_dir``."""
    other_workspace_file: str | None = None
    """A file in another session's workspace (host path), holding the secret."""
    other_scratch_file: str | None = None
    """A file in another session's scratch home (host path), holding the secret."""
    workspace_link: str | None = None
    """Name of a symlink in the attacker's workspace pointing at ``host_file``."""
    setuid_copy: str | None = None
    """Name of a setuid-root copy of ``id`` in the attacker's workspace."""
    _listeners: _Listeners | None = field(default=None, repr=False)
    _ssh_content: bytes = field(default=b"", repr=False)

    @property
    def host_file(self) -> str:
        """The secret file in :attr:`bait_dir`."""
        return os.path.join(self.bait_dir, "secret.txt")

    @property
    def ssh_dir(self) -> str:
        """The directory holding :attr:`ssh_secret`."""
        return os.path.dirname(self.ssh_secret)

    def connections(self) -> int:
        """Connections the planted listeners have accepted so far."""
        return self._listeners.accepted() if self._listeners is not None else 0

    def arm_workspace(self, workspace: Path) -> None:
        """Plant the symlink and (as root) the setuid-root ``id`` in an attacker's workspace.

        Call after the workspace was handed to the sandbox uid: the setuid copy
        must stay root's.
        """
        link = workspace / "escape-link"
        link.symlink_to(self.host_file)
        self.workspace_link = link.name
        if os.geteuid() == 0:
            copy = workspace / "suid-id"
            shutil.copy(shutil.which("id") or "/usr/bin/id", copy)
            os.chown(copy, 0, 0)
            copy.chmod(0o4755)
            self.setuid_copy = copy.name

    def host_damage(self) -> str | None:
        """What an attack changed on the host, or None."""
        for name in _PLANTED_NAMES:
            if os.path.lexists(os.path.join(self.bait_dir, name)):
                return f"{name} appeared in the host's bait directory"
        for target in _HOST_ROOT_TARGETS:
            if os.path.lexists(target):
                return f"{target} appeared on the host"
        try:
            if Path(self.ssh_secret).read_bytes() != self._ssh_content:
                return f"{self.ssh_secret} was changed"
        except OSError as exc:
            return f"{self.ssh_secret} is gone: {exc}"
        status = _proc_status(self.host_pid)
        if not status:
            return f"the host process {self.host_pid} was killed"
        if status.get("TracerPid", "0") != "0":
            return f"the host process {self.host_pid} is being traced"
        if status.get("State", "").startswith(("T", "t")):
            return f"the host process {self.host_pid} was stopped"
        return None


@contextlib.contextmanager
def plant_bait(
    root: Path,
    *,
    state_dir: Path | None = None,
    state_file: Path | None = None,
    network_namespace: bool = True,
) -> Iterator[Bait]:
    """Plant the bait under ``root`` (and in ``~/.ssh``); remove all of it afterwards.

    Starts the host listeners and a host ``sleep``, puts the secret in this
    process's environment (sandboxes must not inherit it), and, as root with
    ``network_namespace``, makes a test network namespace joined to the host
    by a veth pair, its address in 198.18.N.0/24 (RFC 2544 benchmarking
    space: never routed, and a random N keeps concurrent test runs apart).
    """
    secret = f"devsilo-attack-secret-{secrets.token_hex(12)}"
    token = secrets.token_hex(4)
    with contextlib.ExitStack() as stack:
        bait_dir = root / f"bait-{token}"
        bait_dir.mkdir(mode=0o700)
        (bait_dir / "secret.txt").write_text(secret + "\n")
        ssh_secret = stack.enter_context(_ssh_secret(secret, token))
        listeners = stack.enter_context(_Listeners.start(token))
        sleeper = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        stack.callback(_reap, sleeper)
        old_env = os.environ.get(_ENV_NAME)
        os.environ[_ENV_NAME] = secret
        stack.callback(_restore_env, old_env)
        bait = Bait(
            secret=secret,
            ssh_secret=str(ssh_secret),
            bait_dir=str(bait_dir),
            host_pid=sleeper.pid,
            host_port=listeners.port("v4"),
            nats_port=listeners.port("nats"),
            abstract_socket=listeners.abstract_name,
            host_port6=listeners.port("v6") if listeners.has("v6") else None,
            state_dir=str(state_dir) if state_dir is not None else None,
            state_file=str(state_file) if state_file is not None else None,
            _listeners=listeners,
            _ssh_content=ssh_secret.read_bytes(),
        )
        if network_namespace and os.geteuid() == 0 and shutil.which("ip"):
            bait.netns_addr, bait.netns_port = stack.enter_context(_test_netns(token, listeners))
        yield bait


@contextlib.contextmanager
def _ssh_secret(secret: str, token: str) -> Iterator[Path]:
    ssh = Path.home() / ".ssh"
    made_dir = not ssh.exists()
    if made_dir:
        ssh.mkdir(mode=0o700)
    path = ssh / f"devsilo-attack-{token}"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                ssh.rmdir()


class _Listeners:
    """Host listeners that count and drop every connection, on one thread."""

    def __init__(self, token: str) -> None:
        self.abstract_name = f"devsilo-attack-{token}"
        self._sockets: dict[str, socket.socket] = {}
        self._accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._serve, name="attack-bait", daemon=True)

    @classmethod
    @contextlib.contextmanager
    def start(cls, token: str) -> Iterator[_Listeners]:
        self = cls(token)
        try:
            self._listen("v4", socket.AF_INET, ("127.0.0.1", 0))
            self._listen("nats", socket.AF_INET, ("127.0.0.1", 0))
            with contextlib.suppress(OSError):
                self._listen("v6", socket.AF_INET6, ("::1", 0))
            self._listen("abstract", socket.AF_UNIX, "\0" + self.abstract_name)
            self._thread.start()
            yield self
        finally:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(5)
            for sock in self._sockets.values():
                sock.close()
            self._selector.close()

    def _listen(self, name: str, family: int, address: tuple[str, int] | str) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sockets[name] = sock
        self._selector.register(sock, selectors.EVENT_READ)

    def listen_extra(self, name: str, sock: socket.socket) -> None:
        """Count connections on ``sock`` too (already bound and listening)."""
        sock.setblocking(False)
        self._sockets[name] = sock
        self._selector.register(sock, selectors.EVENT_READ)

    def has(self, name: str) -> bool:
        return name in self._sockets

    def port(self, name: str) -> int:
        port: int = self._sockets[name].getsockname()[1]
        return port

    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(BlockingIOError, OSError):
                    conn, _ = sock.accept()
                    conn.close()
                    with self._lock:
                        self._accepted += 1


@contextlib.contextmanager
def _test_netns(token: str, listeners: _Listeners) -> Iterator[tuple[str, int]]:
    """A network namespace with a listener at 198.18.N.2, joined to the host by veth."""
    ns, host_if, ns_if = f"dsatk-{token}", f"dsh{token}", f"dsn{token}"
    net = f"198.18.{random.randrange(256)}"
    address = f"{net}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    made = False
    try:
        ip("netns", "add", ns)
        made = True
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        sock = socket_in_netns(ns, address, backlog=16)
        port: int = sock.getsockname()[1]
        # The host itself must reach the listener: then a sandbox that
        # cannot is confined, not looking at a broken network.
        with socket.create_connection((address, port), timeout=5):
            pass
        with contextlib.suppress(BlockingIOError):
            conn, _ = sock.accept()
            conn.close()
        listeners.listen_extra("netns", sock)
        yield address, port
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot make the attacks' test network namespace: {exc}") from exc
    finally:
        if made:
            # Deleting the namespace deletes its veth end, and so the pair.
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in fields.items()}


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)


def _restore_env(old: str | None) -> None:
    if old is None:
        os.environ.pop(_ENV_NAME, None)
    else:
        os.environ[_ENV_NAME] = old


# -- the attacks --------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One attack: what it is after, the command, and what a right refusal looks like.

    ``command`` is run with ``sh -c`` in the sandbox; ``@name@`` is replaced
    by the bait's field ``name`` (the attack is not applicable when it is
    None). ``blocked_if`` is a regular expression searched (multi-line) in the
    transcript ``exit=N signal=S timed_out=B`` + stdout + stderr.
    """

    name: str
    goal: str
    command: str
    blocked_if: str
    timeout_ms: int = 20_000
    bomb: bool = False
    """A resource bomb: the host is watched while it runs, and the sandbox must
    still answer afterwards."""
    limit_may_end_sandbox: bool = False
    """On a backend whose whole sandbox is one process in the limit's cgroup
    (gVisor's sentry: ``Sandbox.limit_ends_sandbox``), the limit stopping the
    bomb ends the sandbox too; that still counts as stopped, if the host held."""

    @property
    def bait_fields(self) -> frozenset[str]:
        """The :class:`Bait` fields the command uses."""
        return frozenset(_PLACEHOLDER.findall(self.command))


# Shared by the Python attacks: run a call, print BLOCKED <errno> or
# SUCCEEDED <what>, and exit. Numbers for calls glibc has no wrapper for.
_PRELUDE = r"""
import ctypes, errno, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ARCH = os.uname().machine
NR = {
    "x86_64": dict(keyctl=250, add_key=248, bpf=321, perf_event_open=298, io_uring_setup=425,
                   userfaultfd=323, kexec_load=246, finit_module=313, pivot_root=155, clone=56,
                   clone3=435, reboot=169),
    "aarch64": dict(keyctl=219, add_key=217, bpf=280, perf_event_open=241, io_uring_setup=425,
                    userfaultfd=282, kexec_load=104, finit_module=273, pivot_root=41, clone=220,
                    clone3=435, reboot=142),
}.get(ARCH, {})
L = ctypes.c_long
def report(word, detail):
    sys.stdout.write("%s %s\n" % (word, detail))
    sys.stdout.flush()
    os._exit(0)
def refused(err):
    report("BLOCKED", errno.errorcode.get(err, str(err)))
def check(rc, what):
    if rc == -1:
        refused(ctypes.get_errno())
    report("SUCCEEDED", "%s returned %s" % (what, rc))
def call(name, *args):
    check(getattr(libc, name)(*args), name)
def sys_call(name, *args):
    if name not in NR:
        report("NOT-APPLICABLE", "no number for %s on %s" % (name, ARCH))
    check(libc.syscall(L(NR[name]), *[a if isinstance(a, ctypes._SimpleCData) or a is None
                                      or isinstance(a, (bytes, ctypes.Array)) else L(a)
                                      for a in args]), name)
def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        refused(exc.errno)
    report("SUCCEEDED", getattr(fn, "__name__", "call"))
"""


def _py(body: str) -> str:
    """A shell command running ``body`` (after the prelude) with the sandbox's python3."""
    return f"python3 -I -S - <<'DEVSILO_ATTACK'\n{_PRELUDE}\n{body.strip()}\nDEVSILO_ATTACK\n"


_GONE = r"No such file or directory|Permission denied|Directory nonexistent|can't cd|cannot access"
_READ_ONLY = r"Read-only file system|Permission denied|Directory nonexistent|No such file"
_EPERM = r"^BLOCKED EPERM$"


def _read(name: str, goal: str, path: str) -> Attack:
    return Attack(name, goal, f"cat {path}", _GONE)


ATTACKS: tuple[Attack, ...] = (
    # -- reading what is not ours ----------------------------------------------
    _read("read_ssh_secret", "read a key in the host user's ~/.ssh", "@ssh_secret@"),
    Attack("list_host_ssh_dir", "list the host user's ~/.ssh", "ls -a @ssh_dir@", _GONE),
    _read("read_etc_shadow", "read the host's password hashes", "/etc/shadow"),
    _read("read_state_file", "read the services' state (keys, roster)", "@state_file@"),
    Attack("list_state_dir", "list the services' state directory", "ls -a @state_dir@", _GONE),
    _read(
        "read_other_workspace",
        "read another session's workspace by its host path",
        "@other_workspace_file@",
    ),
    _read(
        "read_other_scratch",
        "read another session's scratch home by its host path",
        "@other_scratch_file@",
    ),
    _read("read_host_bait", "read a secret file in a host directory", "@host_file@"),
    _read(
        "follow_workspace_symlink",
        "follow a symlink in the workspace to a host file",
        f"{WORKSPACE}/@workspace_link@",
    ),
    _read("read_via_proc1_root", "reach the host through /proc/1/root", "/proc/1/root@ssh_secret@"),
    Attack(
        "enter_host_process_root",
        "reach the host's files through a host process's /proc/PID/root",
        "ls /proc/@host_pid@/root/",
        _GONE,
    ),
    _read(
        "read_host_process_environ",
        "read a host process's environment",
        "/proc/@host_pid@/environ",
    ),
    Attack(
        "secret_in_any_environment",
        "find the executor's environment (holding the secret) in any process",
        f"if cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -q '^{_ENV_NAME}='; "
        "then echo SUCCEEDED the executor environment leaked; "
        "else echo BLOCKED not in any environment; fi",
        r"^BLOCKED not in any environment$",
    ),
    Attack(
        "grep_secret_everywhere",
        "find the secret anywhere in the sandbox's file system",
        "grep -rlsF --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr --exclude-dir=dev "
        '-- "@secret@" / ; echo "grep-exit=$?"',
        r"^grep-exit=1$",
    ),
    Attack(
        "read_kernel_memory",
        "read /proc/kcore",
        "head -c 1 /proc/kcore > /dev/null && echo SUCCEEDED read /proc/kcore",
        r"No such file or directory|Permission denied|Operation not permitted",
    ),
    # -- writing outside the workspace -----------------------------------------
    Attack(
        "write_usr", "write into the host's /usr", "echo pwned > /usr/devsilo-attack", _READ_ONLY
    ),
    Attack("write_root_dir", "write into the host's /", "echo pwned > /devsilo-attack", _READ_ONLY),
    Attack(
        "write_etc_passwd",
        "add a root account to /etc/passwd",
        "echo 'toor::0:0::/:/bin/sh' >> /etc/passwd",
        _READ_ONLY,
    ),
    Attack(
        "write_host_bait_dir",
        "write into a host directory by its path",
        "echo pwned > @bait_dir@/planted",
        _READ_ONLY,
    ),
    Attack(
        "write_through_symlink",
        "write to the host through a symlink made in the workspace",
        f"ln -s @bait_dir@/planted-link {WORKSPACE}/out-link && echo pwned > {WORKSPACE}/out-link",
        _READ_ONLY,
    ),
    Attack(
        "hard_link_host_file",
        "hard-link a file from outside into the workspace",
        f"ln /usr/bin/id {WORKSPACE}/hard-link",
        r"Invalid cross-device link|Operation not permitted|Permission denied",
    ),
    Attack(
        "write_proc_sys",
        "change a kernel setting through /proc/sys (to its current value)",
        'v=$(cat /proc/sys/kernel/hostname) && echo "$v" > /proc/sys/kernel/hostname',
        r"Read-only file system|Permission denied|Operation not permitted|No such file",
    ),
    Attack(
        "write_sysrq_trigger",
        "drive the kernel's magic SysRq (asking for help only)",
        "echo h > /proc/sysrq-trigger",
        _READ_ONLY,
    ),
    Attack(
        "write_sys",
        "change a device setting through /sys (to its current value)",
        'v=$(cat /sys/class/net/lo/mtu) && echo "$v" > /sys/class/net/lo/mtu',
        _READ_ONLY,
    ),
    Attack(
        "create_device_node",
        "create a device node",
        _py('attempt(os.mknod, "/tmp/devsilo-null", 0o20666, os.makedev(1, 3))'),
        _EPERM,
    ),
    # -- privileges ----------------------------------------------------------------
    Attack(
        "setuid_binary",
        "become root through a setuid-root binary in the workspace",
        f'u=$({WORKSPACE}/@setuid_copy@ -u); if [ "$u" = 0 ]; then echo SUCCEEDED euid 0; '
        'else echo "BLOCKED euid=$u"; fi',
        r"^BLOCKED euid=[1-9][0-9]*$",
    ),
    Attack(
        "su_to_root",
        "become root with su",
        "out=$(su -c 'id -u' root </dev/null 2>&1); echo \"su said: $out\"; "
        '[ "$out" = 0 ] && echo SUCCEEDED root',
        r"^su said: .*(Critical error|Authentication failure|terminal|Permission denied"
        r"|not permitted|cannot|not found)",
    ),
    Attack(
        "hold_capabilities",
        "find any capability in the sandbox",
        'awk \'/^Cap(Prm|Eff|Amb):/ && $2 !~ /^0+$/ {bad=1; print "SUCCEEDED", $0} '
        'END {if (!bad) print "BLOCKED no capabilities"}\' /proc/self/status',
        r"^BLOCKED no capabilities$",
    ),
    # -- mounts and namespaces -----------------------------------------------------
    Attack(
        "mount_tmpfs",
        "mount a file system",
        _py('call("mount", b"none", b"/tmp", b"tmpfs", L(0), None)'),
        _EPERM,
    ),
    Attack("unmount_proc", "unmount /proc", _py('call("umount2", b"/proc", 2)'), _EPERM),
    Attack("chroot", "change the root directory", _py('call("chroot", b"/tmp")'), _EPERM),
    Attack(
        "pivot_root",
        "swap the root mount",
        _py('sys_call("pivot_root", b"/tmp", b"/tmp")'),
        _EPERM,
    ),
    Attack(
        "unshare_user_namespace",
        "make a user namespace (root inside it)",
        _py('call("unshare", 0x10000000)'),
        _EPERM,
    ),
    Attack(
        "unshare_mount_namespace",
        "make a mount namespace",
        _py('call("unshare", 0x00020000)'),
        _EPERM,
    ),
    Attack(
        "unshare_command",
        "run unshare(1) to become root in a new user namespace",
        "unshare --user --map-root-user id -u",
        r"unshare failed: Operation not permitted",
    ),
    Attack(
        "clone_new_user",
        "clone a child into a new user namespace",
        _py('sys_call("clone", L(0x10000000 | 17), 0, 0, 0, 0)'),
        _EPERM,
    ),
    Attack(
        "clone3_new_user",
        "clone3 a child into a new user namespace (flags the filter cannot see)",
        _py(
            "args = struct.pack('=8Q', 0x10000000, 0, 0, 0, 17, 0, 0, 0)\n"
            "buf = ctypes.create_string_buffer(args, len(args))\n"
            'sys_call("clone3", buf, len(args))'
        ),
        r"^BLOCKED (EPERM|ENOSYS)$",
    ),
    Attack(
        "setns_into_init",
        "join pid 1's mount namespace",
        _py(
            "try:\n    fd = os.open('/proc/1/ns/mnt', os.O_RDONLY)\n"
            "except OSError as exc:\n    refused(exc.errno)\n"
            'call("setns", fd, 0)'
        ),
        r"^BLOCKED (EPERM|EACCES|ENOENT)$",
    ),
    # -- other processes -----------------------------------------------------------
    Attack(
        "ptrace_host_process",
        "attach to a host process",
        _py('call("ptrace", L(16), L(@host_pid@), None, None)'),
        r"^BLOCKED (EPERM|ESRCH)$",
    ),
    Attack(
        "ptrace_init",
        "attach to the sandbox's pid 1",
        _py('call("ptrace", L(16), L(1), None, None)'),
        r"^BLOCKED (EPERM|ESRCH)$",
    ),
    Attack(
        "read_init_memory",
        "read pid 1's memory with process_vm_readv",
        _py(
            "buf = ctypes.create_string_buffer(8)\n"
            "local = struct.pack('=QQ', ctypes.addressof(buf), 8)\n"
            "remote = struct.pack('=QQ', 0x400000, 8)\n"
            'call("process_vm_readv", 1, local, L(1), remote, L(1), L(0))'
        ),
        r"^BLOCKED (EPERM|ESRCH)$",
    ),
    Attack(
        "signal_host_process",
        "signal a host process",
        _py("attempt(os.kill, @host_pid@, 0)"),
        r"^BLOCKED (ESRCH|EPERM)$",
    ),
    # -- the kernel ----------------------------------------------------------------
    Attack(
        "load_kernel_module",
        "load a kernel module",
        _py('call("init_module", bytes(64), L(64), b"")'),
        _EPERM,
    ),
    Attack(
        "load_kernel_module_from_file",
        "load a kernel module from a file",
        _py('fd = os.open("/dev/null", os.O_RDONLY)\nsys_call("finit_module", fd, b"", 0)'),
        _EPERM,
    ),
    Attack(
        "unload_kernel_module",
        "unload a kernel module",
        _py('call("delete_module", b"devsilo_no_such_module", 0o4000)'),
        _EPERM,
    ),
    Attack(
        "set_clock",
        "set the system clock (to now)",
        _py(
            "import time\nts = struct.pack('=qq', int(time.time()), 0)\n"
            'call("clock_settime", 0, ts)'
        ),
        _EPERM,
    ),
    Attack(
        "settimeofday",
        "set the time of day (to now)",
        _py(
            "import time\ntv = struct.pack('=qq', int(time.time()), 0)\n"
            'call("settimeofday", tv, None)'
        ),
        _EPERM,
    ),
    Attack(
        "keyctl",
        "reach the kernel keyring",
        _py('sys_call("keyctl", 0, L(-3), 1)'),
        _EPERM,
    ),
    Attack(
        "add_key",
        "add a key to the kernel keyring",
        _py('sys_call("add_key", b"user", b"devsilo-attack", b"x", 1, L(-2))'),
        _EPERM,
    ),
    Attack(
        "bpf",
        "create a BPF map",
        _py(
            "attr = struct.pack('=IIII', 2, 4, 4, 1) + bytes(112)\n"
            'sys_call("bpf", 0, attr, len(attr))'
        ),
        _EPERM,
    ),
    Attack(
        "perf_event_open",
        "open a perf event",
        _py(
            "attr = struct.pack('=IIQ', 1, 128, 0) + bytes(112)\n"
            'sys_call("perf_event_open", attr, 0, L(-1), L(-1), 0)'
        ),
        r"^BLOCKED (EPERM|EACCES)$",
    ),
    Attack(
        "io_uring",
        "set up an io_uring",
        _py('params = bytes(120)\nsys_call("io_uring_setup", 1, params)'),
        r"^BLOCKED (EPERM|ENOSYS)$",
    ),
    Attack(
        "userfaultfd",
        "make a userfaultfd",
        _py('sys_call("userfaultfd", os.O_CLOEXEC)'),
        _EPERM,
    ),
    Attack(
        "kexec_load",
        "load a new kernel (invalid flags)",
        _py('sys_call("kexec_load", 0, 0, None, L(0xDEAD0000))'),
        _EPERM,
    ),
    Attack(
        "reboot",
        "reboot the machine (with a wrong magic number)",
        _py('sys_call("reboot", 0, 0, 0, None)'),
        _EPERM,
    ),
    Attack(
        "swapon",
        "turn on swap",
        _py('call("swapon", b"/devsilo-no-such-swap", 0)'),
        _EPERM,
    ),
    Attack(
        "process_accounting",
        "turn on process accounting",
        _py('call("acct", b"/devsilo-no-such-dir/acct")'),
        _EPERM,
    ),
    Attack(
        "read_kernel_log",
        "read the kernel log",
        _py('buf = ctypes.create_string_buffer(4096)\ncall("klogctl", 3, buf, 4096)'),
        _EPERM,
    ),
    Attack(
        "sethostname",
        "set the host name (to the current one)",
        _py('name = os.uname().nodename.encode()\ncall("sethostname", name, len(name))'),
        _EPERM,
    ),
    Attack(
        "disable_aslr",
        "turn address randomisation off with personality(ADDR_NO_RANDOMIZE)",
        _py('call("personality", ctypes.c_ulong(0x0040000))'),
        # gVisor implements no such flag: EINVAL.
        r"^BLOCKED (EPERM|EINVAL)$",
    ),
    Attack(
        "open_by_handle",
        "open a file by handle, bypassing paths (the 'shocker' escape)",
        _py(
            "handle = struct.pack('=Ii', 8, 1) + struct.pack('=II', 2, 0)\n"
            "fd = os.open('/workspace', os.O_RDONLY)\n"
            'call("open_by_handle_at", fd, handle, 0)'
        ),
        _EPERM,
    ),
    Attack(
        "inject_terminal_input",
        "push keystrokes into a terminal with TIOCSTI",
        _py(
            "last = 0\n"
            "for fd in (0, 1, 2):\n"
            "    if libc.ioctl(fd, ctypes.c_ulong(0x5412), b'x') == 0:\n"
            "        report('SUCCEEDED', 'TIOCSTI on fd %d' % fd)\n"
            "    last = ctypes.get_errno()\n"
            "refused(last)"
        ),
        r"^BLOCKED (EPERM|ENOTTY|EIO|ENXIO)$",
    ),
    Attack(
        "compat_syscall",
        "dodge the filter through the 32-bit system call ABI (int 0x80 unshare)",
        _py(
            "import mmap\n"
            "if ARCH != 'x86_64':\n    report('NOT-APPLICABLE', 'int 0x80 is x86 only')\n"
            "code = bytes.fromhex('b836010000' 'bb00000010' 'cd80' 'c3')\n"
            "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "m.write(code)\n"
            "fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n"
            "rc = fn()\n"
            "if rc == 0:\n    report('SUCCEEDED', 'unshare(CLONE_NEWUSER) through int 0x80')\n"
            "refused(-rc)"
        ),
        # A filter may also kill it (SIGSYS), and a kernel without the
        # 32-bit ABI faults it (SIGSEGV); the shell reports 128 + signal.
        r"^BLOCKED (ENOSYS|EPERM)$|^exit=(139|159) |signal=(11|31) ",
    ),
    # -- the network ---------------------------------------------------------------
    Attack(
        "raw_socket",
        "open a raw IPv4 socket",
        _py("attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"),
        _EPERM,
    ),
    Attack(
        "raw_socket_ipv6",
        "open a raw IPv6 socket",
        _py("attempt(socket.socket, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)"),
        r"^BLOCKED (EPERM|EAFNOSUPPORT)$",
    ),
    Attack(
        "packet_socket",
        "open a packet socket",
        _py("attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))"),
        r"^BLOCKED (EPERM|EAFNOSUPPORT|EACCES)$",
    ),
    Attack(
        "connect_host_loopback",
        "connect to a listener on the host's 127.0.0.1",
        _py('attempt(socket.create_connection, ("127.0.0.1", @host_port@), 5)'),
        r"^BLOCKED (ECONNREFUSED|ENETUNREACH)$",
    ),
    Attack(
        "connect_host_loopback_ipv6",
        "connect to a listener on the host's ::1",
        _py('attempt(socket.create_connection, ("::1", @host_port6@), 5)'),
        r"^BLOCKED (ECONNREFUSED|ENETUNREACH|EADDRNOTAVAIL|EAFNOSUPPORT)$",
    ),
    Attack(
        "connect_nats",
        "connect to the NATS server's port on the host",
        _py('attempt(socket.create_connection, ("127.0.0.1", @nats_port@), 5)'),
        r"^BLOCKED (ECONNREFUSED|ENETUNREACH)$",
    ),
    Attack(
        "connect_abstract_socket",
        "connect to an abstract unix socket the host listens on",
        _py(
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            'attempt(s.connect, "\\0@abstract_socket@")'
        ),
        r"^BLOCKED (ECONNREFUSED|ENOENT)$",
    ),
    Attack(
        "connect_test_network",
        "connect to an address in another network namespace",
        _py('attempt(socket.create_connection, ("@netns_addr@", @netns_port@), 5)'),
        r"^BLOCKED (ENETUNREACH|EHOSTUNREACH)$",
    ),
    Attack(
        "udp_to_test_network",
        "send a UDP datagram to another network namespace",
        _py(
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            'attempt(s.sendto, b"x", ("@netns_addr@", @netns_port@))'
        ),
        r"^BLOCKED (ENETUNREACH|EHOSTUNREACH)$",
    ),
    Attack(
        "find_network_device",
        "find a network device besides loopback",
        _py(
            "names = [n for _, n in socket.if_nameindex()]\n"
            "if names != ['lo']:\n    report('SUCCEEDED', 'devices: %s' % names)\n"
            "report('BLOCKED', 'only lo')"
        ),
        r"^BLOCKED only lo$",
    ),
    # -- resources -----------------------------------------------------------------
    Attack(
        "fork_bomb",
        "exhaust the host's processes",
        "bomb() { bomb | bomb & }; bomb; sleep 30",
        r"Cannot fork|Resource temporarily unavailable|can't fork",
        timeout_ms=4_000,
        bomb=True,
        limit_may_end_sandbox=True,
    ),
    Attack(
        "memory_bomb",
        "exhaust the host's memory",
        _py("chunks = []\nwhile True:\n    chunks.append(b'\\1' * (16 << 20))"),
        r"signal=9 |^exit=137 |MemoryError|Cannot allocate memory",
        timeout_ms=30_000,
        bomb=True,
        limit_may_end_sandbox=True,
    ),
)
"""The battery, in the order :func:`run_battery` runs it (bombs last)."""


# -- running ------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What came of one attack; ``detail`` says what was seen."""

    attack: str
    verdict: Verdict
    detail: str

    @property
    def blocked(self) -> bool:
        """True when the attack failed for the right reason."""
        return self.verdict == "blocked"


_PLACEHOLDER = re.compile(r"@([a-z_0-9]+)@")


def _render(attack: Attack, bait: Bait) -> tuple[str | None, str]:
    """The attack's command with the bait filled in, or None and the missing field."""
    missing: list[str] = []

    def fill(m: re.Match[str]) -> str:
        value = getattr(bait, m.group(1))
        if value is None:
            missing.append(m.group(1))
            return ""
        return str(value)

    command = _PLACEHOLDER.sub(fill, attack.command)
    return (None, missing[0]) if missing else (command, "")


def _transcript(result: ExecResult) -> str:
    return (
        f"exit={result.exit_code} signal={result.signal} timed_out={result.timed_out} \n"
        f"{result.stdout}\n{result.stderr}"
    )


async def run_attack(sandbox: Sandbox, attack: Attack, bait: Bait) -> Outcome:
    """Run ``attack`` in the started ``sandbox`` and judge it (see the module docstring)."""
    command, missing = _render(attack, bait)
    if command is None:
        return Outcome(attack.name, "not-applicable", f"the host has no bait {missing!r}")
    connections = bait.connections()
    stall = _HostWatch() if attack.bomb else None
    if stall is not None:
        stall.start()
    try:
        result = await sandbox.helper.exec(command, timeout_ms=attack.timeout_ms)
    except (SandboxError, ToolError) as exc:
        worst = await stall.stop() if stall is not None else 0.0
        if attack.limit_may_end_sandbox and sandbox.limit_ends_sandbox and worst <= HOST_STALL_LIMIT_S:
            return Outcome(attack.name, "blocked", f"the limit ended the whole sandbox ({exc}); "
                           f"the host's worst bare command took {worst:.3f} s")
        return Outcome(attack.name, "wrong-reason", f"the sandbox failed instead: {exc}")
    if stall is not None:
        worst = await stall.stop()
    else:
        worst = 0.0
    transcript = _transcript(result)
    shown = transcript[-2000:]
    if bait.secret in result.stdout or bait.secret in result.stderr:
        return Outcome(attack.name, "succeeded", f"the secret came out: {shown}")
    if m := re.search(r"^SUCCEEDED.*$", result.stdout, re.MULTILINE):
        return Outcome(attack.name, "succeeded", m.group(0))
    if (damage := bait.host_damage()) is not None:
        return Outcome(attack.name, "succeeded", f"{damage}; {shown}")
    if bait.connections() != connections:
        return Outcome(attack.name, "succeeded", f"a host listener got a connection; {shown}")
    if worst > HOST_STALL_LIMIT_S:
        return Outcome(attack.name, "succeeded", f"the host stalled {worst:.2f} s; {shown}")
    if attack.bomb and (dead := await _still_answers(sandbox)) is not None:
        if attack.limit_may_end_sandbox and sandbox.limit_ends_sandbox and sandbox_lost(dead):
            return Outcome(attack.name, "blocked", f"the limit ended the whole sandbox ({dead}); "
                           f"the host's worst bare command took {worst:.3f} s")
        return Outcome(attack.name, "wrong-reason", f"{dead}; {shown}")
    if m := re.search(r"^NOT-APPLICABLE (.*)$", result.stdout, re.MULTILINE):
        return Outcome(attack.name, "not-applicable", m.group(1))
    if m := re.search(attack.blocked_if, transcript, re.MULTILINE):
        host = f"; the host's worst bare command took {worst:.3f} s" if attack.bomb else ""
        return Outcome(attack.name, "blocked", f"{m.group(0).strip()}{host}")
    return Outcome(attack.name, "wrong-reason", f"expected /{attack.blocked_if}/, saw: {shown}")


async def run_battery(
    sandbox: Sandbox, bait: Bait, attacks: Sequence[Attack] = ATTACKS
) -> list[Outcome]:
    """Run ``attacks`` one after another in one started sandbox; bombs run last."""
    ordered = [a for a in attacks if not a.bomb] + [a for a in attacks if a.bomb]
    return [await run_attack(sandbox, attack, bait) for attack in ordered]


def sandbox_lost(why: str) -> bool:
    """Whether ``_still_answers``'s reason is the sandbox having ended (not merely stuck)."""
    return why.startswith("the sandbox stopped answering")


async def _still_answers(sandbox: Sandbox) -> str | None:
    """None once the sandbox runs a command again; else why not (after a few seconds)."""
    deadline = time.monotonic() + _ALIVE_WAIT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            result = await sandbox.helper.exec("echo alive", timeout_ms=2_000)
        except SandboxError as exc:
            return f"the sandbox stopped answering: {exc}"
        except ToolError as exc:  # e.g. no fork yet while the bomb's processes are reaped
            last = str(exc)[-300:]
            await asyncio.sleep(0.2)
            continue
        if result.stdout == "alive\n":
            return None
        last = _transcript(result)[-300:]
        await asyncio.sleep(0.2)
    return f"the sandbox could not run a command afterwards: {last}"


class _HostWatch:
    """Times a bare ``true`` on the host again and again; remembers the slowest."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.worst

    async def _watch(self) -> None:
        while True:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                "true", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
            )
            try:
                await proc.wait()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
                raise
            self.worst = max(self.worst, time.perf_counter() - started)
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    # python -m devsilo.testing._attacks: the battery, one line per attack.
    for a in ATTACKS:
        sys.stdout.write(f"{a.name:32} {a.goal}\n")
