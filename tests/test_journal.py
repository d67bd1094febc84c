"""The session journal: every record kind, export through the gateway, large records, no secrets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from devsilo.harness._journal import MemorySink, SessionJournal, split_text
from devsilo.harness._replay import ReplayScript, replay
from devsilo.protocol import JournalExportPage, JournalExportRequest, RemoteError, Role, subjects
from devsilo.runtime import Bus
from devsilo.runtime._metrics import ServiceMetrics
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack

API_KEY = "sk-ant-planted-0123456789abcdef0123456789abcdef"
EGRESS_SECRET = "egress-planted-secret-fedcba9876543210"
CRED_HOST = "api.journal-test.invalid"

SCRIPT = {"responses": [
    {"text": "writing", "tool_calls": [{"name": "Write", "input": {"path": "a.txt", "content": "hello\n"}}]},
    {"text": "looking around", "tool_calls": [
        {"name": "Bash", "input": {"command": "cat a.txt; env | grep -c -i -e ant -e secret; "
                                              f"curl -sS --max-time 5 https://{CRED_HOST}/ 2>&1 | head -c 300"}},
        {"name": "Nope", "input": {}}]},
    {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "journaled"}}]},
]}


@pytest.fixture(scope="module")
def jstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("jstack")
    secret_file = root / "egress-secret"
    secret_file.write_text(EGRESS_SECRET + "\n")
    secret_file.chmod(0o600)
    stack = Stack(root / "state", services={"egress": {"options": {"credentials": {"api": {
        "file": str(secret_file), "hosts": [CRED_HOST], "header": "Authorization: Bearer {secret}",
        "users": ["local"]}}}}})
    old = os.environ.get("ANTHROPIC_API_KEY")
    os.environ["ANTHROPIC_API_KEY"] = API_KEY  # the harness (a child of `silo up`) inherits it
    try:
        stack.start()
    finally:
        if old is None:
            os.environ.pop("ANTHROPIC_API_KEY", None)
        else:
            os.environ["ANTHROPIC_API_KEY"] = old
    try:
        yield stack
    finally:
        stack.stop()


def silo(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def run_session(stack: Stack, tmp_path: Path, script: dict[str, Any], *extra: str) -> list[dict[str, Any]]:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    r = silo(stack, "run", "--headless", "--llm", "mock", "--script", str(path), "--workspace", str(ws),
             "--prompt", "please work", "--json", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def export(stack: Stack, sid: str, out: Path) -> list[dict[str, Any]]:
    r = silo(stack, "journal", "export", sid, "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


async def stream_bytes(stack: Stack) -> list[bytes]:
    nc = await connect_nats(StateDir(stack.state_dir), "harness", f"tls://127.0.0.1:{stack.nats_port}")
    found = []
    try:
        js = nc.jetstream()
        for stream in (subjects.EVENTS_STREAM, subjects.JOURNAL_STREAM):
            info = await js.stream_info(stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                found.append((await js.get_msg(stream, seq)).data or b"")
    finally:
        await nc.close()
    return found


def test_a_session_journals_every_kind_in_order_and_exports_as_jsonl(jstack: Stack, tmp_path: Path) -> None:
    events = run_session(jstack, tmp_path, SCRIPT, "--allow-domain", CRED_HOST, "--credential", "api")
    sid = events[0]["session_id"]
    lines = export(jstack, sid, tmp_path / "journal.jsonl")
    records = [x for x in lines if x["kind"] != "network"]
    assert [x["n"] for x in records] == list(range(len(records)))
    assert records[0]["kind"] == "meta"
    meta = records[0]["data"]
    assert meta["grant"]["session_id"] == sid and meta["llm"]["backend"] == "mock"
    assert meta["executor"] == events[0]["data"]["executor"] and meta["headless"] is True
    kinds = [x["kind"] for x in records]
    assert {"lifecycle", "client_input", "llm_request", "llm_response", "tool_exec", "event"} <= set(kinds)
    # every event, in seq order, exactly as clients saw it
    journaled = [x["data"] for x in records if x["kind"] == "event"]
    assert [e["seq"] for e in journaled] == [e["seq"] for e in events]
    assert [e["kind"] for e in journaled] == [e["kind"] for e in events]
    assert records[1]["data"] == {"what": "started", "harness": "harness"}
    prompt = [x["data"] for x in records if x["kind"] == "client_input"]
    assert prompt == [{"kind": "prompt", "client": "start", "text": "please work", "question_id": None}]
    requests = [x["data"] for x in records if x["kind"] == "llm_request"]
    responses = [x["data"] for x in records if x["kind"] == "llm_response"]
    assert len(requests) == len(responses) == 3
    assert requests[0]["from"] == 0 and requests[0]["messages"][-1] == {"role": "user", "content": "please work"}
    assert "Bash" in requests[0]["tools"] and "Exit" in requests[0]["tools"]
    # each later request journals only what is new: the answer and the tool results
    assert requests[1]["from"] == requests[0]["count"]
    assert [m["role"] for m in requests[1]["messages"]] == ["assistant", "tool"]
    assert responses[1]["tool_calls"][0]["name"] == "Bash" and responses[1]["usage"]["input_tokens"] > 0
    execs = [x["data"] for x in records if x["kind"] == "tool_exec"]
    assert [(e["phase"], e["name"]) for e in execs] == [
        ("call", "Write"), ("result", "Write"), ("call", "Bash"), ("result", "Bash"),
        ("call", "Nope"), ("result", "Nope"), ("call", "Exit"), ("result", "Exit")]
    assert {e["owner"] for e in execs if e["name"] in ("Write", "Bash")} == {meta["executor"]}
    assert {e["owner"] for e in execs if e["name"] in ("Nope", "Exit")} == {"harness"}
    assert execs[3]["content"].startswith("hello\n0\n")  # no key or secret in the sandbox's environment
    assert execs[5]["is_error"] and "unknown tool" in execs[5]["content"]
    ended = [x["data"] for x in records if x["kind"] == "lifecycle" and x["data"]["what"] == "ended"]
    assert ended == [{"what": "ended", "exit_code": 0, "reason": "journaled"}]
    assert jstack.metric("harness", "silo_journal_messages_total", 'kind="meta"') >= 1
    network = [x["data"] for x in lines if x["kind"] == "network"]
    assert network and network[0]["host"] == CRED_HOST and "session_id" not in network[0]
    # no planted secret anywhere: the export, every stored message, every log
    blobs = [(tmp_path / "journal.jsonl").read_bytes(), *asyncio.run(stream_bytes(jstack))]
    blobs += [p.read_bytes() for p in (jstack.state_dir / "logs").glob("*.log")]
    for blob in blobs:
        assert API_KEY.encode() not in blob and EGRESS_SECRET.encode() not in blob


def test_a_record_larger_than_a_message_is_split_and_exported_whole(jstack: Stack, tmp_path: Path) -> None:
    # two outputs of 600 kB: the next model request carries both, more than one message holds
    make = "python3 -c \"import sys; [print(f'{sys.argv[1]} line {i} ' + 'x' * 90) for i in range(6000)]\" "
    script = {"responses": [
        {"text": "two big outputs", "tool_calls": [
            {"name": "Bash", "input": {"command": make + "one"}},
            {"name": "Bash", "input": {"command": make + "two"}}]},
        {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]}
    events = run_session(jstack, tmp_path, script)
    sid = events[0]["session_id"]
    lines = export(jstack, sid, tmp_path / "big.jsonl")
    request = [x for x in lines if x["kind"] == "llm_request"][1]
    outputs = [m["content"] for m in request["data"]["messages"] if m["role"] == "tool"]
    for name, out in zip(("one", "two"), outputs, strict=True):
        assert out.splitlines()[:6000] == [f"{name} line {i} " + "x" * 90 for i in range(6000)]
    assert not any(x.get("incomplete") for x in lines)
    records = [x for x in lines if x["kind"] != "network"]
    assert [x["n"] for x in records] == list(range(len(records)))
    # in the stream it took several messages, none over the limit
    parts = []
    for blob in asyncio.run(stream_bytes(jstack)):
        body = json.loads(blob[64:])["body"]
        if body.get("session_id") == sid and body.get("n") == request["n"] and "kind" in body:
            parts.append(body)
    assert len(parts) >= 2 and {p["parts"] for p in parts} == {len(parts)}
    assert all(len(json.dumps(p)) < 1024 * 1024 for p in parts)


def test_export_of_an_unknown_session_is_refused_with_a_clear_error(jstack: Stack, tmp_path: Path) -> None:
    r = silo(jstack, "journal", "export", "nosuchsession", "-o", str(tmp_path / "x.jsonl"))
    assert r.returncode == 1
    assert "no journal for session nosuchsession" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


async def test_the_journal_scrubs_the_harness_keys_and_splits_without_loss() -> None:
    sink = MemorySink()
    journal = SessionJournal(sink, "s1", clock=lambda: 1.0, max_bytes=8192, secrets=[API_KEY])
    await journal.client_input("prompt", "cli", f"my key is {API_KEY}, keep it")
    await journal.write("tool_exec", {"content": "é\"\\" * 5000})
    assert sink.records[0].data["text"] == "my key is [redacted], keep it"
    parts = sink.records[1:]
    assert len(parts) > 1 and all(p.n == 1 and p.parts == len(parts) for p in parts)
    assert json.loads("".join(p.fragment or "" for p in parts)) == {"content": "é\"\\" * 5000}
    assert all(len(p.model_dump_json().encode()) <= 8192 for p in parts)
    assert "".join(split_text("abc" * 100, 40)) == "abc" * 100


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", *args], check=False, capture_output=True,
                          text=True, timeout=60)


def test_a_journal_replays_deterministically_and_a_tampered_script_fails_with_exit_4(
        jstack: Stack, tmp_path: Path) -> None:
    events = run_session(jstack, tmp_path, SCRIPT, "--allow-domain", CRED_HOST)
    journal = tmp_path / "recorded.jsonl"
    export(jstack, events[0]["session_id"], journal)
    script = tmp_path / "replay.json"
    r = cli("replay-test", str(journal), "-o", str(script))
    assert r.returncode == 0, r.stderr
    assert "3 model steps, 2 tool results" in r.stdout  # Write and Bash ran in the sandbox
    r = cli("run", "--llm", "mock", "--sandbox", "mock", "--mock-egress", "--script", str(script),
            "--deterministic", "--json", "--journal", str(tmp_path / "replay1.jsonl"))
    assert r.returncode == 0, r.stderr
    # a second run (here in-process) journals the very same bytes
    again = asyncio.run(replay(ReplayScript.model_validate_json(script.read_text())))
    assert again.code == 0, again.summary
    assert again.journal.encode() == (tmp_path / "replay1.jsonl").read_bytes()
    replayed = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["kind"] for e in replayed] == [e["kind"] for e in events]
    assert [e["data"] for e in replayed if e["kind"] == "tool_result"] == \
        [e["data"] for e in events if e["kind"] == "tool_result"]
    lines = [json.loads(x) for x in (tmp_path / "replay1.jsonl").read_text().splitlines()]
    assert [x["data"]["host"] for x in lines if x["kind"] == "network"] == \
        [x["data"]["host"] for x in json.loads("[" + ",".join(journal.read_text().splitlines()) + "]")
         if x["kind"] == "network"]
    # the model now says something else: the next request no longer matches the journal
    data = json.loads(script.read_text())
    data["steps"][0]["response"]["tool_calls"][0]["input"]["content"] = "tampered\n"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    r = cli("run", "--llm", "mock", "--sandbox", "mock", "--mock-egress", "--script", str(tampered),
            "--deterministic")
    assert r.returncode == 4, r.stderr
    assert "first mismatch: tool call 1: Write" in r.stderr and "tampered" in r.stderr
    assert "unconsumed model responses: 2" in r.stderr and "unconsumed tool results: 2" in r.stderr


async def ask_export(stack: Stack, sid: str, user: str, operator: bool) -> JournalExportPage:
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "gateway", f"tls://127.0.0.1:{stack.nats_port}")
    try:
        bus = Bus(nc, state.identity("gateway"), state.roster(), ServiceMetrics("gateway", "gateway"),
                  log=structlog.get_logger())
        return await bus.request(subjects.HARNESS_JOURNAL_EXPORT,
                                 JournalExportRequest(session_id=sid, user=user, operator=operator,
                                                      max_bytes=1024),
                                 JournalExportPage, from_role=Role.HARNESS, sid=sid, timeout=10)
    finally:
        await nc.close()


def test_a_stop_is_journaled_as_client_input_and_only_the_sessions_user_may_export(
        jstack: Stack, tmp_path: Path) -> None:
    script = tmp_path / "slow.json"
    script.write_text(json.dumps({"responses": [
        {"text": "", "tool_calls": [{"name": "Bash", "input": {"command": "sleep 60"}}]}]}))
    ws = tmp_path / "ws"
    ws.mkdir()
    with subprocess.Popen([sys.executable, "-m", "devsilo.cli", "--state-dir", str(jstack.state_dir), "run",
                           "--headless", "--llm", "mock", "--script", str(script), "--workspace", str(ws),
                           "--prompt", "wait", "--json"], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["kind"] == "tool_use":
                sid = event["session_id"]
                assert silo(jstack, "sessions", "stop", sid).returncode == 0
        assert proc.wait(timeout=60) == 0
    lines = export(jstack, sid, tmp_path / "stopped.jsonl")
    inputs = [x["data"] for x in lines if x["kind"] == "client_input"]
    assert inputs[-1] == {"kind": "stop", "client": "silo-stop", "text": "", "question_id": None}
    ended = [x["data"] for x in lines if x["kind"] == "lifecycle" and x["data"]["what"] == "ended"]
    assert ended == [{"what": "ended", "exit_code": 0, "reason": "stopped by silo-stop"}]
    # the harness itself checks whose session it is: another user gets nothing, an operator gets it
    with pytest.raises(RemoteError, match=f"session {sid} is not mallory's"):
        asyncio.run(ask_export(jstack, sid, "mallory", operator=False))
    page = asyncio.run(ask_export(jstack, sid, "local", operator=False))
    assert page.text.startswith('{"agent":null,"data":{"access"') and not page.done
    assert len(page.text.encode()) <= 1024
