"""Sandboxes: the interface every backend implements, and the bubblewrap backend.

A started sandbox runs the helper (``devsilo.executor.helper.helper``) inside
it, connected to the executor over a socket pair; :attr:`Sandbox.helper` is
the executor's client for it. Inside every sandbox the workspace is at
:data:`WORKSPACE`, the scratch home at :data:`HOME` and scratch tmp at
:data:`TMP`; both scratch directories are per sandbox and removed by
:meth:`Sandbox.close`.

The bubblewrap backend (:class:`BwrapSandbox`) gives first confinement:
user, pid, ipc, uts, net and cgroup namespaces (loopback only, no new user
namespaces inside), no capabilities, no_new_privs, a read-only root built
from the host's ``/usr`` and a few public ``/etc`` files, and nothing else of
the host but the workspace, the scratch and the read allow-list. Seccomp
filters and cgroup limits come later.

bubblewrap always runs as an unprivileged host uid. When the executor runs as
root it cannot simply drop to that uid and hand bubblewrap the paths: the uid
may have no search permission on their parents, and bubblewrap (0.8) resolves
even ``--bind-fd`` sources by path as that uid. So, as root, the launcher
first enters a private mount namespace, bind-mounts every host source onto a
fresh tmpfs stage (checking each is still the very directory the executor
opened), and only then drops to the sandbox uid and runs bubblewrap on the
stage. Nothing of this is visible on the host.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import functools
import importlib.resources
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from devsilo.protocol import SandboxError, ToolError

from ._helper_client import HelperClient

__all__ = [
    "HELPER_PATH",
    "HOME",
    "INNER_GID",
    "INNER_UID",
    "TMP",
    "WORKSPACE",
    "BwrapSandbox",
    "Sandbox",
    "prepare_workspace_ownership",
]

WORKSPACE = "/workspace"
"""Where every backend mounts the workspace, read-write."""
HOME = "/home/silo"
"""The sandbox user's home: per-sandbox scratch, read-write."""
TMP = "/tmp"
"""Per-sandbox scratch tmp, read-write."""
HELPER_PATH = "/.devsilo/helper.py"
"""Where the helper's source sits inside the sandbox, read-only."""
INNER_UID = 1000
"""The sandbox user's uid as seen inside; outside it is the sandbox uid."""
INNER_GID = 1000

_LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STDERR_KEEP = 8192

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

# Runs as root in a private mount namespace: "$1" is the stage directory,
# then (source, dev:ino, d|f) triples up to "--", then the command to exec.
_STAGE_SCRIPT = r"""set -eu
stage=$1
shift
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev devsilo-stage "$stage"
n=0
while [ "$1" != "--" ]; do
    src=$1 want=$2 kind=$3
    shift 3
    if [ "$kind" = d ]; then mkdir "$stage/$n"; else : > "$stage/$n"; fi
    mount --bind "$src" "$stage/$n"
    got=$(stat -c %d:%i "$stage/$n")
    if [ "$got" != "$want" ]; then
        echo "devsilo: $src was replaced while the sandbox started" >&2
        exit 1
    fi
    n=$((n + 1))
done
shift
exec "$@"
"""
# Where the stage may go: top-level directories that anyone may search. The
# stage hides what is below it (in the private namespace only), so it must
# not hold any source.
_STAGE_CANDIDATES = ("/tmp", "/var/tmp", "/mnt", "/media", "/srv", "/run")


@functools.cache
def _helper_source() -> bytes:
    return (importlib.resources.files("devsilo.executor.helper") / "helper.py").read_bytes()


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


class Sandbox(abc.ABC):
    """One sandbox per session: start it, talk to its helper, close it.

    Usable as ``async with``. :meth:`close` is idempotent and always leaves
    nothing running and no scratch behind.
    """

    backend: str = "abstract"
    workspace_path: str = WORKSPACE

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


