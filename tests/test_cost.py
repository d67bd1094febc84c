"""Prices, quotas and context compaction: unit level, then a real stack with the mock model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devsilo.harness._compact import (
    SUMMARY_INSTRUCTION,
    SUMMARY_PREFIX,
    Compactor,
    ContextSettings,
    split_for_compaction,
)
from devsilo.harness._cost import (
    CostMeter,
    Price,
    PriceTable,
    Quota,
    QuotaExceeded,
    QuotaSettings,
    totals_from_events,
)
from devsilo.harness._gate import ModelGate, ModelPolicy
from devsilo.harness._model import ModelFailure, ScriptedModel, Usage
from devsilo.protocol import ConfigError, SessionGrant
from devsilo.protocol.client import CreateSession
from devsilo.testing import Stack
from prometheus_client import CollectorRegistry
from pydantic import ValidationError


def grant(**quotas: Any) -> SessionGrant:
    now = time.time()
    return SessionGrant(grant_id="g" * 12, session_id="s" * 16, user="local", workspace="/w",
                        issued_at=now, expires_at=now + 60, **quotas)


class Events:
    """Collects what the gate emits, as SessionEvents.emit would publish it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, kind: str, data: dict[str, Any] | None = None, agent: str = "main") -> int:
        self.events.append({"kind": kind, "agent": agent, "data": data or {}})
        return len(self.events) - 1


# --- prices -----------------------------------------------------------------------------------

def test_price_arithmetic_splits_fresh_cached_and_written_input() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    usage = Usage(input_tokens=1_507, output_tokens=42, cached_tokens=1_200, cache_write_tokens=300)
    # 7 fresh at $3, 1200 cached at $0.30, 300 written at $3.75, 42 out at $15, per million
    assert price.usd(usage) == pytest.approx((7 * 3 + 1200 * 0.3 + 300 * 3.75 + 42 * 15) / 1e6)
    # Without cache rates, cached and written input cost as ordinary input.
    plain = Price(input=2.0, output=8.0)
    assert plain.usd(usage) == pytest.approx((1507 * 2 + 42 * 8) / 1e6)


def test_longest_prefix_wins_and_options_override_defaults() -> None:
    table = PriceTable.from_options({"prices": {"gpt-5.5": {"input": 1, "output": 2},
                                                "local:": {"input": 0.5, "output": 0.5}}})
    assert table.lookup("openai:gpt-5.5-pro-2026-10-01") == Price(input=30, output=180)
    assert table.lookup("openai:gpt-5.5-2026-10-01") == Price(input=1, output=2)
    assert table.lookup("anthropic:claude-sonnet-4-6") == Price(input=3, output=15, cached_input=0.3,
                                                                cache_write=3.75)
    assert table.lookup("local:qwen3-coder") == Price(input=0.5, output=0.5)
    assert table.lookup("anthropic:claude-unheard-of-9") is None


@pytest.mark.parametrize("bad", [{"x": {"input": -1, "output": 1}}, {"x": {"input": 1}},
                                 {"x": {"input": 1, "output": 1, "typo": 2}}, ["x"]])
def test_a_bad_price_table_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="prices"):
        PriceTable.from_options({"prices": bad})


def test_unknown_model_warns_once_and_its_dollars_are_unknown_not_zero() -> None:
    logged: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **kw: Any) -> None:
            logged.append((event, kw))

    meter = CostMeter(PriceTable.from_options({}), Quota(), logger=Log())
    first = meter.record("openai:gpt-nobody-knows", "main", Usage(input_tokens=100, output_tokens=10))
    second = meter.record("openai:gpt-nobody-knows", "main", Usage(input_tokens=200, output_tokens=20))
    known = meter.record("anthropic:claude-haiku-4-5", "agent-1", Usage(input_tokens=1_000_000))
    assert first["usd"] is None and first["price_unknown"] is True and "gpt-nobody-knows" in first["warning"]
    assert second["price_unknown"] is True and "warning" not in second
    assert logged == [("price_unknown", {"model": "openai:gpt-nobody-knows"})]
    assert known["usd"] == pytest.approx(1.0) and "price_unknown" not in known
    totals = known["totals"]
    assert totals["total"]["usd"] is None and totals["total"]["usd_known"] == pytest.approx(1.0)
    assert totals["total"]["input_tokens"] == 1_000_300
    assert totals["by_model"]["openai:gpt-nobody-knows"]["usd"] is None
    assert totals["by_model"]["openai:gpt-nobody-knows"]["output_tokens"] == 30
    assert totals["by_agent"]["agent-1"]["usd"] == pytest.approx(1.0)
    assert totals["by_agent"]["main"]["completions"] == 2


