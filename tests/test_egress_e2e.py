"""The egress issue's acceptance: from inside a real bwrap sandbox, through the whole stack.

`silo up` runs every service; the egress is told to resolve with the test
internet's DNS server and to trust its CA, and holds one credential in a
file only it reads. A scripted session then does, from inside its sandbox,
what an agent would: curl, Python, git and pip over HTTPS through the proxy
the helper offers, and everything that must fail — a domain off the list,
hostile names, plain TCP and UDP, DNS for another name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from devsilo.executor._relay import relay_line, session_line
from devsilo.protocol import RelayHello, Signer, subjects
from devsilo.runtime._natsconn import connect_nats
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._internet import HOSTILE, ZONE, TestInternet

WWW, API, OTHER = f"www.{ZONE}", f"api.{ZONE}", f"other.{ZONE}"
SECRET = "egress-secret-" + hashlib.sha256(os.urandom(16)).hexdigest()

DNS_PROBE = r"""
import socket, struct, sys
def ask(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
    s.sendto(q, ("127.0.0.1", 3129))
    r = s.recv(4096)
    print(name, "rcode", r[3] & 15, "answers", struct.unpack(">H", r[6:8])[0])
for n in sys.argv[1:]:
    ask(n)
"""


@pytest.fixture
async def internet() -> AsyncIterator[TestInternet]:
    async with TestInternet() as inet:
        yield inet


async def start_stack(tmp_path: Path, internet: TestInternet) -> Stack:
    secret_file = tmp_path / "egress-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    stack = Stack(tmp_path / "state", services={"egress": {"options": {
        "nameservers": [internet.dns_addr],
        "ca_bundles": [str(internet.ca_file)],
        "credentials": {"api": {"file": str(secret_file), "hosts": [API],
                                "header": "Authorization: Bearer {secret}", "users": ["local"]}},
    }}})
    await asyncio.to_thread(stack.start)
    return stack


async def silo(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def bash(command: str) -> dict[str, object]:
    return {"name": "Bash", "input": {"command": command, "timeout_ms": 120_000}}


async def test_from_inside_a_bwrap_sandbox_the_egress_lets_through_only_what_it_should(
        internet: TestInternet, tmp_path: Path) -> None:
    internet.add_git_repo("tool", {"README": "cloned through the egress\n"})
    internet.add_package("silo-test-pkg", "1.0", "ANSWER = 42\n")
    www_addr = internet.sites["www"].address
    checks = {
        "curl": f"curl -sS --max-time 30 https://{WWW}/hello",
        "python": f"python3 -c \"import urllib.request as u; print(u.urlopen('https://{WWW}/hello', timeout=30)"
                  ".read().decode(), end='')\"",
        "git": f"git clone -q https://{WWW}/static/git/tool.git tool && cat tool/README",
        "pip": f"python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target /tmp/site "
               f"--index-url https://{WWW}/simple/ silo-test-pkg && cat /tmp/site/silo_test_pkg.py",
        "credential": f"curl -sS --max-time 30 https://{API}/headers",
        "other": f"curl -sS -v --max-time 30 https://{OTHER}/hello 2>&1 | grep -i '^< x-devsilo-blocked'",
        "private": f"curl -sS -v --max-time 30 https://private.{HOSTILE}/ 2>&1 | grep -i '^< x-devsilo-blocked'",
        "metadata": f"curl -sS -v --max-time 30 http://metadata.{HOSTILE}/ 2>&1 | grep -i '^< x-devsilo-blocked'",
        "tcp": f"python3 -c \"import socket; socket.create_connection(('{www_addr}', 443), timeout=5)\" 2>&1 "
               "| tail -1",
        "udp": f"python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
               f".sendto(b'x', ('{internet.dns_addr}', 53))\" 2>&1 | tail -1",
        "dns": f"python3 -c '{DNS_PROBE}' {WWW} {OTHER}",
        "env": "env | grep -ci -e secret -e authorization; true",
    }
    script = {"responses": [
        *({"text": name, "tool_calls": [bash(cmd)]} for name, cmd in checks.items()),
        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "checked"}}]},
    ]}
    (tmp_path / "script.json").write_text(json.dumps(script))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    stack = await start_stack(tmp_path, internet)
    try:
        code, out, err = await silo(
            stack, "run", "--headless", "--script", str(tmp_path / "script.json"), "--workspace", str(workspace),
            "--prompt", "go", "--json", "--allow-domain", WWW, "--allow-domain", API, "--allow-domain", f"*.{HOSTILE}",
            "--credential", "api")
        assert code == 0, err + out
        events = [json.loads(line) for line in out.splitlines()]
        access = next(e["data"] for e in events if e["kind"] == "access_report")
        assert access["credential_domains"] == [API], access  # the user is told where credentials go
        results = [e["data"]["content"] for e in events if e["kind"] == "tool_result" and e["data"]["name"] == "Bash"]
        got = {name: text.rsplit("[exit code", 1)[0] for name, text in zip(checks, results, strict=True)}
        assert got["curl"].strip() == f"hello from {WWW}", got["curl"]
        assert got["python"].strip() == f"hello from {WWW}", got["python"]
        assert got["git"].strip() == "cloned through the egress", got["git"]
        assert got["pip"].strip() == "ANSWER = 42", got["pip"]
        seen = json.loads(got["credential"])
        assert seen["authorization_sha256"] == hashlib.sha256(f"Bearer {SECRET}".encode()).hexdigest()
        assert f"domain not allowed: {OTHER}" in got["other"]
        assert f"private.{HOSTILE} resolves to 10.0.0.5 is private" in got["private"]
        assert f"metadata.{HOSTILE} resolves to 169.254.169.254 is link-local" in got["metadata"]
        assert "Network is unreachable" in got["tcp"], got["tcp"]
        assert "Network is unreachable" in got["udp"], got["udp"]
        assert f"{WWW} rcode 0 answers 1" in got["dns"] and f"{OTHER} rcode 3 answers 0" in got["dns"], got["dns"]
        assert got["env"].strip() == "0"
        assert (workspace / "tool" / "README").exists()
        # the DNS server never heard of the name off the list; the refusals were counted
        assert OTHER not in {name for name, _ in internet.queries}
        assert stack.metric("egress", "silo_egress_requests_total",
                            'decision="blocked",reason="domain_not_allowed"') >= 1
        assert stack.metric("egress", "silo_egress_credentials_injected_total") == 1
        # the secret went to api.* and nowhere else: not in any event, log or workspace file
        assert SECRET not in out + err
        for log in (stack.state_dir / "logs").glob("*.log"):
            assert SECRET not in log.read_text(errors="replace"), log
        for path in workspace.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
        # ... nor in any message kept in NATS; the journal has the session's network records
        sid = events[0]["session_id"]
        records = []
        nc = await connect_nats(StateDir(stack.state_dir), "harness", f"tls://127.0.0.1:{stack.nats_port}")
        try:
            for stream in (subjects.EVENTS_STREAM, subjects.JOURNAL_STREAM):
                info = await nc.jetstream().stream_info(stream)
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    msg = await nc.jetstream().get_msg(stream, seq)
                    assert SECRET.encode() not in (msg.data or b""), (stream, seq)
                    if msg.subject == subjects.journal_network(sid):
                        records.append(json.loads(msg.data[64:])["body"])
        finally:
            await nc.close()
        by_host = {(r["host"], r["allowed"], r["credential"]) for r in records}
        assert {(WWW, True, False), (API, True, True), (OTHER, False, False),
                (f"private.{HOSTILE}", False, False)} <= by_host
        assert all("?" not in r["path"] for r in records)
    finally:
        await asyncio.to_thread(stack.stop)


async def test_the_egress_serves_only_fresh_relay_lines_signed_by_the_executor_that_opened_the_session(
        internet: TestInternet, tmp_path: Path) -> None:
    """Anyone who can reach the egress's port is not a relay: bare, forged, replayed lines get nothing."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    script = {"responses": [
        {"text": "wait", "tool_calls": [bash("sleep 60")]},
        {"text": "done", "tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]},
    ]}
    (tmp_path / "script.json").write_text(json.dumps(script))
    stack = await start_stack(tmp_path, internet)
    run = None
    try:
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), "run", "--headless",
            "--script", str(tmp_path / "script.json"), "--workspace", str(workspace), "--prompt", "go", "--json",
            "--allow-domain", WWW, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert run.stdout is not None
        sid = json.loads(await asyncio.wait_for(run.stdout.readline(), 60))["session_id"]
        health = await asyncio.to_thread(stack.health, "egress")
        assert health is not None
        host, port = str(health["proxy"]).rsplit(":", 1)
        state = StateDir(stack.state_dir)
        connect = f"CONNECT {WWW}:443 HTTP/1.1\r\nHost: {WWW}:443\r\n\r\n".encode()

        async def attempt(first_line: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(first_line + b"TCP\n" + connect)
            try:
                return await asyncio.wait_for(reader.read(4096), 15)
            finally:
                writer.close()

        def hello(service: str, session_id: str = sid, ttl: float = 60.0) -> bytes:
            sealed, _ = Signer(state.identity(service)).seal(
                RelayHello(session_id=session_id), subjects.egress_relay("egress"), sid=session_id, ttl=ttl)
            return sealed

        # the executor's own line works (what its relay sends) ...
        line = relay_line(hello("executor"))
        assert (await attempt(line)).startswith(b"HTTP/1.1 200")
        # ... once: the same line again is a replay
        assert await attempt(line) == b""
        # a bare session line, a line signed by another service, a forged one, one for
        # a session that is not open: closed unanswered
        assert await attempt(session_line(sid)) == b""
        assert await attempt(relay_line(hello("harness"))) == b""
        forged = bytearray(hello("executor"))
        forged[70] ^= 1
        assert await attempt(relay_line(bytes(forged))) == b""
        assert await attempt(relay_line(hello("executor", session_id="notopen"))) == b""
        assert await attempt(relay_line(hello("executor", ttl=3600))) == b""
    finally:
        if run is not None and run.returncode is None:
            run.kill()
            await run.wait()
        await asyncio.to_thread(stack.stop)
