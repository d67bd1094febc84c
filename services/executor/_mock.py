"""The mock backend: executes nothing, answers every helper request from a script.

Used by replay (a journal turned into a script) and by tests that need a
sandbox's answers without a sandbox. Each script step names the operation
and, optionally, what it expects (command, path); a request that does not
match the next step, or comes after the last, is a :class:`SandboxError`
that names the step, so a replay mismatch is reported, never papered over.

Step format (JSON-compatible)::

    {"op": "exec", "command": "make test", "result": {"exit_code": 0, "stdout": "ok\\n"}}
    {"op": "read", "path": "a.txt", "result": {"content": "hello"}}
    {"op": "write", "path": "a.txt", "result": {"bytes": 5}}
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from devsilo.protocol import SandboxError

from ._helper_client import ExecResult, ReadResult
from ._sandbox import Sandbox
from ._spec import SandboxSpec


def probe(**_: Any) -> str | None:
    """The mock backend works everywhere."""
    return None


class MockHelper:
    """Answers helper requests in script order."""

    def __init__(self, steps: Sequence[dict[str, Any]]) -> None:
        self._steps = list(steps)
        self._next = 0
        self._lock = asyncio.Lock()

    @property
    def remaining(self) -> int:
        """Steps not consumed yet."""
        return len(self._steps) - self._next

    def _take(self, op: str, **expect: Any) -> dict[str, Any]:
        if self._next >= len(self._steps):
            raise SandboxError(f"mock sandbox: unexpected {op} after the last of {len(self._steps)} steps")
        step = self._steps[self._next]
        if step.get("op") != op:
            raise SandboxError(f"mock sandbox step {self._next}: expected {step.get('op')}, got {op}")
        for key, value in expect.items():
            if key in step and step[key] != value:
                raise SandboxError(f"mock sandbox step {self._next}: {op} {key} {value!r}, "
                                   f"script has {step[key]!r}")
        self._next += 1
        result: dict[str, Any] = step.get("result", {})
        return result

    async def exec(self, command: str, *, cwd: str | None = None, env: dict[str, str] | None = None,
                   timeout_ms: int = 120_000, on_output: Callable[[str, str], None] | None = None) -> ExecResult:
        """The scripted result of ``command``."""
        async with self._lock:
            r = self._take("exec", command=command)
        if on_output is not None:
            for stream in ("stdout", "stderr"):
                if r.get(stream):
                    on_output(stream, str(r[stream]))
        return ExecResult(
            exit_code=int(r.get("exit_code", 0)), stdout=str(r.get("stdout", "")),
            stderr=str(r.get("stderr", "")), timed_out=bool(r.get("timed_out", False)),
            cancelled=bool(r.get("cancelled", False)), stdout_truncated=False, stderr_truncated=False,
            duration_ms=int(r.get("duration_ms", 0)),
        )

    async def read(self, path: str, *, offset: int = 0, limit: int = 5 * 1024 * 1024) -> ReadResult:
        """The scripted content of ``path``."""
        async with self._lock:
            r = self._take("read", path=path)
        data = str(r.get("content", "")).encode()
        return ReadResult(content=data[offset:offset + limit], offset=offset, size=len(data),
                          eof=offset + limit >= len(data))

    async def write(self, path: str, content: bytes | str, *, append: bool = False) -> int:
        """Accept a write the script expects; the bytes go nowhere."""
        async with self._lock:
            self._take("write", path=path)
        return len(content.encode() if isinstance(content, str) else content)

    async def shutdown(self) -> None:
        """Nothing runs, so nothing stops."""


class MockSandbox(Sandbox):
    """A sandbox that runs nothing; its helper answers from ``script``."""

    backend = "mock"

    def __init__(self, spec: SandboxSpec, *, script: Sequence[dict[str, Any]] = (), **_: Any) -> None:
        self.spec = spec
        self.warnings: list[str] = ["mock sandbox: nothing is executed; answers come from a script"]
        self._helper = MockHelper(script)
        self._running = False

    async def start(self) -> None:
        """Nothing to start."""
        self._running = True

    @property
    def helper(self) -> Any:
        """The scripted helper."""
        if not self._running:
            raise SandboxError("the mock sandbox is not running")
        return self._helper

    async def close(self) -> None:
        """Nothing to stop."""
        self._running = False