def test_totals_on_request_are_rebuilt_from_cost_events() -> None:
    meter = CostMeter(PriceTable.from_options({}), Quota())
    events = [{"kind": "user_prompt", "agent": "main", "data": {"text": "hi"}}]
    for model, agent, usage in [("anthropic:claude-opus-5", "main", Usage(1000, 100, 500, 200)),
                                ("openai:gpt-5.4", "a1", Usage(2000, 50, 1000)),
                                ("anthropic:claude-opus-5", "a1", Usage(10, 1))]:
        events.append({"kind": "cost", "agent": agent, "data": meter.record(model, agent, usage)})
    events.append({"kind": "cost", "agent": "main", "data": {"model": "x", "input_tokens": "lots",
                                                             "usd": float("nan")}})
    rebuilt = totals_from_events(events)
    expected = meter.totals.as_dict()
    assert rebuilt["by_agent"]["a1"] == expected["by_agent"]["a1"]
    assert rebuilt["by_model"]["openai:gpt-5.4"] == expected["by_model"]["openai:gpt-5.4"]
    # The malformed event counts as a completion of unknown price and no tokens.
    assert rebuilt["total"]["usd"] is None
    assert rebuilt["total"]["usd_known"] == pytest.approx(expected["total"]["usd_known"])
    assert rebuilt["total"]["input_tokens"] == expected["total"]["input_tokens"]


# --- quotas -----------------------------------------------------------------------------------

def test_the_lower_of_grant_and_operator_quota_wins_and_is_named() -> None:
    q = Quota.for_session(grant(quota_tokens=500, quota_usd=9.0), QuotaSettings(tokens=1000, usd=2.0))
    assert (q.tokens, q.usd) == (500, 2.0)
    assert "grant's quota_tokens" in q.tokens_source and "harness's quotas.usd" in q.usd_source
    assert Quota.for_session(grant(), QuotaSettings()) == Quota()
    with pytest.raises(ConfigError, match="quotas"):
        QuotaSettings.from_options({"quotas": {"tokens": -5}})


def test_token_quota_is_checked_before_each_request() -> None:
    meter = CostMeter(PriceTable.from_options({}), Quota(tokens=150, tokens_source="the grant"))
    meter.check("mock")
    meter.record("mock", "main", Usage(input_tokens=100, output_tokens=20))
    meter.check("mock")  # 120 of 150: the next request may go
    meter.record("mock", "main", Usage(input_tokens=25, output_tokens=5))
    with pytest.raises(QuotaExceeded, match="token quota reached: 150 tokens used of 150 allowed by the grant") as exc:
        meter.check("mock")
    assert exc.value.quota == "tokens" and isinstance(exc.value, ModelFailure)
    assert meter.remaining() == {"tokens": 0, "usd": None}


def test_dollar_quota_counts_prices_and_refuses_an_unpriced_model() -> None:
    table = PriceTable.from_options({"prices": {"m": {"input": 10, "output": 10}}})
    meter = CostMeter(table, Quota(usd=0.002, usd_source="the grant"))
    meter.check("m")
    meter.record("m", "main", Usage(input_tokens=150, output_tokens=49))  # $0.00199
    meter.check("m")
    with pytest.raises(QuotaExceeded, match="cannot be enforced: no price is known for model other"):
        meter.check("other")
    meter.record("m", "main", Usage(input_tokens=1))
    with pytest.raises(QuotaExceeded, match=r"dollar quota reached: \$0.0020 spent of \$0.0020") as exc:
        meter.check("m")
    assert exc.value.quota == "usd"


