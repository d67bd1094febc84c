"""Parts of the agent loop without a stack: answers to questions, the mock model's per-agent script,
tool specs of every agent kind, and the executor's output coalescing."""

from __future__ import annotations

import asyncio
import json

import pytest
import structlog
from devsilo.executor._tool_output import ToolOutputStream
from devsilo.executor._tools import ToolOptions, bounded
from devsilo.harness._agents import tools_for
from devsilo.harness._model import ASKING_AGENT, ModelFailure, ModelResponse, ScriptedModel
from devsilo.harness._questions import QuestionBoard
from devsilo.harness._session import SessionRunner
from devsilo.harness._toolspec import tool_specs
from devsilo.protocol import (
    TOOL_OUTPUT_CHUNK,
    AccessReport,
    AskUserQuestionInput,
    ConfigError,
    InputRefused,
    SessionEvent,
    SessionGrant,
    SiloError,
    ToolOutput,
    ToolResult,
)


def question(**kw: object) -> AskUserQuestionInput:
    return AskUserQuestionInput.model_validate({"question": "Q?", "options": [{"label": "a"}, {"label": "b"}], **kw})


def answer(selected: list[str], text: str | None = None) -> str:
    return json.dumps({"selected": selected, "text": text})


@pytest.mark.parametrize(("spec", "raw", "code", "why"), [
    ({}, answer(["c"]), "invalid_answer", "'c' is not an option of question q1; options: a, b"),
    ({}, answer(["a", "b"]), "invalid_answer", "takes one option, not 2"),
    ({"multi_select": True}, answer(["a", "a"]), "invalid_answer", "picked twice"),
    ({}, answer(["a"], "and more"), "invalid_answer", "does not take free text"),
    ({}, answer([]), "invalid_answer", "needs an option"),
    ({"allow_free_text": True}, answer([], "  "), "invalid_answer", "needs an option or free text"),
    ({}, "not json", "invalid_answer", "malformed"),
    ({}, json.dumps({"selected": ["a"], "extra": 1}), "invalid_answer", "malformed"),
])
async def test_an_answer_that_does_not_fit_the_question_is_refused_and_does_not_win(
        spec: dict[str, object], raw: str, code: str, why: str) -> None:
    board = QuestionBoard()
    q = board.ask(question(**spec))
    with pytest.raises(InputRefused) as refused:
        board.answer(q.id, "c1", raw)
    assert refused.value.code == code and why in str(refused.value)
    won = board.answer(q.id, "c2", answer(["a"]))
    assert won.client == "c2" and (await q.future) == won


async def test_the_first_valid_answer_wins_and_later_ones_are_told_who_won() -> None:
    board = QuestionBoard()
    q = board.ask(question(multi_select=True, allow_free_text=True))
    won = board.answer(q.id, "phone", answer(["b", "a"], "both"))
    assert (won.selected, won.text) == (("b", "a"), "both")
    with pytest.raises(InputRefused) as late:
        board.answer(q.id, "laptop", answer(["a"]))
    assert late.value.code == "question_closed" and str(late.value) == "question q1 was already answered by phone"
    with pytest.raises(InputRefused) as unknown:
        board.answer("q2", "laptop", answer(["a"]))
    assert unknown.value.code == "unknown_question"


async def test_an_answer_racing_an_interrupt_finds_the_question_cancelled() -> None:
    board = QuestionBoard()
    q = board.ask(question())
    q.future.cancel()  # what cancelling the asking task does at once
    with pytest.raises(InputRefused) as refused:
        board.answer(q.id, "c1", answer(["a"]))
    assert refused.value.code == "question_closed" and "cancelled" in str(refused.value)


