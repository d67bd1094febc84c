"""The ``docker`` sandbox backend: one Docker Engine container per session.

Built with the ``docker`` SDK against a *local* daemon (a unix socket): every
mount is a host path the daemon resolves on its own machine, so the daemon
must run where the workspace and the scratch live. The runtime is ``runc``
or ``runsc`` (gVisor, registered in the daemon's ``daemon.json`` with
``--network=none --host-uds=open``).

What a container gets (REQUIREMENTS §2):

- no network but its own loopback (``network_mode="none"``), no
  capabilities, ``no-new-privileges``, a read-only root, the host's
  unprivileged sandbox uid/gid as its user (there is no user-namespace remap,
  so the uid inside *is* the host uid; never 0), its own pid, ipc and uts
  namespaces, a seccomp profile of our own (:func:`seccomp_profile`), and
  cgroup limits on memory (no swap), CPU and pids;
- a base image made locally with ``docker import`` from a skeleton of a few
  KB (:func:`ensure_base_image`): mount points, ``/bin``-style symlinks into
  ``/usr`` as the host has them, and a handful of public ``/etc`` files;
  the host's ``/usr`` is bound read-only over it;
- the workspace read-write at :data:`WORKSPACE`; per-sandbox scratch home and
  tmp (host directories, 0700, owned by the sandbox uid, removed at close)
  at :data:`HOME` and :data:`TMP`; the read allow-list read-only at the same
  paths; generated ``passwd``/``group``/``hosts``/``resolv.conf`` naming the
  user ``silo`` with the sandbox's uid; the helper's source, the session's
  relay socket and trust directory (its CA certificate, which the executor
  replaces when the egress restarts) under ``/.devsilo``, read-only; an
  empty read-only ``/sys`` (no host sysfs, as in bwrap).

A container cannot inherit a descriptor from the executor, so the helper
connects *out*: the executor listens on a unix socket in a per-sandbox
directory bound read-only at :data:`HELPER_SOCKET_DIR`; a tiny standard-library
launcher (:data:`LAUNCHER_PATH`) connects to it and runs the helper on that
connection with ``--fd N``. The executor accepts exactly one connection and
then removes the socket. The container's init is the host's ``tini``
(Docker's own ``docker-init``) when ``/usr`` has it, so orphaned commands are
reaped and a stop signal reaches the helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import secrets
import socket
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from devsilo.protocol import SandboxError, ToolError
from docker.types import LogConfig, Mount, Ulimit

from ._helper_client import HelperClient
from ._sandbox import (
    _ENV_NAME,
    _USR_ALIASES,
    HELPER_PYC,
    Sandbox,
    _helper_source,
    _remove_tree,
)
from ._sandbox import _helper_pyc as _compile_helper
from ._seccomp import oci_profile
from ._spec import (
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

if TYPE_CHECKING:
    from docker.models.containers import Container

__all__ = [
    "BASE_IMAGE_REPO",
    "DEFAULT_DOCKER_URL",
    "HELPER_SOCKET",
    "HELPER_SOCKET_DIR",
    "LAUNCHER_PATH",
    "SANDBOX_LABEL",
    "DockerSandbox",
    "base_image_tarball",
    "ensure_base_image",
    "probe",
    "seccomp_profile",
]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
REMOVE_PATIENCE_S = 180.0
"""How long a container's removal is asked again while the daemon is slow to stop it."""
"""The daemon used when neither ``docker_url`` nor ``DOCKER_HOST`` names one."""
BASE_IMAGE_REPO = "devsilo/sandbox-base"
"""Repository of the locally imported base image; the tag is a hash of its content."""
SANDBOX_LABEL = "devsilo.sandbox"
"""Label on every container this backend makes (value ``docker``), to find leftovers."""
SESSION_LABEL = "devsilo.session"
"""Label naming the session a container belongs to."""

LAUNCHER_PATH = "/.devsilo/connect.py"
"""The launcher that connects to the executor and runs the helper on that connection."""
HELPER_SOCKET_DIR = "/.devsilo/run"
"""Directory (bound read-only) holding the executor's socket for the helper."""
HELPER_SOCKET = HELPER_SOCKET_DIR + "/helper.sock"
"""The executor's socket the launcher connects to."""

