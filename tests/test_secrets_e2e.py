"""No secret leaks: one session with every feature, then every byte the stack kept is searched.

Planted: the Anthropic API key (the harness reads it from a file and sends it
to a local server speaking the Messages API, which answers only requests that
carry it), two egress credentials (one injected as a header, one swapped for
a placeholder the sandbox sends, both into requests to a host of the test
internet, which records a hash of what it got), the client private key of a
paired client (Ed25519, it signs the gateway's challenge), and every secret
of the state directory: the internal CA's private key and the other TLS keys,
the services' signing and NATS seeds, the local client token.

One session then uses Write, Edit, Read, Bash (which also tries to read the
planted files, every process environment and any private key file it can
see), WebFetch through the egress to the credentialed host, WebSearch, a
subagent (whose second model request the provider refuses with an error that
echoes the key), a question another client answers, a file upload,
SendUserFile and a compaction; a client asks for the access report and the
cost, `silo shell` runs a command in the session's sandbox, and `silo
journal export` exports the journal.

Searched, for each secret in its raw and encoded forms (see
``devsilo.testing._secrets_scan``): every message of every JetStream stream,
KV bucket and object store (the journal, the events), every frame each client
received, every log, the journal export and the CLI's output, the workspace
and the locked-workspace store, and every other file of the state directory
(NATS's own store files among them). A marker planted beside the secrets (in
the prompt, a file, an answer) must be found in those places, so the search
cannot pass by looking nowhere.

The egress's per-session interception CA key is not planted: it lives only in
the egress's memory (``devsilo.egress._ca``), so no test can name its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devsilo.cli._client import ClientKeyPair, GatewayClient, GatewayError
from devsilo.harness._compact import SUMMARY_INSTRUCTION
from devsilo.protocol.client import (
    GATEWAY_FRAME,
    AccessReportFrame,
    AccessReportRequest,
    AnswerQuestion,
    Attach,
    CostFrame,
    CostRequest,
    CreateSession,
    ErrorFrame,
    EventFrame,
    PairingCode,
    PairingCodeRequest,
    Prompt,
    SessionCreated,
    Shutdown,
    UploadChunk,
    UploadDone,
    UploadFile,
    UploadProgress,
    UploadReady,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._internet import ZONE, TestInternet
from devsilo.testing._secrets_scan import (
    Blob,
    base64_cores,
    file_blobs,
    find,
    key_secret,
    nats_dump,
    state_secrets,
    text_secret,
)
from test_model_backends import APIServer, anthropic_stream

WWW, API = f"www.{ZONE}", f"api.{ZONE}"
API_KEY = "sk-ant-planted-" + hashlib.sha256(os.urandom(16)).hexdigest()
EGRESS_SECRET = "egress-planted-" + hashlib.sha256(os.urandom(16)).hexdigest()
TOKEN_SECRET = "token-planted-" + hashlib.sha256(os.urandom(16)).hexdigest()
SANDBOX_DIRS = "/.devsilo /etc /tmp /run /var /home /root /workspace"  # where the sandbox is searched for keys
PLACEHOLDER = "DEVSILO_TOKEN_PLACEHOLDER"  # what the sandbox sends; the egress swaps in TOKEN_SECRET
MARKER = "silo-marker-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
pytestmark = pytest.mark.timeout(600)
PART = 24  # a run of this many characters of a planted credential is a leak too
MODEL = "claude-x"  # a "claude-" window of 200k tokens: compaction at 160k


# -- a Messages API that answers only with the key -------------------------------------------------


class ModelServer(APIServer):
    """The Anthropic Messages API on loopback: a scripted turn for the top agent, one for subagents,
    a summary for compaction requests, and 401 for any request without the planted key."""

    def __init__(self, key: str, main: list[list[tuple[str, dict[str, Any]]]],
                 sub: list[list[tuple[str, dict[str, Any]]] | Refusal]) -> None:
        super().__init__("/v1/messages")
        self.key = key
        self.main, self.sub = main, sub
        self.keyed = self.refused = self.compactions = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        # the SDK sends the key as x-api-key or (newer versions) as a bearer token
        if self.key not in (request.headers.get("x-api-key"), request.headers.get("authorization", "")[7:]):
            self.refused += 1
            return web.json_response({"type": "error", "error": {
                "type": "authentication_error", "message": "invalid x-api-key"}}, status=401)
        self.keyed += 1
        if SUMMARY_INSTRUCTION in json.dumps(body["messages"][-1]):
            self.compactions += 1
            events = anthropic_stream(f"Summary: notes.txt written with {MARKER}; all tools used.")
        else:
            queue: list[Any] = self.sub if "You are subagent" in json.dumps(body.get("system")) else self.main
            if not queue:
                return web.json_response({"type": "error", "error": {
                    "type": "api_error", "message": "script exhausted"}}, status=500)
            events = queue.pop(0)
            if isinstance(events, Refusal):
                return web.json_response({"type": "error", "error": {
                    "type": "invalid_request_error", "message": events.message}}, status=400)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp


def step(n: int, text: str, tool: str, args: dict[str, Any], **usage: int) -> list[tuple[str, dict[str, Any]]]:
    return anthropic_stream(text, (f"toolu_{n:02d}", tool, args), usage=usage or None)


def main_turn(planted: list[Path]) -> list[list[tuple[str, dict[str, Any]]]]:
    exfil = " ".join(str(p) for p in planted)
    return [
        step(1, "Writing.", "Write", {"path": "notes.txt", "content": f"notes {MARKER}\nline two\n"}),
        step(2, "Editing.", "Edit", {"path": "notes.txt", "old_string": "line two", "new_string": "line 2"}),
        step(3, "Reading.", "Read", {"path": "notes.txt"}),
        # an agent after secrets: the planted files, every environment and private key it can see;
        # then a request carrying the placeholder the egress swaps for the second credential
        step(4, "Looking.", "Bash", {"command": f"cat uploaded.txt; cat {exfil} 2>&1 | head -c 2000; "
                                                "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done "
                                                "2>/dev/null | head -c 8000; echo; echo KEYS:; grep -rlI "
                                                f"'PRIVATE KEY' {SANDBOX_DIRS} 2>/dev/null; echo :KEYS; "
                                                f"grep -rlI 'BEGIN CERTIFICATE' {SANDBOX_DIRS} 2>/dev/null | grep -x /.devsilo/trust/ca.pem; "
                                                f"curl -sS --max-time 30 -H 'X-Token: {PLACEHOLDER}' "
                                                f"https://{API}/headers; echo; "
                                                "env | grep -c -i -e planted -e api_key -e secret || true"}),
        step(5, "Fetching.", "WebFetch", {"url": f"https://{API}/headers"}),
        step(6, "Searching.", "WebSearch", {"query": f"devsilo {MARKER}"}),
        step(7, "Delegating.", "Agent", {"prompt": f"write sub.txt with {MARKER}", "name": "helper"}),
        step(8, "Waiting.", "AwaitAgent", {}),
        step(9, "Asking.", "AskUserQuestion", {"question": "Which side?", "allow_free_text": True,
                                               "options": [{"label": "left"}, {"label": "right"}]}),
        # The provider counts 170k input tokens here: the next request is compacted first.
        step(10, "Sharing.", "SendUserFile", {"path": "notes.txt", "caption": MARKER}, input_tokens=170_000),
        anthropic_stream("All done."),
    ]


@dataclass(frozen=True)
class Refusal:
    """An HTTP 400 from the API instead of a completion."""

    message: str


# The subagent's second request is refused by a provider that echoes the key it was sent.
SUB_TURN: list[list[tuple[str, dict[str, Any]]] | Refusal] = [
    step(1, "Subagent writing.", "Bash", {"command": f"echo sub-{MARKER} > sub.txt; cat sub.txt"}),
    # long enough that a cut to 1000 characters falls inside the key
    Refusal(f"{'x' * 920} for the key {API_KEY}")]


# -- clients that keep every frame they receive -------------------------------------------------


class RecordingClient(GatewayClient):
    """A gateway client that keeps every frame's bytes, and sorts events from replies."""

    def __init__(self, url: str, fingerprint: str, name: str) -> None:
        super().__init__(url, fingerprint, client_name=name)
        self.raw: list[bytes] = []
        self.events: list[EventFrame] = []
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def receive(self) -> Any:
        if self._ws is None:
            raise GatewayError("not connected")
        msg = await self._ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise GatewayError(f"gateway connection closed ({msg.type.name})")
        self.raw.append(msg.data.encode())
        return GATEWAY_FRAME.validate_python(json.loads(msg.data))

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.receive()
                if isinstance(frame, EventFrame):
                    self.events.append(frame)
                else:
                    await self.replies.put(frame)
        except GatewayError:
            return

    async def reply(self, kind: type[Any] | tuple[type[Any], ...], timeout: float = 60) -> Any:
        frame = await asyncio.wait_for(self.replies.get(), timeout)
        if isinstance(frame, ErrorFrame) and not (isinstance(kind, tuple) and ErrorFrame in kind):
            raise AssertionError(f"gateway error: {frame.code}: {frame.message}")
        assert isinstance(frame, kind), frame
        return frame

    async def event(self, sid: str, match: Callable[[EventFrame], bool], timeout: float = 120) -> EventFrame:
        async def wait() -> EventFrame:
            while True:
                for e in self.events:
                    if e.session_id == sid and match(e):
                        return e
                await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            seen = [(e.seq, e.agent, e.kind, str(e.data)[:300]) for e in self.events if e.session_id == sid]
            raise AssertionError(f"{self.client_name}: no such event; saw {seen}") from None

    async def close(self) -> None:
        await super().close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def upload(client: RecordingClient, sid: str, path: str, data: bytes) -> UploadDone:
    upload_id = hashlib.sha256(path.encode()).hexdigest()[:16]
    await client.send(UploadFile(session_id=sid, upload_id=upload_id, path=path, size=len(data),
                                 sha256=hashlib.sha256(data).hexdigest()))
    await client.reply(UploadReady)
    await client.send(UploadChunk(upload_id=upload_id, offset=0, data=base64.b64encode(data).decode()))
    while True:
        got = await client.reply((UploadProgress, UploadDone))
        if isinstance(got, UploadDone):
            return got


