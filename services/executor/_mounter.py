"""The mounter: attaches host directories and sockets inside a running sandbox.

A warm sandbox of an attaching pool (:mod:`devsilo.executor._warm`: bwrap,
or a Docker container on runc) is started before any session names its
workspace, with placeholders where the workspace and the relay socket
belong. At lease time the session's real ones are put on top of the
placeholders, inside the sandbox's own mount namespace, with the new mount
API:

1. ``open_tree(source, OPEN_TREE_CLONE | AT_RECURSIVE)`` in the *host* mount
   namespace: a detached copy of the source's mount tree. It must run here,
   because a mount can only be cloned from the namespace it belongs to.
2. ``mount_setattr`` on that detached tree: ``nosuid``, ``nodev`` (and
   ``rdonly`` where asked), private propagation; what bwrap's own binds get.
3. ``setns(init's pidfd, CLONE_NEWNS)`` (bwrap's init, or the container's:
   Docker's ``State.Pid``), then ``move_mount(tree, "", AT_FDCWD, target,
   MOVE_MOUNT_F_EMPTY_PATH)``: the tree is attached at the target inside the
   sandbox. The sandbox itself could never do this: its
   seccomp filter refuses every mount call and it has no capabilities.

``setns(CLONE_NEWNS)`` refuses a caller that shares its filesystem context
with other threads, and the executor is multithreaded (its launcher thread,
asyncio's executor threads). So the work happens in one small, long-lived,
single-threaded process per executor (this file run as a script, standard
library only), started once and spoken to over a ``SOCK_SEQPACKET`` socket
pair. For each request it clones the trees in the host namespace, enters the
sandbox's namespace, moves the trees in, and ``setns`` back into the host
namespace through a descriptor it kept (then checks it is back at the very
root it started from; if not, it exits rather than serve another request
from the wrong place). It does not fork a child per request: on this kind of
VM a fork and wait of the mounter costs ~2 ms, two ``setns`` calls ~5 µs,
and the lease budget is 5 ms. Needs real root (CAP_SYS_ADMIN in the initial
user namespace); the sandbox's user namespace is not entered.

Wire format, one datagram each way. Request: JSON ``{"mounts": [{"target":
str, "recursive": bool, "readonly": bool, "expect": [dev, ino] | null},
...]}`` with ``SCM_RIGHTS`` descriptors: first a pidfd of the sandbox's
init, then one ``O_PATH`` descriptor per mount, the source. ``expect`` is
the identity the target must have before the attach (the placeholder): a
target that is anything else (a reused pid, a sandbox already attached) is
refused. Reply: JSON ``{"ok": true}`` or ``{"ok": false, "errno": int,
"error": str}``. A failure part-way leaves the earlier mounts of the request
in place: the caller is expected to discard that sandbox.

This module imports nothing but the standard library, so that it runs as
``python -I -S _mounter.py FD``; :class:`Mounter` is the executor's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import platform
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Attach", "MountError", "Mounter"]

# Syscall numbers: the new mount API got one number on every architecture
# that uses the unified table (x86_64's and asm-generic's agree from 424 on).
_SYSCALLS = {"open_tree": 428, "move_mount": 429, "mount_setattr": 442}
_UNIFIED_ARCHES = ("x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x")

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MS_PRIVATE = 1 << 18
_CLONE_NEWNS = 0x00020000

_MAX_MOUNTS = 8
_MAX_MESSAGE = 65536


class MountError(Exception):
    """The mounter could not attach a mount (``errno`` set when the kernel said why)."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Attach:
    """One mount to put inside the sandbox: ``source`` (an open O_PATH descriptor) at ``target``."""

    source_fd: int
    target: str
    recursive: bool = False
    readonly: bool = False
    expect: tuple[int, int] | None = None
    """The target's (st_dev, st_ino) before the attach; anything else is refused."""