_PYTHON = "/usr/bin/python3"
# Docker's own init binary is tini; Debian's docker.io also installs it as tini.
# Docker's `init=True` cannot be used: it mounts the binary at
# /sbin/docker-init, and /sbin here is a symlink into the read-only /usr.
_INIT_CANDIDATES = ("/usr/bin/docker-init", "/usr/bin/tini", "/usr/bin/tini-static")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Public, secret-free host files that ordinary tools need (see _sandbox._HOST_ETC);
# copied into the image when it is built.
_HOST_ETC = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "protocols",
    "services",
)
_ACCEPT_SLICE_S = 0.25
_LOG_TAIL = 2000

# -- seccomp ------------------------------------------------------------------


# Replaces Docker's built-in profile, which in Docker 20.10 still allows
# io_uring: the one sandbox policy (``_seccomp``), as Docker's JSON.
def seccomp_profile(runtime: str = "runc") -> dict[str, Any]:
    """The container's seccomp profile, native architecture only.

    Under ``runsc`` (which applies it inside gVisor with ``--oci-seccomp``)
    the ``clone3`` rule is left out: gVisor ignores ``errnoRet``, so it would
    answer EPERM and libc would never fall back to ``clone``.
    """
    return oci_profile(clone3=not runtime.startswith("runsc"))


# -- the launcher inside ------------------------------------------------------

# Runs inside the container as `python3 -I -S LAUNCHER SOCKET HELPER ARGS...`.
# Standard library and Python 3.9 syntax only, like the helper. It runs the
# helper in the same interpreter (runpy) rather than exec'ing a second one,
# which would cost another interpreter start-up.
_LAUNCHER = b'''\
"""devsilo: connect to the executor's socket, then run the helper on that connection."""
import runpy
import socket
import sys


def main():
    path, helper = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sys.stderr.write("devsilo launcher: cannot reach the executor at %s: %s\\n" % (path, exc))
        return 111
    fd = sock.detach()
    sys.argv = [helper, "--fd", str(fd)] + sys.argv[3:]
    runpy.run_path(helper, run_name="__main__")
    return 0


sys.exit(main())
'''


# -- the base image -----------------------------------------------------------


