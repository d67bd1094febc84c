"""Warm pools: sandboxes started before their session, so that a lease takes milliseconds.

A sandbox binds its workspace and relay socket when it starts, and a session
names those only when it leases. A warm pool bridges that in one of two ways,
depending on what the backend lets the executor change in a running sandbox.

**Attaching** (``bwrap``; ``docker`` with runc): any workspace. Each warm
sandbox starts on placeholders of its own, in a slot directory under the
spec's scratch root::

    <scratch_root>/warm-<token>/workspace   empty directory, at /workspace
    <scratch_root>/warm-<token>/relay.sock  a unix socket nobody listens on,
                                            at /.devsilo/egress.sock

and :meth:`WarmPool.take` puts the session's real workspace and relay socket
on top of them, inside the running sandbox's mount namespace, through the
executor's mounter (:mod:`devsilo.executor._mounter`: ``open_tree`` in the
host namespace, ``setns`` + ``move_mount`` in the sandbox's). The namespace
is entered through a pidfd of the sandbox's init: bwrap's, or the
container's (Docker's ``State.Pid``; runc containers have no user namespace
of their own, so the mounter's root suffices). The sandbox user cannot take
the mounts off again: its seccomp filter refuses every mount call
(``umount2`` answers EPERM) and it has no capabilities. The placeholders
stay on the host while the sandbox runs (removing a directory detaches
whatever is mounted on it, in every namespace) and the pool removes them
when the sandbox's init exits. Root only: attaching mounts in another mount
namespace needs CAP_SYS_ADMIN in the initial user namespace.

**Keyed** (``gvisor``; ``docker`` with runsc): one workspace, known in
advance. gVisor's sentry sees host files only through its gofer, and no
attach reaches it here: the sandbox process's mount namespace (runsc's
``State.Pid``, what the mounter would enter) has no ``/workspace`` at all;
the gofer's own namespace is entered, but the gofer runs chrooted in it and
``move_mount`` onto its view of ``/workspace`` fails (ENOENT) from the
namespace's root; and the gofer serves binds that the launcher made in a
private mount namespace at start, which a mount on the host never reaches
(all tried with Debian's runsc 0.0~20221219). So these warm sandboxes start on
the real workspace; the executor keeps a pool per locked workspace (its path
in executor storage is fixed before any session names it) with
:class:`WarmPools`. The relay socket cannot be attached either, so the pool
binds one per warm sandbox itself (owned by the sandbox uid, mode 0600, not
listening: connecting is refused) and hands it to the session's relay at
lease (:meth:`~devsilo.executor._relay.SessionRelay.adopt`).

Every warm sandbox is an ordinary sandbox of its backend, started with the
same code as a cold one (so exactly as confined), used by one session and
closed by it: nothing carries over from one session to the next.

What a warm sandbox cannot serve, because the backend fixes it at launch: a
session whose spec differs from the pool's template in anything but
``session_id``, ``relay_socket`` and (attaching pools) ``workspace``. In
practice:

- a non-empty read allow-list (``allow_read``): those paths are bound at
  launch, at paths that differ per session;
- other cgroup limits than the template's (the warm sandbox already sits in
  a cgroup with the template's limits);
- another environment, CA certificate, sandbox uid/gid or scratch root;
- for keyed pools, any other workspace than the pool's.

Such sessions are cold-started (:meth:`WarmPool.take` does it for them;
:meth:`WarmPool.unfit` says why). A session without a relay keeps the warm
sandbox's own socket: connecting to it is refused (ECONNREFUSED or EACCES),
where a cold sandbox has no file there (ENOENT). A warm sandbox keeps the
name of its slot (``warm-<token>``) in its cgroup, container name and
labels, not the session's.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from devsilo.protocol import SandboxError

from ._backends import get_backend
from ._mounter import Attach, Mounter, MountError
from ._sandbox import BwrapSandbox, Sandbox
from ._spec import RELAY_SOCKET, WORKSPACE, SandboxSpec

if TYPE_CHECKING:
    from ._relay import SessionRelay

__all__ = ["DEFAULT_SIZES", "WARM_BACKENDS", "WarmPool", "WarmPools", "WarmStats", "attaches"]

WARM_BACKENDS = ("bwrap", "gvisor", "docker")
"""The backends a warm pool can serve."""
DEFAULT_SIZES: Mapping[str, int] = {"bwrap": 2, "gvisor": 1, "docker": 1}
"""Warm sandboxes per pool by default (per locked workspace for keyed pools)."""

_MAX_BACKOFF_S = 30.0


def attaches(backend: str, config: Mapping[str, Any]) -> bool:
    """Whether warm sandboxes of ``backend`` take any workspace at lease (else only their own).

    True for bwrap and for docker with runc; False for gvisor and for docker
    with runsc (see the module docstring).
    """
    if backend == "bwrap":
        return True
    if backend == "docker":
        return not str(config.get("runtime", "runc")).startswith("runsc")
    return False


@dataclass
class WarmStats:
    """What the pool did, for the executor's metrics and status."""

    warm_leases: int = 0
    cold_leases: int = 0
    """Leases :meth:`WarmPool.take` cold-started (unfit spec, empty pool or failed attach)."""
    starts: int = 0
    start_failures: int = 0
    attach_failures: int = 0
    """Leases whose hand-over failed: the mounter's attach, or the relay's adoption."""
    discarded: int = 0
    """Warm sandboxes closed unused: found dead or stale at lease time, or after a failed attach."""
    last_error: str | None = None


