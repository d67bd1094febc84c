"""The harness's agent loop through a whole stack: subagents, caps, interrupts, questions, streamed
output, files, and malformed model output. Mock model (scripted), real bwrap sandboxes, real
gateway WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from devsilo.cli._client import GatewayClient
from devsilo.cli._sessions import local_gateway
from devsilo.executor._tools import SHARE_MAX, ToolOptions, run_tool
from devsilo.protocol import Ack, Signer, ToolCall, ToolCancel, ToolOutput, ToolResult, subjects
from devsilo.protocol.client import (
    AnswerQuestion,
    Attach,
    CreateSession,
    ErrorFrame,
    EventFrame,
    Interrupt,
    Prompt,
    SessionCreated,
    Shutdown,
)
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._internet import ZONE, TestInternet

WAIT = 60.0  # how long a test waits for an event before it fails (never a measured bound)
SEARCH_HOST = f"www.{ZONE}"

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def internet() -> AsyncIterator[TestInternet]:
    """The test internet (its servers run on the module's event loop)."""
    async with TestInternet() as inet:
        yield inet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, internet: TestInternet) -> Iterator[Stack]:
    """One stack for the module: its egress reaches the test internet, and its executor's WebSearch
    endpoint is a site there (which sessions reach only when they allow its domain)."""
    s = Stack(tmp_path_factory.mktemp("stack") / "state", services={
        "executor": {"options": {"search_url": f"https://{SEARCH_HOST}/search?q={{query}}"}},
        "egress": {"options": {"nameservers": [internet.dns_addr], "ca_bundles": [str(internet.ca_file)]}},
    })
    s.start()
    try:
        yield s
    finally:
        s.stop()


class Client:
    """A gateway client that keeps every event of the session it follows, in order."""

    def __init__(self, gw: GatewayClient) -> None:
        self.gw = gw
        self.events: list[EventFrame] = []
        self.errors: list[ErrorFrame] = []
        self.sid = ""

    async def create(self, workspace: Path, responses: list[dict[str, Any]], *, headless: bool = False,
                     prompt: str | None = None, allow_domains: tuple[str, ...] = ()) -> str:
        await self.gw.send(CreateSession(workspace=str(workspace), llm="mock", headless=headless, prompt=prompt,
                                         script=json.dumps({"responses": responses}), allow_domains=allow_domains))
        while True:
            frame = await asyncio.wait_for(self.gw.receive(), WAIT)
            assert not isinstance(frame, ErrorFrame), f"create failed: {frame}"
            if isinstance(frame, SessionCreated):
                break
        await self.attach(frame.session_id)
        return frame.session_id

    async def attach(self, sid: str) -> None:
        self.sid = sid
        await self.gw.send(Attach(session_id=sid))

    async def until(self, pred: Callable[[EventFrame], bool]) -> EventFrame:
        """Read frames until an event matches ``pred``; return it."""
        while True:
            frame = await asyncio.wait_for(self.gw.receive(), WAIT)
            if isinstance(frame, ErrorFrame):
                self.errors.append(frame)
            elif isinstance(frame, EventFrame) and frame.session_id == self.sid:
                self.events.append(frame)
                if pred(frame):
                    return frame

    async def until_kind(self, kind: str, **data: Any) -> EventFrame:
        return await self.until(lambda e: e.kind == kind and all(e.data.get(k) == v for k, v in data.items()))

    async def error(self) -> ErrorFrame:
        """The next error frame (events read meanwhile are kept)."""
        while not self.errors:
            frame = await asyncio.wait_for(self.gw.receive(), WAIT)
            if isinstance(frame, ErrorFrame):
                self.errors.append(frame)
            elif isinstance(frame, EventFrame) and frame.session_id == self.sid:
                self.events.append(frame)
        return self.errors.pop(0)

    def of(self, kind: str) -> list[EventFrame]:
        return [e for e in self.events if e.kind == kind]

    def result(self, name: str, agent: str = "main") -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.kind == "tool_result" and e.agent == agent
                and e.data["name"] == name]


@pytest_asyncio.fixture(loop_scope="module")
async def client(stack: Stack) -> AsyncIterator[Client]:
    c = await connect(stack, "tester")
    try:
        yield c
    finally:
        await c.gw.close()


