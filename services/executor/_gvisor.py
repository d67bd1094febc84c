"""The gVisor backend: runsc runs an OCI bundle that the executor writes per sandbox.

Each sandbox gets a scratch directory under ``spec.scratch_root`` holding its
``home`` and ``tmp`` and an OCI bundle (``config.json`` and a small read-only
``rootfs``: mount points, the generated ``/etc`` files and the helper).
``runsc run`` starts the helper as the container's only process; its stdin
is the sandbox's end of a socket pair, so the helper runs as
``helper.pyc --fd 0`` (compiled by the sandbox's own Python: compiling at
every start is slow under gVisor) and no listening socket is needed: gVisor
imports the stdio descriptors as host-backed sockets.

Inside: the workspace read-write at :data:`WORKSPACE`, scratch home and tmp
read-write, the allow-list read-only at the same paths, read-only ``/usr`` (and
``/bin``, ``/lib``… as the host has them), a generated ``/etc`` plus a few
public host files, gVisor's own ``/proc``, ``/dev`` and ``/sys``. No network
but loopback (``--network=none``). The process runs as :data:`INNER_UID` with
empty capability sets and no_new_privs under an OCI seccomp profile (enforced
by gVisor itself, ``--oci-seccomp``) that refuses mount, namespaces, ptrace,
modules, clock changes, keyctl, bpf, perf, io_uring and raw and packet
sockets with EPERM, on top of what gVisor does not implement anyway.

Closing asks the helper to shut down (the container ends with it and the
attached ``runsc run`` destroys it), then escalates: ``runsc kill`` TERM,
``runsc kill --all`` KILL, ``runsc delete --force``, and finally SIGKILL for
any process still naming the container, and removes its cgroups, bundle and
scratch.

Host ownership. The executor runs runsc as root (rootless runsc can only map
the executor's own uid, to root inside, which the sandbox must never be). The
container's user namespace maps :data:`INNER_UID` to ``spec.sandbox_uid`` and
0 to host root, and runsc starts its gofer (the process that does the file
I/O for the sandbox) in that namespace. So files the sandbox creates belong to
the sandbox uid on the host, and the gofer can override permissions only on
files owned by root or the sandbox uid, not on anyone else's.

Such a gofer cannot walk into, say, a user's 0700 home to reach the workspace.
So, like the bubblewrap backend, the launcher first enters a private mount
namespace, binds every host source (scratch, workspace, allow-list, relay
socket, trust directory) onto a tmpfs stage inside the scratch directory
(checking each is still the very file the executor opened), and runs runsc on
the stage. Nothing of this is visible on the host. The trust directory stays
a live view of the host's (``--file-access-mounts=shared``): the session CA
the executor renames into it after an egress restart is what the sandbox
reads next.

Limits: memory and CPU go to the host cgroup (``linux.resources``). The pid
limit is enforced inside as ``RLIMIT_NPROC``, which gVisor applies to the
sandbox user; the host cgroup gets a proportionally larger backstop, because
on the ptrace platform each sandboxed process costs ~18 host tasks (stub
processes and threads).

Known limitation of Debian's runsc (2022-12-19): ``statx``/``fstatat`` with
``AT_NO_AUTOMOUNT`` fail with EINVAL, so coreutils ``ls`` and ``stat`` fail;
Python, shells, git and most other tools do not use that flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devsilo.protocol import SandboxError, ToolError

from ._helper_client import HelperClient
from ._sandbox import (
    _HOST_ETC,
    _USR_ALIASES,
    OutputTail,
    Sandbox,
    _etc_files,
    _helper_pyc,
    _helper_source,
    _remove_tree,
    _tool,
)
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

__all__ = ["GvisorSandbox", "probe"]

_LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CPU_PERIOD_US = 100_000
# Host tasks per sandboxed process on the ptrace platform (measured ~18: one
# stub process per address space plus a stub thread per sentry thread that
# entered it), and what the sentry and gofer need on their own.
_HOST_TASKS_PER_PROCESS = 20
_HOST_TASKS_BASE = 256
_PROBE_TIMEOUT_S = 20.0
_RUNSC_CMD_TIMEOUT_S = 10.0

HELPER_PYC = "/.devsilo/helper.pyc"
"""The helper compiled by the sandbox's Python, run instead of its source: a
script given as source is compiled at every start, slowly under gVisor."""

# Runs as root in a private mount namespace: "$1" is the stage directory,
# then (source, dev:ino, d|f) triples up to "--", then the command to exec.
# Each source is bound at "$stage/<index>" and must still be the very object
# the executor opened.
_STAGE_SCRIPT = r"""set -eu
stage=$1
shift
mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev devsilo-gvisor-stage "$stage"
n=0
while [ "$1" != "--" ]; do
    src=$1 want=$2 kind=$3
    shift 3
    if [ "$kind" = d ]; then mkdir "$stage/$n"; else : > "$stage/$n"; fi
    mount --bind "$src" "$stage/$n"
    if [ "$(stat -c %d:%i "$stage/$n")" != "$want" ]; then
        echo "devsilo: $src was replaced while the sandbox started" >&2
        exit 1
    fi
    n=$((n + 1))
