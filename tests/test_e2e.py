"""The whole stack as separate processes, started by `silo up`, driven by the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from devsilo.testing import Stack

SCRIPT = {
    "responses": [
        {"text": "writing", "tool_calls": [
            {"name": "Write", "input": {"path": "out/hello.txt", "content": "hi from the agent\n"}}]},
        {"text": "running", "tool_calls": [
            {"name": "Bash", "input": {"command": "cat out/hello.txt; echo made-in-sandbox > made.txt; id -u"}}]},
        {"text": "reading", "tool_calls": [{"name": "Read", "input": {"path": "made.txt"}},
                                             {"name": "Read", "input": {"path": "/root/.bashrc"}}]},
        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "all done"}}]},
    ]
}


def silo(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def write_script(tmp_path: Path, script: dict[str, object]) -> Path:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    return path


def test_headless_session_runs_tools_in_the_sandbox_and_exits_0(stack: Stack, workspace: Path,
                                                                  tmp_path: Path) -> None:
    script = write_script(tmp_path, SCRIPT)
    r = silo(stack, "run", "--headless", "--llm", "mock", "--script", str(script),
             "--workspace", str(workspace), "--prompt", "say hi", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(len(events)))
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "session_started" and kinds[-1] == "shutdown"
    bash = [e for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Bash"][0]
    assert "hi from the agent" in bash["data"]["content"]
    assert bash["data"]["meta"]["exit_code"] == 0
    assert (workspace / "made.txt").read_text() == "made-in-sandbox\n"
    assert (workspace / "out" / "hello.txt").read_text() == "hi from the agent\n"
    uid_inside = bash["data"]["content"].splitlines()[1]
    assert uid_inside != "0"
    assert events[-1]["data"]["exit_code"] == 0
    reads = [e["data"] for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Read"]
    assert reads[0]["content"] == "made-in-sandbox\n" and not reads[0]["is_error"]
    assert reads[1]["is_error"] and "not_found" in reads[1]["content"]


def test_log_lines_carry_session_and_message_ids(stack: Stack, workspace: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, SCRIPT)
    r = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(workspace),
             "--prompt", "go", "--json")
    assert r.returncode == 0, r.stderr
    sid = json.loads(r.stdout.splitlines()[0])["session_id"]
    lines = [json.loads(x) for x in (stack.state_dir / "logs" / "executor.log").read_text().splitlines()
             if x.startswith("{")]
    started = [x for x in lines if x.get("event") == "sandbox_started" and x.get("session") == sid]
    assert len(started) == 1
    assert started[0]["service"] == "executor" and len(started[0]["mid"]) >= 16


def test_sessions_lease_warm_sandboxes(stack: Stack, workspace: Path, tmp_path: Path) -> None:
    before = stack.metric("executor", "silo_sandbox_leases_total", 'backend="bwrap",kind="warm"')
    script = write_script(tmp_path, SCRIPT)
    r = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(workspace),
             "--prompt", "go")
    assert r.returncode == 0, r.stderr
    assert (workspace / "made.txt").read_text() == "made-in-sandbox\n"
    assert stack.metric("executor", "silo_sandbox_leases_total", 'backend="bwrap",kind="warm"') == before + 1


def test_human_output_shows_the_transcript(stack: Stack, workspace: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, SCRIPT)
    r = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(workspace),
             "--prompt", "say hi")
    assert r.returncode == 0, r.stderr
    assert "> say hi" in r.stdout
    assert "● Bash: cat out/hello.txt" in r.stdout
    assert "session ended (exit code 0): all done" in r.stdout


def test_script_that_never_exits_ends_with_code_3(stack: Stack, workspace: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, {"responses": [{"text": "thinking"}]})
    r = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(workspace),
             "--prompt", "go")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "mock script exhausted" in r.stdout


def test_workspace_on_the_risk_list_is_refused(stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, SCRIPT)
    r = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(stack.state_dir),
             "--prompt", "go")
    assert r.returncode == 1
    assert "risk list" in r.stderr


def test_second_client_gets_backlog_then_live_events(stack: Stack, workspace: Path, tmp_path: Path) -> None:
    script = write_script(tmp_path, {"responses": [
        {"text": "first", "tool_calls": [{"name": "Bash", "input": {"command": "echo one"}}]},
        {"text": "slow", "tool_calls": [{"name": "Bash", "input": {"command": "sleep 3; echo two"}}]},
        {"text": "bye", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]},
    ]})
    first = subprocess.Popen(
        [sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
         "--script", str(script), "--workspace", str(workspace), "--prompt", "go", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout is not None
    lines = []
    while True:  # read until the slow command is running
        line = first.stdout.readline()
        assert line, first.stderr.read() if first.stderr else ""
        lines.append(json.loads(line))
        if lines[-1]["kind"] == "tool_use" and "sleep" in lines[-1]["data"]["input"]["command"]:
            break
    sid = lines[0]["session_id"]
    second = silo(stack, "sessions", "attach", sid, "--json")
    out, _ = first.communicate(timeout=60)
    lines += [json.loads(x) for x in out.splitlines()]
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    attached = [json.loads(x) for x in second.stdout.splitlines()]
    assert attached == lines
    assert [e["seq"] for e in attached] == list(range(len(attached)))
    assert any(e["kind"] == "tool_result" and "two" in e["data"]["content"] for e in attached)


def test_every_service_serves_health_and_metrics(stack: Stack) -> None:
    import urllib.request

    for name, port in stack.metrics_ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            health = json.loads(r.read())
        assert health["ok"] is True and health["role"] == name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'silo_messages_rejected_total{reason="bad_signature"}' in text


def test_supervisor_restarts_a_killed_service(stack: Stack) -> None:
    before = stack.service_pid("harness")
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if stack.healthy("harness") and stack.live_pid("harness") not in (None, before):
            break
        time.sleep(0.2)
    else:
        pytest.fail("harness was not restarted within 30 s:\n" + stack.output())
    assert "harness exited with -9; restarting" in stack.output()
