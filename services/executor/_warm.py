"""A warm pool of started bwrap sandboxes: a lease attaches its workspace instead of starting one.

A bwrap sandbox binds its workspace and relay socket when it starts, and a
session names those only when it leases. So each warm sandbox starts on
placeholders of its own, in a slot directory under the spec's scratch root::

    <scratch_root>/warm-<token>/workspace   empty directory, at /workspace
    <scratch_root>/warm-<token>/relay.sock  a unix socket nobody listens on,
                                            at /.devsilo/egress.sock

and :meth:`WarmPool.take` puts the session's real workspace and relay socket
on top of them, inside the running sandbox's mount namespace, through the
executor's mounter (:mod:`devsilo.executor._mounter`: ``open_tree`` in the
host namespace, ``setns`` + ``move_mount`` in the sandbox's). The sandbox
user cannot take them off again: its seccomp filter refuses every mount
call (``umount2`` answers EPERM) and it has no capabilities. The placeholders
stay on the host while the sandbox runs (removing a directory detaches
whatever is mounted on it, in every namespace) and the pool removes them
when the sandbox's init exits. A leased sandbox is an ordinary
:class:`~devsilo.executor._sandbox.BwrapSandbox` that its caller closes.

What a warm sandbox cannot serve, because bwrap fixes it at launch: a
session whose spec differs from the pool's template in anything but
``session_id``, ``workspace`` and ``relay_socket``. In practice:

- a non-empty read allow-list (``allow_read``): those paths are bound at
  launch, at paths that differ per session;
- other cgroup limits than the template's (the warm sandbox already sits in
  a cgroup with the template's limits);
- another environment, CA certificate, sandbox uid/gid or scratch root.

Such sessions are cold-started (:meth:`WarmPool.take` does it for them;
:meth:`WarmPool.unfit` says why). A session without a relay socket keeps the
placeholder socket: connecting to it is refused (EACCES), where a cold
sandbox has no file there (ENOENT). The sandbox's cgroup keeps the name of
its warm slot, not of the session.

Root only: attaching mounts in another mount namespace needs CAP_SYS_ADMIN in
the initial user namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import select
import shutil
import socket
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from devsilo.protocol import SandboxError

from ._mounter import Attach, Mounter, MountError
from ._sandbox import BwrapSandbox, Sandbox
from ._spec import RELAY_SOCKET, WORKSPACE, SandboxSpec

__all__ = ["WarmPool", "WarmStats"]

_PER_SESSION = ("session_id", "workspace", "relay_socket")
"""The spec fields a lease supplies; every other field is fixed when a warm sandbox starts."""
_MAX_BACKOFF_S = 30.0


@dataclass
class WarmStats:
    """What the pool did, for the executor's metrics and status."""

    warm_leases: int = 0
    cold_leases: int = 0
    """Leases :meth:`WarmPool.take` cold-started (unfit spec, empty pool or failed attach)."""
    starts: int = 0
    start_failures: int = 0
    attach_failures: int = 0
    discarded: int = 0
    """Warm sandboxes closed unused: found dead or stale at lease time, or after a failed attach."""
    last_error: str | None = None


@dataclass
class _Slot:
    """One warm sandbox and the placeholders it was started on."""

    sandbox: BwrapSandbox
    template: SandboxSpec
    directory: Path
    workspace_id: tuple[int, int]
    relay_id: tuple[int, int]
    init_pidfd: int

    def alive(self) -> bool:
        """Whether the sandbox's init and its helper are still there."""
        return not self.sandbox.helper.closed and _running(self.init_pidfd)