done
shift
exec "$@"
"""

# Where the sandbox's own mounts live: the allow-list must not cover them.
_OWN_PATHS = (WORKSPACE, HOME, TMP, "/.devsilo", "/proc", "/dev", "/sys", "/usr")


class _Pinned:
    """A host path to bind into the sandbox, pinned by an O_PATH descriptor until staged."""

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
        self.owner = st.st_uid
        self.identity = f"{st.st_dev}:{st.st_ino}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _seccomp_profile() -> dict[str, Any]:
    """The one sandbox policy (``_seccomp``) as an OCI profile for ``--oci-seccomp``.

    Without the ``clone3`` rule: gVisor has no clone3 and ignores ``errnoRet``.
    """
    return oci_profile(clone3=False, architectures=("SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"))


class GvisorSandbox(Sandbox):
    """One session's sandbox on gVisor (see the module docstring).

    Configuration (the backend's keyword arguments): ``runsc`` the binary;
    ``platform`` gVisor's platform (``ptrace``; ``kvm`` hangs on VMs like ours);
    ``state_dir`` runsc's ``--root`` (default ``<scratch_root>/runsc``, so
    ``runsc --root … list`` shows this executor's sandboxes and nobody
    else's); ``cgroup_parent`` the cgroup under which each sandbox gets its
    own; ``python`` the interpreter inside (from the host's ``/usr``);
    ``start_timeout`` seconds to wait for the helper's hello; ``debug_log``
    a runsc ``--debug-log`` location, for diagnosing runsc itself.
    """

    backend = "gvisor"
    limit_ends_sandbox = True

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        runsc: str = "runsc",
        platform: str = "ptrace",
        state_dir: str | Path | None = None,
        cgroup_parent: str = "devsilo/gvisor",
        python: str = "/usr/bin/python3",
        start_timeout: float = 15.0,
        debug_log: str | None = None,
    ) -> None:
        self.spec = spec
        self.runsc = runsc
        self.platform = platform
        self.state_dir = Path(state_dir) if state_dir is not None else spec.scratch_root / "runsc"
        self.cgroup_parent = cgroup_parent.strip("/")
        self.python = python
        self.start_timeout = start_timeout
        self.debug_log = debug_log
        self.warnings: list[str] = []
        """Things a user should know about this sandbox (for the access report)."""
        self.scratch_dir: Path | None = None
        # A fresh id per sandbox: runsc refuses to reuse an id still in its
        # state, and a leftover cgroup of an old id would be reused silently.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.session_id)[:40]
        self.container_id = f"silo-{safe}-{secrets.token_hex(4)}"
        self._runsc_path = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._client: HelperClient | None = None
        self._stderr = OutputTail()
        self._pins: list[_Pinned] = []
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
        """The host pid of ``runsc run``, while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def host_pid(self) -> int:
        """The host pid of ``runsc run``, which lives exactly as long as the sandbox.

        (For the warm pool to watch.) SandboxError when it is not running.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None or self._closed:
            raise SandboxError("the sandbox is not running (start() it first)")
        return proc.pid

    async def start(self) -> None:
        """Write the bundle, run it, and return once the helper inside answered hello."""
        if self._started:
            raise SandboxError("this sandbox was already started; make a new one")
        self._started = True
        try:
            await self._launch()
            assert self._client is not None
            info = await asyncio.wait_for(self._client.hello(), self.start_timeout)
            if (info.uid, info.gid) != (INNER_UID, INNER_GID):
                raise SandboxError(
                    f"the helper runs as uid {info.uid} gid {info.gid}, not {INNER_UID}:{INNER_GID}"
                )
            self._unpin()
        except (TimeoutError, SandboxError, ToolError, OSError) as exc:
            why = str(exc) or type(exc).__name__
            detail = await self._exit_detail(2.0, known=why)
            await self.close()
            raise SandboxError(
                f"gvisor sandbox for {self.spec.workspace} did not start: {why}"
                + (f"; {detail}" if detail else "")
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the container (shutdown, TERM, KILL), delete it, remove bundle and scratch.

        Idempotent. Afterwards no runsc process of this sandbox runs, runsc
        has no state for it and its cgroups are gone.
        """
        if self._closed:
            return
        self._closed = True
        self._unpin()
        client, proc = self._client, self._proc
        if client is not None and not client.closed:
            # A clean exit first: the helper kills its commands and exits, the
            # container with it, and an attached `runsc run` then destroys it.
            with contextlib.suppress(SandboxError, ToolError, asyncio.TimeoutError):
                await asyncio.wait_for(client.shutdown(), 1.0)
        if proc is not None:
            await self._stop(proc)
            # Whatever `runsc run` left: the sandbox and gofer processes die
            # with it, but its state and cgroups may stay when it was killed.
            await self._runsc_quiet("delete", "--force", self.container_id)
            await asyncio.get_running_loop().run_in_executor(None, self._reap_leftovers)
        if client is not None:
            await client.close()
        await self._stderr.close()
        if self.scratch_dir is not None:
            await asyncio.get_running_loop().run_in_executor(None, _remove_tree, self.scratch_dir)
            self.scratch_dir = None

    # -- launching ----------------------------------------------------------

    def _unpin(self) -> None:
        pins, self._pins = self._pins, []
        for pin in pins:
            pin.close()

    def _check(self) -> None:
        spec = self.spec
        if os.geteuid() != 0:
            raise SandboxError(_NEEDS_ROOT)
        if spec.sandbox_uid <= 0 or spec.sandbox_gid <= 0:
            raise SandboxError("the sandbox uid and gid must not be 0: never host root")
        runsc = shutil.which(self.runsc)
        if runsc is None:
            raise SandboxError(f"runsc ({self.runsc}) is not installed; apt-get install runsc")
        self._runsc_path = runsc
        if not os.access(self.python, os.X_OK) or not self.python.startswith("/usr/"):
            raise SandboxError(f"{self.python} is missing: the helper needs a Python 3 in /usr")
        if not spec.workspace.is_dir():
            raise SandboxError(f"workspace {spec.workspace} is not a directory")
        for name, value in sandbox_env(spec).items():
            if not _ENV_NAME.match(name) or "\0" in value:
                raise SandboxError(f"invalid environment variable for the sandbox: {name!r}")
        if spec.relay_socket is not None and not spec.relay_socket.is_socket():
            raise SandboxError(f"relay socket {spec.relay_socket} is not a unix socket")
        if spec.trust_dir is not None and not spec.trust_dir.is_dir():
            raise SandboxError(f"trust directory {spec.trust_dir} is not a directory")
        if spec.limits.disk_bytes is not None:
            self.warnings.append("the gvisor backend does not enforce a disk quota")

    async def _launch(self) -> None:
        self._check()
        spec = self.spec
        dests = [_allow_dest(p) for p in spec.allow_read]
        pyc = await asyncio.get_running_loop().run_in_executor(None, _helper_pyc, self.python)
        self._make_scratch()
        assert self.scratch_dir is not None
        sources: list[_Pinned] = []
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Staged at <stage>/<index>, in this order (see _config).
            sources.append(_Pinned(self.scratch_dir, "", writable=True, directory=True))
            sources.append(_Pinned(spec.workspace, WORKSPACE, writable=True, directory=True))
            for host, dest in zip(spec.allow_read, dests, strict=True):
                sources.append(_Pinned(host, dest, writable=False, directory=False))
            if spec.relay_socket is not None:
                sources.append(
                    _Pinned(spec.relay_socket, RELAY_SOCKET, writable=True, directory=False)
                )
            if spec.trust_dir is not None:
                # A directory bind: gVisor revalidates bind mounts against the host
                # (--file-access-mounts=shared), so the CA the executor renames into
                # it later is the one the sandbox opens next.
                sources.append(_Pinned(spec.trust_dir, TRUST_DIR, writable=False, directory=True))
            if sources[1].owner != spec.sandbox_uid:
                self.warnings.append(
                    f"sandbox uid {spec.sandbox_uid} does not own {spec.workspace}: commands "
                    "cannot write it (see prepare_workspace_ownership)"
                )
            stage = str(self.scratch_dir / "stage")
            bundle = self.scratch_dir / "bundle"
            self._write_bundle(bundle, stage, sources, pyc)
            err_r = await self._spawn(self._argv(stage, sources), child_sock)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
            # Held until the helper answers (the stage is made by then): an
            # inode pinned open cannot be freed and its number reused by an
            # impostor before the stage checks it.
            self._pins = sources
        try:
            await self._stderr.follow(err_r)
        except BaseException:
            parent_sock.close()
            raise
        self._client = HelperClient(parent_sock, describe_exit=self._describe_exit)
        await self._client.start()

    async def _spawn(self, argv: list[str], child_sock: socket.socket) -> int:
        """Start the launcher; returns the read end of its (and the sandbox's) output pipe."""
        # A plain pipe read by us, not asyncio's PIPE: before Python 3.12,
        # Process.wait() also waits for asyncio's pipes to close.
        err_r, err_w = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                # runsc hands its stdio to the container's process: the
                # helper's connection is its stdin (helper.py --fd 0).
                stdin=child_sock.fileno(),
                stdout=err_w,
                stderr=err_w,
                env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
                # Own session: a Ctrl-C meant for the executor must not
                # reach the sandbox behind its back.
                start_new_session=True,
            )
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(err_w)
        return err_r

    def _make_scratch(self) -> None:
        """The per-sandbox scratch: home and tmp for the sandbox uid, the stage, the bundle."""
        spec = self.spec
        spec.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Known at once, so that close() removes it whatever fails next.
        self.scratch_dir = Path(tempfile.mkdtemp(prefix="gvisor-", dir=spec.scratch_root))
        for sub in ("home", "tmp"):
            path = self.scratch_dir / sub
            path.mkdir(0o700)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
            os.chown(path, spec.sandbox_uid, spec.sandbox_gid)
        (self.scratch_dir / "stage").mkdir(0o700)

    def _write_bundle(
        self, bundle: Path, stage: str, sources: list[_Pinned], helper_pyc: bytes
    ) -> None:
        """The bundle: a read-only rootfs of mount points and small files, and config.json."""
        spec = self.spec
        rootfs = bundle / "rootfs"
        for sub in (
            "usr",
            "proc",
            "dev",
            "sys",
            "etc",
            "home/silo",
            "tmp",
            "workspace",
            ".devsilo",
        ):
            (rootfs / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(bundle, 0o700)
        for name in _USR_ALIASES:
            host = f"/{name}"
            if os.path.islink(host):
                os.symlink(os.readlink(host), rootfs / name)
            elif os.path.isdir(host):
                (rootfs / name).mkdir(mode=0o755)
        for dest, content in _generated_etc().items():
            _write_file(rootfs / dest.lstrip("/"), content, 0o644)
        for path in _HOST_ETC:
            if os.path.isdir(path):
                (rootfs / path.lstrip("/")).mkdir(mode=0o755)
            elif os.path.exists(path):
                _write_file(rootfs / path.lstrip("/"), b"", 0o644)
        # The source too: tracebacks from inside quote it.
        _write_file(rootfs / HELPER_PATH.lstrip("/"), _helper_source(), 0o444)
        _write_file(rootfs / HELPER_PYC.lstrip("/"), helper_pyc, 0o444)
        if spec.relay_socket is not None:
            _write_file(rootfs / RELAY_SOCKET.lstrip("/"), b"", 0o444)
        assert self.scratch_dir is not None
        for source in sources[2:]:
            _make_mount_point(rootfs, self.scratch_dir, source, spec)
        config = self._config(stage, sources)
        _write_file(bundle / "config.json", json.dumps(config, indent=1).encode(), 0o600)

    def _config(self, stage: str, sources: list[_Pinned]) -> dict[str, Any]:
        """The OCI runtime config; host sources are their staged paths."""
        spec = self.spec
        ro, rw = ["rbind", "ro", "nosuid", "nodev"], ["rbind", "rw", "nosuid", "nodev"]

        def bind(dest: str, source: str, options: list[str]) -> dict[str, Any]:
            return {"destination": dest, "type": "bind", "source": source, "options": options}

        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            bind("/usr", "/usr", ["rbind", "ro"]),
        ]
        for name in _USR_ALIASES:
            host = f"/{name}"
            if not os.path.islink(host) and os.path.isdir(host):
                mounts.append(bind(host, host, ["rbind", "ro"]))
        for path in _HOST_ETC:
            if os.path.exists(path):
                mounts.append(bind(path, path, ro))
        mounts.append(bind(WORKSPACE, f"{stage}/1", rw))
        mounts.append(bind(HOME, f"{stage}/0/home", rw))
        mounts.append(bind(TMP, f"{stage}/0/tmp", rw))
        # After the scratch mounts: an allow-listed path below HOME or TMP is
        # mounted on top of them.
        for i, source in enumerate(sources[2:], start=2):
            mounts.append(bind(source.dest, f"{stage}/{i}", rw if source.writable else ro))

        ids = [{"containerID": 0, "hostID": 0, "size": 1}]
        uid_map = [*ids, {"containerID": INNER_UID, "hostID": spec.sandbox_uid, "size": 1}]
        gid_map = [*ids, {"containerID": INNER_GID, "hostID": spec.sandbox_gid, "size": 1}]
        limits = spec.limits
        memory: dict[str, int] = {"limit": limits.memory_bytes}
        if _swap_accounting():
            memory["swap"] = limits.memory_bytes  # memory + swap: no swap at all
        resources = {
            "memory": memory,
            "cpu": {
                "quota": max(1000, round(limits.cpus * _CPU_PERIOD_US)),
                "period": _CPU_PERIOD_US,
            },
            "pids": {"limit": limits.pids * _HOST_TASKS_PER_PROCESS + _HOST_TASKS_BASE},
        }
        no_caps: dict[str, list[str]] = {
            k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")
        }
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": INNER_UID, "gid": INNER_GID, "additionalGids": []},
                "args": [
                    self.python,
                    "-I",
                    "-S",
                    HELPER_PYC,
                    "--fd",
                    "0",
                    "--workspace",
                    WORKSPACE,
                ],
                "env": [f"{k}={v}" for k, v in sandbox_env(spec).items()],
                "cwd": WORKSPACE,
                "capabilities": no_caps,
                "rlimits": [{"type": "RLIMIT_NPROC", "hard": limits.pids, "soft": limits.pids}],
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "silo",
            "mounts": mounts,
            "linux": {
                "namespaces": [
                    {"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user")
                ],
                "uidMappings": uid_map,
                "gidMappings": gid_map,
                "cgroupsPath": f"/{self.cgroup_parent}/{self.container_id}",
                "resources": resources,
                "seccomp": _seccomp_profile(),
            },
        }

    def _runsc_flags(self) -> list[str]:
        flags = [
            self._runsc_path,
            f"--root={self.state_dir}",
            "--network=none",
            f"--platform={self.platform}",
            "--oci-seccomp",
            "--cpu-num-from-quota",
            # The default, pinned: bind mounts are revalidated against the host, which is
            # how the sandbox sees the session CA the executor renames into its trust directory.
            "--file-access-mounts=shared",
        ]
        if self.spec.relay_socket is not None:
            # Lets the sandbox connect to host unix sockets bound into it:
            # the relay socket, and whatever socket sits in the workspace or
            # allow-list, so it is off unless a relay needs it.
            flags.append("--host-uds=open")
        if self.debug_log:
            flags += ["--debug", f"--debug-log={self.debug_log}"]
        return flags

    def _argv(self, stage: str, sources: list[_Pinned]) -> list[str]:
        staged: list[str] = []
        for source in sources:
            staged += [source.path, source.identity, "d" if source.directory else "f"]
        runsc = [*self._runsc_flags(), "run", "--bundle", f"{stage}/0/bundle", self.container_id]
        # fmt: off
        return [
            _tool("unshare"), "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", _STAGE_SCRIPT, "devsilo-stage", stage, *staged, "--", *runsc,
        ]
        # fmt: on

    # -- stopping -----------------------------------------------------------

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """Wait for `runsc run` to end; otherwise TERM the container, then KILL everything."""
        steps: tuple[tuple[tuple[str, ...] | None, float], ...] = (
            (None, 1.0),
            (("kill", self.container_id, "TERM"), 2.0),
            (("kill", "--all", self.container_id, "KILL"), 3.0),
        )
        for command, wait in steps:
            if command is not None and proc.returncode is None:
                await self._runsc_quiet(*command)
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except TimeoutError:
                continue
        # runsc itself hangs: its sandbox and gofer die with it (parent-death
        # signal), and _reap_leftovers catches the rest.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)

    async def _runsc_quiet(self, *args: str) -> None:
        """Run a runsc subcommand on this sandbox, ignoring failure (it may be gone already)."""
        if not self._runsc_path:
            return
        try:
            proc = await asyncio.create_subprocess_exec(
                self._runsc_path,
                f"--root={self.state_dir}",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
            )
        except OSError:
            return
        try:
            await asyncio.wait_for(proc.wait(), _RUNSC_CMD_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _reap_leftovers(self) -> None:
        """SIGKILL any process still running for this sandbox; remove its cgroups."""
        marks = [self.container_id]
        if self.scratch_dir is not None:
            marks.append(str(self.scratch_dir) + "/")
        for _ in range(3):
            found = False
            for pid, pidfd in _processes_marked(marks):
                found = True
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
                self.warnings.append(f"killed leftover runsc process {pid}")
            if not found:
                break
            # Reaped by their parents (or init) shortly after the signal.
            _wait_gone(marks, 2.0)
        for directory in _cgroup_dirs(f"{self.cgroup_parent}/{self.container_id}"):
            with contextlib.suppress(OSError):
                directory.rmdir()

    # -- watching -----------------------------------------------------------

    def _describe_exit(self) -> str:
        return "; ".join(part for part in (self._exit_status(), self._output_tail()) if part)

    def _exit_status(self) -> str:
        if self._proc is not None and self._proc.returncode is not None:
            return f"runsc exited with status {self._proc.returncode}"
        return ""

    def _output_tail(self) -> str:
        tail = self._stderr.text()
        return "its output: " + tail[-1000:] if tail else ""

    async def _exit_detail(self, wait: float, known: str) -> str:
        """How runsc ended, for a start failure; leaves out what ``known`` already says."""
        if self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), wait)
        await self._stderr.settle(0.5)
        parts = (self._exit_status(), self._output_tail())
        return "; ".join(part for part in parts if part and part[-200:] not in known)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"<GvisorSandbox {self.container_id} {self.spec.workspace} {state}>"


