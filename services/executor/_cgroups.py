"""Per-sandbox cgroups: memory, CPU and pids limits, on cgroup v1 or v2.

Each sandbox gets its own cgroup ``devsilo/<name>``. As root, ``devsilo/``
sits at the hierarchy's root, as Docker's cgroupfs driver puts ``docker/``
(and the gVisor backend ``devsilo/gvisor/``). Otherwise it goes below the
executor's own cgroup, which must then be delegated to the executor's user
(systemd ``Delegate=yes``), and is removed again when its last sandbox
closes, so that it never keeps the delegated cgroup from being removed.
Where the three controllers live decides the version:

- **v2** when the unified hierarchy offers ``memory``, ``cpu`` and ``pids``.
  The parent's ``cgroup.subtree_control`` must hand them down, which v2
  refuses below a cgroup that holds processes: an unprivileged executor
  needs its delegated cgroup to hold none but its own subtree.
- **v1** otherwise, one directory per controller hierarchy (``cpu`` may share
  one with ``cpuacct``). Hybrid hosts (v1 controllers with an empty v2 mount
  beside them) land here.

:meth:`SandboxCgroup.create` raises :class:`CgroupUnavailable` with the
reason when no cgroup can be made (no controllers, or not root and nothing
delegated); the backend then runs without limits and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from devsilo.protocol import SandboxError

from ._spec import SandboxLimits

__all__ = ["CONTROLLERS", "CgroupUnavailable", "SandboxCgroup"]

CONTROLLERS = ("memory", "cpu", "pids")
"""The controllers every sandbox cgroup gets."""

_TOP = "devsilo"
_CPU_PERIOD_US = 100_000
# A sandbox cgroup left empty this long was orphaned by an executor that
# died before it could remove it (a new one is filled within milliseconds).
_STALE_AFTER_S = 300.0
_OURS = re.compile(r".+-[0-9a-f]{8}\Z")
_KILL_ROUNDS = 200
_KILL_PAUSE_S = 0.01
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CgroupUnavailable(SandboxError):
    """No cgroup can be made for the sandbox here; the message says why."""


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path that is the mount's root (not "/" under a cgroup namespace)
    point: Path
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] in ("cgroup", "cgroup2"):
            mounts.append(
                _Mount(
                    root=_unescape(fields[3]),
                    point=Path(_unescape(fields[4])),
                    fstype=tail[0],
                    options=frozenset(tail[2].split(",")),
                )
            )
    return mounts


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    own = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            own[controller] = parts[2]
    return own


def _below(mount: _Mount, path: str) -> Path:
    """Where cgroup ``path`` is in the file system, given the mount that holds it."""
    root = mount.root.rstrip("/")
    if path != mount.root and not path.startswith(root + "/"):
        # Our cgroup is outside what this mount shows: use the mount's root.
        return mount.point
    return mount.point / path[len(root) :].lstrip("/")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _key_values(path: Path) -> dict[str, int]:
    values = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    return values


class SandboxCgroup:
    """One sandbox's cgroup: processes added with :meth:`add`, all killed by :meth:`kill`.

    ``dirs`` maps each controller to its directory (all the same one on v2).
    """

    def __init__(self, version: int, dirs: dict[str, Path], tops: Iterable[Path]) -> None:
        self.version = version
        self.dirs = dirs
        self._tops = sorted(set(tops))
        self._removed = False

    # -- making one ---------------------------------------------------------

    @classmethod
    def create(cls, session_id: str, limits: SandboxLimits) -> SandboxCgroup:
        """Make ``devsilo/<session_id>-<random>`` with ``limits``; CgroupUnavailable if impossible."""
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
            own = _own_paths(Path("/proc/self/cgroup").read_text())
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from None
        mounts = _mounts(mountinfo)
        as_root = os.geteuid() == 0
        name = f"{_NAME_UNSAFE.sub('_', session_id)[:64] or 'sandbox'}-{secrets.token_hex(4)}"
        unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if unified is not None and set(CONTROLLERS) <= _v2_controllers(unified.point):
            parent = unified.point if as_root else _below(unified, own.get("", "/"))
            return cls._create_v2(parent, name, limits, remove_top=not as_root)
        v1 = {}
        for controller in CONTROLLERS:
            mount = next(
                (m for m in mounts if m.fstype == "cgroup" and controller in m.options), None
            )
            if mount is not None:
                v1[controller] = mount.point if as_root else _below(mount, own.get(controller, "/"))
        missing = [c for c in CONTROLLERS if c not in v1]
        if missing:
            raise CgroupUnavailable(
                f"the {', '.join(missing)} cgroup controller(s) are not mounted (neither "
                "cgroup v1 nor v2)"
            )
        return cls._create_v1(v1, name, limits, remove_top=not as_root)

    @classmethod
    def _create_v1(
        cls, parents: dict[str, Path], name: str, limits: SandboxLimits, *, remove_top: bool
    ) -> SandboxCgroup:
        dirs: dict[str, Path] = {}
        made: list[Path] = []
        tops = [p / _TOP for p in parents.values()] if remove_top else []
        try:
            for controller, parent in parents.items():
                path = parent / _TOP / name
                if path not in made:
                    _make(parent / _TOP, name)
                    made.append(path)
                dirs[controller] = path
            group = cls(1, dirs, tops)
            group._limit_v1(limits)
        except (OSError, CgroupUnavailable) as exc:
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()
            for top in tops:
                with contextlib.suppress(OSError):
                    top.rmdir()
            if isinstance(exc, CgroupUnavailable):
                raise
            raise _unavailable(exc) from None
        return group

    @classmethod
    def _create_v2(
        cls, parent: Path, name: str, limits: SandboxLimits, *, remove_top: bool
    ) -> SandboxCgroup:
        wanted = " ".join(f"+{c}" for c in CONTROLLERS)
        try:
            _write(parent / "cgroup.subtree_control", wanted)
        except OSError as exc:
            # EBUSY: the parent holds processes (v2's no-internal-process rule).
            raise CgroupUnavailable(
                f"cannot hand the {', '.join(CONTROLLERS)} controllers down from {parent} "
                f"({exc.strerror}): run the executor as root, or in a delegated cgroup "
                "(systemd Delegate=yes) that holds no process itself"
            ) from None
        top = parent / _TOP
        path = top / name
        try:
            with contextlib.suppress(FileExistsError):
                top.mkdir()
            _write(top / "cgroup.subtree_control", wanted)
            _make(top, name)
        except OSError as exc:
            raise _unavailable(exc) from None
        group = cls(2, {c: path for c in CONTROLLERS}, [top] if remove_top else [])
        try:
            group._limit_v2(limits)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise _unavailable(exc) from None
        return group

    def _limit_v1(self, limits: SandboxLimits) -> None:
        memory = self.dirs["memory"]
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        # Memory plus swap no more than memory: the limit cannot be dodged
        # by swapping out (absent when the kernel does not account swap).
        if (memory / "memory.memsw.limit_in_bytes").exists():
            _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        cpu = self.dirs["cpu"]
        _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(_cpu_quota(limits.cpus)))
        _write(self.dirs["pids"] / "pids.max", str(limits.pids))

    def _limit_v2(self, limits: SandboxLimits) -> None:
        path = self.dirs["memory"]
        _write(path / "memory.max", str(limits.memory_bytes))
        if (path / "memory.swap.max").exists():
            _write(path / "memory.swap.max", "0")
        _write(path / "cpu.max", f"{_cpu_quota(limits.cpus)} {_CPU_PERIOD_US}")
        _write(path / "pids.max", str(limits.pids))

    # -- using one ----------------------------------------------------------

    @property
    def name(self) -> str:
        """The cgroup's own name (the last path component)."""
        return next(iter(self.dirs.values())).name

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and so everything it starts later) into the cgroup."""
        for path in sorted(set(self.dirs.values())):
            try:
                _write(path / "cgroup.procs", str(pid))
            except OSError as exc:
                raise SandboxError(f"cannot move pid {pid} into cgroup {path}: {exc}") from None

    def pids(self) -> set[int]:
        """The processes in the cgroup now (any controller's view; each holds them all)."""
        found: set[int] = set()
        for path in set(self.dirs.values()):
            found.update(_read_ints(path / "cgroup.procs"))
        return found

    def events(self) -> dict[str, int]:
        """Limit hits so far: ``oom_kill`` (processes the memory limit killed), ``pids_max``
        (forks the pids limit refused)."""
        memory = self.dirs["memory"]
        source = memory / ("memory.events" if self.version == 2 else "memory.oom_control")
        return {
            "oom_kill": _key_values(source).get("oom_kill", 0),
            "pids_max": _key_values(self.dirs["pids"] / "pids.events").get("max", 0),
        }

    async def kill(self) -> None:
        """SIGKILL every process in the cgroup, including ones that left their session."""
        if self._removed:
            return
        kill_file = self.dirs["pids"] / "cgroup.kill"
        if self.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
        for _ in range(_KILL_ROUNDS):
            listed = self.pids()
            if not listed:
                return
            self._kill_listed(listed)
            await asyncio.sleep(_KILL_PAUSE_S)
        raise SandboxError(f"processes {sorted(self.pids())[:20]} survived SIGKILL in {self.name}")

    def _kill_listed(self, listed: set[int]) -> None:
        # A listed pid may exit and be reused by a host process before the
        # signal: pin each by a pidfd, then signal only those still listed.
        pinned = {}
        for pid in listed:
            with contextlib.suppress(OSError):
                pinned[pid] = os.pidfd_open(pid)
        try:
            still = self.pids()
            for pid, fd in pinned.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            for fd in pinned.values():
                os.close(fd)

    async def remove(self) -> None:
        """Kill what is left and remove the cgroup (and ``devsilo/`` when it is empty)."""
        if self._removed:
            return
        await self.kill()
        self._removed = True
        for path in sorted(set(self.dirs.values())):
            for _ in range(_KILL_ROUNDS):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the killed processes finish exiting.
                    if exc.errno != errno.EBUSY:
                        raise SandboxError(f"cannot remove cgroup {path}: {exc}") from None
                    await asyncio.sleep(_KILL_PAUSE_S)
            else:
                raise SandboxError(f"cgroup {path} stayed busy after its processes were killed")
        for top in self._tops:
            # Another sandbox's cgroup may still be there: then it stays.
            # (Root's top-level devsilo/ always stays, like Docker's docker/.)
            with contextlib.suppress(OSError):
                top.rmdir()

    def __repr__(self) -> str:
        return f"<SandboxCgroup v{self.version} {self.name}>"


def _v2_controllers(point: Path) -> set[str]:
    try:
        return set((point / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _make(top: Path, name: str) -> None:
    """mkdir ``top/name``, making ``top`` too; retried if another sandbox's close removes ``top``."""
    for _ in range(5):
        with contextlib.suppress(FileExistsError):
            top.mkdir()
        _sweep(top)
        try:
            (top / name).mkdir()
            return
        except FileNotFoundError:
            continue
    raise CgroupUnavailable(f"cannot create cgroup {top / name}: its parent keeps disappearing")


def _sweep(top: Path) -> None:
    """Remove sandbox cgroups that executors died without removing: empty and old."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            if not entry.is_dir(follow_symlinks=False) or not _OURS.match(entry.name):
                continue
            with contextlib.suppress(OSError):
                path = Path(entry.path)
                if now - entry.stat().st_mtime > _STALE_AFTER_S and not _read_ints(
                    path / "cgroup.procs"
                ):
                    # rmdir refuses a cgroup that holds a process or a child.
                    path.rmdir()


def _cpu_quota(cpus: float) -> int:
    if cpus <= 0:
        raise SandboxError(f"the sandbox CPU limit must be positive, not {cpus}")
    # The kernel's minimum quota is 1 ms.
    return max(1000, round(cpus * _CPU_PERIOD_US))


def _unavailable(exc: OSError) -> CgroupUnavailable:
    where = f" at {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CgroupUnavailable(
            f"no permission to make a cgroup{where} ({exc.strerror}): run the executor as root "
            "or in a delegated cgroup"
        )
    return CgroupUnavailable(f"cannot make the sandbox's cgroup{where}: {exc.strerror}")
