"""`silo run`, `silo sessions attach|list` and `silo demo`: sessions through the gateway."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

from devsilo.protocol import ConfigError
from devsilo.protocol.client import (
    Attach,
    CreateSession,
    EventFrame,
    ListSessions,
    SessionCreated,
    Sessions,
    Shutdown,
    WorkspaceCommand,
    WorkspaceResult,
    WorkspaceUploadNeeded,
)
from devsilo.runtime._state import StateDir

from ._client import GatewayClient, GatewayError
from ._render import print_event
from ._supervisor import read_stack_file

EXIT_RUNTIME = 1


@dataclass(frozen=True)
class GatewayTarget:
    """Where the gateway is and how to trust it."""

    url: str
    fingerprint: str
    token: str


def local_gateway(state: StateDir, url: str | None = None) -> GatewayTarget:
    """The gateway of the stack running from ``state`` (or at ``url``), with the local token."""
    if url is None:
        stack = read_stack_file(state)
        if stack is None:
            raise ConfigError(f"no devsilo is running from {state.root}; start it with `silo up`")
        url = str(stack["gateway_url"])
    return GatewayTarget(url, state.gateway_fingerprint(), state.client_token())


async def follow(client: GatewayClient, session_id: str, from_seq: int, out: TextIO, *,
                 as_json: bool) -> int:
    """Print a session's events until it shuts down; return its exit code."""
    await client.send(Attach(session_id=session_id, from_seq=from_seq))
    async for frame in client.frames():
        if isinstance(frame, EventFrame) and frame.session_id == session_id:
            print_event(frame, out, as_json=as_json)
            if frame.kind == "shutdown":
                return int(frame.data.get("exit_code", EXIT_RUNTIME))
    return EXIT_RUNTIME


async def run_session(target: GatewayTarget, request: CreateSession, out: TextIO, *,
                      as_json: bool = False) -> int:
    """Create a session, print its events as they arrive, return its exit code."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-run") as client:
        await client.connect(target.token)
        await client.send(request)
        async for frame in client.frames():
            if isinstance(frame, SessionCreated):
                if not as_json:
                    out.write(f"session {frame.session_id} on executor {frame.executor_id}\n")
                return await follow(client, frame.session_id, 0, out, as_json=as_json)
    return EXIT_RUNTIME


async def attach_session(target: GatewayTarget, session_id: str, from_seq: int, out: TextIO, *,
                         as_json: bool = False) -> int:
    """Attach to a running session as another client."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-attach") as client:
        await client.connect(target.token)
        return await follow(client, session_id, from_seq, out, as_json=as_json)


async def stop_session(target: GatewayTarget, session_id: str, out: TextIO) -> int:
    """Stop a session and wait for its shutdown event; return its exit code."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-stop") as client:
        await client.connect(target.token)
        await client.send(Shutdown(session_id=session_id))
        code = await follow(client, session_id, 0, io.StringIO(), as_json=True)
        out.write(f"session {session_id} stopped\n")
        return code



EXIT_AUTO_EXEC = 3


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


async def workspace_command(target: GatewayTarget, cmd: WorkspaceCommand, out: TextIO, *,
                            as_json: bool = False) -> int:
    """Run `silo workspace lock|unlock|status|list`; 3 after an unlock that changed an auto-exec surface."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-workspace") as client:
        await client.connect(target.token)
        await client.send(cmd)
        async for frame in client.frames():
            if isinstance(frame, WorkspaceResult):
                return _print_workspace(frame, cmd, out, as_json=as_json)
            if isinstance(frame, WorkspaceUploadNeeded):
                out.write(f"error: {frame.reason}; run `silo workspace lock {frame.path}` to upload it\n")
                return EXIT_RUNTIME
    return EXIT_RUNTIME


def _print_workspace(res: WorkspaceResult, cmd: WorkspaceCommand, out: TextIO, *, as_json: bool) -> int:
    if as_json:
        out.write(json.dumps(res.model_dump(mode="json"), indent=2) + "\n")
    elif res.op == "unlock":
        out.write(res.report_text if res.report_text.endswith("\n") else res.report_text + "\n")
    else:
        if not res.workspaces:
            out.write("no locked workspaces\n")
        for w in res.workspaces:
            line = f"{w['path']}: {w['phase']}"
            if w.get("executor"):
                line += f" on {w['executor']}"
            if w.get("origin_host"):
                line += f" (uploaded from {w['origin_host']})"
            if w["phase"] == "locked":
                line += f", {w.get('entries', 0)} entries, {_size(int(w.get('size_bytes', 0)))}"
                sessions = w.get("sessions") or []
                line += f", sessions: {', '.join(sessions) if sessions else 'none'}"
                shells = w.get("shells") or []
                line += f", shells: {', '.join(shells) if shells else 'none'}"
                if w.get("storage") == "ext4":
                    line += ", in an ext4 image mounted only in the executor's namespace"
            out.write(line + "\n")
            out.writelines(f"  warning: {warning}\n" for warning in w.get("warnings") or [])
    if res.op == "unlock" and res.auto_exec_changed and not cmd.accept:
        if not as_json:
            out.write("An auto-exec surface changed: review it before running anything here "
                      "(`--accept` to acknowledge).\n")
        return EXIT_AUTO_EXEC
    return 0