@pytest.mark.parametrize("quota", [{"quota_tokens": -1}, {"quota_usd": -0.5}, {"quota_usd": float("inf")},
                                   {"quota_usd": float("nan")}, {"quota_tokens": "lots"}])
def test_a_client_cannot_ask_for_a_nonsense_quota(quota: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CreateSession.model_validate({"type": "create_session", "workspace": "/w", **quota})


def test_silo_run_refuses_a_negative_quota(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(tmp_path), "run", "--headless",
                        "--llm", "openai", "--model", "gpt-5.4", "--workspace", str(tmp_path), "--prompt", "hi",
                        "--quota-usd", "-1"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "must not be negative" in r.stderr


async def test_policy_counts_tokens_dollars_and_quota_stops_in_metrics() -> None:
    registry = CollectorRegistry()
    policy = ModelPolicy.from_options({"prices": {"mock": {"input": 2.0, "output": 4.0}}}, registry)
    gate = policy.gate(ScriptedModel(json.dumps({"responses": [{"text": "a b c"}, {"text": "d"}]})),
                       grant(quota_tokens=1), Events())
    response = await gate.complete([{"role": "user", "content": "hello there"}], [])
    with pytest.raises(QuotaExceeded):
        await gate.complete([{"role": "user", "content": "again"}], [])
    sample = registry.get_sample_value
    assert sample("silo_model_tokens_total", {"backend": "mock", "kind": "input"}) == response.usage.input_tokens
    assert sample("silo_model_cost_usd_total", {"backend": "mock"}) == pytest.approx(
        (response.usage.input_tokens * 2 + response.usage.output_tokens * 4) / 1e6)
    assert sample("silo_quota_stops_total", {"quota": "tokens"}) == 1


def test_a_bad_option_fails_the_policy_not_a_session() -> None:
    with pytest.raises(ConfigError, match="context"):
        ModelPolicy.from_options({"context": {"threshold": 2}})


# --- compaction -------------------------------------------------------------------------------

def conversation(rounds: int, size: int = 600) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "do the task"}]
    for i in range(rounds):
        msgs += [{"role": "assistant", "content": f"step {i}",
                  "tool_calls": [{"id": f"c{i}a", "name": "Bash", "input": {"command": "ls"}},
                                 {"id": f"c{i}b", "name": "Read", "input": {"path": "x"}}]},
                 {"role": "tool", "tool_call_id": f"c{i}a", "content": "x" * size, "is_error": False},
                 {"role": "tool", "tool_call_id": f"c{i}b", "content": "y" * size, "is_error": False}]
    return msgs


def test_split_keeps_system_prompt_and_last_exchange_and_never_splits_a_tool_call() -> None:
    msgs = conversation(3)
    start, end = split_for_compaction(msgs)
    assert (start, end) == (1, 8)
    assert msgs[end]["role"] == "assistant" and msgs[end]["content"] == "step 2"
    # A last exchange that began with a user message keeps that message.
    msgs.append({"role": "user", "content": "and now?"})
    msgs.append({"role": "assistant", "content": "now this", "tool_calls": []})
    assert split_for_compaction(msgs) == (1, 11)
    assert split_for_compaction(conversation(0)) == (1, 1)


async def test_gate_compacts_near_the_window_and_the_session_goes_on() -> None:
    script = {"responses": [
        {"text": "The user asked for the task; steps 0 and 1 listed files and read x."},
        {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "done"}}]},
    ]}
    events = Events()
    journaled: list[tuple[list[dict[str, Any]], list[dict[str, Any]], str]] = []

    async def journal(original: list[dict[str, Any]], now: list[dict[str, Any]], summary: str) -> None:
        journaled.append((original, now, summary))

    settings = ContextSettings(windows={"mock": 1000}, threshold=0.8)
    gate = ModelGate(ScriptedModel(json.dumps(script)), CostMeter(PriceTable.from_options({}), Quota()),
                     Compactor(settings), events, on_compacted=journal)
    msgs = conversation(3)
    original = [dict(m) for m in msgs]
    assert gate.compactor.estimate("main", msgs) >= 800
    response = await gate.complete(msgs, ["Bash", "Read", "Exit"])
    assert response.tool_calls[0].name == "Exit"  # the real request came after the summary
    assert msgs[0] == original[0]
    assert msgs[1] == {"role": "user", "content": SUMMARY_PREFIX + script["responses"][0]["text"]}
    assert msgs[2:] == original[8:]  # the last exchange, intact, tool results with their call
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    assert journaled and journaled[0][0] == original and journaled[0][1] == msgs
    costs = [e["data"] for e in events.events if e["kind"] == "cost"]
    assert costs[0]["purpose"] == "compaction"
    assert costs[0]["compaction"]["messages_replaced"] == 7
    assert costs[0]["compaction"]["tokens_after"] < costs[0]["compaction"]["tokens_before"]
    assert "purpose" not in costs[1] and costs[1]["totals"]["total"]["completions"] == 2