def _running(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` still runs (a pidfd turns readable when it exits)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


class WarmPool:
    """Keeps ``size`` bwrap sandboxes started on placeholders, ready to lease.

    ``make_spec()`` gives the template of every warm sandbox; its
    ``session_id``, ``workspace`` and ``relay_socket`` are ignored (each slot
    uses its own), everything else is what the sandbox is started with and
    what a lease must match. ``sandbox_config`` goes to
    :class:`~devsilo.executor._sandbox.BwrapSandbox` (``bwrap``, ``python``,
    ``start_timeout``), for warm and cold starts alike. ``mounter`` may be
    shared between pools (the caller then starts and closes it); by default
    the pool runs one of its own.

    Use: ``await pool.start()`` (or ``async with``), then
    ``await pool.take(spec)`` per session, ``await pool.close()`` at the end.
    Sandboxes start one at a time in the background, so refilling never
    competes with running sessions for more than one core's worth of
    start-up.
    """

    backend = "bwrap"

    def __init__(
        self,
        make_spec: Callable[[], SandboxSpec],
        size: int,
        *,
        mounter: Mounter | None = None,
        retry_after: float = 1.0,
        **sandbox_config: Any,
    ) -> None:
        if size < 0:
            raise ValueError("a warm pool's size cannot be negative")
        self.make_spec = make_spec
        self.size = size
        self.retry_after = retry_after
        self.sandbox_config = sandbox_config
        self.stats = WarmStats()
        self._mounter = mounter if mounter is not None else Mounter()
        self._own_mounter = mounter is None
        self._ready: deque[_Slot] = deque()
        self._leased: dict[int, _Slot] = {}
        """Leased slots by their init's pidfd, until that sandbox ends (see :meth:`_watch`)."""
        self._wanted = asyncio.Event()
        self._changed = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the mounter and the background refill; SandboxError where a warm pool cannot work."""
        if self._refill_task is not None:
            return
        if os.geteuid() != 0:
            raise SandboxError(
                "a warm bwrap pool needs root: attaching a workspace inside a running "
                "sandbox takes CAP_SYS_ADMIN on the host"
            )
        if self._own_mounter:
            try:
                await self._mounter.start()
            except MountError as exc:
                raise SandboxError(f"the warm pool's mounter cannot run: {exc}") from None
        self._refill_task = asyncio.create_task(self._refill(), name="warm-pool-refill")

    async def close(self) -> None:
        """Close every warm sandbox not leased yet, remove their slots, stop the mounter.

        Leased sandboxes belong to their callers and are left alone; the
        placeholders of those still running are removed when they end
        (while this event loop runs). Idempotent.
        """
        self._closing = True
        self._wanted.set()
        task, self._refill_task = self._refill_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while self._ready:
            await self._discard(self._ready.popleft(), count=False)
        for slot in list(self._leased.values()):
            if not _running(slot.init_pidfd):
                self._release(slot)
        if self._own_mounter:
            await self._mounter.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- leasing --------------------------------------------------------------

    @property
    def ready(self) -> int:
        """How many warm sandboxes are waiting for a lease."""
        return len(self._ready)

    def unfit(self, spec: SandboxSpec) -> str | None:
        """None when a warm sandbox can serve ``spec``, else why it must be cold-started."""
        if spec.allow_read:
            return "read allow-list paths are bound when a sandbox starts"
        return _differs(spec, self.make_spec())

    async def wait_ready(self, count: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``count`` (default: all ``size``) warm sandboxes are ready; TimeoutError else."""
        wanted = self.size if count is None else count

        async def filled() -> None:
            while len(self._ready) < wanted:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(filled(), timeout)

    async def try_take(self, spec: SandboxSpec) -> BwrapSandbox | None:
        """A warm sandbox serving ``spec`` now, or None when it is unfit or none is ready.

        SandboxError when the session's workspace or relay socket cannot be
        opened (no warm sandbox is used up), or the attach fails (that warm
        sandbox is closed).
        """
        if self._closing or self.unfit(spec) is not None or not self._ready:
            return None
        sources = _SessionSources.open(spec)
        try:
            while self._ready:
                slot = self._ready.popleft()
                self._wanted.set()
                if not slot.alive() or _differs(spec, slot.template) is not None:
                    # Dead, or started from an older template than make_spec() gives now.
                    await self._discard(slot)
                    continue
                try:
                    await self._attach(slot, spec, sources)
                except BaseException:
                    # Part of it may be attached already: this sandbox is spoilt.
                    await self._discard(slot)
                    raise
                self.stats.warm_leases += 1
                return slot.sandbox
            return None
        finally:
            sources.close()

    async def take(self, spec: SandboxSpec) -> Sandbox:
        """A started sandbox for ``spec``: warm when it fits and one is ready, else cold-started.

        A failed attach falls back to a cold start too (see ``stats.last_error``).
        """
        try:
            sandbox = await self.try_take(spec)
        except SandboxError as exc:
            self.stats.last_error = str(exc)
            sandbox = None
        if sandbox is not None:
            return sandbox
        cold = BwrapSandbox(spec, **self.sandbox_config)
        await cold.start()
        self.stats.cold_leases += 1
        return cold

    # -- attaching ------------------------------------------------------------

    async def _attach(self, slot: _Slot, spec: SandboxSpec, sources: _SessionSources) -> None:
        """Put ``spec``'s workspace and relay socket over ``slot``'s placeholders."""
        mounts = [Attach(sources.workspace_fd, WORKSPACE, recursive=True, expect=slot.workspace_id)]
        if sources.relay_fd >= 0:
            mounts.append(
                Attach(sources.relay_fd, RELAY_SOCKET, readonly=True, expect=slot.relay_id)
            )
        try:
            await self._mounter.attach(slot.init_pidfd, mounts)
        except MountError as exc:
            self.stats.attach_failures += 1
            raise SandboxError(f"cannot attach {spec.workspace} to a warm sandbox: {exc}") from None
        sandbox = slot.sandbox
        sandbox.spec = spec  # it serves this session now: its workspace, its relay socket
        if sources.workspace_owner != spec.sandbox_uid:
            sandbox.warnings.append(
                f"sandbox uid {spec.sandbox_uid} does not own {spec.workspace}: commands "
                "cannot write it (see prepare_workspace_ownership)"
            )
        self._watch(slot)

    def _watch(self, slot: _Slot) -> None:
        """Remove a leased slot's placeholders once its sandbox's init is gone.

        Not before: the session's mounts sit on the placeholders, and removing
        a host directory or socket detaches, in every namespace, whatever is
        mounted on it; the sandbox would be left on the empty placeholder.
        """
        self._leased[slot.init_pidfd] = slot
        asyncio.get_running_loop().add_reader(slot.init_pidfd, self._release, slot)

    def _release(self, slot: _Slot) -> None:
        if slot.init_pidfd < 0:
            return
        asyncio.get_running_loop().remove_reader(slot.init_pidfd)
        del self._leased[slot.init_pidfd]
        os.close(slot.init_pidfd)
        slot.init_pidfd = -1
        _remove_slot_dir(slot.directory)

    # -- filling --------------------------------------------------------------

    async def _refill(self) -> None:
        delay = self.retry_after
        while not self._closing:
            if len(self._ready) >= self.size:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            try:
                slot = await self._start_slot()
            except Exception as exc:  # noqa: BLE001 - the refill must outlive any one failure
                self.stats.start_failures += 1
                self.stats.last_error = f"warm sandbox did not start: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            delay = self.retry_after
            self._ready.append(slot)
            self._changed.set()

    async def _start_slot(self) -> _Slot:
        template = self.make_spec()
        template.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        directory = template.scratch_root / f"warm-{token}"
        directory.mkdir(mode=0o700)
        sandbox: BwrapSandbox | None = None
        pidfd = -1
        try:
            placeholder = directory / "workspace"
            placeholder.mkdir(mode=0o700)
            # The sandbox uid owns it, as it would a real workspace; it stays empty.
            os.chown(placeholder, template.sandbox_uid, template.sandbox_gid)
            relay = directory / "relay.sock"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(str(relay))  # bound, never listening: connecting is refused
            spec = dataclasses.replace(
                template, session_id=f"warm-{token}", workspace=placeholder, relay_socket=relay
            )
            sandbox = BwrapSandbox(spec, **self.sandbox_config)
            await sandbox.start()
            self.stats.starts += 1
            pidfd = _init_pidfd(sandbox)
            return _Slot(
                sandbox=sandbox,
                template=spec,
                directory=directory,
                workspace_id=_identity(placeholder),
                relay_id=_identity(relay),
                init_pidfd=pidfd,
            )
        except BaseException:
            if pidfd >= 0:
                os.close(pidfd)
            if sandbox is not None:
                with contextlib.suppress(SandboxError):
                    await sandbox.close()
            _remove_slot_dir(directory)
            raise

    async def _discard(self, slot: _Slot, *, count: bool = True) -> None:
        """Close a slot's sandbox and remove its placeholders."""
        if count:
            self.stats.discarded += 1
        try:
            await slot.sandbox.close()
        except SandboxError as exc:
            self.stats.last_error = f"closing a warm sandbox: {exc}"
        if slot.init_pidfd >= 0:
            os.close(slot.init_pidfd)
            slot.init_pidfd = -1
        _remove_slot_dir(slot.directory)

    def __repr__(self) -> str:
        return f"<WarmPool bwrap size={self.size} ready={len(self._ready)}>"


def _differs(spec: SandboxSpec, template: SandboxSpec) -> str | None:
    """Which field fixed at a warm start ``spec`` does not share with ``template``, if any."""
    for f in dataclasses.fields(SandboxSpec):
        if f.name not in _PER_SESSION and getattr(spec, f.name) != getattr(template, f.name):
            return f"its {f.name} differs from the warm sandboxes' (fixed when they start)"
    return None


@dataclass
class _SessionSources:
    """The session's workspace and relay socket, opened O_PATH for the mounter to clone."""

    workspace_fd: int
    workspace_owner: int
    relay_fd: int = -1

    @classmethod
    def open(cls, spec: SandboxSpec) -> _SessionSources:
        workspace_fd = _open_source(spec.workspace, directory=True)
        sources = cls(workspace_fd, os.fstat(workspace_fd).st_uid)
        if spec.relay_socket is None:
            return sources
        try:
            sources.relay_fd = _open_source(spec.relay_socket, directory=False)
            if not stat.S_ISSOCK(os.fstat(sources.relay_fd).st_mode):
                raise SandboxError(f"relay socket {spec.relay_socket} is not a unix socket")
        except BaseException:
            sources.close()
            raise
        return sources

    def close(self) -> None:
        for fd in (self.workspace_fd, self.relay_fd):
            if fd >= 0:
                os.close(fd)
        self.workspace_fd = self.relay_fd = -1


def _open_source(path: Path, *, directory: bool) -> int:
    """``path`` opened O_PATH (its real path, the last component not followed)."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    try:
        return os.open(os.path.realpath(path), flags)
    except OSError as exc:
        raise SandboxError(f"cannot open {path} for the sandbox: {exc.strerror}") from None


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_dev, st.st_ino


def _init_pidfd(sandbox: BwrapSandbox) -> int:
    """A pidfd of the sandbox's init, checked to be that very process (not a reused pid)."""
    init_pid, bwrap_pid = sandbox.init_pid, sandbox.pid
    if init_pid is None or bwrap_pid is None:
        raise SandboxError("the warm sandbox reported no init pid")
    pidfd = os.pidfd_open(init_pid)
    try:
        # bwrap's outer process is our child and not reaped, so its pid is
        # still its own; a process whose parent it is, is the sandbox's init.
        with open(f"/proc/{init_pid}/stat", "rb") as f:
            parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = -1
    if parent != bwrap_pid:
        os.close(pidfd)
        raise SandboxError(f"pid {init_pid} is no longer the warm sandbox's init")
    return pidfd


def _remove_slot_dir(directory: Path) -> None:
    # Only empty placeholders live here; a sandbox's own scratch is elsewhere.
    shutil.rmtree(directory, ignore_errors=True)