def _etc_users(uid: int, gid: int) -> dict[str, bytes]:
    """``passwd`` and ``group`` naming the sandbox user ``silo`` with ``uid``/``gid``."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"silo:x:{uid}:{gid}:devsilo sandbox:{HOME}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\nsilo:x:{gid}:\nnogroup:x:65534:\n".encode(),
    }


# Generated per sandbox and bound over Docker's own: Docker would otherwise
# copy the host's resolv.conf (its DNS servers) into the container.
_ETC_NET = {
    "hostname": b"silo\n",
    "hosts": b"127.0.0.1\tlocalhost silo\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    # The helper's resolver on loopback; nothing else answers in here anyway.
    "resolv.conf": b"nameserver 127.0.0.1\noptions ndots:0\n",
}
_NSSWITCH = (
    b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    b"networks: files\nprotocols: files\nservices: files\n"
)
# Mount points the container needs in its read-only root.
_IMAGE_DIRS = ("dev", "proc", "sys", "etc", "usr", "home", "home/silo", "tmp", "workspace",
               ".devsilo", HELPER_SOCKET_DIR.lstrip("/"))  # fmt: skip


@functools.cache
def base_image_tarball() -> bytes:
    """The base image's root filesystem as a tar archive (a few KB), deterministic.

    Holds mount points, the host's top-level symlinks into ``/usr`` (so that
    the host's ``/usr`` bound read-only gives ``/bin``, ``/lib``…), default
    ``passwd``/``group``/``nsswitch.conf``, and copies of the public host
    files in ``_HOST_ETC``. The same host gives the same bytes, hence the
    same image tag.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, *, data: bytes = b"", mode: int = 0o644,
                target: str = "") -> None:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.linkname = target
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in _IMAGE_DIRS:
            add(d, tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        for name in _USR_ALIASES:
            host = f"/{name}"
            if os.path.islink(host):
                add(name, tarfile.SYMTYPE, target=os.readlink(host), mode=0o777)
            elif os.path.isdir(host):
                add(name, tarfile.DIRTYPE, mode=0o755)  # bound read-only at run time
        for fname, content in {**_etc_users(INNER_UID, INNER_GID), **_ETC_NET}.items():
            add(f"etc/{fname}", tarfile.REGTYPE, data=content)
        add("etc/nsswitch.conf", tarfile.REGTYPE, data=_NSSWITCH)
        for name in _HOST_ETC:
            _add_host_etc(add, Path("/etc") / name, f"etc/{name}")
    return buf.getvalue()


def _add_host_etc(add: Callable[..., None], host: Path, name: str) -> None:
    """Copy a public ``/etc`` entry into the image: files, symlinks, one level of directory."""
    try:
        st = host.lstat()
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        add(name, tarfile.SYMTYPE, target=os.readlink(host), mode=0o777)
    elif stat.S_ISREG(st.st_mode) and st.st_size <= 1024 * 1024:
        add(name, tarfile.REGTYPE, data=host.read_bytes(), mode=0o644)
    elif stat.S_ISDIR(st.st_mode):
        add(name, tarfile.DIRTYPE, mode=0o755)
        for child in sorted(host.iterdir()):
            child_st = child.lstat()
            if stat.S_ISLNK(child_st.st_mode):
                add(f"{name}/{child.name}", tarfile.SYMTYPE, target=os.readlink(child), mode=0o777)
            elif stat.S_ISREG(child_st.st_mode) and child_st.st_size <= 1024 * 1024:
                add(f"{name}/{child.name}", tarfile.REGTYPE, data=child.read_bytes())


def _base_image_ref() -> str:
    digest = hashlib.sha256(base_image_tarball()).hexdigest()[:16]
    return f"{BASE_IMAGE_REPO}:{digest}"


def ensure_base_image(client: docker.DockerClient) -> str:
    """The base image's reference, imported into the daemon first if it lacks it.

    No registry is involved: the image is made here from
    :func:`base_image_tarball` with ``docker import``.
    """
    ref = _base_image_ref()
    try:
        client.images.get(ref)
        return ref
    except docker.errors.ImageNotFound:
        pass
    repo, tag = ref.split(":")
    client.api.import_image_from_data(base_image_tarball(), repository=repo, tag=tag)
    client.images.get(ref)  # raises if the import did not produce it
    return ref


# -- probing ------------------------------------------------------------------


def _daemon_url(docker_url: str | None) -> str:
    return docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def _runtime_problem(runtime: str, runtimes: dict[str, Any], url: str) -> str | None:
    """Why the daemon's ``runtime`` cannot run our sandboxes, or None."""
    if runtime not in runtimes:
        known = ", ".join(sorted(runtimes)) or "none"
        return f"runtime {runtime} not configured in the daemon at {url} (it has: {known})"
    if runtime == "runsc" or "runsc" in str((runtimes[runtime] or {}).get("path", "")):
        args = [str(a) for a in (runtimes[runtime] or {}).get("runtimeArgs") or []]
        if "--network=none" not in args:
            return (
                f"runtime {runtime} in the daemon at {url} lacks runtimeArgs --network=none "
                "(gVisor's own network cannot start here)"
            )
        if not any(a in ("--host-uds=open", "--host-uds=all") for a in args):
            return (
                f"runtime {runtime} in the daemon at {url} lacks runtimeArgs --host-uds=open "
                "(the helper could not reach the executor)"
            )
    return None


def _socket_answers(url: str) -> bool:
    """Whether something accepts connections on the daemon's unix socket.

    Checked before the SDK connects, because the SDK leaks its socket when
    the connection fails.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(url.removeprefix("unix://"))
    except OSError:
        return False
    return True


def probe(*, runtime: str = "runc", docker_url: str | None = None, **_config: Any) -> str | None:
    """None when a local Docker daemon answers and has ``runtime``; else one line saying why not.

    Other backend settings (``image``, ``start_timeout``…) are accepted and
    ignored, so the executor can pass the backend's whole configuration.
    """
    url = _daemon_url(docker_url)
    if not url.startswith("unix://"):
        return f"docker daemon {url} is not a local unix socket: sandboxes bind host paths"
    if not os.access(_PYTHON, os.X_OK):
        return f"{_PYTHON} is missing: the helper runs on the host's /usr"
    if not _socket_answers(url):
        return f"no Docker daemon at {url}"
    try:
        client = docker.DockerClient(base_url=url, timeout=5)
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return f"no Docker daemon at {url}"
    try:
        info = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return f"no Docker daemon at {url}"
    finally:
        client.close()
    return _runtime_problem(runtime, info.get("Runtimes") or {}, url)


# -- the sandbox --------------------------------------------------------------

_T = TypeVar("_T")


class DockerSandbox(Sandbox):
    """One session's sandbox in a Docker container (see the module docstring).

    ``runtime`` is the daemon's runtime name (``runc`` or ``runsc``);
    ``docker_url`` the daemon's unix socket (default ``DOCKER_HOST``, then
    :data:`DEFAULT_DOCKER_URL`). Other settings: ``image`` (default: the
    base image, imported on first use), ``start_timeout`` (seconds until the
    helper must have answered), ``stop_grace`` (seconds between TERM and
    KILL at close), ``runsc_host_pids`` (the host's task limit for a runsc
    sandbox; see :meth:`_pids_limits`).
    """

    backend = "docker"

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        runtime: str = "runc",
        docker_url: str | None = None,
        **config: Any,
    ) -> None:
        unknown = set(config) - {"image", "start_timeout", "stop_grace", "runsc_host_pids"}
        if unknown:
            raise SandboxError(f"unknown docker sandbox settings: {', '.join(sorted(unknown))}")
        self.spec = spec
        self.runtime = runtime
        self.limit_ends_sandbox = runtime == "runsc"
        self.docker_url = _daemon_url(docker_url)
        self.image: str | None = config.get("image")
        self.start_timeout = float(config.get("start_timeout", 20.0))
        self.stop_grace = float(config.get("stop_grace", 2.0))
        host_pids = config.get("runsc_host_pids")
        self.runsc_host_pids = int(host_pids) if host_pids is not None else None
        self.warnings: list[str] = []
        """Things a user should know about this sandbox (for the access report)."""
        self.timings: dict[str, float] = {}
        """Seconds spent in each step of :meth:`start` (``create``, ``start``,
        ``connect``, ``hello``, ``total``), for metrics and benchmarks."""
        self.scratch_dir: Path | None = None
        self.container_id: str | None = None
        self._client: docker.DockerClient | None = None
        self._container: Container | None = None
        self._name: str | None = None
        self._listener: socket.socket | None = None
        self._helper: HelperClient | None = None
        self._started = False
        self._closed = False

    # -- public -------------------------------------------------------------

    @property
    def helper(self) -> HelperClient:
        """The helper's client; raises SandboxError before start or after close."""
        if self._helper is None or self._closed:
            raise SandboxError("the sandbox is not running (start() it first)")
        return self._helper

    @property
    def container_name(self) -> str | None:
        """The container's name while it exists (for logs and leftovers)."""
        return self._container.name if self._container is not None else None

    async def host_pid(self) -> int:
        """The host pid of the running container's init (Docker's ``State.Pid``).

        It lives exactly as long as the container; the warm pool watches it
        and enters its mount namespace. SandboxError when the container is
        not running.
        """
        container = self._container
        if container is None or self._closed:
            raise SandboxError("the sandbox is not running (start() it first)")
        await self._call(container.reload)
        state = container.attrs.get("State", {})
        pid = state.get("Pid")
        if not state.get("Running") or type(pid) is not int or pid <= 1:
            raise SandboxError(f"docker container {container.id[:12]} is not running")
        return pid

    async def start(self) -> None:
        """Create and start the container; returns once the helper answered hello."""
        if self._started:
            raise SandboxError("this sandbox was already started; make a new one")
        self._started = True
        began = time.monotonic()
        try:
            await self._launch()
            step = time.monotonic()
            assert self._helper is not None
            remaining = max(0.1, self.start_timeout - (step - began))
            await asyncio.wait_for(self._helper.hello(), remaining)
            self.timings["hello"] = time.monotonic() - step
            self.timings["total"] = time.monotonic() - began
        except (TimeoutError, SandboxError, ToolError, OSError) as exc:
            detail = await self._container_detail()
            await self.close()
            why = str(exc) or type(exc).__name__
            raise SandboxError(
                f"docker sandbox ({self.runtime}) for {self.spec.workspace} did not start: {why}"
                + (f"; {detail}" if detail and detail not in why else "")
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Shut the helper down, stop (TERM, grace, KILL) and remove the container, drop scratch.

        Idempotent; leaves no container, no socket and no scratch behind.
        """
        if self._closed:
            return
        self._closed = True
        helper = self._helper
        if helper is not None and not helper.closed:
            # A clean exit first: the helper kills its commands' groups and
            # exits, tini follows, and the container stops by itself.
            with contextlib.suppress(SandboxError, ToolError, asyncio.TimeoutError):
                await asyncio.wait_for(helper.shutdown(), 1.0)
        self._close_listener()
        errors: list[str] = []
        if self._container is None and self._name is not None and self._client is not None:
            # Cancelled while the daemon was creating it: find it by its name.
            with contextlib.suppress(SandboxError):
                self._container = await self._call(self._find_container, self._name)
        if self._container is not None:
            try:
                await self._call(self._remove_container, self._container)
            except SandboxError as exc:
                errors.append(str(exc))
            self._container = None
        if helper is not None:
            await helper.close()
        if self._client is not None:
            await self._call(self._client.close)
            self._client = None
        if self.scratch_dir is not None:
            scratch, self.scratch_dir = self.scratch_dir, None
            try:
                await asyncio.get_running_loop().run_in_executor(None, _remove_tree, scratch)
            except SandboxError as exc:
                errors.append(str(exc))
        if errors:
            raise SandboxError("; ".join(errors))

    # -- launching ----------------------------------------------------------

    def _check(self) -> tuple[str, bool]:
        spec = self.spec
        if spec.sandbox_uid <= 0 or spec.sandbox_gid <= 0:
            raise SandboxError("the sandbox uid and gid must not be 0: never host root")
        as_root = os.geteuid() == 0
        if not as_root and (spec.sandbox_uid, spec.sandbox_gid) != (os.geteuid(), os.getegid()):
            raise SandboxError(
                f"the executor runs as uid {os.geteuid()} and cannot give scratch to sandbox uid "
                f"{spec.sandbox_uid}; run it as root or set the sandbox uid/gid to its own"
            )
        if not self.docker_url.startswith("unix://"):
            raise SandboxError(
                f"docker daemon {self.docker_url} is not a local unix socket: sandboxes bind "
                "host paths, so the daemon must run on this machine"
            )
        if not os.access(_PYTHON, os.X_OK):
            raise SandboxError(f"{_PYTHON} is missing: the helper runs on the host's /usr")
        if not spec.workspace.is_dir():
            raise SandboxError(f"workspace {spec.workspace} is not a directory")
        for name, value in sandbox_env(spec).items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise SandboxError(f"invalid environment variable for the sandbox: {name!r}")
        if spec.relay_socket is not None:
            try:
                relay_mode = os.stat(spec.relay_socket).st_mode
            except OSError as exc:
                raise SandboxError(f"relay socket {spec.relay_socket}: {exc.strerror}") from None
            if not stat.S_ISSOCK(relay_mode):
                raise SandboxError(f"relay socket {spec.relay_socket} is not a unix socket")
        workspace = os.path.realpath(spec.workspace)
        if as_root and os.stat(workspace).st_uid != spec.sandbox_uid:
            self.warnings.append(
                f"sandbox uid {spec.sandbox_uid} does not own {spec.workspace}: commands "
                "cannot write it (see prepare_workspace_ownership)"
            )
        if spec.limits.disk_bytes is not None:
            self.warnings.append(
                "the docker backend does not limit disk use: the root is read-only and "
                "workspace and scratch are host directories"
            )
        return workspace, as_root

    async def _launch(self) -> None:
        workspace, as_root = self._check()
        allow = [(_allow_dest(p), os.path.realpath(p)) for p in self.spec.allow_read]
        await asyncio.to_thread(_helper_pyc)  # compiled once per process, off the loop
        self.scratch_dir = Path(self._make_scratch(as_root))
        self._listener = self._listen(as_root)
        if not await asyncio.to_thread(_socket_answers, self.docker_url):
            raise SandboxError(f"no Docker daemon at {self.docker_url}")
        self._client = await self._call(docker.DockerClient, base_url=self.docker_url)
        image = self.image or await self._call(ensure_base_image, self._client)
        kwargs = self._container_kwargs(workspace, allow)
        began = time.monotonic()
        self._container = await self._call(self._client.containers.create, image, **kwargs)
        self.container_id = self._container.id
        step = time.monotonic()
        self.timings["create"] = step - began
        await self._call(self._container.start)
        self.timings["start"] = time.monotonic() - step
        step = time.monotonic()
        sock = await self._accept(began)
        self.timings["connect"] = time.monotonic() - step
        self._helper = HelperClient(sock, describe_exit=self._describe_exit)
        await self._helper.start()

    def _make_scratch(self, as_root: bool) -> str:
        """Scratch: ``home``, ``tmp`` (the sandbox's, 0700), ``run`` (the socket), files."""
        spec = self.spec
        spec.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="docker-", dir=spec.scratch_root)
        uid, gid = spec.sandbox_uid, spec.sandbox_gid
        for sub in ("home", "tmp", "run"):
            path = os.path.join(scratch, sub)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
            if as_root:
                os.chown(path, uid, gid)
        files = {
            "connect.py": _LAUNCHER,
            "helper.py": _helper_source(),
            "helper.pyc": _helper_pyc(),
            **{f"etc-{name}": data for name, data in {**_etc_users(uid, gid), **_ETC_NET}.items()},
        }
        for name, data in files.items():
            path = os.path.join(scratch, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            with open(fd, "wb") as f:
                f.write(data)
            os.chmod(path, 0o444)
        return scratch

    def _listen(self, as_root: bool) -> socket.socket:
        """The executor's listening socket in ``run/``; only the sandbox uid may connect."""
        assert self.scratch_dir is not None
        run = os.open(self.scratch_dir / "run", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # Through the directory's descriptor: sun_path holds only 107 bytes,
        # and a scratch root may be deeper than that.
        path = f"/proc/self/fd/{run}/helper.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            if as_root:
                os.chown(path, self.spec.sandbox_uid, self.spec.sandbox_gid)
            listener.listen(1)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise SandboxError(f"cannot listen for the sandbox's helper: {exc}") from None
        finally:
            os.close(run)
        return listener

    def _container_kwargs(self, workspace: str, allow: list[tuple[str, str]]) -> dict[str, Any]:
        spec = self.spec
        assert self.scratch_dir is not None
        scratch = str(self.scratch_dir)

        def bind(dest: str, source: str, *, read_only: bool = True) -> Mount:
            return Mount(dest, source, type="bind", read_only=read_only, propagation="rprivate")

        mounts = [bind("/usr", "/usr")]
        for name in _USR_ALIASES:
            host = f"/{name}"
            if os.path.isdir(host) and not os.path.islink(host):
                mounts.append(bind(host, host))
        mounts += [
            bind(WORKSPACE, workspace, read_only=False),
            bind(HOME, f"{scratch}/home", read_only=False),
            bind(TMP, f"{scratch}/tmp", read_only=False),
            bind(HELPER_SOCKET_DIR, f"{scratch}/run"),
            bind(HELPER_PATH, f"{scratch}/helper.py"),
            bind(HELPER_PYC, f"{scratch}/helper.pyc"),
            bind(LAUNCHER_PATH, f"{scratch}/connect.py"),
        ]
        for name in (*_etc_users(0, 0), *_ETC_NET):
            mounts.append(bind(f"/etc/{name}", f"{scratch}/etc-{name}"))
        if spec.trust_dir is not None:
            # The directory, not the file: the executor renames a new CA into it later.
            mounts.append(bind(TRUST_DIR, os.path.realpath(spec.trust_dir)))
        if spec.relay_socket is not None:
            mounts.append(bind(RELAY_SOCKET, os.path.realpath(spec.relay_socket)))
        mounts += [bind(dest, source) for dest, source in allow]
        # The host's sysfs (hardware, kernel and cgroup details) is none of
        # the sandbox's business; bwrap does not mount it either.
        mounts.append(Mount("/sys", None, type="tmpfs", read_only=True, tmpfs_size=4096))
        init = next((p for p in _INIT_CANDIDATES if os.access(p, os.X_OK)), None)
        if init is None:
            self.warnings.append(
                "no tini in /usr (install tini): the helper runs as the container's init, "
                "so orphaned background processes are not reaped"
            )
        limits = spec.limits
        helper_args = ("--workspace", WORKSPACE)
        safe_session = _NAME_UNSAFE.sub("-", spec.session_id).strip("-.")[:40] or "session"
        self._name = f"devsilo-{safe_session}-{secrets.token_hex(4)}"
        return {
            "name": self._name,
            "entrypoint": [init, "--"] if init else None,
            "command": [
                _PYTHON,
                "-I",
                "-S",
                LAUNCHER_PATH,
                HELPER_SOCKET,
                HELPER_PYC,
                *helper_args,
            ],
            "runtime": self.runtime,
            "user": f"{spec.sandbox_uid}:{spec.sandbox_gid}",
            "working_dir": WORKSPACE,
            "environment": sandbox_env(spec),
            "hostname": "silo",
            "network_mode": "none",
            "ipc_mode": "private",
            "cap_drop": ["ALL"],
            "security_opt": [
                "no-new-privileges",
                "seccomp=" + json.dumps(seccomp_profile(self.runtime)),
            ],
            "read_only": True,
            "mounts": mounts,
            "mem_limit": limits.memory_bytes,
            "memswap_limit": limits.memory_bytes,  # the same: no swap on top
            "nano_cpus": max(1, int(limits.cpus * 1_000_000_000)),
            **self._pids_limits(),
            "labels": {SANDBOX_LABEL: "docker", SESSION_LABEL: spec.session_id},
            # Only the helper's own errors land here; keep them bounded.
            "log_config": LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            "stdin_open": False,
            "tty": False,
        }

    def _pids_limits(self) -> dict[str, Any]:
        """The process limit: the container's pids cgroup under runc; two bounds under runsc.

        Under runsc the host's cgroup holds gVisor's own tasks, not the
        sandbox's processes: on the ptrace platform each process inside costs
        10-30 host tasks (2,650 for 100 sleeping processes here), so the
        spec's limit there would kill gVisor after a couple of dozen
        processes. gVisor enforces ``RLIMIT_NPROC`` per sandbox on its own
        processes, so that carries the spec's limit inside, and the host
        cgroup gets a larger bound that still protects the host's pid space
        (``runsc_host_pids``; default 8 x the spec's limit, at least 4096).
        Under runc ``RLIMIT_NPROC`` would count every process of the sandbox
        uid on the whole host, so only the cgroup limits there.
        """
        pids = self.spec.limits.pids
        if not self.runtime.startswith("runsc"):
            return {"pids_limit": pids}
        host = self.runsc_host_pids or max(4096, pids * 8)
        return {"pids_limit": host, "ulimits": [Ulimit(name="nproc", soft=pids, hard=pids)]}

    async def _accept(self, began: float) -> socket.socket:
        """The helper's connection; fails early when the container exits instead."""
        assert self._listener is not None and self._container is not None
        loop = asyncio.get_running_loop()
        deadline = began + self.start_timeout
        while True:
            try:
                sock, _ = await asyncio.wait_for(loop.sock_accept(self._listener), _ACCEPT_SLICE_S)
                break
            except TimeoutError:
                pass
            await self._call(self._container.reload)
            if self._container.status not in ("created", "running"):
                raise SandboxError(
                    f"the container {self._container.status} before its helper connected"
                )
            if time.monotonic() > deadline:
                raise SandboxError(f"the helper did not connect within {self.start_timeout:g} s")
        # One connection only, ever: nothing else may take the helper's place.
        self._close_listener()
        return sock

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.scratch_dir is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.scratch_dir / "run" / "helper.sock")

    # -- stopping and reporting ---------------------------------------------

    def _find_container(self, name: str) -> Container | None:
        assert self._client is not None
        try:
            return self._client.containers.get(name)
        except docker.errors.NotFound:
            return None

    def _remove_container(self, container: Container) -> None:
        """TERM, ``stop_grace`` seconds, KILL (Docker's stop), then remove; gone is fine.

        A container full of processes (a fork bomb under runsc) can take the daemon
        longer than a request's timeout to stop: the removal is then asked again until
        it is done or :data:`REMOVE_PATIENCE_S` have passed.
        """
        with contextlib.suppress(docker.errors.NotFound):
            try:
                container.stop(timeout=max(0, round(self.stop_grace)))
            except (docker.errors.APIError, requests.exceptions.RequestException):
                pass  # never started, or slow to stop: removal with force still follows
            deadline = time.monotonic() + REMOVE_PATIENCE_S
            while True:
                try:
                    container.remove(force=True, v=True)
                    return
                except docker.errors.NotFound:
                    return
                except (docker.errors.APIError, requests.exceptions.RequestException):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)

    async def _container_detail(self) -> str:
        """How the container ended and the tail of its output, for a start error."""
        container = self._container
        if container is None:
            return ""
        try:
            await self._call(container.reload)
            state = container.attrs.get("State", {})
            logs = await self._call(container.logs, tail=20)
        except SandboxError:
            return ""
        parts = [f"container {container.status}"]
        if state.get("ExitCode"):
            parts[0] += f" with status {state['ExitCode']}"
        if state.get("Error"):
            parts.append(f"docker: {state['Error']}")
        # Without stream=True the SDK returns the bytes themselves.
        raw = logs if isinstance(logs, bytes) else b""
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            parts.append("its output: " + text[-_LOG_TAIL:])
        return "; ".join(parts)

    def _describe_exit(self) -> str:
        # Called from the helper client's reader, inside the event loop: no
        # blocking daemon call here, just which container it was.
        if self.container_id is None:
            return ""
        return f"docker container {self.container_id[:12]} ({self.runtime})"

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking SDK call in a thread; daemon errors become one-line SandboxErrors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(
                f"image not found in the daemon at {self.docker_url}: {exc.explanation}"
            ) from None
        except docker.errors.APIError as exc:
            raise SandboxError(
                f"docker daemon at {self.docker_url}: {exc.explanation or exc}"
            ) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise SandboxError(f"no Docker daemon at {self.docker_url}: {exc}") from None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<DockerSandbox {self.spec.workspace} {self.runtime} uid={self.spec.sandbox_uid} {state}>"


def _allow_dest(host: Path) -> str:
    """Where an allow-listed host path appears inside: the same path, if that is free."""
    if not host.is_absolute():
        raise SandboxError(f"read allow-list path {host} must be absolute")
    if not host.exists():
        raise SandboxError(f"read allow-list path {host} does not exist")
    dest = os.path.normpath(host)
    own = (WORKSPACE, HOME, TMP, "/.devsilo", "/usr", "/proc", "/dev", "/sys",
           *(f"/etc/{name}" for name in (*_etc_users(0, 0), *_ETC_NET)),
           *(f"/{name}" for name in _USR_ALIASES))  # fmt: skip
    # Below the scratch and /usr is fine (mounted on top, and /usr has the
    # same path already); below the workspace is not (it would plant mount
    # points in the user's files), nor below the sandbox's own machinery.
    nested_ok = (HOME, TMP, "/usr")
    for mine in own:
        inside = dest.startswith(mine + "/") and mine not in nested_ok
        if dest == "/" or dest == mine or mine.startswith(dest + "/") or inside:
            raise SandboxError(f"read allow-list path {host} would cover the sandbox's own {mine}")
    return dest


def _helper_pyc() -> bytes:
    """The helper compiled by the sandbox's Python (cached per process by ``_sandbox``)."""
    return _compile_helper(_PYTHON)