async def test_the_mock_gives_each_agent_the_responses_named_for_it_and_unnamed_ones_in_request_order() -> None:
    model = ScriptedModel(json.dumps({"responses": [
        {"agent": "a1", "text": "for a1"},
        {"text": "anyone 1"},
        {"agent": "main", "text": "for main"},
        {"text": "anyone 2", "tool_calls": [{"name": "Bash", "arguments": "{\"command\": 1"}]},
    ]}))

    async def ask(agent: str) -> ModelResponse:
        ASKING_AGENT.set(agent)  # as the loop does in each agent's task
        return await model.complete([], [])

    assert (await asyncio.create_task(ask("main"))).text == "anyone 1"
    assert (await asyncio.create_task(ask("main"))).text == "for main"
    assert (await asyncio.create_task(ask("a1"))).text == "for a1"
    bad = await asyncio.create_task(ask("a1"))
    assert bad.text == "anyone 2" and bad.tool_calls[0].input_error is not None
    assert "not a JSON object" in bad.tool_calls[0].input_error
    with pytest.raises(ModelFailure, match="exhausted for agent a1 after 4 responses"):
        await asyncio.create_task(ask("a1"))


def test_each_agent_kind_is_offered_its_tools_with_specs() -> None:
    sandbox = ["Bash", "Read", "Write", "Edit", "Glob", "Grep", "WebFetch", "WebSearch"]
    assert tools_for(top_level=True, headless=False) == [
        *sandbox, "Agent", "AwaitAgent", "AskUserQuestion", "SendUserFile"]
    assert tools_for(top_level=True, headless=True) == [*sandbox, "Agent", "AwaitAgent", "Exit"]
    assert tools_for(top_level=False, headless=False) == [*sandbox, "Agent", "AwaitAgent"]
    specs = {s.name: s for s in tool_specs([*sandbox, "Agent", "AwaitAgent", "AskUserQuestion", "SendUserFile",
                                            "Exit"])}
    ask = specs["AskUserQuestion"].input_schema
    assert ask["required"] == ["question"] and ask["additionalProperties"] is False
    assert "title" not in json.dumps(ask)
    assert specs["Exit"].input_schema["required"] == ["message"]


def test_a_long_result_keeps_its_head_and_tail_and_says_what_was_cut() -> None:
    result = bounded(ToolResult(call_id="c", content="h" * 600 + "t" * 600), most=1000)
    assert result.content.startswith("h" * 400) and result.content.endswith("t" * 400)
    assert f"[... {result.meta['cut_chars']} characters cut ...]" in result.content
    assert len(json.dumps(result.content).encode()) <= 1000
    assert bounded(result, most=2000) is result


def test_a_result_of_control_characters_is_cut_by_its_encoded_size() -> None:
    result = bounded(ToolResult(call_id="c", content="\x01" * 10_000), most=6000)
    assert len(json.dumps(result.content, ensure_ascii=False).encode()) <= 6000
    assert result.content.startswith("\x01" * 400) and result.meta["cut_chars"] > 9000


async def test_output_chunks_are_merged_per_stream_in_order_and_split_at_the_chunk_size() -> None:
    sent: list[ToolOutput] = []

    async def send(out: ToolOutput) -> None:
        sent.append(out)

    stream = ToolOutputStream(send, "t1", log=structlog.get_logger(), linger_s=0.01)
    stream.feed("stdout", "a")
    stream.feed("stdout", "b")
    stream.feed("stderr", "E")
    stream.feed("stdout", "x" * (TOOL_OUTPUT_CHUNK + 5))
    await asyncio.sleep(0.05)  # lets the pump run; the result below does not depend on how long
    stream.feed("stdout", "z")
    assert await stream.close() == len(sent)
    assert [(o.seq, o.stream) for o in sent[:3]] == [(0, "stdout"), (1, "stderr"), (2, "stdout")]
    assert sent[0].data == "ab" and sent[1].data == "E"
    assert "".join(o.data for o in sent[2:]) == "x" * (TOOL_OUTPUT_CHUNK + 5) + "z"
    assert all(len(o.data) <= TOOL_OUTPUT_CHUNK for o in sent)
    assert [o.seq for o in sent] == list(range(len(sent)))


class EventSink:
    """The one part of a bus SessionEvents uses: a JetStream publish (kept in a list)."""

    def __init__(self) -> None:
        self.events: list[SessionEvent] = []

    async def js_publish(self, subject: str, body: SessionEvent, *, sid: str | None, dedupe_id: str) -> None:
        assert dedupe_id == f"{sid}:{body.seq}"
        self.events.append(body)


