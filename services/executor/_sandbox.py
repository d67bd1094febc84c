"""Sandboxes: the interface every backend implements, and the bubblewrap backend.

A started sandbox runs the helper (``devsilo.executor.helper.helper``) inside
it, connected to the executor over a socket pair; :attr:`Sandbox.helper` is
the executor's client for it. Every backend builds what a
:class:`~devsilo.executor._spec.SandboxSpec` asks for, with the paths of
:mod:`devsilo.executor._spec` (:data:`WORKSPACE`, :data:`HOME`, :data:`TMP`,
:data:`RELAY_SOCKET`, :data:`CA_CERT`…).

The bubblewrap backend (:class:`BwrapSandbox`) confines the helper and all it
starts with: user, pid, ipc, uts, net and cgroup namespaces (loopback only;
no new user namespaces inside); a uid that maps to the unprivileged host
``spec.sandbox_uid``, never to host root; no capabilities; no_new_privs; the
seccomp filter of :mod:`devsilo.executor._seccomp`; a read-only root built
from the host's ``/usr`` and a few public ``/etc`` files; a fresh ``/proc``,
a minimal ``/dev`` and a size-capped tmpfs ``/tmp`` (mode 0700); the
workspace and a scratch home read-write (the home is removed at close);
the read allow-list, the session's relay socket and trust directory (its CA
certificate, replaced by the executor when the egress restarts)
read-only; and a cgroup of its own with the spec's memory, CPU and pids
limits (:mod:`devsilo.executor._cgroups`).

bubblewrap always runs as the unprivileged sandbox uid. When the executor
runs as root it cannot simply drop to that uid and hand bubblewrap the
paths: the uid may have no search permission on their parents, and
bubblewrap (0.8) resolves even ``--bind-fd`` sources by path as that uid.
So, as root, each launch first enters a private mount namespace, mounts a
fresh tmpfs stage on a world-searchable directory, bind-mounts every host
source onto the stage (opening each again and checking it is still the very
object the executor opened), and only then drops to the sandbox uid
(``setpriv``) and runs bubblewrap on the stage. Nothing of this is visible
on the host, and it takes no process but ``setpriv`` itself: the namespace
and the mounts are made by :class:`_Launcher`, one thread of the executor
set aside for starting sandboxes.

bubblewrap's ``--block-fd`` holds the sandbox's init after its mounts are
set up and before it starts the helper; the executor uses that moment to
move init into the sandbox's cgroup, so that nothing inside ever runs
unconfined.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import importlib.resources
import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from devsilo.protocol import SandboxError, ToolError

from ._cgroups import CgroupUnavailable, SandboxCgroup
from ._helper_client import HelperClient
from ._seccomp import build_filter
from ._seccomp import probe as _seccomp_probe
from ._spec import (
    CA_CERT,
    HELPER_PATH,
    HOME,
    INNER_GID,
    INNER_UID,
    RELAY_SOCKET,
    TMP,
    TRUST_DIR,
    WORKSPACE,
    SandboxSpec,
    sandbox_env,
)

__all__ = [
    "CA_CERT",
    "HELPER_PATH",
    "HELPER_PYC",
    "HOME",
    "INNER_GID",
    "INNER_UID",
    "RELAY_SOCKET",
    "TMP",
    "TRUST_DIR",
    "WORKSPACE",
    "BwrapSandbox",
    "Sandbox",
    "prepare_workspace_ownership",
    "probe",
]

HELPER_PYC = "/.devsilo/helper.pyc"
"""The helper compiled for the sandbox's Python, run instead of the source: a
script given as source is compiled at every start, which costs a cold start
several milliseconds."""

_LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STDERR_KEEP = 8192
_PROBE_UID = 65534  # nobody: a probe run as root tries bwrap as some unprivileged uid

# Public, secret-free host files that ordinary tools need: the dynamic
# linker's cache and config, the alternatives symlinks (awk, editor… point
# there), time zone, and protocol/service names.
_HOST_ETC = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/protocols",
    "/etc/services",
)
# The top-level names that merged-/usr systems make symlinks and others
# make directories; mirrored as the host has them.
_USR_ALIASES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Where the stage may go: top-level directories that anyone may search. The
# stage hides what is below it (in the launch's private namespace only), so
# it must not hold any source.
_STAGE_CANDIDATES = ("/tmp", "/var/tmp", "/mnt", "/media", "/srv", "/run")
_STAGE_SIZE = "1m"

# Linux ABI values for the launcher's namespace and mount calls (Python 3.11
# has no os.unshare / os.setns / mount).
_CLONE_FS = 0x00000200
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_BIND = 0x2, 0x4, 0x1000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000

# Compiles the helper with the sandbox's own interpreter: source on stdin,
# a .pyc on stdout. Only the magic number is checked when a .pyc is run as
# the main script, so the rest of the header stays zero.
_COMPILE_HELPER = (
    "import importlib.util, marshal, sys; "
    "code = compile(sys.stdin.buffer.read(), sys.argv[1], 'exec', dont_inherit=True); "
    "sys.stdout.buffer.write(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code))"
)

_T = TypeVar("_T")


def prepare_workspace_ownership(path: Path, uid: int, gid: int) -> list[str]:
    """Give the sandbox uid ownership of the workspace tree so that it can write it.

    Needed when the executor runs as root: the sandbox runs as an
    unprivileged host uid, which otherwise cannot write a user's files.
    Walks the tree by directory descriptors and never follows a symlink
    (links themselves are lchown'd). Regular files with more than one hard
    link are skipped and returned (relative paths): their other names live
    outside the workspace, and handing those over would leak ownership of
    host files to the sandbox.

    This is an interim measure: the workspace-lock issue replaces it by
    moving the files into executor-owned storage that only the sandbox
    mounts, so nothing of the user's tree changes owner in place.
    """
    skipped: list[str] = []
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot open workspace {path}: {exc.strerror}") from None
    try:
        os.chown(top, uid, gid)
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in dirnames + filenames:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    skipped.append(os.path.normpath(os.path.join(dirpath, name)))
                    continue
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    except OSError as exc:
        raise SandboxError(
            f"cannot hand workspace {path} to uid {uid}: {exc} "
            "(the executor must run as root to change owners)"
        ) from None
    finally:
        os.close(top)
    return skipped


class OutputTail:
    """The last bytes a sandbox launcher and helper wrote to stderr, read from a pipe.

    The launcher's own errors and a crashing helper's traceback land here; only
    the tail is kept, since the sandbox could write without end.
    """

    def __init__(self, keep: int = _STDERR_KEEP) -> None:
        self._data = bytearray()
        self._keep = keep
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def follow(self, read_fd: int) -> None:
        """Start reading the pipe's read end ``read_fd`` (owned from here on)."""
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        stream = asyncio.StreamReader()
        try:
            self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stream), pipe
            )
        except BaseException:
            pipe.close()
            raise
        self._task = asyncio.create_task(self._collect(stream))

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            self._data += data
            del self._data[: -self._keep]

    async def settle(self, wait: float) -> None:
        """Give the reader up to ``wait`` seconds to take in what is still in the pipe."""
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), wait)

    async def close(self) -> None:
        """Read what is left (briefly), then stop."""
        await self.settle(1.0)
        if self._transport is not None:
            self._transport.close()

    def text(self) -> str:
        """The tail, decoded and stripped."""
        return self._data.decode("utf-8", errors="replace").strip()


