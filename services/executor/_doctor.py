"""`silo doctor`: what works on this host, and for what does not, the one-line reason."""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._backends import BACKENDS, STRENGTH_ORDER


@dataclass(frozen=True)
class Check:
    """One preflight check: what, whether it passed, and what we found."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def user_namespaces() -> Check:
    """Whether unprivileged user namespaces can be created (bwrap needs them)."""
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return Check("user namespaces", False, "disabled: kernel.unprivileged_userns_clone=0")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return Check("user namespaces", False,
                     "AppArmor restricts them: kernel.apparmor_restrict_unprivileged_userns=1")
    limit = _read("/proc/sys/user/max_user_namespaces")
    if limit == "0":
        return Check("user namespaces", False, "user.max_user_namespaces=0")
    return Check("user namespaces", True, f"allowed (max {limit or 'unknown'})")


def cgroups() -> Check:
    """Which cgroup hierarchy sandboxes' limits go into."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return Check("cgroups", True, "v2 (unified)")
    v1 = [c for c in ("memory", "cpu", "pids") if Path(f"/sys/fs/cgroup/{c}").is_dir()]
    if v1:
        extra = " with a v2 mount at /sys/fs/cgroup/unified" if Path("/sys/fs/cgroup/unified").is_dir() else ""
        return Check("cgroups", len(v1) == 3, f"v1 ({', '.join(v1)}){extra}")
    return Check("cgroups", False, "no cgroup hierarchy found: sandboxes run without limits")


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_long * 40)]


def clock() -> Check:
    """Whether the kernel thinks the clock is synchronised (signed messages expire in 60 s)."""
    try:
        tx = _Timex()
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return Check("clock", True, "cannot ask the kernel; make sure NTP runs on every host")
    if state == 5:  # TIME_ERROR: not synchronised
        return Check("clock", True, "not synchronised by NTP: keep hosts within 30 s of each other")
    return Check("clock", True, "synchronised")


def backends(config: dict[str, dict[str, Any]] | None = None) -> list[Check]:
    """Every sandbox backend's probe."""
    config = config or {}
    out = []
    for name in (*STRENGTH_ORDER, "mock"):
        reason = BACKENDS[name].probe(**config.get(name, {}))
        out.append(Check(f"sandbox {name}", reason is None, reason or "works"))
    return out


def auto_backend(checks: list[Check]) -> str | None:
    """The strongest backend that works (what `--sandbox auto` picks), or None."""
    works = {c.name.removeprefix("sandbox ") for c in checks if c.ok and c.name.startswith("sandbox ")}
    return next((b for b in STRENGTH_ORDER if b in works), None)


def host_checks(config: dict[str, dict[str, Any]] | None = None) -> list[Check]:
    """Every host check, backends included."""
    checks = [user_namespaces(), cgroups(), clock(), *backends(config)]
    if os.geteuid() == 0:
        checks.append(Check("sandbox uid", True, "running as root: sandboxes run as an unprivileged uid"))
    return checks