def runner(script: list[dict[str, object]]) -> tuple[SessionRunner, EventSink]:
    sink = EventSink()
    grant = SessionGrant(grant_id="g1", session_id="s1", user="u", workspace="/w", issued_at=0.0, expires_at=1.0)
    model = ScriptedModel(json.dumps({"responses": script}))
    return SessionRunner(sink, grant, "e1", AccessReport(backend="mock", workspace="/w"), model,  # type: ignore[arg-type]
                         headless=False, log=structlog.get_logger()), sink


@pytest.mark.parametrize("url", ["https://search.example/?q=fixed", "ftp://search.example/{query}", "{query}", 42])
def test_a_search_url_that_cannot_carry_the_query_stops_the_executor_start(url: object) -> None:
    with pytest.raises(ConfigError, match="search_url must be an http"):
        ToolOptions.from_options({"search_url": url})


@pytest.mark.parametrize(("spec", "why"), [
    ({"question": "Q?"}, "give options, or allow_free_text"),
    ({"question": "Q?", "options": [{"label": "a"}, {"label": "a"}]}, "labels must differ"),
])
def test_a_question_nobody_could_answer_is_refused(spec: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        AskUserQuestionInput.model_validate(spec)


async def test_prompts_are_shown_to_every_client_on_arrival_and_queued_in_order() -> None:
    loop_runner, sink = runner([{"text": "one"}, {"text": "two"}])
    await loop_runner.prompt("first", "phone")
    await loop_runner.prompt("second", "laptop")
    assert [(e.seq, e.kind, e.data) for e in sink.events] == [
        (0, "user_prompt", {"text": "first", "client": "phone"}),
        (1, "user_prompt", {"text": "second", "client": "laptop"})]
    await loop_runner._run_turn(await loop_runner.inputs.get())
    assert loop_runner.messages[0] == {"role": "user", "content": "first"}
    assert loop_runner.inputs.get_nowait() == "second"
    assert [e.kind for e in sink.events][-3:] == ["assistant_text", "busy", "turn_complete"]


class LostExecutorSink(EventSink):
    """A bus whose executor took a tool call and then died: the call never returns, a cancel finds nobody."""

    async def request(self, subject: str, body: object, reply: type, **_: object) -> object:
        if subject.endswith(".tool"):
            await asyncio.Event().wait()
        raise SiloError(f"no_responders: no executor is listening on {subject}")


class SlowJournal:
    """A journal whose tool results take a moment to write, as a JetStream publish does."""

    def __getattr__(self, name: str) -> object:
        async def write(*_: object, **__: object) -> None:
            await asyncio.sleep(0.2 if name == "tool_result" else 0)
        return write


@pytest.mark.parametrize("told", [1, 2])
async def test_a_lost_executor_ends_the_session_after_the_running_calls_result(told: int) -> None:
    sink = LostExecutorSink()
    grant = SessionGrant(grant_id="g1", session_id="s1", user="u", workspace="/w", issued_at=0.0, expires_at=1.0)
    model = ScriptedModel(json.dumps({"responses": [{"tool_calls": [{"name": "Bash", "input": {"command": "ls"}}]}]}))
    session = SessionRunner(sink, grant, "e1", AccessReport(backend="mock", workspace="/w"), model,  # type: ignore[arg-type]
                            headless=False, log=structlog.get_logger(), journal=SlowJournal())  # type: ignore[arg-type]
    running = asyncio.create_task(session.run("go"))
    while not any(e.kind == "tool_use" for e in sink.events):
        await asyncio.sleep(0.01)
    reason = "executor e1 stopped responding; the session cannot continue"
    first = asyncio.create_task(session.executor_lost(reason))
    if told == 2:  # the pool hears of it again (silent, then announcing) while the call is being stopped
        await asyncio.sleep(0.05)
        await session.executor_lost(reason)
    await first
    await asyncio.wait_for(running, 10)
    kinds = [e.kind for e in sink.events]
    # clients stop reading at shutdown: the interrupted call's result must come before it
    assert kinds[-3:] == ["tool_result", "error", "shutdown"], kinds
    assert kinds.count("error") == 1
    assert sink.events[-3].data["content"] == "interrupted" and sink.events[-1].data["exit_code"] == 1