class Sandbox(abc.ABC):
    """One sandbox per session: start it, talk to its helper, close it.

    Usable as ``async with``. :meth:`close` is idempotent and always leaves
    nothing running and no scratch behind.
    """

    backend: str = "abstract"
    workspace_path: str = WORKSPACE
    limit_ends_sandbox: bool = False
    """True where hitting the memory limit kills the sandbox as a whole (gVisor's
    sentry is one host process) rather than only the process that caused it."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the sandbox and its helper; raises SandboxError if it cannot."""

    @property
    @abc.abstractmethod
    def helper(self) -> HelperClient:
        """The client of the helper running inside (after :meth:`start`)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything inside (TERM, then KILL) and remove the scratch."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- probing ------------------------------------------------------------------


def probe(*, bwrap: str = "bwrap", python: str = "/usr/bin/python3", **_config: Any) -> str | None:
    """None when bwrap sandboxes work on this host, else one line saying why not.

    Checks what the kernel says about user namespaces, that libseccomp can
    build the filter, then starts a real (tiny) sandbox with the same
    namespaces and filter, as an unprivileged uid. Other backend settings
    (``start_timeout``…) are accepted and ignored.
    """
    found = shutil.which(bwrap)
    if found is None:
        return f"bwrap not installed ({bwrap}; apt-get install bubblewrap)"
    if not os.access(python, os.X_OK):
        return f"{python} is missing: the helper needs a Python 3 in /usr"
    if _sysctl("kernel/unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces disabled (kernel.unprivileged_userns_clone=0)"
    if _sysctl("user/max_user_namespaces") == "0":
        return "user namespaces disabled (user.max_user_namespaces=0)"
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv", path=_LAUNCH_PATH) is None:
        return "setpriv (util-linux) is missing: root cannot drop to the sandbox uid"
    problem = _seccomp_probe()
    if problem is not None:
        return problem
    return _trial_run(found, as_root)


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _trial_run(bwrap: str, as_root: bool) -> str | None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, build_filter())
    finally:
        os.close(write_fd)
    # fmt: off
    argv = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
        "--die-with-parent", "--clearenv", "--seccomp", str(read_fd),
        "--ro-bind", "/usr", "/usr", *_usr_alias_args(), "--proc", "/proc", "--dev", "/dev",
        "--", "/usr/bin/true",
    ]
    if as_root:
        argv = [
            shutil.which("setpriv", path=_LAUNCH_PATH) or "setpriv",
            f"--reuid={_PROBE_UID}", f"--regid={_PROBE_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv,
        ]
    # fmt: on
    try:
        done = subprocess.run(
            argv,
            pass_fds=(read_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap cannot start a sandbox here: {exc}"
    finally:
        os.close(read_fd)
    if done.returncode == 0:
        return None
    said = done.stderr.decode(errors="replace").strip().splitlines()
    why = said[-1] if said else f"exit status {done.returncode}"
    if _sysctl("kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces "
            f"(kernel.apparmor_restrict_unprivileged_userns=1): {why}"
        )
    return f"bwrap cannot start a sandbox here: {why}"


# -- the launcher thread ------------------------------------------------------


def _libc_call(name: str, *args: Any) -> None:
    """Call a libc function that returns -1 and sets errno on failure."""
    func = getattr(_libc(), name)
    if func(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


class _Launcher:
    """The executor's one thread for starting sandboxes.

    Why a thread of its own: bwrap's ``--die-with-parent`` (PR_SET_PDEATHSIG)
    fires when the *thread* that forked it exits, so the forking thread must
    live as long as the executor; and as root each launch moves that thread
    into a new mount namespace, which no thread running anything else may do.
    Launches are quick (a few mount calls and one fork) and run one at a time.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[_Launcher], Any]]
        ] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._host_mount_ns = -1

    def submit(self, job: Callable[[_Launcher], _T]) -> concurrent.futures.Future[_T]:
        """Run ``job(self)`` on the launcher thread."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="devsilo-sandbox-launcher", daemon=True
                )
                self._thread.start()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((future, job))
        return future

    def fresh_mount_namespace(self) -> None:
        """Move this thread into a new private copy of the executor's mount namespace."""
        if self._host_mount_ns < 0:
            # setns() refuses a thread that shares its fs_struct with others.
            _libc_call("unshare", _CLONE_FS)
            self._host_mount_ns = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        else:
            _libc_call("setns", self._host_mount_ns, _CLONE_NEWNS)
        _libc_call("unshare", _CLONE_NEWNS)
        # Private: nothing mounted here may propagate to the host.
        _libc_call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)

    def _serve(self) -> None:
        while True:
            future, job = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job(self))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)