_NEEDS_ROOT = (
    "the gvisor backend needs the executor to run as root (rootless runsc can only map "
    "the executor's own uid, and only to root inside the sandbox)"
)


def probe(*, runsc: str = "runsc", platform: str = "ptrace", **_config: Any) -> str | None:
    """None when runsc works here (a trivial sandbox runs), else why not, in one line.

    Runs ``runsc --network=none do true`` once per runsc binary and platform
    and caches the answer for the life of the process (~0.2 s).
    """
    if os.geteuid() != 0:
        return _NEEDS_ROOT
    path = shutil.which(runsc)
    if path is None:
        return "runsc not installed (apt-get install runsc)"
    return _probe_runsc(path, platform)


@functools.cache
def _probe_runsc(path: str, platform: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="devsilo-runsc-probe-") as root:
        try:
            result = subprocess.run(
                [path, f"--root={root}", "--network=none", f"--platform={platform}", "do", "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_PROBE_TIMEOUT_S,
                cwd="/",
                env={"PATH": _LAUNCH_PATH, "LC_ALL": "C"},
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"runsc failed: `runsc do true` did not finish in {_PROBE_TIMEOUT_S:.0f} s"
        except OSError as exc:
            return f"runsc failed: {exc}"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).decode("utf-8", errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return f"runsc failed: {last or f'exit status {result.returncode}'}"[:300]
    return None


def _generated_etc() -> dict[str, bytes]:
    """The /etc files written into the rootfs: the shared ones, and resolv.conf."""
    etc = _etc_files()
    # Names go to the helper's resolver on loopback (gVisor lets the sandbox
    # user bind port 53); there is no other server to reach.
    etc.setdefault("/etc/resolv.conf", b"nameserver 127.0.0.1\n")
    return etc


def _allow_dest(host: Path) -> str:
    """Where an allow-listed host path appears inside: the same path, if it is free."""
    if not host.is_absolute():
        raise SandboxError(f"read allow-list path {host} must be absolute")
    if not host.exists():
        raise SandboxError(f"read allow-list path {host} does not exist")
    dest = os.path.normpath(host)
    # The sandbox's own mount points must stay its own. Below the scratch
    # mounts is fine (mounted after them, on top), and below /usr (the path
    # is there already, read-only); below anything else of ours is not: it
    # would plant mount points in the user's files or cover the plumbing.
    for mine in (*_OWN_PATHS, *_generated_etc(), *_HOST_ETC):
        inside = dest.startswith(mine + "/") and mine not in (HOME, TMP, "/usr")
        if dest == "/" or dest == mine or mine.startswith(dest + "/") or inside:
            raise SandboxError(f"read allow-list path {host} would cover the sandbox's own {mine}")
    return dest


def _make_mount_point(rootfs: Path, scratch: Path, source: _Pinned, spec: SandboxSpec) -> None:
    """Create ``source.dest``'s mount point where the sandbox will look for it.

    Below HOME or TMP it goes into the scratch (owned by the sandbox uid);
    below a host bind (``/usr``, a merged-``/usr`` alias) it exists already,
    being the very host path; elsewhere it goes into the rootfs.
    """
    dest = source.dest
    if dest == RELAY_SOCKET:
        return  # made with the rest of /.devsilo
    for inner, host in ((HOME, scratch / "home"), (TMP, scratch / "tmp")):
        if dest.startswith(inner + "/"):
            _make_path(
                host,
                dest[len(inner) + 1 :],
                source.directory,
                owner=(spec.sandbox_uid, spec.sandbox_gid),
            )
            return
    top = dest.split("/")[1]
    if top == "usr" or top in _USR_ALIASES:
        return
    _make_path(rootfs, dest.lstrip("/"), source.directory, owner=None)


def _make_path(base: Path, rel: str, directory: bool, owner: tuple[int, int] | None) -> None:
    """mkdir -p below ``base`` without following any symlink; the leaf a dir or an empty file."""
    parts = [p for p in rel.split("/") if p]
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                if last and not directory:
                    leaf = os.open(
                        part,
                        os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o644,
                        dir_fd=fd,
                    )
                    if owner is not None:
                        os.fchown(leaf, *owner)
                    os.close(leaf)
                    return
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                raise SandboxError(
                    f"cannot make the mount point for /{rel}: {exc.strerror}"
                ) from None
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask filtered the creation mode
    finally:
        os.close(fd)


@functools.cache
def _swap_accounting() -> bool:
    """Whether a memory+swap limit can be set (cgroup v1 memsw, or v2)."""
    return (_CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists() or (
        _CGROUP_ROOT / "cgroup.controllers"
    ).exists()


def _cgroup_dirs(rel: str) -> Iterator[Path]:
    """The directories a cgroup path ``rel`` has under every mounted hierarchy."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split(" ", 1)[0] in ("cgroup", "cgroup2"):
            candidate = Path(fields[0].split()[4]) / rel
            if candidate.is_dir():
                yield candidate


def _processes_marked(marks: list[str]) -> Iterator[tuple[int, int]]:
    """(pid, pidfd) of every process whose argv names one of ``marks``.

    ``runsc boot`` and its ptrace stubs carry the container id as an
    argument, the gofer the bundle path (inside the scratch directory). The
    argv is read again after opening the pidfd, so a reused pid is never hit.
    """
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        if not _argv_marked(pid, marks):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        if _argv_marked(pid, marks):
            yield pid, pidfd
        else:
            os.close(pidfd)


def _argv_marked(pid: int, marks: list[str]) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", errors="replace").split("\0")
    except OSError:
        return False
    return any(
        arg == mark or (mark.endswith("/") and mark in arg) for arg in argv for mark in marks
    )


def _wait_gone(marks: list[str], timeout: float) -> None:
    """Wait until no process names one of ``marks`` any more (they were just killed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = False
        for _pid, pidfd in _processes_marked(marks):
            alive = True
            os.close(pidfd)
        if not alive:
            return
        time.sleep(0.02)