async def connect(stack: Stack, name: str) -> Client:
    target = local_gateway(StateDir(stack.state_dir))
    gw = GatewayClient(target.url, target.fingerprint, client_name=name)
    await gw.connect(target.token)
    return Client(gw)


def call(tool: str, **args: Any) -> dict[str, Any]:
    return {"name": tool, "input": args}


def step(agent: str, text: str = "", *calls: dict[str, Any]) -> dict[str, Any]:
    return {"agent": agent, "text": text, "tool_calls": list(calls)}


@pytest.mark.parametrize("first", ["a1", "a2"])
async def test_await_agent_without_an_id_returns_whichever_subagent_finishes_first(
        client: Client, workspace: Path, first: str) -> None:
    second = "a2" if first == "a1" else "a1"
    # The slow one waits for the fast one's flag file, so the order is fixed without timing.
    wait = "while [ ! -e first.flag ]; do sleep 0.02; done; echo slow-out"
    script = [
        step("main", "fan out", call("Agent", prompt="job one", name="one"),
             call("Agent", prompt="job two", name="two"), call("AwaitAgent"), call("AwaitAgent"),
             call("AwaitAgent", agent="a9"), call("AwaitAgent")),
        step(first, "", call("Bash", command="echo fast-out; touch first.flag")),
        step(first, f"{first} answers first"),
        step(second, "", call("Bash", command=wait)),
        step(second, f"{second} answers second"),
        step("main", "", call("Exit", message="collected")),
    ]
    await client.create(workspace, script, headless=True, prompt="go")
    end = await client.until_kind("shutdown")
    assert end.data["exit_code"] == 0, client.events
    awaits = client.result("AwaitAgent")
    assert [a["content"] for a in awaits[:2]] == [f"{first} answers first", f"{second} answers second"]
    assert [a["meta"]["agent"] for a in awaits[:2]] == [first, second]
    assert awaits[2]["is_error"] and "a9 is not a subagent of main" in awaits[2]["content"]
    assert awaits[3]["is_error"] and "no subagent left" in awaits[3]["content"]
    spawned = [e.data for e in client.of("agent_spawned")]
    assert spawned == [{"id": "a1", "name": "one", "parent": "main", "prompt": "job one"},
                       {"id": "a2", "name": "two", "parent": "main", "prompt": "job two"}]
    assert all(e.agent == "main" for e in client.of("agent_spawned"))
    done = {e.agent: e.data for e in client.of("agent_completed")}
    assert done == {first: {"id": first, "status": "done", "text": f"{first} answers first"},
                    second: {"id": second, "status": "done", "text": f"{second} answers second"}}
    # Each subagent's own events carry its id.
    assert client.result("Bash", first)[0]["content"].startswith("fast-out")
    assert client.result("Bash", second)[0]["content"].startswith("slow-out")
    outputs = {e.agent: e.data["data"] for e in client.of("tool_output")}
    assert outputs[first].startswith("fast-out") and outputs[second].startswith("slow-out")
    # With a1 the slow one, finishing at all shows the two ran at once (a1 waited for a2's flag).


async def test_subagents_nest_at_most_three_deep(client: Client, workspace: Path) -> None:
    script = [
        step("main", "", call("Agent", prompt="level 1"), call("AwaitAgent", agent="a1")),
        step("a1", "", call("Agent", prompt="level 2"), call("AwaitAgent", agent="a2")),
        step("a2", "", call("Agent", prompt="level 3"), call("AwaitAgent", agent="a3")),
        step("a3", "", call("Agent", prompt="level 4")),
        step("a3", "a3 done"),
        step("a2", "a2 done"),
        step("a1", "a1 done"),
        step("main", "", call("Exit", message="deep")),
    ]
    await client.create(workspace, script, headless=True, prompt="go")
    await client.until_kind("shutdown")
    refused = client.result("Agent", "a3")
    assert len(refused) == 1 and refused[0]["is_error"]
    assert "nest at most 3 deep" in refused[0]["content"]
    assert [e.data["id"] for e in client.of("agent_spawned")] == ["a1", "a2", "a3"]
    assert client.result("AwaitAgent")[0]["content"] == "a1 done"


