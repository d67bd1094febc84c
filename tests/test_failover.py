"""Failover: kill -9 the harness that runs a session; another one resumes it from the journal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from devsilo.harness._failover import UNKNOWN_RESULT
from devsilo.protocol import Ack, RemoteError, Role, SessionInput, subjects
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack

SCRIPT = {"responses": [
    {"text": "writing", "tool_calls": [{"name": "Write", "input": {"path": "a.txt", "content": "before\n"}}]},
    {"text": "waiting", "tool_calls": [{"name": "Bash", "input": {"command": "sleep 4; echo slept"}},
                                       {"name": "Bash", "input": {"command": "cat a.txt; echo after >> a.txt"}}]},
    {"text": "checking", "tool_calls": [{"name": "Read", "input": {"path": "a.txt"}}]},
    {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "survived"}}]},
]}


@pytest.fixture(scope="module")
def two_harnesses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("failover") / "state", services={
        "harness": {"role": "harness", "options": {"takeover_after_s": 2.0}},
        "harness2": {"role": "harness", "metrics_port": 0, "options": {"takeover_after_s": 2.0}}})
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def owner_of(stack: Stack, sid: str) -> str:
    for service in ("harness", "harness2"):
        for line in (stack.state_dir / "logs" / f"{service}.log").read_text().splitlines():
            if '"session_started"' in line and sid in line:
                return service
    raise AssertionError(f"no harness logged starting {sid}")


def run_killing_owner(stack: Stack, tmp_path: Path, script: dict[str, Any],
                      kill_when: Callable[[list[dict[str, Any]]], bool],
                      ) -> tuple[list[dict[str, Any]], str, int, str]:
    """Run a headless session; SIGKILL the harness owning it once ``kill_when(events so far)``.

    Returns the events, the killed harness, the CLI's exit code and its stderr.
    """
    (tmp_path / "script.json").write_text(json.dumps(script))
    ws = tmp_path / "ws"
    ws.mkdir()
    events: list[dict[str, Any]] = []
    killed = None
    with subprocess.Popen(
            [sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
             "--llm", "mock", "--script", str(tmp_path / "script.json"), "--workspace", str(ws), "--prompt", "go",
             "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            for line in proc.stdout:
                events.append(json.loads(line))
                if killed is None and kill_when(events):
                    killed = owner_of(stack, events[-1]["session_id"])
                    os.kill(stack.live_pid(killed) or 0, signal.SIGKILL)
            code = proc.wait(timeout=120)
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert killed is not None, events
    return events, killed, code, err


def test_a_session_survives_kill_9_of_its_harness_with_one_continuous_event_stream(
        two_harnesses: Stack, tmp_path: Path) -> None:
    stack = two_harnesses
    ws = tmp_path / "ws"

    def at_the_sleep(events: list[dict[str, Any]]) -> bool:
        event = events[-1]
        return event["kind"] == "tool_use" and event["data"]["input"].get("command", "").startswith("sleep")

    events, killed, code, err = run_killing_owner(stack, tmp_path, SCRIPT, at_the_sleep)
    assert code == 0, err
    # one stream: no gap, no duplicate, ending with the agent's own Exit
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["exit_code"] == 0
    assert events[-1]["data"]["reason"] == "survived"
    results = {e["data"]["id"]: e["data"] for e in events if e["kind"] == "tool_result"}
    uses = [e["data"] for e in events if e["kind"] == "tool_use"]
    assert [u["name"] for u in uses] == ["Write", "Bash", "Bash", "Read", "Exit"]
    # the call that ran while its harness died has an unknown result; the rest of the turn ran
    assert results[uses[1]["id"]]["content"] == UNKNOWN_RESULT and results[uses[1]["id"]]["is_error"]
    assert results[uses[2]["id"]]["content"].startswith("before\n")
    assert results[uses[3]["id"]]["content"] == "before\nafter\n"
    assert (ws / "a.txt").read_text() == "before\nafter\n"
    deadline = time.monotonic() + 30
    while not stack.healthy(killed) and time.monotonic() < deadline:  # `silo up` restarts it
        time.sleep(0.2)
    assert sum(stack.metric(h, "silo_session_takeovers_total") for h in ("harness", "harness2")) == 1
    # what was spent before the kill still counts: the totals after it include it
    costs = [e["data"] for e in events if e["kind"] == "cost"]
    assert costs[-1]["totals"]["total"]["input_tokens"] == sum(c["input_tokens"] for c in costs)
    # the journal says who resumed it, and the resumed model request carried the earlier results
    sid = events[0]["session_id"]
    out = tmp_path / "journal.jsonl"
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "journal",
                        "export", sid, "-o", str(out)], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    records = [x for x in records if x["kind"] != "network"]
    assert [x["n"] for x in records] == list(range(len(records)))
    resumed = [i for i, x in enumerate(records) if x["kind"] == "lifecycle" and x["data"]["what"] == "resumed"]
    assert len(resumed) == 1
    assert records[resumed[0]]["data"]["responses"] == 2
    after = [x["data"] for x in records[resumed[0]:] if x["kind"] == "llm_request"]
    assert after[0]["from"] == 0
    tool_messages = [m for m in after[0]["messages"] if m["role"] == "tool"]
    assert tool_messages[0]["content"].startswith("wrote 7 bytes to a.txt")
    assert tool_messages[1]["content"] == UNKNOWN_RESULT
    assert tool_messages[2]["content"].startswith("before\n")
    assert [m["role"] for m in after[0]["messages"]][:2] == ["system", "user"]


async def ask_input(stack: Stack, sid: str) -> None:
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "gateway", f"tls://127.0.0.1:{stack.nats_port}")
    try:
        bus = Bus(nc, state.identity("gateway"), state.roster(), ServiceMetrics("gateway", "gateway"),
                  log=structlog.get_logger())
        await bus.request(subjects.session_input(sid), SessionInput(kind="prompt", text="anyone?"), Ack,
                          from_role=Role.HARNESS, sid=sid, timeout=1.5)
    finally:
        await nc.close()


def test_no_harness_answers_input_for_a_session_it_does_not_run(two_harnesses: Stack) -> None:
    with pytest.raises(RemoteError) as caught:
        asyncio.run(ask_input(two_harnesses, "nobodysession"))
    assert caught.value.code == "timeout"  # both replicas heard it; neither answered


def agent_step(agent: str, text: str = "", *calls: tuple[str, dict[str, object]]) -> dict[str, object]:
    return {"agent": agent, "text": text, "tool_calls": [{"name": n, "input": i} for n, i in calls]}


SUBAGENT_SCRIPT = {"responses": [
    agent_step("main", "", ("Agent", {"name": "quick", "prompt": "answer at once"}),
               ("Agent", {"name": "slow", "prompt": "take your time"})),
    agent_step("main", "", ("AwaitAgent", {"agent": "a2"})),
    agent_step("main", "", ("AwaitAgent", {"agent": "a1"}), ("Agent", {"name": "late", "prompt": "one more"}),
               ("AwaitAgent", {"agent": "a3"})),
    agent_step("main", "", ("Exit", {"message": "all collected"})),
    agent_step("a1", "quick answer"),
    agent_step("a2", "", ("Bash", {"command": "sleep 5; echo slept >> slow.txt"})),
    agent_step("a2", "", ("Bash", {"command": "echo resumed >> slow.txt; cat slow.txt"})),
    agent_step("a2", "slow answer"),
    agent_step("a3", "late answer"),
]}


def test_subagents_survive_kill_9_of_their_harness_and_their_answers_reach_the_parent(
        two_harnesses: Stack, tmp_path: Path) -> None:
    """Killed while a1 has answered (not yet collected), a2 runs a command and main waits for a2:
    the harness that takes over resumes a2, main's AwaitAgent gets both answers, a3 is new."""
    stack = two_harnesses
    takeovers = {h: stack.metric(h, "silo_session_takeovers_total") for h in ("harness", "harness2")}

    def mid_way(events: list[dict[str, Any]]) -> bool:
        seen = {(e["agent"], e["kind"], e["data"].get("name")) for e in events}
        return {("a1", "agent_completed", None), ("a2", "tool_use", "Bash"),
                ("main", "tool_use", "AwaitAgent")} <= seen

    events, killed, code, err = run_killing_owner(stack, tmp_path, SUBAGENT_SCRIPT, mid_way)
    assert code == 0, (err, events)
    assert [e["seq"] for e in events] == list(range(len(events)))  # one stream, no gap, no duplicate
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["reason"] == "all collected"
    assert [e["data"]["id"] for e in events if e["kind"] == "agent_spawned"] == ["a1", "a2", "a3"]
    ended = [(e["data"]["id"], e["data"]["status"], e["data"]["text"]) for e in events
             if e["kind"] == "agent_completed"]
    assert sorted(ended) == [("a1", "done", "quick answer"), ("a2", "done", "slow answer"),
                             ("a3", "done", "late answer")]
    # a2's command ran as its harness died: its result is unknown; a2 went on with its next call
    a2 = [e["data"] for e in events if e["agent"] == "a2" and e["kind"] in ("tool_use", "tool_result")]
    assert [(x["name"], "input" in x) for x in a2] == [("Bash", True), ("Bash", False), ("Bash", True),
                                                       ("Bash", False)]
    assert a2[1]["content"] == UNKNOWN_RESULT and a2[1]["is_error"]
    assert "resumed" in a2[3]["content"] and not a2[3]["is_error"]
    # main's AwaitAgent on a2, cut short, was waited again (shown once), then it collected the rest
    waits = [e["data"] for e in events if e["agent"] == "main" and e["kind"] == "tool_use"
             and e["data"]["name"] == "AwaitAgent"]
    assert [w["input"] for w in waits] == [{"agent": "a2"}, {"agent": "a1"}, {"agent": "a3"}]
    answers = {e["data"]["id"]: e["data"] for e in events if e["agent"] == "main" and e["kind"] == "tool_result"}
    assert [answers[w["id"]]["content"] for w in waits] == ["slow answer", "quick answer", "late answer"]
    assert not any(answers[w["id"]]["is_error"] for w in waits)
    deadline = time.monotonic() + 30
    while not stack.healthy(killed) and time.monotonic() < deadline:  # `silo up` restarts it
        time.sleep(0.2)
    takeovers[killed] = 0  # its counters restarted with it
    assert sum(stack.metric(h, "silo_session_takeovers_total") for h in takeovers) == sum(takeovers.values()) + 1
