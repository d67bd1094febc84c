"""Chaos for a running stack: kill -9 one part, wait until the supervisor has it back.

A :class:`ChaosSchedule` kills, in turn, the gateway, the harness, an
executor, the egress and the embedded NATS server of a :class:`Stack`
(``silo up``), each with SIGKILL, and waits until the supervisor has
restarted it and it is healthy again (for NATS: every service connected to
it again) before going on. It records what it did (:class:`Kill`) so that a
test or ``bench/load.py --chaos`` can say what the load lived through. Use
it as the load driver's ``during=`` hook, or on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._stack import Stack

if TYPE_CHECKING:
    from ._load import LoadRun

TARGETS = ("gateway", "harness", "executor", "egress", "nats")
"""What the default schedule kills, in this order (ids of a default `silo init`, plus the NATS server)."""
RESTART_TIMEOUT_S = 60.0


class ChaosError(AssertionError):
    """A part killed on purpose did not come back."""


@dataclass
class Kill:
    """One SIGKILL: what, which pid, when, and when its replacement was healthy."""

    target: str
    pid: int
    at: float
    new_pid: int = 0
    back_at: float = 0.0

    @property
    def down_s(self) -> float:
        """Seconds from the kill until the replacement was healthy."""
        return self.back_at - self.at


def live_pid(stack: Stack, target: str) -> int | None:
    """The pid running ``target`` now (a service id, or ``nats``), None while it is down."""
    if target == "nats":
        try:
            pid = stack.nats_pid()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if _alive(pid) else None
    return stack.live_pid(target)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def services_of(stack: Stack) -> list[str]:
    """Every service id of the stack."""
    return list(stack.metrics_ports)


def all_connected(stack: Stack) -> bool:
    """Whether every service answers /healthz ok (which includes being connected to NATS)."""
    return all(stack.healthy(s) for s in services_of(stack))


async def kill(stack: Stack, target: str) -> Kill:
    """SIGKILL ``target`` (a service id, or ``nats``) now."""
    pid = await asyncio.to_thread(live_pid, stack, target)
    if pid is None:
        raise ChaosError(f"{target} is not running, nothing to kill")
    os.kill(pid, signal.SIGKILL)
    return Kill(target, pid, time.time())


async def wait_back(stack: Stack, k: Kill, timeout: float = RESTART_TIMEOUT_S) -> Kill:
    """Wait until the supervisor restarted ``k.target`` and the whole stack is healthy again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = await asyncio.to_thread(live_pid, stack, k.target)
        if pid is not None and pid != k.pid and await asyncio.to_thread(all_connected, stack):
            k.new_pid, k.back_at = pid, time.time()
            return k
        await asyncio.sleep(0.1)
    raise ChaosError(f"{k.target} (pid {k.pid}) was not back within {timeout:.0f}s:\n{stack.output()[-3000:]}")


Trigger = Callable[[str], Awaitable[None]]
"""Awaited before each kill with the target's name: when to strike (e.g. once a tool call runs)."""


@dataclass
class ChaosSchedule:
    """Kill each target in turn, waiting for each to come back before the next.

    ``before`` decides when each kill happens (default: ``pause_s`` after the
    previous one came back); ``after`` runs once the target is back (e.g. to
    check what the kill did). ``kills`` records every kill, in order.
    """

    stack: Stack
    targets: Sequence[str] = TARGETS
    pause_s: float = 2.0
    before: Trigger | None = None
    after: Callable[[Kill], Awaitable[None]] | None = None
    kills: list[Kill] = field(default_factory=list)

    async def run(self) -> list[Kill]:
        """Run the whole schedule; the kills done."""
        for target in self.targets:
            if self.before is not None:
                await self.before(target)
            else:
                await asyncio.sleep(self.pause_s)
            k = await kill(self.stack, target)
            self.kills.append(k)
            await wait_back(self.stack, k)
            if self.after is not None:
                await self.after(k)
        return self.kills

    async def __call__(self, *_: object) -> list[Kill]:
        """The schedule as a ``during=`` hook (any arguments are ignored)."""
        return await self.run()

    def summary(self) -> str:
        """One line per kill: what, and how long until it was back."""
        return "\n".join(f"{k.target:<10} pid {k.pid} -> {k.new_pid}, back in {k.down_s:.1f}s" for k in self.kills)


