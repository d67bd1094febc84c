"""Untrustworthy messages over a real NATS connection are dropped before any handler runs.

Each case is sent to the harness's start subject from the gateway's own NATS
account (so NATS lets it through and only the signature checks stand in the
way), and must come back as a signed error naming the reason, be counted in
``silo_messages_rejected_total{reason}``, and change nothing: no session, no
sandbox, no event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from devsilo.protocol import (
    ErrorReply,
    LLMChoice,
    Role,
    ServiceIdentity,
    SessionInput,
    Signer,
    StartSession,
    Verifier,
    subjects,
)
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from nacl.signing import SigningKey

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("rej") / "state", extra_args=["--max-message-bytes", str(LIMIT)])
    s.start()
    try:
        yield s
    finally:
        s.stop()


def start_body() -> StartSession:
    return StartSession(grant="bm90IGEgZ3JhbnQ=", llm=LLMChoice(script='{"responses":[{"text":"x"}]}'),
                        headless=True, prompt="rm -rf /")


def forged(stack: Stack, case: str) -> bytes:
    state = StateDir(stack.state_dir)
    gw = state.identity("gateway")
    subject = subjects.HARNESS_START
    if case == "malformed":
        return b"\x00" * 64 + b"this is not an envelope"
    if case == "unsigned":
        return json.dumps({"type": "start_session", "body": start_body().model_dump()}).encode()
    if case == "bad_signature":  # the gateway's key id, somebody else's key
        doc = json.loads(Signer(gw).seal(start_body(), subject)[0][64:])
        return bytes(SigningKey.generate().sign(json.dumps(doc).encode()))
    if case == "unknown_sender":
        return Signer(ServiceIdentity("intruder", Role.GATEWAY, SigningKey.generate())).seal(start_body(), subject)[0]
    if case == "wrong_key":  # the executor's real key, claiming to be the gateway
        ex = state.identity("executor")
        doc = json.loads(Signer(ex).seal(start_body(), subject)[0][64:])
        doc.update(sender="gateway", role="gateway")
        return bytes(ex.signing_key.sign(json.dumps(doc).encode()))
    if case == "role_not_allowed":  # honestly signed by the executor, which may not start sessions
        return Signer(state.identity("executor")).seal(start_body(), subject)[0]
    if case == "expired":
        return Signer(gw, clock=lambda: time.time() - 300).seal(start_body(), subject)[0]
    if case == "oversized":
        big = StartSession(grant="x", llm=LLMChoice(script="y" * LIMIT), headless=True)
        return Signer(gw).seal(big, subject)[0]
    raise AssertionError(case)


CASES = ["malformed", "unsigned", "bad_signature", "unknown_sender", "wrong_key", "role_not_allowed",
         "expired", "oversized"]


async def _request(stack: Stack, data: bytes) -> ErrorReply:
    state = StateDir(stack.state_dir)
    nc = await connect_nats(state, "gateway", f"tls://127.0.0.1:{stack.nats_port}")
    try:
        reply = await nc.request(subjects.HARNESS_START, data, timeout=10)
    finally:
        await nc.close()
    env = Verifier(state.roster()).open(reply.data, reply.subject)
    assert env.header.sender == "harness"
    return env.expect(ErrorReply)


def _nothing_changed(stack: Stack) -> None:
    assert stack.metric("harness", "silo_sessions_active") == 0
    assert stack.metric("executor", "silo_sandbox_starts_total", 'backend="bwrap",outcome="ok"') == 0
    assert stack.metric("harness", "silo_messages_received_total", 'type="start_session"') <= 1


@pytest.mark.parametrize("case", CASES)
def test_rejected_before_any_handler(small_stack: Stack, case: str) -> None:
    reason = "malformed" if case == "unsigned" else case
    before = small_stack.metric("harness", "silo_messages_rejected_total", f'reason="{reason}"')
    err = asyncio.run(_request(small_stack, forged(small_stack, case)))
    assert err.code == reason, err.message
    after = small_stack.metric("harness", "silo_messages_rejected_total", f'reason="{reason}"')
    assert after == before + 1
    _nothing_changed(small_stack)
    log = (small_stack.state_dir / "logs" / "harness.log").read_text()
    assert f'"reason": "{reason}"' in log


def test_replayed_message_is_rejected_the_second_time(small_stack: Stack) -> None:
    state = StateDir(small_stack.state_dir)
    wire, _ = Signer(state.identity("gateway")).seal(start_body(), subjects.HARNESS_START)
    first = asyncio.run(_request(small_stack, wire))
    assert first.code == "GrantError"  # verified, handled, refused: the grant is not a grant
    again = asyncio.run(_request(small_stack, wire))
    assert again.code == "replayed"
    assert small_stack.metric("harness", "silo_messages_rejected_total", 'reason="replayed"') >= 1
    _nothing_changed(small_stack)


def test_forged_input_without_reply_is_counted_and_dropped(small_stack: Stack) -> None:
    state = StateDir(small_stack.state_dir)
    before = small_stack.metric("harness", "silo_messages_rejected_total", 'reason="role_not_allowed"')
    wire, _ = Signer(state.identity("executor")).seal(SessionInput(kind="stop"), subjects.session_input("s1"),
                                                       sid="s1")

    async def send() -> None:
        nc = await connect_nats(state, "gateway", f"tls://127.0.0.1:{small_stack.nats_port}")
        await nc.publish(subjects.session_input("s1"), wire)
        await nc.flush()
        await nc.close()

    asyncio.run(send())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = small_stack.metric("harness", "silo_messages_rejected_total", 'reason="role_not_allowed"')
        if now == before + 1:
            break
        time.sleep(0.05)
    assert now == before + 1