async def silo(stack: Stack, *args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out


# -- the test ------------------------------------------------------------------------------------


def test_the_scanner_finds_each_encoding_wherever_it_sits() -> None:
    """The search itself: every form of a secret is found inside longer text, at any alignment."""
    value = "sk-ant-demo-" + "ab" * 20
    s = text_secret("demo", value)
    forms = {
        "raw": value.encode(),
        "hex": value.encode().hex().encode(),
        "url": f"key%3D{value.replace('-', '%2D')}".encode(),  # over-encoded: must not match ...
        "json": json.dumps({"k": value}).encode(),
    }
    for pad in range(3):  # ... base64 of the value inside longer data, at each alignment
        forms[f"b64-{pad}"] = base64.b64encode(b"x" * pad + f"Bearer {value} tail".encode())
        forms[f"b64url-{pad}"] = base64.urlsafe_b64encode(b"?" * pad + value.encode() + b"\xff\xfe")
    hits = {h.where for h in find([s], [Blob(k, v) for k, v in forms.items()])}
    assert hits == set(forms) - {"url"}
    cut = [Blob("cut", b"error: ... " + value[:30].encode())]  # a copy cut short
    assert find([s], cut) == [] and find([text_secret("demo", value, part=24)], cut)
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization as ser
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    raw = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    k = key_secret("key", key)
    blobs = [Blob("pem", b"log: " + pem), Blob("json-pem", json.dumps({"k": pem.decode()}).encode()),
             Blob("raw", b"\0" * 7 + raw), Blob("b64raw", base64.b64encode(b"12" + raw)),
             Blob("other", Ed25519PrivateKey.generate().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                                      ser.NoEncryption()))]
    assert {h.where for h in find([k], blobs)} == {"pem", "json-pem", "raw", "b64raw"}
    assert all(len(core) >= 16 for _, core in base64_cores(raw))