async def test_a_subagent_that_ends_without_collecting_its_own_subagent_has_it_cancelled(
        client: Client, workspace: Path) -> None:
    script = [
        step("main", "", call("Agent", prompt="delegate"), call("AwaitAgent", agent="a1")),
        step("a1", "", call("Agent", prompt="slow grandchild")),
        step("a2", "", call("Bash", command="sleep 30")),
        step("a1", "a1 is done without waiting"),
        step("main", "", call("Exit", message="ok")),
    ]
    await client.create(workspace, script, headless=True, prompt="go")
    await client.until_kind("shutdown")
    completed = [(e.data["id"], e.data["status"]) for e in client.of("agent_completed")]
    assert completed == [("a2", "cancelled"), ("a1", "done")]
    assert client.result("AwaitAgent")[0]["content"] == "a1 is done without waiting"
    assert [e.data["parent"] for e in client.of("agent_spawned")] == ["main", "a1"]


async def test_a_ninth_running_subagent_is_refused_and_unawaited_ones_are_cancelled_at_turn_end(
        client: Client, workspace: Path) -> None:
    children = [f"a{i}" for i in range(1, 9)]
    script = [step("main", "nine", *[call("Agent", prompt=f"job {i}", name=f"c{i}") for i in range(1, 10)])]
    script += [step(a, "", call("Bash", command=f"sleep 30; touch late-{a}")) for a in children]
    script += [step("main", "leaving them running")]
    count = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 30'"
    script += [step("main", "", call("Bash", command=count)), step("main", "counted")]
    await client.create(workspace, script, prompt="go")
    await client.until_kind("turn_complete")
    agents = client.result("Agent")
    assert [r["is_error"] for r in agents] == [False] * 8 + [True]
    assert "8 subagents already run" in agents[8]["content"]
    completed = {e.data["id"]: e.data["status"] for e in client.of("agent_completed")}
    assert completed == dict.fromkeys(children, "cancelled")
    # Their commands are gone from the sandbox too.
    await client.gw.send(Prompt(session_id=client.sid, text="count sleepers"))
    await client.until(lambda e: e.kind == "turn_complete" and len(client.of("turn_complete")) == 2)
    assert client.result("Bash")[-1]["content"].splitlines()[0] == "0"
    await client.gw.send(Shutdown(session_id=client.sid))
    await client.until_kind("shutdown")


async def test_an_interrupt_kills_running_commands_and_cancels_subagents_and_questions(
        client: Client, workspace: Path) -> None:
    script = [
        step("main", "", call("Bash", command="sleep 2; touch late-main")),
        step("main", "", call("Agent", prompt="sleepy"),
             call("AskUserQuestion", question="Go on?", options=[{"label": "yes"}, {"label": "no"}])),
        step("a1", "", call("Bash", command="sleep 2; touch late-child")),
        step("main", "", call("Bash", command="sleep 3; ls")),
        step("main", "checked"),
    ]
    await client.create(workspace, script, prompt="first")
    await client.until(lambda e: e.kind == "tool_use" and e.data["name"] == "Bash")
    await client.gw.send(Interrupt(session_id=client.sid))
    await client.until_kind("interrupted")
    interrupted = client.result("Bash")
    assert interrupted == [{"id": interrupted[0]["id"], "name": "Bash", "content": "interrupted",
                            "is_error": True, "meta": {"cancelled": True}}]

    await client.gw.send(Prompt(session_id=client.sid, text="second"))
    # Main asks while its subagent runs a command (in either order).
    await client.until(lambda e: bool(client.of("question_asked"))
                       and any(x.kind == "tool_use" and x.agent == "a1" for x in client.events))
    asked = client.of("question_asked")[0]
    await client.gw.send(Interrupt(session_id=client.sid))
    stopped = await client.until_kind("interrupted")
    answered = client.of("question_answered")
    assert [a.data for a in answered] == [{"id": asked.data["id"], "cancelled": True}]
    cancelled = client.of("agent_completed")
    assert [c.data["status"] for c in cancelled] == ["cancelled"]
    assert answered[0].seq < stopped.seq and cancelled[0].seq < stopped.seq

    # A late answer to the cancelled question is refused.
    await client.gw.send(AnswerQuestion(session_id=client.sid, question_id=asked.data["id"], selected=("yes",)))
    late = await client.error()
    assert late.code == "question_closed" and "cancelled" in late.message

    await client.gw.send(Prompt(session_id=client.sid, text="third"))
    await client.until_kind("turn_complete")
    listing = client.result("Bash")[-1]
    assert listing["meta"]["exit_code"] == 0
    assert "late-" not in listing["content"]
    assert not (workspace / "late-main").exists() and not (workspace / "late-child").exists()
    prompts = [e.data["text"] for e in client.of("user_prompt")]
    assert prompts == ["first", "second", "third"]
    await client.gw.send(Shutdown(session_id=client.sid))
    await client.until_kind("shutdown")


