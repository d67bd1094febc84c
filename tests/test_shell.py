"""`silo shell` through the whole stack: a real PTY, real NATS, real bwrap sandboxes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from devsilo.cli._client import GatewayClient
from devsilo.cli._sessions import local_gateway
from devsilo.executor._shell_stream import ShellStalled, ShellStream
from devsilo.protocol import SHELL_CHUNK, ShellOutput, Signer, ToolCall, subjects
from devsilo.protocol.client import (
    ErrorFrame,
    ShellExitFrame,
    ShellInputFrame,
    ShellOpenedFrame,
    ShellOpenFrame,
    ShellOutputFrame,
)
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack

SILO = [sys.executable, "-m", "devsilo.cli"]
WAIT = 60  # how long pexpect waits for output before the test fails (never a measured bound)


def silo(stack: Stack, *args: str, stdin: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SILO, "--state-dir", str(stack.state_dir), *args], input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None,
                          capture_output=True, text=True, timeout=timeout, check=False)


def spawn_shell(stack: Stack, *args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """`silo shell ARGS` on a fresh pseudo-terminal of rows x cols, as a user would type it."""
    child = pexpect.spawn(SILO[0], [*SILO[1:], "--state-dir", str(stack.state_dir), "shell", *args],
                          dimensions=(rows, cols), timeout=WAIT, env={**os.environ, "TERM": "xterm"})
    return child


def finish(child: pexpect.spawn) -> int:
    """Wait for `silo shell` to end; its exit status."""
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, f"silo shell died of signal {child.signalstatus}"
    return int(child.exitstatus)


@pytest.fixture
def locked(stack: Stack, tmp_path: Path) -> Iterator[Path]:
    """A workspace with one file, locked for the test and unlocked after it."""
    ws = tmp_path / "project"
    ws.mkdir()
    (ws / "README").write_text("the locked readme\n")
    r = silo(stack, "workspace", "lock", str(ws))
    assert r.returncode == 0, r.stdout + r.stderr
    yield ws
    silo(stack, "workspace", "unlock", str(ws), "--accept")


def test_typed_commands_run_in_the_workspace_and_their_output_comes_back(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked))
    child.sendline("echo $((6*7)); pwd; cat README; id -un")
    child.expect(r"42\r\n/workspace\r\nthe locked readme\r\nsilo\r\n")
    child.sendline("exit")
    assert finish(child) == 0


def test_the_remote_terminal_follows_the_local_window_size(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked), rows=30, cols=100)
    child.sendline("stty size")
    child.expect(r"\r30 100\r\n")
    child.setwinsize(41, 133)
    # The resize and the next line travel separately; ask until the new size shows.
    for _ in range(20):
        child.sendline("stty size")
        child.expect(r"\r(\d+) (\d+)\r\n")
        if child.match.groups() == (b"41", b"133"):
            break
    else:
        raise AssertionError("the remote terminal never took the new size 41x133")
    child.sendline("exit")
    assert finish(child) == 0


def test_ctrl_c_interrupts_the_running_command_not_the_shell(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked))
    # The marker comes from the job itself, so it already holds the terminal when ^C comes.
    child.sendline("sh -c 'echo start-$((1+1)); exec sleep 1000'")
    child.expect(r"start-2\r\n")
    child.sendcontrol("c")
    child.sendline("echo status=$?")
    child.expect(r"status=130\r\n")
    child.sendline("echo still-$((2+2))")
    child.expect(r"still-4\r\n")
    child.sendline("exit")
    assert finish(child) == 0


def test_the_exit_code_of_the_remote_shell_is_silo_shells(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked))
    child.sendline("exit 7")
    assert finish(child) == 7


def _gvisor_missing() -> str | None:
    from devsilo.executor._gvisor import probe

    return probe() if os.geteuid() == 0 else "the gvisor backend needs root"


@pytest.mark.skipif(_gvisor_missing() is not None, reason=f"gvisor unavailable: {_gvisor_missing()}")
def test_sandbox_gvisor_overrides_the_backend_for_a_terminal_and_a_command(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked), "--sandbox", "gvisor", rows=33, cols=99)
    child.expect(r"note: --sandbox gvisor differs from the workspace's defaults \(bwrap\)")
    child.sendline("stty size; cat README")
    child.expect(r"\r33 99\r\nthe locked readme\r\n")
    child.sendline("exit 3")
    assert finish(child) == 3
    r = silo(stack, "shell", "--workspace", str(locked), "--sandbox", "gvisor", "--", "cat README; exit 4")
    assert (r.returncode, r.stdout) == (4, "the locked readme\n")


def test_a_command_runs_without_a_terminal_stdout_stderr_and_exit_code_pass_through(
        stack: Stack, locked: Path) -> None:
    r = silo(stack, "shell", "--workspace", str(locked), "--", "cat README; echo oops >&2; test -t 0; exit 5")
    assert r.returncode == 5
    assert r.stdout == "the locked readme\n"
    assert r.stderr == "oops\n"


def test_a_command_reads_silo_shells_stdin(stack: Stack, locked: Path) -> None:
    r = silo(stack, "shell", "--workspace", str(locked), "--", "tr a-z A-Z", stdin="quiet words\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "QUIET WORDS\n"


def test_large_output_arrives_whole_and_in_order(stack: Stack, locked: Path) -> None:
    r = silo(stack, "shell", "--workspace", str(locked), "--", "seq 1 200000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"{i}\n" for i in range(1, 200001))


def test_the_shell_sees_nothing_of_the_host(stack: Stack, locked: Path) -> None:
    # Readable by the sandbox's host uid if it were visible: only the sandbox hides it.
    secret = Path("/tmp") / f"shell-secret-{uuid.uuid4().hex}"
    secret.write_text("host secret 5f2c\n")
    secret.chmod(0o644)
    try:
        control = subprocess.run(["setpriv", "--reuid=64123", "--regid=64123", "--clear-groups", "cat",
                                  str(secret)], capture_output=True, text=True, check=False)
        assert control.stdout == "host secret 5f2c\n"
        r = silo(stack, "shell", "--workspace", str(locked), "--",
                 f"cat {secret}; ls /root; ls {stack.state_dir}; cat /etc/shadow")
        assert r.returncode != 0
        assert "5f2c" not in r.stdout + r.stderr
        assert r.stdout == ""
        assert r.stderr.count("No such file or directory") >= 3, r.stderr
    finally:
        secret.unlink()


def test_a_policy_override_is_noted_on_stderr(stack: Stack, locked: Path) -> None:
    r = silo(stack, "shell", "--workspace", str(locked), "--allow-domain", "example.com", "--", "true")
    assert r.returncode == 0, r.stderr
    assert ("note: --allow-domain example.com differs from the workspace's defaults (none)"
            in r.stderr)
    plain = silo(stack, "shell", "--workspace", str(locked), "--", "true")
    assert "note:" not in plain.stderr


def test_workspace_status_lists_an_open_shell(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked))
    child.sendline("echo up-$((3+3))")
    child.expect(r"up-6\r\n")
    status = json.loads(silo(stack, "workspace", "status", str(locked), "--json").stdout)
    shells = status["workspaces"][0]["shells"]
    assert len(shells) == 1 and status["workspaces"][0]["sessions"] == []
    assert f"shells: {shells[0]}" in silo(stack, "workspace", "status", str(locked)).stdout
    child.sendline("exit")
    assert finish(child) == 0
    status = json.loads(silo(stack, "workspace", "status", str(locked), "--json").stdout)
    assert status["workspaces"][0]["shells"] == []


def test_unlock_terminates_the_shell_on_the_workspace(stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "unlockme"
    ws.mkdir()
    assert silo(stack, "workspace", "lock", str(ws)).returncode == 0
    child = spawn_shell(stack, "--workspace", str(ws))
    child.sendline("echo from-shell > made.txt; echo made-$((5*5)); sleep 1000")
    child.expect(r"made-25\r\n")
    r = silo(stack, "workspace", "unlock", str(ws))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Changes since lock: 1" in r.stdout and "made.txt" in r.stdout
    child.expect(r"the shell's sandbox was closed on executor \S+: workspace unlocked")
    assert finish(child) == 1
    assert (ws / "made.txt").read_text() == "from-shell\n"


LIVE_SESSION = {"responses": [
    {"tool_calls": [
        {"name": "Write", "input": {"path": "agent.txt", "content": "written by the agent\n"}},
        # Waits for the user's shell to answer through the shared workspace.
        {"name": "Bash", "input": {"command": "while [ ! -f from-shell.txt ]; do sleep 0.05; done; "
                                              "cat from-shell.txt", "timeout_ms": 300000}},
    ]},
    {"tool_calls": [{"name": "Exit", "input": {"message": "done"}}]},
]}


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A host directory the sandbox uid could read, for read allow-lists."""
    d = Path("/tmp") / f"shell-docs-{uuid.uuid4().hex}"
    d.mkdir(mode=0o755)
    (d / "doc.txt").write_text("allow-listed doc\n")
    (d / "doc.txt").chmod(0o644)
    yield d
    (d / "doc.txt").unlink()
    d.rmdir()