class _Source:
    """A host path to bind into the sandbox, pinned by an O_PATH descriptor."""

    def __init__(self, host: Path, dest: str, *, writable: bool, directory: bool) -> None:
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if directory:
            flags |= os.O_DIRECTORY
        real = os.path.realpath(host)
        try:
            self.fd = os.open(real, flags)
        except OSError as exc:
            raise SandboxError(f"cannot open {host} for the sandbox: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.path = real
        self.dest = dest
        self.writable = writable
        self.directory = stat.S_ISDIR(st.st_mode)
        self.identity = f"{st.st_dev}:{st.st_ino}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class BwrapSandbox(Sandbox):
    """A bubblewrap sandbox on this host (see the module docstring).

    ``workspace`` is mounted read-write at :data:`WORKSPACE`; ``allow_read``
    host paths read-only at the same paths; ``env`` is added to the
    sandbox's environment. The sandbox runs as host ``sandbox_uid`` /
    ``sandbox_gid`` (``INNER_UID`` inside): as root the executor drops to
    them; otherwise they must be the executor's own. Scratch lives in a new
    directory under ``scratch_root``.
    """

    backend = "bwrap"

    def __init__(
        self,
        workspace: Path,
        *,
        sandbox_uid: int,
        sandbox_gid: int,
        scratch_root: Path,
        allow_read: Sequence[Path] = (),
        env: Mapping[str, str] | None = None,
        bwrap: str = "bwrap",
        python: str = "/usr/bin/python3",
        start_timeout: float = 10.0,
    ) -> None:
        self.workspace = Path(workspace)
        self.sandbox_uid = sandbox_uid
        self.sandbox_gid = sandbox_gid
        self.scratch_root = Path(scratch_root)
        self.allow_read = [Path(p) for p in allow_read]
        self.env = dict(env or {})
        self.bwrap = bwrap
        self.python = python
        self.start_timeout = start_timeout
        self.warnings: list[str] = []
        """Things a user should know about this sandbox (for the access report)."""
        self.scratch_dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._client: HelperClient | None = None
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr_transport: asyncio.BaseTransport | None = None
        self._info_fd = -1
        self._init_pidfd = -1
        self._started = False
        self._closed = False

    # -- public -------------------------------------------------------------

    @property
    def helper(self) -> HelperClient:
        """The helper's client; raises SandboxError before start or after close."""
        if self._client is None or self._closed:
            raise SandboxError("the sandbox is not running (start() it first)")
        return self._client

    @property
    def pid(self) -> int | None:
        """The host pid of bubblewrap, while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Launch bubblewrap and the helper; returns once the helper answered hello."""
        if self._started:
            raise SandboxError("this sandbox was already started; make a new one")
        self._started = True
        try:
            await self._launch()
            assert self._client is not None
            await asyncio.wait_for(self._client.hello(), self.start_timeout)
            await self._pin_init()
        except (TimeoutError, SandboxError, ToolError, OSError) as exc:
            detail = await self._exit_detail(wait=2.0)
            await self.close()
            why = str(exc) or type(exc).__name__
            raise SandboxError(
                f"bwrap sandbox for {self.workspace} did not start: {why}"
                + (f"; {detail}" if detail and detail not in why else "")
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Shut the helper down, then TERM and KILL bubblewrap; remove the scratch."""
        if self._closed:
            return
        self._closed = True
        client, proc = self._client, self._proc
        if client is not None and not client.closed:
            # A clean exit first: the helper kills its commands' groups and
            # exits, and with it the whole pid namespace.
            with contextlib.suppress(SandboxError, ToolError, asyncio.TimeoutError):
                await asyncio.wait_for(client.shutdown(), 1.0)
        if proc is not None:
            await _stop_process(proc)
        await self._wait_for_init()
        if self._info_fd >= 0:
            os.close(self._info_fd)
            self._info_fd = -1
        if client is not None:
            await client.close()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_task, 1.0)
        if self._stderr_transport is not None:
            self._stderr_transport.close()
        if self.scratch_dir is not None:
            await asyncio.get_running_loop().run_in_executor(None, _remove_tree, self.scratch_dir)
            self.scratch_dir = None

    # -- launching ----------------------------------------------------------

    def _check(self) -> tuple[str, bool]:
        if self.sandbox_uid <= 0 or self.sandbox_gid <= 0:
            raise SandboxError("the sandbox uid and gid must not be 0: never host root")
        as_root = os.geteuid() == 0
        if not as_root and (self.sandbox_uid, self.sandbox_gid) != (os.geteuid(), os.getegid()):
            raise SandboxError(
                f"the executor runs as uid {os.geteuid()} and cannot switch to sandbox uid "
                f"{self.sandbox_uid}; run it as root or set the sandbox uid/gid to its own"
            )
        bwrap = shutil.which(self.bwrap)
        if bwrap is None:
            raise SandboxError(
                f"bubblewrap ({self.bwrap}) is not installed; apt-get install bubblewrap"
            )
        if not os.access(self.python, os.X_OK):
            raise SandboxError(f"{self.python} is missing: the helper needs a Python 3 in /usr")
        if not self.workspace.is_dir():
            raise SandboxError(f"workspace {self.workspace} is not a directory")
        for name, value in self.env.items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise SandboxError(f"invalid environment variable for the sandbox: {name!r}")
        return bwrap, as_root

    async def _launch(self) -> None:
        bwrap, as_root = self._check()
        dests = [self._allow_dest(p) for p in self.allow_read]
        self.scratch_dir = Path(self._make_scratch(as_root))
        sources: list[_Source] = []
        child_fds: list[int] = []  # ours to close once bwrap has them
        stderr_w: list[int] = []
        try:
            sources.append(_Source(self.workspace, WORKSPACE, writable=True, directory=True))
            sources.append(_Source(self.scratch_dir / "home", HOME, writable=True, directory=True))
            sources.append(_Source(self.scratch_dir / "tmp", TMP, writable=True, directory=True))
            for host, dest in zip(self.allow_read, dests, strict=True):
                sources.append(_Source(host, dest, writable=False, directory=False))
            if as_root and os.fstat(sources[0].fd).st_uid != self.sandbox_uid:
                self.warnings.append(
                    f"sandbox uid {self.sandbox_uid} does not own {self.workspace}: commands "
                    "cannot write it (see prepare_workspace_ownership)"
                )
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds.append(child_sock.detach())
            info_r, info_w = os.pipe()
            child_fds.append(info_w)
            self._info_fd = info_r
            # A plain pipe read by us, not asyncio's PIPE: before Python 3.12,
            # Process.wait() also waits for asyncio's pipes to close.
            err_r, err_w = os.pipe()
            stderr_w.append(err_w)
            try:
                argv = self._argv(bwrap, as_root, sources, child_fds)
                fds = child_fds + ([] if as_root else [s.fd for s in sources])
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=err_w,
                    pass_fds=fds,
                    env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
                    # Own session: a Ctrl-C meant for the executor must not
                    # reach the sandbox behind its back.
                    start_new_session=True,
                )
            except BaseException:
                parent_sock.close()
                os.close(err_r)
                raise
        finally:
            for source in sources:
                source.close()
            for fd in child_fds + stderr_w:
                os.close(fd)
        pipe = os.fdopen(err_r, "rb", buffering=0)
        stderr = asyncio.StreamReader()
        try:
            self._stderr_transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stderr), pipe
            )
        except BaseException:
            pipe.close()
            parent_sock.close()
            raise
        self._stderr_task = asyncio.create_task(self._collect_stderr(stderr))
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
        for mine in (WORKSPACE, HOME, TMP, HELPER_PATH, "/proc", "/dev", *_etc_files()):
            inside = dest.startswith(mine + "/") and mine not in (HOME, TMP)
            if dest == "/" or dest == mine or mine.startswith(dest + "/") or inside:
                raise SandboxError(
                    f"read allow-list path {host} would cover the sandbox's own {mine}"
                )
        return dest

    def _make_scratch(self, as_root: bool) -> str:
        self.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="bwrap-", dir=self.scratch_root)
        for sub in ("home", "tmp"):
            path = os.path.join(scratch, sub)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
            if as_root:
                os.chown(path, self.sandbox_uid, self.sandbox_gid)
        return scratch

    def _argv(
        self, bwrap: str, as_root: bool, sources: list[_Source], child_fds: list[int]
    ) -> list[str]:
        sock_fd, info_fd = child_fds[0], child_fds[1]
        # bwrap's options read best in their groups.
        # fmt: off
        args = [
            bwrap,
            # Tells us the host pid of the sandbox's init; see _wait_for_init.
            "--info-fd", str(info_fd),
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--uid", str(INNER_UID), "--gid", str(INNER_GID), "--hostname", "silo",
            "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr",
        ]
        # fmt: on
        for name in _USR_ALIASES:
            host = f"/{name}"
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                args += ["--ro-bind", host, host]
        for path in _HOST_ETC:
            args += ["--ro-bind-try", path, path]
        for dest, content in _etc_files().items():
            args += ["--perms", "0644", "--ro-bind-data", str(_data_fd(content, child_fds)), dest]
        args += ["--proc", "/proc", "--dev", "/dev"]
        stage_dir = _stage_dir(sources) if as_root else ""
        for i, source in enumerate(sources):
            if as_root:
                staged = f"{stage_dir}/{i}"
                args += ["--bind" if source.writable else "--ro-bind", staged, source.dest]
            else:
                option = "--bind-fd" if source.writable else "--ro-bind-fd"
                args += [option, str(source.fd), source.dest]
        helper_fd = _data_fd(_helper_source(), child_fds)
        args += ["--perms", "0444", "--ro-bind-data", str(helper_fd), HELPER_PATH]
        # Everything is in place: the root itself (and /etc, /home) goes read-only.
        args += ["--remount-ro", "/", "--chdir", WORKSPACE]
        env = {
            "PATH": _SANDBOX_PATH,
            "HOME": HOME,
            "TMPDIR": TMP,
            "LANG": "C.UTF-8",
            "USER": "silo",
            "LOGNAME": "silo",
            "SHELL": "/bin/sh",
            **self.env,
        }
        for name, value in env.items():
            args += ["--setenv", name, value]
        helper_argv = [self.python, "-I", "-S", HELPER_PATH, "--fd", str(sock_fd)]
        args += ["--", *helper_argv, "--workspace", WORKSPACE]
        if not as_root:
            return args
        stage: list[str] = []
        for source in sources:
            stage += [source.path, source.identity, "d" if source.directory else "f"]
        setpriv = _tool("setpriv")
        # fmt: off
        drop = [
            setpriv, f"--reuid={self.sandbox_uid}", f"--regid={self.sandbox_gid}",
            "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        ]
        return [
            _tool("unshare"), "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", _STAGE_SCRIPT, "devsilo-stage", stage_dir, *stage, "--", *drop, *args,
        ]
        # fmt: on

    # -- watching -----------------------------------------------------------

    async def _pin_init(self) -> None:
        """Hold a pidfd on the sandbox's init (pid 1 inside), from bwrap's info."""
        info = b""
        pid: object = None
        try:
            os.set_blocking(self._info_fd, False)
            while pid is None and len(info) < 65536 and await _readable(self._info_fd, 2.0):
                chunk = os.read(self._info_fd, 4096)
                if not chunk:
                    break
                info += chunk
                with contextlib.suppress(ValueError):
                    pid = json.loads(info).get("child-pid")
        except (OSError, AttributeError):
            pid = None
        finally:
            os.close(self._info_fd)
            self._info_fd = -1
        if type(pid) is not int or pid <= 1:
            raise SandboxError(f"bwrap did not report its sandbox's pid (got {info[:200]!r})")
        try:
            self._init_pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise SandboxError(f"cannot track the sandbox's processes: {exc}") from None

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

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        # bubblewrap's own errors and a crashing helper's traceback land here;
        # keep only the tail, the sandbox could write without end.
        while data := await stream.read(65536):
            self._stderr += data
            del self._stderr[:-_STDERR_KEEP]

    def _describe_exit(self) -> str:
        parts = []
        if self._proc is not None and self._proc.returncode is not None:
            parts.append(f"bwrap exited with status {self._proc.returncode}")
        tail = self._stderr.decode("utf-8", errors="replace").strip()
        if tail:
            parts.append("its stderr: " + tail[-1000:])
        return "; ".join(parts)

    async def _exit_detail(self, wait: float) -> str:
        if self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), wait)
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 0.5)
        return self._describe_exit()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<BwrapSandbox {self.workspace} uid={self.sandbox_uid} {state}>"


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


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    """Give the process a moment to exit, then TERM it, then KILL it."""
    steps = ((None, 1.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0))
    for sig, wait in steps:
        if sig is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue
    raise SandboxError(f"bwrap (pid {proc.pid}) did not die after SIGKILL")


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