@dataclass
class LoadChaos:
    """Kill each of ``targets`` in turn beside a load run: ``await run.run(during=LoadChaos(stack))``.

    Waits for the run's warm-up, then before each kill lets the load go on for ``pause_s``;
    sessions on a killed executor are marked as allowed to end with an error (they must);
    ``live_at[target]`` holds the sessions that were running when ``target`` was killed.
    """

    stack: Stack
    targets: Sequence[str] = TARGETS
    pause_s: float = 1.5
    live_at: dict[str, set[str]] = field(default_factory=dict)
    schedule: ChaosSchedule | None = None

    async def __call__(self, run: LoadRun) -> None:
        """Run the schedule beside ``run``."""

        async def before(target: str) -> None:
            await run.warmed_up.wait()
            await asyncio.sleep(self.pause_s)
            self.live_at[target] = {s.session_id for s in run.live_sessions()}

        self.schedule = ChaosSchedule(self.stack, before=before)
        for target in self.targets:
            self.schedule.targets = (target,)
            health = await asyncio.to_thread(self.stack.health, target) if target != "nats" else None
            if (health or {}).get("role") == "executor":
                async with run.expecting_errors(executor_id=target):
                    await self.schedule.run()
            else:
                await self.schedule.run()

    @property
    def kills(self) -> list[Kill]:
        """The kills done so far."""
        return self.schedule.kills if self.schedule is not None else []

    def summary(self) -> str:
        """One line per kill."""
        return self.schedule.summary() if self.schedule is not None else "no kills"


# -- what the journal says was written ------------------------------------------------------


def export_journal(stack: Stack, session_id: str, out: Path) -> list[dict[str, Any]]:
    """``silo journal export`` of a session: its records (network records left out)."""
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "journal",
                        "export", session_id, "-o", str(out)], check=False, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise ChaosError(f"journal export of {session_id} failed: {r.stderr}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return [x for x in records if x["kind"] != "network"]


def expected_files(records: list[dict[str, Any]]) -> dict[str, str]:
    """Workspace path -> content the journal says it must have: its completed ``Write`` and
    ``Edit`` calls applied in order.

    A path with a call journaled without a result, or with an error result (its executor died
    under it and the call was ended as interrupted: it may or may not have landed) is left out, and so is a path a command could have changed in ways the
    journal does not spell out (only files written by these two tools are in the answer).
    """
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    files: dict[str, str] = {}
    unsure: set[str] = set()
    for x in records:
        d = x["data"]
        if x["kind"] != "tool_exec" or d.get("name") not in ("Write", "Edit"):
            continue
        if d.get("phase") == "call":
            calls[str(d["id"])] = (str(d["name"]), d["input"])
            continue
        name, args = calls.pop(str(d["id"]), ("", {}))
        path = str(args.get("path", ""))
        if not name:
            continue
        if d.get("is_error"):  # e.g. "interrupted" as its executor died: it may have landed or not
            unsure.add(path)
            continue
        if name == "Write":
            files[path] = str(args["content"])
        elif path in files:
            old, new = str(args["old_string"]), str(args["new_string"])
            files[path] = files[path].replace(old, new) if args.get("replace_all") else files[path].replace(old, new, 1)
        else:
            unsure.add(path)  # edited before any write the journal saw: content unknown
    unsure.update(str(args.get("path", "")) for _, args in calls.values())
    return {p: c for p, c in files.items() if p not in unsure}


def read_as_executor(executor_pid: int, path: Path) -> bytes:
    """A file as the executor sees it (its workspace images are mounted in its own mount namespace)."""
    r = subprocess.run(["nsenter", "-t", str(executor_pid), "-m", "--", "cat", str(path)], check=False,
                       capture_output=True, timeout=30)
    if r.returncode != 0:
        raise ChaosError(f"cannot read {path} in executor {executor_pid}'s mounts: {r.stderr.decode()[-500:]}")
    return r.stdout


def digest_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file below ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