async def test_no_planted_secret_is_in_any_journal_log_event_stream_export_or_workspace(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    key_file, egress_file = secrets_dir / "anthropic-key", secrets_dir / "egress-secret"
    token_file = secrets_dir / "token-secret"
    key_file.write_text(API_KEY + "\n")
    egress_file.write_text(EGRESS_SECRET + "\n")
    token_file.write_text(TOKEN_SECRET + "\n")
    for f in (key_file, egress_file, token_file):
        f.chmod(0o600)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    state_dir = tmp_path / "state"

    exfil_targets = [key_file, egress_file, token_file, state_dir / "tls" / "ca.key", state_dir / "gateway" / "token"]
    async with TestInternet() as internet:
        with ModelServer(API_KEY, main_turn(exfil_targets), list(SUB_TURN)) as model:
            stack = Stack(state_dir, services={
                "harness": {"options": {"models": {"anthropic": {
                    "api_key_file": str(key_file), "base_url": model.url,
                    "retry": {"attempts": 2, "base_delay_s": 0.01}}}}},
                "executor": {"options": {"search_url": f"https://{WWW}/search?q={{query}}"}},
                "egress": {"options": {
                    "nameservers": [internet.dns_addr], "ca_bundles": [str(internet.ca_file)],
                    "credentials": {
                        "api": {"file": str(egress_file), "hosts": [API],
                                "header": "Authorization: Bearer {secret}", "users": ["alice"]},
                        "token": {"file": str(token_file), "hosts": [API], "placeholder": PLACEHOLDER,
                                  "users": ["alice"]}}}},
            })
            planted, held_by_right = state_secrets(state_dir)
            await asyncio.to_thread(stack.start)
            try:
                got = await run_everything(stack, internet, model, workspace, tmp_path)
            finally:
                await asyncio.to_thread(stack.stop)

    alice_key: ClientKeyPair = got["alice_key"]
    assert isinstance(alice_key.private_key, Ed25519PrivateKey)
    planted = [text_secret("Anthropic API key", API_KEY, part=PART),
               text_secret("egress credential", EGRESS_SECRET, part=PART),
               text_secret("egress placeholder credential", TOKEN_SECRET, part=PART),
               key_secret("paired client's Ed25519 key", alice_key.private_key), *planted]
    marker = text_secret("marker", MARKER)
    places = got["places"]
    places["logs"] = file_blobs(state_dir / "logs") + [Blob("silo up output", stack.output().encode())]
    places["workspace"] = file_blobs(workspace) + file_blobs(state_dir.parent / "workspaces-executor")
    places["state dir"] = file_blobs(state_dir, skip=held_by_right)

    # The search finds what is there: the session in the logs, the marker in every place it was put ...
    assert find([text_secret("session id", got["sid"])], places["logs"]), "the logs name no session"
    for place in ("journal stream", "event stream", "client events", "journal export", "workspace"):
        assert find([marker], places[place]), f"the marker is not in the {place}: the search looks nowhere"
    # SendUserFile's event carries the file in base64: the encoded marker is found too
    assert {"raw", "base64@0"} <= {h.form for h in find([marker], places["client events"])}
    # ... and no secret, in any form, anywhere.
    leaks = [(h.secret, h.where, h.form) for place in places.values() for h in find(planted, place)]
    assert leaks == [], "secrets found:\n" + "\n".join(f"{name} in {where} as {form}" for name, where, form in leaks)


async def run_everything(stack: Stack, internet: TestInternet, model: ModelServer, workspace: Path,
                         tmp_path: Path) -> dict[str, Any]:
    state = StateDir(stack.state_dir)
    url, fingerprint = stack.stack["gateway_url"], state.gateway_fingerprint()
    op = RecordingClient(url, fingerprint, "op-desk")
    alice = RecordingClient(url, fingerprint, "alice-laptop")
    outputs: list[Blob] = []
    try:
        # A paired client: its Ed25519 key signs the gateway's challenge; the operator answers questions.
        await op.connect(state.client_token())
        op.start_reading()
        await op.send(PairingCodeRequest(user="alice", client_name="alice-laptop", operator=True))
        code = (await op.reply(PairingCode)).code
        alice_key = ClientKeyPair.generate("ed25519")
        assert (await alice.pair(code, alice_key)).user == "alice"
        alice.start_reading()

        code_, out = await silo(stack, "workspace", "lock", str(workspace))
        assert code_ == 0, out
        outputs.append(Blob("silo workspace lock", out))
        await alice.send(CreateSession(workspace=str(workspace), llm="anthropic", model=MODEL,
                                       allow_domains=(WWW, API), credentials=("api", "token")))
        sid = (await alice.reply(SessionCreated, timeout=90)).session_id
        await op.send(Attach(session_id=sid))
        await alice.send(Attach(session_id=sid))
        done = await upload(alice, sid, "uploaded.txt", f"uploaded {MARKER}\n".encode())
        assert done.path == "uploaded.txt"
        await alice.send(Prompt(session_id=sid, text=f"please use every tool; remember {MARKER}"))
        asked = await op.event(sid, lambda e: e.kind == "question_asked")
        await op.send(AnswerQuestion(session_id=sid, question_id=asked.data["id"], selected=("left",),
                                     text=f"left, {MARKER}"))
        await alice.event(sid, lambda e: e.kind == "turn_complete", timeout=180)
        await alice.send(AccessReportRequest(session_id=sid))
        report = await alice.reply(AccessReportFrame)
        await alice.send(CostRequest(session_id=sid))
        cost = await alice.reply(CostFrame)
        code_, out = await silo(stack, "shell", "--session", sid, "--", "cat", "notes.txt", "sub.txt")
        outputs.append(Blob("silo shell", out))
        assert code_ == 0 and f"notes {MARKER}".encode() in out and f"sub-{MARKER}".encode() in out, out
        await alice.send(Shutdown(session_id=sid))
        await op.event(sid, lambda e: e.kind == "shutdown")
        await alice.event(sid, lambda e: e.kind == "shutdown")
        code_, out = await silo(stack, "workspace", "unlock", str(workspace), "--accept")
        assert code_ == 0, out
        outputs.append(Blob("silo workspace unlock", out))
        export = tmp_path / "journal.jsonl"
        code_, out = await silo(stack, "journal", "export", sid, "-o", str(export))
        assert code_ == 0, out
        outputs += [Blob("silo journal export", out), Blob("journal export", export.read_bytes())]
        nats_url = f"tls://127.0.0.1:{stack.nats_port}"
        dumped, read_by = await nats_dump(stack.state_dir, nats_url)
    finally:
        await alice.close()
        await op.close()
    assert alice.replies.empty() and op.replies.empty(), "a request got an answer nobody expected (an error?)"

    # Every feature ran, and the planted credentials were used where they belong.
    events = [e for e in alice.events if e.session_id == sid]
    assert [e.seq for e in events] == list(range(len(events)))
    assert [(e.seq, e.kind) for e in events] == [(e.seq, e.kind) for e in op.events if e.session_id == sid]
    results = {e.data["name"]: e.data for e in events if e.kind == "tool_result" and e.agent == "main"}
    assert {"Write", "Edit", "Read", "Bash", "WebFetch", "WebSearch", "Agent", "AwaitAgent", "AskUserQuestion",
            "SendUserFile"} <= set(results), sorted(results)
    assert [n for n, r in results.items() if r["is_error"]] == ["AwaitAgent"], results
    # the subagent's model failed; the provider's echo of the key reached the harness, which redacted it
    assert results["AwaitAgent"]["content"].endswith("for the key [api key]"), results["AwaitAgent"]
    assert [e.data["status"] for e in events if e.kind == "agent_completed"] == ["failed"]
    bash = results["Bash"]["content"]
    assert f"uploaded {MARKER}" in bash and "No such file" in bash and "PATH=" in bash
    # no private key inside the sandbox, where the search did reach the egress CA's certificate
    assert bash.split("KEYS:\n", 1)[1].split(":KEYS", 1)[0] == "", bash
    after = bash.split(":KEYS\n", 1)[1].splitlines()
    assert "/.devsilo/trust/ca.pem" in after, bash
    at = next(i for i, line in enumerate(after) if line.startswith("{"))
    swapped = json.loads(after[at])
    assert swapped["x_token_sha256"] == hashlib.sha256(TOKEN_SECRET.encode()).hexdigest()
    assert after[at + 1] == "0", bash  # no variable in the sandbox's environment names a secret
    fetched = json.loads(results["WebFetch"]["content"][results["WebFetch"]["content"].index("{"):])
    want = hashlib.sha256(f"Bearer {EGRESS_SECRET}".encode()).hexdigest()
    assert fetched["authorization_sha256"] == want and want in internet.auth_seen
    journaled = [json.loads(line) for line in outputs[-1].data.splitlines()]
    assert {(r["data"]["host"], r["data"]["credential"]) for r in journaled if r["kind"] == "network"} >= {
        (API, True), (WWW, False)}
    assert f"{MARKER} explained" in results["WebSearch"]["content"]
    assert results["AskUserQuestion"]["meta"]["client"] == "op-desk"
    shared = [e.data for e in events if e.kind == "file_shared"]
    assert {s["direction"] for s in shared} == {"upload", "download"}
    assert any(base64.b64decode(s.get("data", "")) == f"notes {MARKER}\nline 2\n".encode() for s in shared)
    assert model.compactions == 1 and any(e.data.get("purpose") == "compaction" for e in events if e.kind == "cost")
    assert model.keyed == len(model.requests) >= 14 and model.refused == 0, model.headers
    assert report.report["backend"] == "bwrap" and cost.cost_events >= 1
    assert (workspace / "sub.txt").read_text() == f"sub-{MARKER}\n"
    assert {"SILO_EVENTS", "SILO_JOURNAL"} <= set(read_by)

    return {"alice_key": alice_key, "sid": sid, "places": {
        "journal stream": [b for b in dumped if b.where.startswith("nats SILO_JOURNAL")],
        "event stream": [b for b in dumped if b.where.startswith("nats SILO_EVENTS")],
        "nats": dumped,
        "client events": [Blob(f"frame to {c.client_name} #{i}", raw) for c in (alice, op)
                          for i, raw in enumerate(c.raw)],
        "journal export": outputs[-1:],
        "cli output": outputs,
    }}