async def list_sessions(target: GatewayTarget, out: TextIO) -> int:
    """Print the sessions this user may see."""
    async with GatewayClient(target.url, target.fingerprint, client_name="silo-list") as client:
        await client.connect(target.token)
        await client.send(ListSessions())
        async for frame in client.frames():
            if isinstance(frame, Sessions):
                out.writelines(f"{s.session_id}  {s.user}  {s.workspace}  {s.state}\n" for s in frame.sessions)
                return 0
    return EXIT_RUNTIME


DEMO_PROGRAM = '''"""Primes below 50, by the sieve of Eratosthenes."""
limit = 50
sieve = [True] * limit
sieve[0] = sieve[1] = False
for i in range(2, int(limit ** 0.5) + 1):
    if sieve[i]:
        for j in range(i * i, limit, i):
            sieve[j] = False
print("primes below", limit, ":", [n for n, p in enumerate(sieve) if p])
'''

DEMO_SCRIPT = {
    "responses": [
        {"text": "I'll write a small program into the workspace.",
         "tool_calls": [{"name": "Write", "input": {"path": "primes.py", "content": DEMO_PROGRAM}}]},
        {"text": "Now I'll run it inside the sandbox.",
         "tool_calls": [{"name": "Bash", "input": {"command": "python3 primes.py && ls -l"}}]},
        {"text": "And check who I am in here, and that the host's files are out of reach.",
         "tool_calls": [{"name": "Bash", "input": {
             "command": "id; ls /root 2>&1 | head -1; python3 -c 'import socket; "
                        "print(\"network interfaces:\", [n for _, n in socket.if_nameindex()])'"}}]},
        {"text": "The program works.",
         "tool_calls": [{"name": "Exit", "input": {"message": "wrote and ran primes.py"}}]},
    ]
}


async def _wait_for_stack(state: StateDir, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_stack_file(state) is not None:
            return
        if proc.poll() is not None:
            raise ConfigError(f"`silo up` exited with {proc.returncode} before the stack was ready")
        await asyncio.sleep(0.1)
    raise ConfigError(f"the stack did not come up within {timeout:.0f}s")


async def demo(state: StateDir, workspace: str | None, out: TextIO, *, as_json: bool = False) -> int:
    """Run the built-in scripted session, starting (and then stopping) a stack if none runs."""
    proc: subprocess.Popen[bytes] | None = None
    if read_stack_file(state) is None:
        out.write("starting devsilo (silo up) for the demo...\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "devsilo.cli", "up", "--state-dir", str(state.root)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            await _wait_for_stack(state, proc)
        except BaseException:
            _stop(proc)
            raise
    try:
        ws = os.path.abspath(workspace or tempfile.mkdtemp(prefix="silo-demo-"))
        out.write(f"workspace: {ws}\n")
        target = local_gateway(state)
        here = socket.gethostname()
        await workspace_command(target, WorkspaceCommand(op="lock", path=ws, workspace_host=here), out)
        request = CreateSession(workspace=os.path.abspath(ws), workspace_host=socket.gethostname(), llm="mock", script=json.dumps(DEMO_SCRIPT),
                                headless=True, prompt="Write a small program and run it.")
        code = await run_session(target, request, out, as_json=as_json)
        out.write(f"\nunlocking {ws}: the change report\n")
        unlocked = await workspace_command(target, WorkspaceCommand(op="unlock", path=ws), out)
        out.write(f"demo finished with exit code {code or unlocked}; the program is in {ws}/primes.py\n")
        return code or unlocked
    except GatewayError as exc:
        out.write(f"error: {exc}\n")
        return EXIT_RUNTIME
    finally:
        if proc is not None:
            _stop(proc)
            out.write("stopped the demo's devsilo; run `silo up` to keep one running\n")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