async def test_malformed_model_output_gets_error_results_and_the_session_goes_on(
        client: Client, workspace: Path) -> None:
    script = [
        {"text": "bad", "tool_calls": [
            {"name": "Teleport", "input": {"to": "mars"}},
            {"name": "Bash", "arguments": "{\"command\": \"echo unterminated"},
            {"name": "Bash", "arguments": "[1, 2]"},
            {"name": "AskUserQuestion", "input": {"question": "Which?", "options": [{"label": "x"}]}},
            {"name": "Bash", "input": {"command": "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo tail-line"}},
        ]},
        {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "survived"}}]},
    ]
    await client.create(workspace, script, headless=True, prompt="go")
    end = await client.until_kind("shutdown")
    assert end.data == {"exit_code": 0, "reason": "survived"}
    results = [e.data for e in client.of("tool_result")]
    assert results[0]["is_error"] and "unknown tool 'Teleport'" in results[0]["content"]
    assert results[1]["is_error"] and "not a JSON object" in results[1]["content"]
    assert results[2]["is_error"] and "not a JSON object" in results[2]["content"]
    # Headless: a question is answered with a reminder, not left waiting.
    assert not results[3]["is_error"] and "running headless" in results[3]["content"]
    assert not client.of("question_asked")
    big = results[4]
    assert big["meta"]["truncated"] and big["meta"]["cut_chars"] > 0
    assert len(json.dumps(big["content"]).encode()) <= 768 * 1024
    streamed = [e.data for e in client.of("tool_output") if e.data["id"] == big["id"]]
    assert streamed and all(len(s["data"]) <= 16 * 1024 for s in streamed)
    assert sum(len(s["data"]) for s in streamed) <= 1024 * 1024 + 1024  # the helper's cap


async def test_streamed_output_only_comes_from_the_sessions_executor_for_its_running_call_in_order(
        stack: Stack, client: Client, workspace: Path) -> None:
    script = [step("main", "", call("Bash", command="echo early-out; while [ ! -e go ]; do sleep 0.02; done; "
                                                     "echo late-out")),
              step("main", "done")]
    sid = await client.create(workspace, script, prompt="go")
    started = await client.until_kind("session_started")
    running = (await client.until(lambda e: e.kind == "tool_output" and "early-out" in e.data["data"])).data["id"]
    def dropped(reason: str) -> float:
        return stack.metric("harness", "silo_tool_output_dropped_total", f'reason="{reason}"')

    before = {r: dropped(r) for r in ("not_running", "out_of_order")}
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "executor", f"tls://127.0.0.1:{stack.nats_port}")
    try:
        signer = Signer(state.identity("executor"))
        subject = subjects.session_output(sid)
        forged = [  # the executor's own key, but: a call not running, a seq out of order, another session's sid
            (subject, sid, ToolOutput(call_id="t999", seq=0, stream="stdout", data="FORGED-unknown-call")),
            (subject, sid, ToolOutput(call_id=running, seq=7, stream="stdout", data="FORGED-seq")),
            (subject, "other-session", ToolOutput(call_id=running, seq=1, stream="stdout", data="FORGED-sid")),
        ]
        for subj, signed_sid, body in forged:
            wire, _ = signer.seal(body, subj, sid=signed_sid)
            await nc.publish(subj, wire)
        await nc.flush()
    finally:
        await nc.close()
    assert started.data["executor"] == "executor"
    (workspace / "go").touch()
    await client.until_kind("turn_complete")
    streamed = [e.data for e in client.of("tool_output")]
    assert "".join(s["data"] for s in streamed) == "early-out\nlate-out\n"
    assert {s["id"] for s in streamed} == {client.result("Bash")[0]["id"]}
    assert {r: dropped(r) - n for r, n in before.items()} == {"not_running": 1, "out_of_order": 1}
    await client.gw.send(Shutdown(session_id=sid))
    await client.until_kind("shutdown")