def test_a_shell_on_a_session_shares_its_live_workspace_and_policy(
        stack: Stack, tmp_path: Path, readable_dir: Path) -> None:
    ws = tmp_path / "live"
    ws.mkdir()
    script = tmp_path / "live.json"
    script.write_text(json.dumps(LIVE_SESSION))
    run = subprocess.Popen([*SILO, "--state-dir", str(stack.state_dir), "run", "--headless", "--json",
                            "--script", str(script), "--workspace", str(ws), "--prompt", "go",
                            "--allow-read", str(readable_dir)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        sid = None
        for line in run.stdout:
            event = json.loads(line)
            sid = event["session_id"]
            if event["kind"] == "tool_use" and event["data"].get("name") == "Bash":
                break
        assert sid is not None
        # The session's read allow-list comes with it...
        r = silo(stack, "shell", "--session", sid, "--", f"cat agent.txt {readable_dir}/doc.txt")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "written by the agent\nallow-listed doc\n"
        assert "note:" not in r.stderr
        # ...unless overridden, which is noted.
        r = silo(stack, "shell", "--session", sid, "--allow-read", "/usr/share", "--",
                 f"cat {readable_dir}/doc.txt")
        assert r.returncode == 1 and "No such file or directory" in r.stderr
        assert (f"note: --allow-read /usr/share differs from session {sid}'s policy ({readable_dir})"
                in r.stderr)
        # The agent, waiting in its sandbox, sees what the user's shell writes.
        r = silo(stack, "shell", "--session", sid, "--", "echo answered by the user > from-shell.txt")
        assert r.returncode == 0, r.stderr
        out, err = run.communicate(timeout=120)
    finally:
        run.kill()
        run.wait()
    results = [json.loads(x) for x in out.splitlines() if json.loads(x)["kind"] == "tool_result"]
    assert any("answered by the user" in json.dumps(e["data"]) for e in results), out
    assert run.returncode == 0, err


def test_a_signal_to_silo_shell_reaches_a_command(stack: Stack, locked: Path) -> None:
    with subprocess.Popen([*SILO, "--state-dir", str(stack.state_dir), "shell", "--workspace", str(locked),
                           "--", "echo ready; sleep 1000"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 130


def _shells_on(stack: Stack, ws: Path) -> list[str]:
    status = json.loads(silo(stack, "workspace", "status", str(ws), "--json").stdout)
    return list(status["workspaces"][0]["shells"])


def test_a_hung_up_silo_shell_ends_the_remote_shell(stack: Stack, locked: Path) -> None:
    child = spawn_shell(stack, "--workspace", str(locked))
    child.sendline("echo here-$((4*4))")
    child.expect(r"here-16\r\n")
    assert len(_shells_on(stack, locked)) == 1
    child.kill(signal.SIGTERM)
    assert finish(child) == 128 + signal.SIGTERM
    # The gateway closes it once the connection is gone; wait for the executor to say so.
    for _ in range(120):
        if not _shells_on(stack, locked):
            break
        time.sleep(0.5)
    assert _shells_on(stack, locked) == []


def test_a_shell_needs_a_locked_workspace(stack: Stack, tmp_path: Path) -> None:
    r = silo(stack, "shell", "--workspace", str(tmp_path), "--", "true")
    assert r.returncode == 1
    assert f"{tmp_path} is not locked on any executor" in r.stderr
    assert "silo workspace lock" in r.stderr


def test_a_shell_on_an_unknown_session_is_refused(stack: Stack) -> None:
    r = silo(stack, "shell", "--session", "nosuchsession", "--", "true")
    assert r.returncode == 1
    assert "no session nosuchsession visible to you" in r.stderr


async def _connect(stack: Stack) -> GatewayClient:
    target = local_gateway(StateDir(stack.state_dir))
    client = GatewayClient(target.url, target.fingerprint, client_name="test")
    await client.connect(target.token)
    return client


async def _next(client: GatewayClient, kind: type | tuple[type, ...]) -> object:
    while True:
        frame = await asyncio.wait_for(client.receive(), WAIT)
        if isinstance(frame, (kind, ErrorFrame)):
            return frame


def test_input_only_reaches_a_shell_from_the_connection_that_opened_it(stack: Stack, locked: Path) -> None:
    async def scenario() -> None:
        owner, other = await _connect(stack), await _connect(stack)
        try:
            await owner.send(ShellOpenFrame(workspace=str(locked), command="cat", tty=False))
            opened = await _next(owner, ShellOpenedFrame)
            assert isinstance(opened, ShellOpenedFrame), opened
            sneaky = base64.b64encode(b"injected\n").decode()
            await other.send(ShellInputFrame(shell_id=opened.shell_id, data=sneaky, eof=True))
            refused = await _next(other, ErrorFrame)
            assert isinstance(refused, ErrorFrame)
            assert refused.message == f"no shell {opened.shell_id} is open on this connection"
            await other.send(ShellInputFrame(shell_id="0123456789abcdef", data=sneaky))
            unknown = await _next(other, ErrorFrame)
            assert isinstance(unknown, ErrorFrame) and "no shell 0123456789abcdef" in unknown.message
            mine = base64.b64encode(b"from the owner\n").decode()
            await owner.send(ShellInputFrame(shell_id=opened.shell_id, data=mine, eof=True))
            out = b""
            while True:
                frame = await _next(owner, (ShellOutputFrame, ShellExitFrame))
                if isinstance(frame, ShellOutputFrame):
                    out += base64.b64decode(frame.data)
                else:
                    assert isinstance(frame, ShellExitFrame) and frame.exit_code == 0, frame
                    break
            assert out == b"from the owner\n"
        finally:
            await owner.close()
            await other.close()

    asyncio.run(scenario())


PRODUCER = """python3 -c '
import os, sys
block = b"x" * (1 << 20)
for i in range(64):
    sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()
    with open("progress.new", "w") as f:
        f.write(str(i + 1))
    os.replace("progress.new", "progress")
'"""
"""Writes 64 MiB and counts the MiB written in ``progress`` (replaced whole, so a look never reads it empty)."""


def test_a_client_that_stops_reading_holds_the_shell_back_and_then_gets_everything(
        stack: Stack, locked: Path) -> None:
    def progress() -> int:
        r = silo(stack, "shell", "--workspace", str(locked), "--", "cat progress 2>/dev/null || echo 0")
        return int(r.stdout)

    async def scenario() -> None:
        client = await _connect(stack)
        try:
            await client.send(ShellOpenFrame(workspace=str(locked), command=PRODUCER, tty=False))
            opened = await _next(client, ShellOpenedFrame)
            assert isinstance(opened, ShellOpenedFrame), opened
            first = await _next(client, ShellOutputFrame)
            assert isinstance(first, ShellOutputFrame)
            received = len(base64.b64decode(first.data))
            # We read nothing now. Wait for the producer to stop getting further (each look
            # is a shell of its own); without flow control it would write all 64 MiB.
            seen = [await asyncio.to_thread(progress)]
            while len(seen) < 3 or seen[-1] != seen[-2]:
                assert len(seen) < 120, seen
                await asyncio.sleep(0.5)
                seen.append(await asyncio.to_thread(progress))
            # Held back before the end: what got through sits in the window (1 MiB), the
            # socket buffers between executor, gateway and this client, and the pipe. How
            # much those hold depends on the kernel's autotuning and load (31-33 MiB seen).
            assert seen[-1] < 64, seen
            while True:
                frame = await _next(client, (ShellOutputFrame, ShellExitFrame))
                if isinstance(frame, ShellOutputFrame):
                    received += len(base64.b64decode(frame.data))
                else:
                    assert isinstance(frame, ShellExitFrame)
                    assert (frame.exit_code, frame.message) == (0, "")
                    break
            assert received == 64 << 20
        finally:
            await client.close()

    asyncio.run(scenario())
    assert progress() == 64


def test_the_harness_cannot_run_tools_in_a_users_shell_sandbox(stack: Stack, locked: Path) -> None:
    async def scenario() -> None:
        client = await _connect(stack)
        state = StateDir(stack.state_dir)
        nc = await connect_nats(state, "harness", f"tls://127.0.0.1:{stack.nats_port}")
        try:
            await client.send(ShellOpenFrame(workspace=str(locked), command="cat", tty=False))
            opened = await _next(client, ShellOpenedFrame)
            assert isinstance(opened, ShellOpenedFrame), opened
            shid = opened.shell_id
            subject = subjects.exec_tool(opened.executor_id, shid)
            wire, _ = Signer(state.identity("harness")).seal(
                ToolCall(call_id="c1", name="Bash", input={"command": "echo pwned > pwned.txt"}), subject, sid=shid)
            reply = await nc.request(subject, wire, timeout=WAIT)
            doc = json.loads(reply.data[64:])
            assert doc["type"] == "error"
            assert doc["body"]["message"] == f"{shid} is a user's shell on executor {opened.executor_id}, not a session"
            await client.send(ShellInputFrame(shell_id=shid, data=base64.b64encode(b"ls\n").decode(), eof=True))
            exit_frame = await _next(client, ShellExitFrame)
            assert isinstance(exit_frame, ShellExitFrame) and exit_frame.exit_code == 0
        finally:
            await nc.close()
            await client.close()

    asyncio.run(scenario())
    r = silo(stack, "shell", "--workspace", str(locked), "--", "ls")
    assert "pwned" not in r.stdout


def test_an_oversized_input_frame_is_refused_with_a_clear_error(stack: Stack, locked: Path) -> None:
    async def scenario() -> None:
        client = await _connect(stack)
        try:
            await client.send(ShellOpenFrame(workspace=str(locked), command="cat", tty=False))
            opened = await _next(client, ShellOpenedFrame)
            assert isinstance(opened, ShellOpenedFrame), opened
            too_big = base64.b64encode(b"x" * (SHELL_CHUNK + 3)).decode()
            assert client._ws is not None
            await client._ws.send_str(json.dumps(
                {"type": "shell_input", "shell_id": opened.shell_id, "data": too_big}))
            refused = await _next(client, ErrorFrame)
            assert isinstance(refused, ErrorFrame) and refused.code == "bad_request"
            assert re.search(r"invalid frame at shell_input\.data: String should have at most \d+ characters",
                             refused.message), refused.message
            # The shell is unharmed and still answers.
            await client.send(ShellInputFrame(shell_id=opened.shell_id,
                                              data=base64.b64encode(b"after\n").decode(), eof=True))
            frame = await _next(client, ShellOutputFrame)
            assert isinstance(frame, ShellOutputFrame) and base64.b64decode(frame.data) == b"after\n"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_shell_whose_executor_dies_ends_with_a_clear_error(stack: Stack, tmp_path: Path) -> None:
    """The last test on the module's stack (its executor is killed; the supervisor restarts it)."""
    ws = tmp_path / "doomed"
    ws.mkdir()
    assert silo(stack, "workspace", "lock", str(ws)).returncode == 0
    child = spawn_shell(stack, "--workspace", str(ws))
    child.sendline("echo alive-$((8*8))")
    child.expect(r"alive-64\r\n")
    pid = stack.live_pid("executor")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    child.expect(r"executor executor stopped or restarted; the shell ended with its sandbox")
    assert finish(child) == 1


# -- the executor's output stream, without NATS ------------------------------------------


async def test_the_output_stream_stays_within_its_window_until_acknowledged() -> None:
    sent: list[ShellOutput] = []
    stream = ShellStream(_collect(sent), window=4)
    running = asyncio.create_task(stream.run())
    await stream.put("pty", b"a" * (SHELL_CHUNK * 6 + 5))  # seven chunks
    while len(sent) < 4:
        await asyncio.sleep(0)
    for _ in range(20):  # it may not run ahead however often it gets the chance
        await asyncio.sleep(0)
    assert [m.seq for m in sent] == [0, 1, 2, 3]
    stream.ack(99)  # more than was sent: ignored
    stream.ack(2)
    while len(sent) < 6:
        await asyncio.sleep(0)
    assert [m.seq for m in sent] == [0, 1, 2, 3, 4, 5]
    stream.ack(6)
    await stream.finish()
    await running
    data = b"".join(base64.b64decode(m.data) for m in sent)
    assert data == b"a" * (SHELL_CHUNK * 6 + 5) and stream.seq == 7
    assert {m.stream for m in sent} == {"pty"}


async def test_the_output_stream_gives_up_when_nothing_is_acknowledged() -> None:
    sent: list[ShellOutput] = []
    stream = ShellStream(_collect(sent), window=2, ack_timeout=0.01)
    running = asyncio.create_task(stream.run())
    await stream.put("stdout", b"x" * (SHELL_CHUNK * 3))
    with pytest.raises(ShellStalled, match="stopped reading"):
        await running
    assert len(sent) == 2


def _collect(sent: list[ShellOutput]) -> Callable[[ShellOutput], Awaitable[None]]:
    async def publish(body: ShellOutput) -> None:
        sent.append(body)

    return publish