@dataclass
class _Slot:
    """One warm sandbox and what it was started on."""

    sandbox: Sandbox
    template: SandboxSpec
    directory: Path
    relay_id: tuple[int, int]
    pidfd: int
    """A pidfd of a host process that lives exactly as long as the sandbox (see _liveness_pidfd)."""
    workspace_id: tuple[int, int] | None = None
    """The placeholder workspace's identity (attaching pools)."""
    relay_listener: socket.socket | None = None
    """The bound, not yet listening relay socket, until a session's relay adopts it (keyed pools)."""

    def alive(self) -> bool:
        """Whether the sandbox and its helper are still there."""
        try:
            helper_closed = self.sandbox.helper.closed
        except SandboxError:
            return False
        return not helper_closed and self.pidfd >= 0 and _running(self.pidfd)


def _running(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` still runs (a pidfd turns readable when it exits)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


class WarmPool:
    """Keeps ``size`` sandboxes of one backend started, ready to lease.

    ``make_spec()`` gives the template of every warm sandbox; its
    ``session_id`` and ``relay_socket`` are ignored (each slot uses its own),
    and so is ``workspace`` in an attaching pool; everything else is what the
    sandbox is started with and what a lease must match. ``backend`` names
    the backend (``bwrap``, ``gvisor``, ``docker``); ``sandbox_config`` goes
    to its sandbox class (e.g. ``runtime`` and ``docker_url`` for docker),
    for warm and cold starts alike. ``mounter`` (attaching pools only) may
    be shared between pools (the caller then starts and closes it); by
    default an attaching pool runs one of its own.

    Use: ``await pool.start()`` (or ``async with``), then
    ``await pool.take(spec, relay)`` per session, ``await pool.close()`` at
    the end. Sandboxes start one at a time in the background, so refilling
    never competes with running sessions for more than one core's worth of
    start-up.
    """

    def __init__(
        self,
        make_spec: Callable[[], SandboxSpec],
        size: int,
        *,
        backend: str = "bwrap",
        mounter: Mounter | None = None,
        retry_after: float = 1.0,
        **sandbox_config: Any,
    ) -> None:
        if size < 0:
            raise ValueError("a warm pool's size cannot be negative")
        if backend not in WARM_BACKENDS:
            raise ValueError(
                f"no warm pool for backend {backend!r} (only {', '.join(WARM_BACKENDS)})"
            )
        self.make_spec = make_spec
        self.size = size
        self.backend = backend
        self.retry_after = retry_after
        self.sandbox_config = sandbox_config
        self.attaches = attaches(backend, sandbox_config)
        """True: any workspace is attached at lease; False: only the template's workspace fits."""
        self.stats = WarmStats()
        self._per_session = ("session_id", "relay_socket") + (
            ("workspace",) if self.attaches else ()
        )
        self._mounter = mounter if mounter is not None or not self.attaches else Mounter()
        self._own_mounter = mounter is None and self.attaches
        self._ready: deque[_Slot] = deque()
        self._leased: dict[int, _Slot] = {}
        """Leased slots by their pidfd, until that sandbox ends (see :meth:`_watch`)."""
        self._wanted = asyncio.Event()
        self._changed = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life -----------------------------------------------------------------

    async def start(self) -> None:
        """Start the mounter (attaching pools) and the background refill; SandboxError where a
        warm pool cannot work."""
        if self._refill_task is not None:
            return
        if self.attaches and os.geteuid() != 0:
            raise SandboxError(
                f"a warm {self.backend} pool needs root: attaching a workspace inside a running "
                "sandbox takes CAP_SYS_ADMIN on the host"
            )
        if self._own_mounter and self._mounter is not None:
            try:
                await self._mounter.start()
            except MountError as exc:
                raise SandboxError(f"the warm pool's mounter cannot run: {exc}") from None
        self._refill_task = asyncio.create_task(self._refill(), name=f"warm-pool-{self.backend}")

    async def close(self) -> None:
        """Close every warm sandbox not leased yet, remove their slots, stop the mounter.

        Leased sandboxes belong to their callers and are left alone; the
        slots of those still running are removed when they end (while this
        event loop runs). Idempotent.
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
            if not _running(slot.pidfd):
                self._release(slot)
        if self._own_mounter and self._mounter is not None:
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
        template = self.make_spec()
        if not self.attaches and not _same_path(spec.workspace, template.workspace):
            return (
                f"warm {self.backend} sandboxes start on their workspace: these are for "
                f"{template.workspace} only"
            )
        return _differs(spec, template, self._per_session)

    async def wait_ready(self, count: int | None = None, timeout: float = 30.0) -> None:
        """Wait until ``count`` (default: all ``size``) warm sandboxes are ready; TimeoutError else."""
        wanted = self.size if count is None else count

        async def filled() -> None:
            while len(self._ready) < wanted:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(filled(), timeout)

    async def try_take(
        self, spec: SandboxSpec, relay: SessionRelay | None = None
    ) -> Sandbox | None:
        """A warm sandbox serving ``spec`` now, or None when it is unfit or none is ready.

        ``relay`` is the session's running relay: a keyed pool hands it the
        warm sandbox's relay socket (an attaching pool mounts
        ``spec.relay_socket`` instead). SandboxError when the session's
        workspace or relay socket cannot be opened (no warm sandbox is used
        up), or the hand-over fails (that warm sandbox is closed).
        """
        if self._closing or self.unfit(spec) is not None or not self._ready:
            return None
        sources = _SessionSources.open(spec) if self.attaches else None
        try:
            while self._ready:
                slot = self._ready.popleft()
                self._wanted.set()
                if not slot.alive() or _differs(spec, slot.template, self._per_session):
                    # Dead, or started from an older template than make_spec() gives now.
                    await self._discard(slot)
                    continue
                try:
                    if sources is not None:
                        await self._attach(slot, spec, sources)
                    else:
                        await self._hand_over(slot, spec, relay)
                except BaseException:
                    # Part of it may be handed over already: this sandbox is spoilt.
                    await self._discard(slot)
                    raise
                self._watch(slot)
                self.stats.warm_leases += 1
                return slot.sandbox
            return None
        finally:
            if sources is not None:
                sources.close()

    async def take(self, spec: SandboxSpec, relay: SessionRelay | None = None) -> Sandbox:
        """A started sandbox for ``spec``: warm when it fits and one is ready, else cold-started.

        A failed hand-over falls back to a cold start too (see ``stats.last_error``).
        """
        try:
            sandbox = await self.try_take(spec, relay)
        except SandboxError as exc:
            self.stats.last_error = str(exc)
            sandbox = None
        if sandbox is not None:
            return sandbox
        cold = get_backend(self.backend).create(spec, **self.sandbox_config)
        await cold.start()
        self.stats.cold_leases += 1
        return cold

    # -- handing a warm sandbox to its session ----------------------------------

    async def _attach(self, slot: _Slot, spec: SandboxSpec, sources: _SessionSources) -> None:
        """Put ``spec``'s workspace and relay socket over ``slot``'s placeholders."""
        assert self._mounter is not None
        mounts = [Attach(sources.workspace_fd, WORKSPACE, recursive=True, expect=slot.workspace_id)]
        if sources.relay_fd >= 0:
            mounts.append(
                Attach(sources.relay_fd, RELAY_SOCKET, readonly=True, expect=slot.relay_id)
            )
        try:
            await self._mounter.attach(slot.pidfd, mounts)
        except MountError as exc:
            self.stats.attach_failures += 1
            raise SandboxError(f"cannot attach {spec.workspace} to a warm sandbox: {exc}") from None
        sandbox: Any = slot.sandbox
        sandbox.spec = spec  # it serves this session now: its workspace, its relay socket
        if sources.workspace_owner != spec.sandbox_uid:
            sandbox.warnings.append(_not_owned(spec))

    async def _hand_over(self, slot: _Slot, spec: SandboxSpec, relay: SessionRelay | None) -> None:
        """Give a keyed slot's relay socket to the session's relay; the sandbox is the session's."""
        try:
            owner = os.stat(spec.workspace).st_uid
        except OSError as exc:
            raise SandboxError(
                f"cannot look at workspace {spec.workspace}: {exc.strerror}"
            ) from None
        listener, slot.relay_listener = slot.relay_listener, None
        if listener is not None:
            if relay is None:
                listener.close()  # bound, never listening: connecting stays refused
            else:
                try:
                    await relay.adopt(listener)
                except (OSError, SandboxError) as exc:
                    self.stats.attach_failures += 1
                    raise SandboxError(
                        f"cannot hand a warm sandbox's relay socket to session {spec.session_id}: "
                        f"{exc}"
                    ) from None
        sandbox: Any = slot.sandbox
        sandbox.spec = dataclasses.replace(spec, relay_socket=slot.template.relay_socket)
        # Ownership may have changed since the sandbox started (the executor
        # hands the workspace to the sandbox uid at each lease): say it as it is now.
        stale = _not_owned(slot.template)
        sandbox.warnings[:] = [w for w in sandbox.warnings if w != stale]
        if owner != spec.sandbox_uid:
            sandbox.warnings.append(_not_owned(spec))

    def _watch(self, slot: _Slot) -> None:
        """Remove a leased slot's directory once its sandbox is gone.

        Not before: the session's mounts sit on the placeholders (removing a
        host directory or socket detaches, in every namespace, whatever is
        mounted on it), and a keyed sandbox reaches its relay socket there.
        """
        self._leased[slot.pidfd] = slot
        asyncio.get_running_loop().add_reader(slot.pidfd, self._release, slot)

    def _release(self, slot: _Slot) -> None:
        if slot.pidfd < 0:
            return
        asyncio.get_running_loop().remove_reader(slot.pidfd)
        del self._leased[slot.pidfd]
        os.close(slot.pidfd)
        slot.pidfd = -1
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
        sandbox: Sandbox | None = None
        listener: socket.socket | None = None
        pidfd = -1
        try:
            relay = directory / "relay.sock"
            listener = _bound_socket(relay, template.sandbox_uid)
            workspace = template.workspace
            if self.attaches:
                listener.close()  # a placeholder: bound, never listening
                listener = None
                workspace = directory / "workspace"
                workspace.mkdir(mode=0o700)
                # The sandbox uid owns it, as it would a real workspace; it stays empty.
                os.chown(workspace, template.sandbox_uid, template.sandbox_gid)
            spec = dataclasses.replace(
                template, session_id=f"warm-{token}", workspace=workspace, relay_socket=relay
            )
            sandbox = get_backend(self.backend).create(spec, **self.sandbox_config)
            await sandbox.start()
            self.stats.starts += 1
            pidfd = await _liveness_pidfd(sandbox)
            return _Slot(
                sandbox=sandbox,
                template=spec,
                directory=directory,
                relay_id=_identity(relay),
                pidfd=pidfd,
                workspace_id=_identity(workspace) if self.attaches else None,
                relay_listener=listener,
            )
        except BaseException:
            if pidfd >= 0:
                os.close(pidfd)
            if listener is not None:
                listener.close()
            if sandbox is not None:
                with contextlib.suppress(SandboxError):
                    await sandbox.close()
            _remove_slot_dir(directory)
            raise

    async def _discard(self, slot: _Slot, *, count: bool = True) -> None:
        """Close a slot's sandbox and remove its directory."""
        if count:
            self.stats.discarded += 1
        try:
            await slot.sandbox.close()
        except SandboxError as exc:
            self.stats.last_error = f"closing a warm sandbox: {exc}"
        if slot.relay_listener is not None:
            slot.relay_listener.close()
            slot.relay_listener = None
        if slot.pidfd >= 0:
            os.close(slot.pidfd)
            slot.pidfd = -1
        _remove_slot_dir(slot.directory)

    def __repr__(self) -> str:
        kind = "attaching" if self.attaches else "keyed"
        return f"<WarmPool {self.backend} {kind} size={self.size} ready={len(self._ready)}>"


class WarmPools:
    """An executor's warm pools: one per attaching backend, one per locked workspace for the rest.

    ``make_spec(workspace)`` gives the template of a warm sandbox: for an
    attaching pool with ``workspace`` None, for a keyed pool with the locked
    workspace's path in executor storage. ``sizes`` gives the warm sandboxes
    wanted per pool, by backend name (0 turns a backend's off);
    ``backend_config`` each backend's settings, as for cold starts;
    ``backends`` the backends this executor offers. Attaching pools share
    one mounter.

    :meth:`start` starts the attaching pools; :meth:`track` a workspace's
    keyed pools when it is locked, :meth:`forget` closes them before it is
    unlocked. Backends whose pool could not start are in :attr:`problems`.
    """

    def __init__(
        self,
        make_spec: Callable[[Path | None], SandboxSpec],
        sizes: Mapping[str, int],
        backend_config: Mapping[str, Mapping[str, Any]],
        backends: Sequence[str],
    ) -> None:
        self.make_spec = make_spec
        self.sizes = {b: max(0, int(sizes.get(b, 0))) for b in WARM_BACKENDS}
        self.backend_config = {b: dict(backend_config.get(b, {})) for b in WARM_BACKENDS}
        self.backends = [b for b in backends if b in WARM_BACKENDS and self.sizes[b] > 0]
        self.problems: dict[str, str] = {}
        """Backend -> why it has no warm pool here."""
        self._pools: dict[tuple[str, str], WarmPool] = {}
        self._mounter = Mounter()
        self._mounter_started = False

    def _attaching(self, backend: str) -> bool:
        return attaches(backend, self.backend_config[backend])

    async def start(self) -> None:
        """Start a pool for every attaching backend (a failure is noted in :attr:`problems`)."""
        for backend in self.backends:
            if not self._attaching(backend):
                continue
            if os.geteuid() != 0:
                self.problems[backend] = (
                    "needs root: attaching a workspace inside a running sandbox takes "
                    "CAP_SYS_ADMIN on the host"
                )
                continue
            if not self._mounter_started:
                try:
                    await self._mounter.start()
                except MountError as exc:
                    self.problems[backend] = f"the mounter cannot run: {exc}"
                    continue
                self._mounter_started = True
            await self._add((backend, ""), lambda: self.make_spec(None), backend)

    async def track(self, workspace: Path, *, exclude: tuple[str, ...] = ()) -> None:
        """Keep warm sandboxes of every keyed backend (but ``exclude``) on ``workspace`` (locked here)."""
        key = os.path.realpath(workspace)
        for backend in self.backends:
            if backend in exclude:
                continue
            if not self._attaching(backend) and (backend, key) not in self._pools:
                await self._add((backend, key), lambda: self.make_spec(Path(key)), backend)

    async def forget(self, workspace: Path) -> None:
        """Close ``workspace``'s keyed pools (before it is unlocked); leased sandboxes stay."""
        key = os.path.realpath(workspace)
        pools = [self._pools.pop(k) for k in list(self._pools) if k[1] == key]
        await asyncio.gather(*(pool.close() for pool in pools))

    def pool_for(self, backend: str, spec: SandboxSpec) -> WarmPool | None:
        """The pool that could serve ``spec`` on ``backend``, if there is one."""
        pool = self._pools.get((backend, ""))
        if pool is None:
            pool = self._pools.get((backend, os.path.realpath(spec.workspace)))
        return pool

    async def try_take(
        self, backend: str, spec: SandboxSpec, relay: SessionRelay | None = None
    ) -> Sandbox | None:
        """A warm sandbox of ``backend`` for ``spec`` (see :meth:`WarmPool.try_take`), or None."""
        pool = self.pool_for(backend, spec)
        return await pool.try_take(spec, relay) if pool is not None else None

    def ready(self) -> dict[str, int]:
        """Warm sandboxes waiting for a lease, by backend (keyed pools summed)."""
        counts = {b: 0 for b in self.backends if b not in self.problems}
        for (backend, _), pool in self._pools.items():
            counts[backend] = counts.get(backend, 0) + pool.ready
        return counts

    def pools(self) -> list[WarmPool]:
        """Every pool running now."""
        return list(self._pools.values())

    async def close(self) -> None:
        """Close every pool and the mounter. Idempotent."""
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(pool.close() for pool in pools))
        await self._mounter.close()

    async def _add(
        self, key: tuple[str, str], make_spec: Callable[[], SandboxSpec], backend: str
    ) -> None:
        pool = WarmPool(
            make_spec,
            self.sizes[backend],
            backend=backend,
            mounter=self._mounter if self._attaching(backend) else None,
            **self.backend_config[backend],
        )
        try:
            await pool.start()
        except SandboxError as exc:
            self.problems[backend] = str(exc)
            return
        self._pools[key] = pool


def warm_sizes(option: object) -> dict[str, int]:
    """The executor's ``warm`` option as sizes per backend.

    None: :data:`DEFAULT_SIZES`; a number: that many for every backend; a
    mapping: per backend, the others at their default. TypeError or
    ValueError otherwise.
    """
    sizes = dict(DEFAULT_SIZES)
    if option is None:
        return sizes
    if isinstance(option, int | str) and not isinstance(option, bool):
        return {b: int(option) for b in WARM_BACKENDS}
    if isinstance(option, Mapping):
        unknown = set(option) - set(WARM_BACKENDS)
        if unknown:
            raise ValueError(
                f"warm: no warm pool for {', '.join(sorted(map(str, unknown)))} "
                f"(only {', '.join(WARM_BACKENDS)})"
            )
        sizes.update({str(b): int(n) for b, n in option.items()})
        return sizes
    raise TypeError("warm must be a number or a mapping of backend to number")


def _differs(spec: SandboxSpec, template: SandboxSpec, per_session: Sequence[str]) -> str | None:
    """Which field fixed at a warm start ``spec`` does not share with ``template``, if any."""
    for f in dataclasses.fields(SandboxSpec):
        if f.name in per_session:
            continue
        if f.name == "workspace":
            if not _same_path(spec.workspace, template.workspace):
                return f"its workspace is not {template.workspace}, the warm sandboxes'"
        elif getattr(spec, f.name) != getattr(template, f.name):
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


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _not_owned(spec: SandboxSpec) -> str:
    """The warning every backend gives when the sandbox uid does not own the workspace."""
    return (
        f"sandbox uid {spec.sandbox_uid} does not own {spec.workspace}: commands "
        "cannot write it (see prepare_workspace_ownership)"
    )


def _bound_socket(path: Path, uid: int) -> socket.socket:
    """A unix socket bound at ``path``, owned by ``uid``, mode 0600, not listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            os.chown(path, uid, -1)
    except OSError as exc:
        sock.close()
        raise SandboxError(f"cannot bind a warm sandbox's relay socket {path}: {exc}") from None
    return sock


async def _liveness_pidfd(sandbox: Sandbox) -> int:
    """A pidfd of the host process that lives exactly as long as ``sandbox``.

    bwrap: the sandbox's init. docker: the container's init (``State.Pid``),
    checked again after opening so that a pid reused in between is never
    taken. gvisor: ``runsc run``, the executor's own child.
    """
    if isinstance(sandbox, BwrapSandbox):
        return _init_pidfd(sandbox)
    host_pid = getattr(sandbox, "host_pid", None)
    if host_pid is None:
        raise SandboxError(f"no warm pool for {sandbox.backend} sandboxes")
    pid = await host_pid()
    pidfd = os.pidfd_open(pid)
    try:
        if await host_pid() != pid:
            raise SandboxError(f"pid {pid} is no longer the warm {sandbox.backend} sandbox's")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


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