async def test_the_executor_stops_a_call_it_is_told_to_cancel_even_one_not_started_yet(
        stack: Stack, client: Client, workspace: Path) -> None:
    sid = await client.create(workspace, [{"text": "idle"}], prompt="go")
    started = await client.until_kind("session_started")
    await client.until_kind("turn_complete")
    eid = started.data["executor"]
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "harness", f"tls://127.0.0.1:{stack.nats_port}")
    signer = Signer(state.identity("harness"))

    async def request(subject: str, body: Any) -> dict[str, Any]:
        wire, _ = signer.seal(body, subject, sid=sid)
        reply = await nc.request(subject, wire, timeout=WAIT)
        return dict(json.loads(reply.data[64:]))

    try:
        sleeper = asyncio.create_task(request(subjects.exec_tool(eid, sid), ToolCall(
            call_id="x1", name="Bash", input={"command": "sleep 30"})))
        while not sleeper.done():  # cancel until the executor has it running and stops it
            ack = await request(subjects.exec_cancel(eid, sid), ToolCancel(call_id="x1"))
            assert ack["type"] == Ack.TYPE
            await asyncio.wait({sleeper}, timeout=0.2)
        stopped = ToolResult.model_validate((await sleeper)["body"])
        assert stopped.is_error and stopped.content in ("cancelled", "cancelled before it started")
        await request(subjects.exec_cancel(eid, sid), ToolCancel(call_id="x2"))
        early = await request(subjects.exec_tool(eid, sid), ToolCall(
            call_id="x2", name="Bash", input={"command": "touch ran-x2"}))
        assert early["body"]["content"] == "cancelled before it started"
    finally:
        await nc.close()
    assert not (workspace / "ran-x2").exists()
    await client.gw.send(Shutdown(session_id=sid))
    await client.until_kind("shutdown")