# -- the mounter process (standard library only) --------------------------------


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _Kernel:
    """The few raw system calls the mounter needs (Python 3.11 wraps none of them)."""

    def __init__(self) -> None:
        machine = platform.machine()
        if machine not in _UNIFIED_ARCHES:
            raise MountError(f"the new mount API's syscall numbers are not known for {machine}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

    def _check(self, name: str, result: int) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")
        return result

    def open_tree(self, fd: int, recursive: bool) -> int:
        flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH
        if recursive:
            flags |= _AT_RECURSIVE
        result = self._libc.syscall(
            ctypes.c_long(_SYSCALLS["open_tree"]), ctypes.c_int(fd), b"", ctypes.c_uint(flags)
        )
        return self._check("open_tree", result)

    def mount_setattr(self, tree: int, attr_set: int, recursive: bool) -> None:
        attr = _MountAttr(attr_set, 0, _MS_PRIVATE, 0)
        flags = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
        result = self._libc.syscall(
            ctypes.c_long(_SYSCALLS["mount_setattr"]),
            ctypes.c_int(tree),
            b"",
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        self._check("mount_setattr", result)

    def setns(self, fd: int, nstype: int) -> None:
        self._check("setns", self._libc.setns(fd, nstype))

    def move_mount(self, tree: int, target: str) -> None:
        result = self._libc.syscall(
            ctypes.c_long(_SYSCALLS["move_mount"]),
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
        self._check("move_mount", result)


def _failure(exc: OSError, what: str) -> dict[str, object]:
    return {"ok": False, "errno": exc.errno or 0, "error": f"{what}: {exc.strerror or exc}"}


def _handle(
    kernel: _Kernel, home: _Home, request: dict[str, object], fds: list[int]
) -> dict[str, object]:
    """Clone each source here (host namespace), then attach them all inside the sandbox's."""
    mounts = request.get("mounts")
    if not isinstance(mounts, list) or not 0 < len(mounts) <= _MAX_MOUNTS:
        return {"ok": False, "errno": errno.EINVAL, "error": "bad request: mounts"}
    if len(fds) != len(mounts) + 1:
        return {"ok": False, "errno": errno.EINVAL, "error": "bad request: descriptors"}
    pidfd, sources = fds[0], fds[1:]
    trees: list[int] = []
    try:
        for mount, source in zip(mounts, sources, strict=True):
            recursive = bool(mount.get("recursive"))
            try:
                tree = kernel.open_tree(source, recursive)
            except OSError as exc:
                return _failure(exc, f"cloning the source of {mount.get('target')}")
            trees.append(tree)
            attrs = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
            if mount.get("readonly"):
                attrs |= _MOUNT_ATTR_RDONLY
            try:
                kernel.mount_setattr(tree, attrs, recursive)
            except OSError as exc:
                return _failure(exc, f"setting the flags of {mount.get('target')}")
        return _attach_inside(kernel, home, pidfd, mounts, trees)
    finally:
        # A tree that was attached lives on in the sandbox; one that was not
        # is unmounted by closing its last descriptor.
        for tree in trees:
            os.close(tree)


class _Home:
    """The mounter's own mount namespace, to come back to after each request."""

    def __init__(self) -> None:
        self.ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.identity = self._where()

    @staticmethod
    def _where() -> tuple[int, int, int, int]:
        ns, root = os.stat("/proc/self/ns/mnt"), os.stat("/")
        return ns.st_dev, ns.st_ino, root.st_dev, root.st_ino

    def back(self, kernel: _Kernel) -> None:
        """Return to it; the process must end if it cannot (it would clone from the wrong place)."""
        kernel.setns(self.ns_fd, _CLONE_NEWNS)
        if self._where() != self.identity:
            raise OSError(errno.EIO, "back in the host mount namespace, but not at its root")


def _attach_inside(
    kernel: _Kernel,
    home: _Home,
    pidfd: int,
    mounts: list[dict[str, object]],
    trees: list[int],
) -> dict[str, object]:
    """Enter the sandbox's mount namespace, attach, and come back."""
    try:
        kernel.setns(pidfd, _CLONE_NEWNS)
    except OSError as exc:
        return _failure(exc, "entering the sandbox's mount namespace")
    try:
        return _attach(mounts, trees, kernel)
    finally:
        # Anything else would leave this process cloning from the wrong
        # namespace: it ends instead, and the executor sees it gone.
        try:
            home.back(kernel)
        except OSError as exc:
            print(f"devsilo mounter: cannot return to the host namespace: {exc}", file=sys.stderr)
            os._exit(70)


def _attach(
    mounts: list[dict[str, object]], trees: list[int], kernel: _Kernel
) -> dict[str, object]:
    """Inside the sandbox's namespace: each tree onto its target, if that is still its placeholder."""
    for mount, tree in zip(mounts, trees, strict=True):
        target = mount.get("target")
        if not isinstance(target, str) or not target.startswith("/"):
            return {"ok": False, "errno": errno.EINVAL, "error": f"bad target {target!r}"}
        expect = mount.get("expect")
        if expect is not None:
            try:
                st = os.stat(target, follow_symlinks=False)
            except OSError as exc:
                return _failure(exc, f"looking at {target} inside the sandbox")
            if [st.st_dev, st.st_ino] != expect:
                return {
                    "ok": False,
                    "errno": errno.ESTALE,
                    "error": f"{target} inside the sandbox is not its placeholder any more",
                }
        try:
            kernel.move_mount(tree, target)
        except OSError as exc:
            return _failure(exc, f"attaching {target}")
    return {"ok": True}


def _serve(sock: socket.socket) -> None:
    """Answer requests until the executor closes its end."""
    kernel = _Kernel()
    home = _Home()
    sock.send(b'{"ready": true}')
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_MOUNTS + 1)
        except InterruptedError:
            continue
        if not data:
            return
        try:
            try:
                request = json.loads(data)
                reply = (
                    _handle(kernel, home, request, fds)
                    if isinstance(request, dict)
                    else {"ok": False, "errno": errno.EINVAL, "error": "bad request"}
                )
            except (ValueError, OSError) as exc:
                reply = {"ok": False, "errno": getattr(exc, "errno", 0) or 0, "error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def _main(argv: Sequence[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    try:
        _serve(sock)
    finally:
        sock.close()
    return 0


# -- the executor's client ------------------------------------------------------


class Mounter:
    """The executor's handle on its mounter process: :meth:`start` once, :meth:`attach`, :meth:`close`.

    Start it from a thread in the host mount namespace (the event loop's
    thread, never the sandbox launcher's, which lives in namespaces of its
    own): the mounter clones sources in the namespace it was born in.
    Requests are served one at a time; each is a handful of syscalls. A
    mounter that died or stopped answering is started afresh by the next
    :meth:`attach`.
    """

    def __init__(self, *, python: str = sys.executable, request_timeout: float = 5.0) -> None:
        self.python = python
        self.request_timeout = request_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._started = False
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The mounter process's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the mounter process; MountError when this host or user cannot attach mounts."""
        if self._closed:
            raise MountError("this mounter was closed")
        async with self._lock:
            if self._sock is None:
                await self._spawn()
            self._started = True

    async def attach(self, init_pidfd: int, mounts: Sequence[Attach]) -> None:
        """Attach ``mounts`` inside the mount namespace of the process ``init_pidfd`` refers to.

        The descriptors stay the caller's. Raises MountError with the kernel's errno.
        """
        request = {
            "mounts": [
                {
                    "target": m.target,
                    "recursive": m.recursive,
                    "readonly": m.readonly,
                    "expect": list(m.expect) if m.expect is not None else None,
                }
                for m in mounts
            ]
        }
        fds = [init_pidfd, *(m.source_fd for m in mounts)]
        async with self._lock:
            if not self._started or self._closed:
                raise MountError("the mounter is not running (start() it first)")
            if self._sock is not None and self.pid is None:
                self._drop()  # it died since the last request
            if self._sock is None:
                await self._spawn()
            sock = self._sock
            assert sock is not None
            try:
                # One small datagram: a socket pair's buffer takes it at once.
                socket.send_fds(sock, [json.dumps(request).encode()], fds)
                data = await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(sock, _MAX_MESSAGE),
                    self.request_timeout,
                )
            except (OSError, TimeoutError) as exc:
                # A late reply would be taken for the next request's: this
                # mounter is done, the next attach starts another.
                self._drop()
                raise MountError(f"the mounter failed: {exc or type(exc).__name__}") from None
            except BaseException:
                self._drop()
                raise
            if not data:
                self._drop()
                raise MountError("the mounter exited")
        reply = json.loads(data)
        if not reply.get("ok"):
            raise MountError(str(reply.get("error")), reply.get("errno") or None)

    async def close(self) -> None:
        """Stop the mounter (closing its socket ends it) and reap it. Idempotent."""
        self._closed = True
        self._drop()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _spawn(self) -> None:
        if os.geteuid() != 0:
            raise MountError("attaching mounts in a running sandbox needs root")
        if platform.machine() not in _UNIFIED_ARCHES:
            raise MountError(
                f"the new mount API's syscall numbers are not known for {platform.machine()}"
            )
        old = self._proc
        if old is not None and old.returncode is None:
            # Its socket is closed, so it is on its way out; make sure.
            with contextlib.suppress(ProcessLookupError):
                old.kill()
            await old.wait()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.python,
                "-I",
                "-S",
                os.path.abspath(__file__),
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
                # The executor's Ctrl-C is not for it: it ends when its socket closes.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise MountError(f"cannot start the mounter: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        # Wait for its hello, so that a mounter that cannot run fails here and
        # its start-up (an interpreter) is not charged to a lease.
        try:
            hello = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(ours, _MAX_MESSAGE), self.request_timeout
            )
        except (OSError, TimeoutError) as exc:
            hello = f"{exc or type(exc).__name__}".encode()
        if hello != b'{"ready": true}':
            self._drop()
            raise MountError(f"the mounter did not start: {hello[:200]!r}")

    def _drop(self) -> None:
        """Close our end of the socket: the mounter reads EOF and exits."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