async def test_the_summary_request_asks_for_a_summary_of_the_head_only() -> None:
    seen: list[list[dict[str, Any]]] = []

    class Recorder(ScriptedModel):
        async def complete(self, messages: list[dict[str, Any]], tools: list[str], *,
                           on_text: Any = None) -> Any:
            seen.append(list(messages))
            return await super().complete(messages, tools, on_text=on_text)

    model = Recorder(json.dumps({"responses": [{"text": "summary"}, {"text": "next"}]}))
    gate = ModelGate(model, CostMeter(PriceTable.from_options({}), Quota()),
                     Compactor(ContextSettings(windows={"mock": 500})), Events())
    msgs = conversation(2)
    await gate.complete(msgs, ["Bash"])
    head = conversation(2)[:5]
    assert seen[0] == [*head, {"role": "user", "content": SUMMARY_INSTRUCTION}]
    assert seen[1] == msgs


async def test_nothing_to_summarise_leaves_the_conversation_alone() -> None:
    gate = ModelGate(ScriptedModel(json.dumps({"responses": [{"text": "ok"}]})),
                     CostMeter(PriceTable.from_options({}), Quota()),
                     Compactor(ContextSettings(windows={"mock": 256})), Events())
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "z" * 4000}]
    assert (await gate.complete(msgs, [])).text == "ok"
    assert len(msgs) == 2


async def test_a_summary_is_not_summarised_again_when_the_last_exchange_alone_is_large() -> None:
    script = {"responses": [{"text": "the summary"}, {"text": "first"}, {"text": "second"}]}
    events = Events()
    gate = ModelGate(ScriptedModel(json.dumps(script)), CostMeter(PriceTable.from_options({}), Quota()),
                     Compactor(ContextSettings(windows={"mock": 500})), events)
    msgs = [*conversation(1), {"role": "user", "content": "and now this"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c9", "name": "Bash", "input": {}}]},
            {"role": "tool", "tool_call_id": "c9", "content": "z" * 4000, "is_error": False}]
    assert (await gate.complete(msgs, ["Bash"])).text == "first"
    # Still over the window (the kept exchange alone is), but only the summary is left before it.
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "tool"]
    assert gate.compactor.needed("mock", "main", msgs)
    assert (await gate.complete(msgs, ["Bash"])).text == "second"
    assert [e["data"].get("purpose") for e in events.events] == ["compaction", None, None]


async def test_quota_stops_compaction_too() -> None:
    gate = ModelGate(ScriptedModel(json.dumps({"responses": [{"text": "never"}]})),
                     CostMeter(PriceTable.from_options({}), Quota(tokens=0, tokens_source="the grant")),
                     Compactor(ContextSettings(windows={"mock": 500})), Events())
    with pytest.raises(QuotaExceeded):
        await gate.complete(conversation(2), [])


# --- through a real stack ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cost_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    options = {"prices": {"mock": {"input": 1000.0, "output": 1000.0}},  # $0.001 a token
               "quotas": {"tokens": 1_000_000},
               "context": {"windows": {"mock": 1000}, "threshold": 0.8}}
    s = Stack(tmp_path_factory.mktemp("cost") / "state", services={"harness": {"options": options}})
    s.start()
    try:
        yield s
    finally:
        s.stop()