async def test_text_streams_as_deltas_then_whole(client: Client, workspace: Path) -> None:
    script = [{"text": "three little words", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]
    await client.create(workspace, script, headless=True, prompt="go")
    await client.until_kind("shutdown")
    texts = [e.data for e in client.of("assistant_text")]
    assert texts == [{"text": "three ", "final": False}, {"text": "little ", "final": False},
                     {"text": "words", "final": False}, {"text": "three little words", "final": True}]


async def test_send_user_file_shares_any_bytes_and_refuses_big_files(client: Client, workspace: Path) -> None:
    blob = bytes(range(256)) * 64 + b"\x00\xff\n"
    (workspace / "blob.bin").write_bytes(blob)
    (workspace / "big.bin").write_bytes(b"x" * (SHARE_MAX + 1))
    script = [
        {"text": "", "tool_calls": [
            {"name": "SendUserFile", "input": {"path": "blob.bin", "caption": "the blob"}},
            {"name": "SendUserFile", "input": {"path": "big.bin"}},
            {"name": "SendUserFile", "input": {"path": "missing.bin"}}]},
        {"text": "sent"},
    ]
    await client.create(workspace, script, prompt="go")
    await client.until_kind("turn_complete")
    shared = [e.data for e in client.of("file_shared")]
    assert len(shared) == 1
    assert shared[0] == {"path": "blob.bin", "caption": "the blob", "size": len(blob),
                         "sha256": hashlib.sha256(blob).hexdigest(),
                         "data": base64.b64encode(blob).decode(), "direction": "download"}
    results = client.result("SendUserFile")
    assert "data" not in results[0]["meta"]
    assert results[1]["is_error"] and f"up to {SHARE_MAX} bytes" in results[1]["content"]
    assert results[2]["is_error"]
    await client.gw.send(Shutdown(session_id=client.sid))
    await client.until_kind("shutdown")


async def test_web_search_outside_the_allow_list_says_so(client: Client, workspace: Path) -> None:
    script = [{"text": "", "tool_calls": [{"name": "WebSearch", "input": {"query": "devsilo agents"}}]},
              {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]
    await client.create(workspace, script, headless=True, prompt="go")
    await client.until_kind("shutdown")
    result = client.result("WebSearch")[0]
    assert result["is_error"]
    assert f"WebSearch uses {SEARCH_HOST}, which this session may not reach" in result["content"]
    assert "domain not allowed" in result["content"]


async def test_web_search_asks_the_configured_endpoint_through_the_egress(
        client: Client, workspace: Path, internet: TestInternet) -> None:
    script = [{"text": "", "tool_calls": [{"name": "WebSearch", "input": {"query": "sandbox egress"}}]},
              {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]
    before = internet.hits[SEARCH_HOST]
    await client.create(workspace, script, headless=True, prompt="go", allow_domains=(SEARCH_HOST,))
    await client.until_kind("shutdown")
    result = client.result("WebSearch")[0]
    assert not result["is_error"], result
    head, body = result["content"].split("\n\n", 1)
    assert head == f"search results from {SEARCH_HOST} (HTTP 200)"
    assert json.loads(body) == {"query": "sandbox egress", "results": [
        {"title": "sandbox explained", "url": f"https://{SEARCH_HOST}/wiki/sandbox"},
        {"title": "egress explained", "url": f"https://{SEARCH_HOST}/wiki/egress"}]}
    assert internet.hits[SEARCH_HOST] == before + 1


async def test_web_search_without_an_endpoint_is_a_clear_error() -> None:
    result = await run_tool(None, ToolCall(call_id="c1", name="WebSearch", input={"query": "x"}),  # type: ignore[arg-type]
                            ToolOptions(search_url=None))
    assert result.is_error and "WebSearch is not configured" in result.content


async def test_twenty_clients_race_to_answer_one_question_and_exactly_one_wins(
        stack: Stack, client: Client, workspace: Path) -> None:
    options = [{"label": "red", "description": "warm"}, {"label": "blue", "description": "cool"}]
    script = [
        {"text": "", "tool_calls": [{"name": "AskUserQuestion", "input": {
            "question": "Which colour?", "options": options, "multi_select": False, "allow_free_text": False}}]},
        {"text": "thanks"},
    ]
    sid = await client.create(workspace, script, prompt="ask me")
    asked = await client.until_kind("question_asked")
    qid = asked.data["id"]
    assert asked.data == {"id": qid, "question": "Which colour?", "options": options,
                          "multi_select": False, "allow_free_text": False}
    # Invalid answers never win.
    for selected, text, why in [(("green",), None, "'green' is not an option"),
                                (("red", "blue"), None, "takes one option"),
                                (("red",), "also this", "does not take free text"),
                                ((), None, "needs an option")]:
        await client.gw.send(AnswerQuestion(session_id=sid, question_id=qid, selected=selected, text=text))
        err = await client.error()
        assert err.code == "invalid_answer" and why in err.message, err
    await client.gw.send(AnswerQuestion(session_id=sid, question_id="q999", selected=("red",)))
    assert (await client.error()).code == "unknown_question"

    racers = await asyncio.gather(*(connect(stack, f"racer-{i}") for i in range(20)))
    try:
        for r in racers:
            await r.attach(sid)
        for r in racers:
            await r.until_kind("question_asked")
        await asyncio.gather(*(r.gw.send(AnswerQuestion(session_id=sid, question_id=qid, selected=("blue",)))
                               for r in racers))
        seen = await asyncio.gather(*(r.until_kind("question_answered") for r in racers))
        winner = seen[0].data["client"]
        assert winner in {f"racer-{i}" for i in range(20)}
        assert all(s.data == {"id": qid, "client": winner, "selected": ["blue"], "text": None} for s in seen)
        assert len({s.seq for s in seen}) == 1
        losers = [r for r in racers if r.gw.client_name != winner]
        errors = await asyncio.gather(*(r.error() for r in losers))
        assert len(errors) == 19
        assert all(e.code == "question_closed" and e.message == f"question {qid} was already answered by {winner}"
                   for e in errors)
        await client.until_kind("turn_complete")
        result = client.result("AskUserQuestion")[0]
        assert json.loads(result["content"]) == {"answered_by": winner, "selected": ["blue"], "text": None}
        # The winner got no error: its next frame is the rest of the session, not a refusal.
        champion = next(r for r in racers if r.gw.client_name == winner)
        await champion.until_kind("turn_complete")
        assert not champion.errors
    finally:
        await asyncio.gather(*(r.gw.close() for r in racers))
    await client.gw.send(Shutdown(session_id=sid))
    await client.until_kind("shutdown")