_LAUNCHER = _Launcher()
"""Process-wide on purpose: see :class:`_Launcher` for why one thread starts every sandbox."""


@dataclass
class _Spawned:
    """bwrap's outer process, with a pidfd to wait on it without reaping races."""

    proc: subprocess.Popen[bytes]
    pidfd: int

    def reap(self) -> None:
        """Reap the exited outer bwrap, first killing what is left of its process group.

        bwrap's child waits for the outer process to map its uids before it
        asks to die with its parent; an outer killed in between leaves it
        blocked for ever, parented to init. It is still in the outer's process
        group (it has not yet made its own session), which is killed while the
        outer is a zombie, so the group's id cannot have been reused.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass(frozen=True)
class _Source:
    """A host path to bind into the sandbox, opened by the executor (O_PATH)."""

    path: str
    dest: str
    writable: bool
    directory: bool
    fd: int
    identity: tuple[int, int]

    @classmethod
    def open(cls, host: Path, dest: str, *, writable: bool, directory: bool) -> _Source:
        """Open ``host`` (its real path, the last component not followed)."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if directory:
            flags |= os.O_DIRECTORY
        real = os.path.realpath(host)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            raise SandboxError(f"cannot open {host} for the sandbox: {exc.strerror}") from None
        st = os.fstat(fd)
        return cls(real, dest, writable, stat.S_ISDIR(st.st_mode), fd, (st.st_dev, st.st_ino))

    def stage_into(self, target: str) -> None:
        """Bind this very source onto ``target`` (a new name in the stage); as root only."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if self.directory:
            flags |= os.O_DIRECTORY
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        # Open again in the launch's own mount namespace (a mount can only be
        # bound from the namespace it belongs to) and check it is still what
        # the executor opened: a path swapped meanwhile is refused.
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.identity:
                raise SandboxError(f"{self.path} was replaced while the sandbox started")
            # The magic link binds the object the descriptor holds, not whatever
            # the path names by now.
            _libc_call(
                "mount", f"/proc/self/fd/{fd}".encode(), target.encode(), None, _MS_BIND, None
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the executor's descriptor."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- the bwrap sandbox --------------------------------------------------------


class BwrapSandbox(Sandbox):
    """A bubblewrap sandbox on this host, built from ``spec`` (see the module docstring).

    As root the executor drops to ``spec.sandbox_uid``/``sandbox_gid`` (``INNER_UID``
    inside); otherwise those must be the executor's own. Scratch home lives in a
    new directory under ``spec.scratch_root``. ``bwrap`` and ``python`` (the
    helper's interpreter, from the host's ``/usr``) may be overridden;
    ``start_timeout`` bounds :meth:`start`.
    """

    backend = "bwrap"

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        bwrap: str = "bwrap",
        python: str = "/usr/bin/python3",
        start_timeout: float = 10.0,
    ) -> None:
        self.spec = spec
        self.bwrap = bwrap
        self.python = python
        self.start_timeout = start_timeout
        self.warnings: list[str] = []
        """Things a user should know about this sandbox (for the access report)."""
        self.scratch_dir: Path | None = None
        """The host directory holding this sandbox's scratch home (until close)."""
        self.cgroup: SandboxCgroup | None = None
        """The sandbox's cgroup, None when this host gave none (see :attr:`warnings`)."""
        self.init_pid: int | None = None
        """The host pid of the sandbox's init (pid 1 inside), once started."""
        self._spawned: _Spawned | None = None
        self._client: HelperClient | None = None
        self._stderr = OutputTail()
        self._info_fd = -1
        self._block_fd = -1
        self._init_pidfd = -1
        self._started = False
        self._closed = False

    # -- public -------------------------------------------------------------

    @property
    def workspace(self) -> Path:
        """The host workspace directory."""
        return self.spec.workspace

    @property
    def helper(self) -> HelperClient:
        """The helper's client; raises SandboxError before start or after close."""
        if self._client is None or self._closed:
            raise SandboxError("the sandbox is not running (start() it first)")
        return self._client

    @property
    def pid(self) -> int | None:
        """The host pid of bubblewrap's outer process, while it runs."""
        return self._spawned.proc.pid if self._spawned is not None else None

    async def start(self) -> None:
        """Launch bubblewrap and the helper; returns once the helper answered hello."""
        if self._started:
            raise SandboxError("this sandbox was already started; make a new one")
        self._started = True
        try:
            await asyncio.wait_for(self._start(), self.start_timeout)
        except (TimeoutError, SandboxError, ToolError, OSError) as exc:
            detail = await self._exit_detail(wait=2.0)
            await self._close_quietly()
            why = str(exc) or type(exc).__name__
            raise SandboxError(
                f"bwrap sandbox for {self.spec.workspace} did not start: {why}"
                + (f"; {detail}" if detail and detail not in why else "")
            ) from None
        except BaseException:
            await self._close_quietly()
            raise

    async def close(self) -> None:
        """Shut the helper down, kill everything left (bwrap, init, the cgroup), remove scratch.

        Every step runs even when one fails; the first failure is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[SandboxError] = []
        client = self._client
        clean = False
        if client is not None and not client.closed and self._block_fd < 0:
            # A clean exit first: the helper kills its commands' groups and
            # exits, and with it the whole pid namespace.
            with contextlib.suppress(SandboxError, ToolError, asyncio.TimeoutError):
                await asyncio.wait_for(client.shutdown(), 1.0)
                clean = True
        steps = (
            functools.partial(self._stop_bwrap, grace=1.0 if clean else 0.0),
            self._wait_for_init,
            self._remove_cgroup,
        )
        for step in steps:
            try:
                await step()
            except SandboxError as exc:
                errors.append(exc)
        for fd in (self._info_fd, self._block_fd):
            if fd >= 0:
                os.close(fd)
        self._info_fd = self._block_fd = -1
        if client is not None:
            await client.close()
        await self._stderr.close()
        if self.scratch_dir is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, _remove_tree, self.scratch_dir
                )
                self.scratch_dir = None
            except SandboxError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- starting -----------------------------------------------------------

    async def _start(self) -> None:
        bwrap, as_root = self._check()
        loop = asyncio.get_running_loop()
        pyc = await loop.run_in_executor(None, _helper_pyc, self.python)
        await self._launch(bwrap, as_root, pyc)
        init_pid = await self._read_init_pid()
        self.init_pid = init_pid
        try:
            self._init_pidfd = os.pidfd_open(init_pid)
        except OSError as exc:
            raise SandboxError(f"cannot track the sandbox's processes: {exc}") from None
        if self.cgroup is not None:
            # init waits on --block-fd: nothing inside runs before this.
            self.cgroup.add(init_pid)
        os.write(self._block_fd, b"1")
        os.close(self._block_fd)
        self._block_fd = -1
        assert self._client is not None
        await self._client.hello()

    def _check(self) -> tuple[str, bool]:
        spec = self.spec
        if spec.sandbox_uid <= 0 or spec.sandbox_gid <= 0:
            raise SandboxError("the sandbox uid and gid must not be 0: never host root")
        as_root = os.geteuid() == 0
        if not as_root and (spec.sandbox_uid, spec.sandbox_gid) != (os.geteuid(), os.getegid()):
            raise SandboxError(
                f"the executor runs as uid {os.geteuid()} and cannot switch to sandbox uid "
                f"{spec.sandbox_uid}; run it as root or set the sandbox uid/gid to its own"
            )
        bwrap = shutil.which(self.bwrap)
        if bwrap is None:
            raise SandboxError(
                f"bubblewrap ({self.bwrap}) is not installed; apt-get install bubblewrap"
            )
        if not os.access(self.python, os.X_OK):
            raise SandboxError(f"{self.python} is missing: the helper needs a Python 3 in /usr")
        if not spec.workspace.is_dir():
            raise SandboxError(f"workspace {spec.workspace} is not a directory")
        for name, value in sandbox_env(spec).items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise SandboxError(f"invalid environment variable for the sandbox: {name!r}")
        if spec.trust_dir is not None and not spec.trust_dir.is_dir():
            raise SandboxError(f"trust directory {spec.trust_dir} is not a directory")
        if spec.relay_socket is not None:
            try:
                is_socket = stat.S_ISSOCK(os.stat(spec.relay_socket).st_mode)
            except OSError as exc:
                raise SandboxError(
                    f"relay socket {spec.relay_socket} is missing: {exc.strerror}"
                ) from None
            if not is_socket:
                raise SandboxError(f"relay socket {spec.relay_socket} is not a unix socket")
        return bwrap, as_root

    async def _launch(self, bwrap: str, as_root: bool, helper_pyc: bytes) -> None:
        spec = self.spec
        dests = [self._allow_dest(p) for p in spec.allow_read]
        self.scratch_dir = Path(self._make_scratch(as_root))
        try:
            self.cgroup = SandboxCgroup.create(spec.session_id, spec.limits)
        except CgroupUnavailable as exc:
            self.warnings.append(f"no memory, CPU or pids limits for this sandbox: {exc}")
        sources: list[_Source] = []
        child_fds: list[int] = []  # ours to close once bwrap has them
        err_w = -1
        parent_sock: socket.socket | None = None
        err_r = -1
        try:
            sources.append(_Source.open(spec.workspace, WORKSPACE, writable=True, directory=True))
            sources.append(
                _Source.open(self.scratch_dir / "home", HOME, writable=True, directory=True)
            )
            for host, dest in zip(spec.allow_read, dests, strict=True):
                sources.append(_Source.open(host, dest, writable=False, directory=False))
            if spec.relay_socket is not None:
                sources.append(
                    _Source.open(spec.relay_socket, RELAY_SOCKET, writable=False, directory=False)
                )
            if spec.trust_dir is not None:
                # A directory, not the file: the executor renames a new CA into it later.
                sources.append(_Source.open(spec.trust_dir, TRUST_DIR, writable=False, directory=True))
            if as_root and os.fstat(sources[0].fd).st_uid != spec.sandbox_uid:
                self.warnings.append(
                    f"sandbox uid {spec.sandbox_uid} does not own {spec.workspace}: commands "
                    "cannot write it (see prepare_workspace_ownership)"
                )
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds.append(child_sock.detach())
            info_r, info_w = os.pipe()
            child_fds.append(info_w)
            self._info_fd = info_r
            block_r, block_w = os.pipe()
            child_fds.append(block_r)
            self._block_fd = block_w
            # A plain pipe read by us, not subprocess.PIPE: read without a thread.
            err_r, err_w = os.pipe()
            stage = _stage_dir(sources) if as_root else None
            argv = self._argv(bwrap, stage, sources, child_fds, helper_pyc)
            fds = child_fds + ([] if as_root else [s.fd for s in sources])
            job = functools.partial(_spawn, argv, fds, err_w, sources if as_root else [], stage)
            self._spawned = await _run_on_launcher(job)
        except BaseException:
            if parent_sock is not None:
                parent_sock.close()
            if err_r >= 0:
                os.close(err_r)
            raise
        finally:
            for source in sources:
                source.close()
            for fd in child_fds + ([err_w] if err_w >= 0 else []):
                os.close(fd)
        try:
            await self._stderr.follow(err_r)
        except BaseException:
            parent_sock.close()
            raise
        self._client = HelperClient(parent_sock, describe_exit=self._describe_exit)
        await self._client.start()

    def _allow_dest(self, host: Path) -> str:
        if not host.is_absolute():
            raise SandboxError(f"read allow-list path {host} must be absolute")
        if not host.exists():
            raise SandboxError(f"read allow-list path {host} does not exist")
        dest = os.path.normpath(host)
        # The sandbox's own mount points must stay its own. Below the scratch
        # mounts is fine (mounted after them, on top); below the workspace is
        # not: it would plant mount points in the user's files.
        own = (WORKSPACE, HOME, TMP, os.path.dirname(HELPER_PATH), "/proc", "/dev")
        for mine in (*own, *_etc_files()):
            inside = dest.startswith(mine + "/") and mine not in (HOME, TMP)
            if dest == "/" or dest == mine or mine.startswith(dest + "/") or inside:
                raise SandboxError(
                    f"read allow-list path {host} would cover the sandbox's own {mine}"
                )
        return dest

    def _make_scratch(self, as_root: bool) -> str:
        self.spec.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="bwrap-", dir=self.spec.scratch_root)
        home = os.path.join(scratch, "home")
        os.mkdir(home, 0o700)
        os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
        if as_root:
            os.chown(home, self.spec.sandbox_uid, self.spec.sandbox_gid)
        return scratch

    def _argv(
        self,
        bwrap: str,
        stage: str | None,
        sources: list[_Source],
        child_fds: list[int],
        helper_pyc: bytes,
    ) -> list[str]:
        """bwrap's command line; as root (``stage`` set) behind setpriv, sources from the stage."""
        spec = self.spec
        sock_fd, info_fd, block_fd = child_fds[0], child_fds[1], child_fds[2]
        seccomp_fd = _data_fd(build_filter(), child_fds)
        # bwrap's options read best in their groups.
        # fmt: off
        args = [
            bwrap,
            # The host pid of the sandbox's init, then init waits for us to
            # put it in its cgroup; see _start.
            "--info-fd", str(info_fd), "--block-fd", str(block_fd),
            "--seccomp", str(seccomp_fd),
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--uid", str(INNER_UID), "--gid", str(INNER_GID), "--hostname", "silo",
            "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", *_usr_alias_args(),
        ]
        # fmt: on
        for path in _HOST_ETC:
            args += ["--ro-bind-try", path, path]
        for dest, content in _etc_files().items():
            args += ["--perms", "0644", "--ro-bind-data", str(_data_fd(content, child_fds)), dest]
        args += ["--proc", "/proc", "--dev", "/dev"]
        # Scratch tmp lives in the sandbox's memory: removed with it, charged
        # to its memory cgroup, and capped so a full /tmp is ENOSPC, not OOM.
        tmp_size = str(max(16 * 1024 * 1024, spec.limits.memory_bytes // 2))
        args += ["--perms", "0700", "--size", tmp_size, "--tmpfs", TMP]
        for i, source in enumerate(sources):
            if stage is not None:
                option = "--bind" if source.writable else "--ro-bind"
                args += [option, f"{stage}/{i}", source.dest]
            else:
                option = "--bind-fd" if source.writable else "--ro-bind-fd"
                args += [option, str(source.fd), source.dest]
        helper_fd = _data_fd(_helper_source(), child_fds)
        pyc_fd = _data_fd(helper_pyc, child_fds)
        args += ["--perms", "0444", "--ro-bind-data", str(helper_fd), HELPER_PATH]
        args += ["--perms", "0444", "--ro-bind-data", str(pyc_fd), HELPER_PYC]
        # Everything is in place: the root itself (and /etc, /home) goes read-only.
        args += ["--remount-ro", "/", "--chdir", WORKSPACE]
        for name, value in sandbox_env(spec).items():
            args += ["--setenv", name, value]
        helper_argv = [self.python, "-I", "-S", HELPER_PYC, "--fd", str(sock_fd)]
        args += ["--", *helper_argv, "--workspace", WORKSPACE]
        if stage is None:
            return args
        # fmt: off
        return [
            _tool("setpriv"), f"--reuid={spec.sandbox_uid}", f"--regid={spec.sandbox_gid}",
            "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            *args,
        ]
        # fmt: on

    async def _read_init_pid(self) -> int:
        """The host pid of the sandbox's init, from bwrap's --info-fd."""
        info = b""
        pid: object = None
        os.set_blocking(self._info_fd, False)
        while pid is None and len(info) < 65536 and await _readable(self._info_fd, 2.0):
            chunk = os.read(self._info_fd, 4096)
            if not chunk:
                break
            info += chunk
            with contextlib.suppress(ValueError, AttributeError):
                pid = json.loads(info).get("child-pid")
        os.close(self._info_fd)
        self._info_fd = -1
        if type(pid) is not int or pid <= 1:
            raise SandboxError(f"bwrap did not report its sandbox's pid (got {info[:200]!r})")
        return pid

    # -- stopping -----------------------------------------------------------

    async def _close_quietly(self) -> None:
        # A failed start's own error is the one to report.
        with contextlib.suppress(SandboxError):
            await self.close()

    async def _stop_bwrap(self, grace: float) -> None:
        """Give bwrap ``grace`` seconds to exit, then TERM it, then KILL it; reap it."""
        spawned = self._spawned
        if spawned is None or spawned.pidfd < 0:
            return
        try:
            steps = ((None, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))
            for sig, wait in steps:
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(spawned.pidfd, sig)
                if await _readable(spawned.pidfd, wait):
                    spawned.reap()
                    return
            raise SandboxError(f"bwrap (pid {spawned.proc.pid}) did not die after SIGKILL")
        finally:
            os.close(spawned.pidfd)
            spawned.pidfd = -1

    async def _wait_for_init(self) -> None:
        # bwrap's outer process exits as soon as it learns the helper's exit
        # status, while the sandbox's init may still be killing and reaping
        # the rest of the pid namespace. Its pidfd turns readable only once
        # init and with it every process inside is gone.
        pidfd, self._init_pidfd = self._init_pidfd, -1
        if pidfd < 0:
            return
        try:
            for sig in (None, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, sig)
                if await _readable(pidfd, 2.0):
                    return
            raise SandboxError("the sandbox's init did not die after SIGKILL")
        finally:
            os.close(pidfd)

    async def _remove_cgroup(self) -> None:
        # Anything that got out of the pid namespace's reach is still in the
        # cgroup: killed here, then the cgroup goes.
        if self.cgroup is not None:
            await self.cgroup.remove()

    # -- watching -----------------------------------------------------------

    def _describe_exit(self) -> str:
        parts = []
        if self._spawned is not None and self._spawned.proc.returncode is not None:
            parts.append(f"bwrap exited with status {self._spawned.proc.returncode}")
        tail = self._stderr.text()
        if tail:
            parts.append("its stderr: " + tail[-1000:])
        return "; ".join(parts)

    async def _exit_detail(self, wait: float) -> str:
        spawned = self._spawned
        if spawned is not None and spawned.pidfd >= 0 and await _readable(spawned.pidfd, wait):
            spawned.proc.wait()
        await self._stderr.settle(0.5)
        return self._describe_exit()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<BwrapSandbox {self.spec.workspace} uid={self.spec.sandbox_uid} {state}>"


# -- launching ----------------------------------------------------------------


async def _run_on_launcher(job: Callable[[_Launcher], _Spawned]) -> _Spawned:
    """Run a spawn on the launcher thread; a spawn whose caller gave up is killed."""
    future = _LAUNCHER.submit(job)
    try:
        return await asyncio.shield(asyncio.wrap_future(future))
    except asyncio.CancelledError:
        future.add_done_callback(_kill_orphan)
        raise


def _kill_orphan(future: concurrent.futures.Future[_Spawned]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    spawned = future.result()
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(spawned.pidfd, signal.SIGKILL)
    # Wait for the exit without reaping: until reaped, its group id is still its own.
    os.waitid(os.P_PIDFD, spawned.pidfd, os.WEXITED | os.WNOWAIT)
    spawned.reap()
    os.close(spawned.pidfd)


def _spawn(
    argv: list[str],
    pass_fds: list[int],
    stderr_fd: int,
    staged: list[_Source],
    stage: str | None,
    launcher: _Launcher,
) -> _Spawned:
    """On the launcher thread: (as root) stage the sources, then start bwrap."""
    if stage is not None:
        launcher.fresh_mount_namespace()
        try:
            _libc_call(
                "mount",
                b"devsilo-stage",
                stage.encode(),
                b"tmpfs",
                _MS_NOSUID | _MS_NODEV,
                f"mode=0755,size={_STAGE_SIZE}".encode(),
            )
            for i, source in enumerate(staged):
                source.stage_into(f"{stage}/{i}")
        except OSError as exc:
            raise SandboxError(f"cannot stage the sandbox's mounts: {exc}") from None
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_fd,
        pass_fds=pass_fds,
        env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
        # Own session: a Ctrl-C meant for the executor must not reach the
        # sandbox behind its back.
        start_new_session=True,
    )
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        proc.kill()
        proc.wait()
        raise
    return _Spawned(proc, pidfd)


@functools.cache
def _helper_source() -> bytes:
    return (importlib.resources.files("devsilo.executor.helper") / "helper.py").read_bytes()


@functools.cache
def _helper_pyc(python: str) -> bytes:
    """The helper compiled by ``python`` itself (its magic number must match); once per process."""
    try:
        done = subprocess.run(
            [python, "-I", "-S", "-c", _COMPILE_HELPER, HELPER_PATH],
            input=_helper_source(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"cannot compile the helper with {python}: {exc}") from None
    if done.returncode != 0 or len(done.stdout) <= 16:
        said = done.stderr.decode(errors="replace").strip()[-500:]
        raise SandboxError(f"{python} cannot compile the helper: {said}")
    return done.stdout


def _usr_alias_args() -> list[str]:
    args = []
    for name in _USR_ALIASES:
        host = f"/{name}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    return args


def _etc_files() -> dict[str, bytes]:
    """The generated /etc files: just enough for the sandbox user to have a name."""
    return {
        "/etc/passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"silo:x:{INNER_UID}:{INNER_GID}:devsilo sandbox:{HOME}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "/etc/group": f"root:x:0:\nsilo:x:{INNER_GID}:\nnogroup:x:65534:\n".encode(),
        "/etc/hostname": b"silo\n",
        "/etc/hosts": b"127.0.0.1\tlocalhost silo\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "/etc/nsswitch.conf": (
            b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
            b"networks: files\nprotocols: files\nservices: files\n"
        ),
    }


def _data_fd(content: bytes, child_fds: list[int]) -> int:
    """A pipe already holding ``content``; bubblewrap copies it into the sandbox."""
    r, w = os.pipe()
    child_fds.append(r)
    try:
        if len(content) > 65536:
            # Let the whole content fit, so that writing it here cannot block.
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, len(content))
        view = memoryview(content)
        while view:
            view = view[os.write(w, view) :]
    except OSError as exc:
        raise SandboxError(f"cannot pass {len(content)} bytes into the sandbox: {exc}") from None
    finally:
        os.close(w)
    return r


def _stage_dir(sources: Sequence[_Source]) -> str:
    """A directory to mount the stage on without hiding any source."""
    for candidate in _STAGE_CANDIDATES:
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or not st.st_mode & stat.S_IXOTH:
            continue
        if all(not (s.path + "/").startswith(candidate + "/") for s in sources):
            return candidate
    raise SandboxError(
        "no place to stage the sandbox's mounts: every one of "
        f"{', '.join(_STAGE_CANDIDATES)} is missing or holds a path the sandbox needs"
    )


def _tool(name: str) -> str:
    path = shutil.which(name, path=_LAUNCH_PATH)
    if path is None:
        raise SandboxError(f"{name} (util-linux) is needed to start sandboxes as root")
    return path


async def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` turns readable within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _remove_tree(path: Path) -> None:
    """Remove a scratch tree that the sandbox may have made hard to remove."""
    last: OSError | None = None
    for _ in range(5):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            last = exc
        # A directory the sandbox chmod'ed to 000 stops a non-root rmtree;
        # give every real directory back its owner bits and try again.
        for dirpath, dirnames, _files in os.walk(path):
            for name in dirnames:
                full = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if stat.S_ISDIR(os.lstat(full).st_mode):
                        os.chmod(full, 0o700)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
    raise SandboxError(f"cannot remove sandbox scratch {path}: {last}")