def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          check=False, capture_output=True, text=True, timeout=120)


def run_script(stack: Stack, tmp_path: Path, workspace: Path, responses: list[dict[str, Any]],
               *flags: str) -> tuple[int, list[dict[str, Any]], str]:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"responses": responses}))
    r = silo(stack, "run", "--headless", "--llm", "mock", "--script", str(script), "--workspace",
             str(workspace), "--prompt", "do it", "--json", *flags)
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines()], r.stdout + r.stderr


BASH_STEPS = [{"text": f"step {i}", "tool_calls": [{"name": "Bash", "input": {"command": f"echo {i} >> log"}}]}
              for i in range(4)] + [{"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]


def test_token_quota_stops_a_headless_session_mid_turn_with_exit_3(
        cost_stack: Stack, tmp_path: Path, workspace: Path) -> None:
    code, events, out = run_script(cost_stack, tmp_path, workspace, BASH_STEPS, "--quota-tokens", "1")
    assert code == 3, out
    kinds = [e["kind"] for e in events]
    # The first completion ran its tool; the quota stopped the second request.
    assert kinds.count("cost") == 1 and kinds.count("tool_result") == 1
    assert (workspace / "log").read_text() == "0\n"
    error = next(e["data"]["message"] for e in events if e["kind"] == "error")
    assert "token quota reached" in error and "session grant's quota_tokens" in error
    assert events[-1]["kind"] == "shutdown" and events[-1]["data"]["exit_code"] == 3
    cost = next(e["data"] for e in events if e["kind"] == "cost")
    assert cost["model"] == "mock" and cost["usd"] == pytest.approx(
        (cost["input_tokens"] + cost["output_tokens"]) / 1000)
    assert cost["totals"]["by_agent"]["main"]["completions"] == 1


def test_dollar_quota_stops_a_headless_session_with_exit_3(
        cost_stack: Stack, tmp_path: Path, workspace: Path) -> None:
    code, events, out = run_script(cost_stack, tmp_path, workspace, BASH_STEPS, "--quota-usd", "0.15")
    assert code == 3, out
    costs = [e["data"] for e in events if e["kind"] == "cost"]
    assert costs and costs[-1]["totals"]["total"]["usd"] >= 0.15 > costs[-2]["totals"]["total"]["usd"]
    error = next(e["data"]["message"] for e in events if e["kind"] == "error")
    assert "dollar quota reached" in error and "quota_usd" in error
    assert events[-1]["data"]["exit_code"] == 3


def test_a_long_session_is_compacted_and_finishes(cost_stack: Stack, tmp_path: Path, workspace: Path) -> None:
    big = "printf '%02400d\\n' 7"  # ~600 tokens of output a call
    responses = [
        {"text": "one", "tool_calls": [{"name": "Bash", "input": {"command": big}}]},
        {"text": "two", "tool_calls": [{"name": "Bash", "input": {"command": big}}]},
        {"text": "Summary: printed two long numbers for the user."},
        {"text": "", "tool_calls": [{"name": "Exit", "input": {"message": "compacted and done"}}]},
    ]
    code, events, out = run_script(cost_stack, tmp_path, workspace, responses)
    assert code == 0, out
    costs = [e["data"] for e in events if e["kind"] == "cost"]
    assert [c.get("purpose") for c in costs] == [None, None, "compaction", None]
    assert costs[2]["compaction"]["messages_replaced"] >= 2
    assert events[-1]["data"]["reason"] == "compacted and done"
    # The conversation the summary replaced is kept whole in the journal.
    export = silo(cost_stack, "journal", "export", events[0]["session_id"])
    assert export.returncode == 0, export.stderr
    records = [json.loads(line) for line in export.stdout.splitlines()]
    kept = [r["data"] for r in records if r["kind"] == "lifecycle" and r["data"]["what"] == "compacted"]
    assert len(kept) == 1 and kept[0]["summary"].startswith("Summary: printed two long numbers")
    originals = json.dumps(kept[0]["original"])
    assert kept[0]["original_count"] > kept[0]["new_count"] and originals.count("0" * 2399 + "7") == 2
