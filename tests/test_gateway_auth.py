"""The gateway's TLS and authentication: token, pairing codes, signed challenges, users, versions.

One `silo up` for the module with two gateway replicas on one NATS: ``gateway``
(the self-signed certificate, defaults) and ``gateway2`` (an operator's own
certificate, a short auth deadline and code lifetime, a low lockout threshold).
Clients are real TLS WebSocket clients pinned to the certificate they expect.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from devsilo.cli._client import ClientKeyPair, GatewayClient, GatewayError
from devsilo.cli._workspace_transfer import RemoteWorkspace
from devsilo.gateway._pairing import PairingLimiter, PairingRefused
from devsilo.gateway._tls import gateway_certificate, operator_certificate
from devsilo.protocol import AuthError, ConfigError
from devsilo.protocol.client import (
    PAIRING_ALPHABET,
    Attach,
    Authenticate,
    AuthErrorFrame,
    ClientRevoked,
    CreateSession,
    ErrorFrame,
    Interrupt,
    ListClients,
    ListSessions,
    PairingCode,
    PairingCodeRequest,
    Prompt,
    RevokeClient,
    SessionCreated,
    Sessions,
    ShellOpenFrame,
    Shutdown,
    WorkspaceCommand,
    WorkspaceUploadNeeded,
    challenge_message,
)
from devsilo.runtime._state import StateDir
from devsilo.testing import Stack
from devsilo.testing._stack import free_ports

G2_DEADLINE_S = 3.0  # short for the deadline test, long enough for the others on a loaded machine
G2_CODE_VALID_S = 1.0
G2_MAX_FAILURES = 3


# -- fixtures ------------------------------------------------------------------------------


def _self_signed(name: str) -> tuple[bytes, bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, key


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`silo up` with a second gateway replica that serves an operator's certificate."""
    root = tmp_path_factory.mktemp("gwauth")
    state_dir = root / "state"
    (g2_port,) = free_ports(1)
    # Many tests here fail a pairing on purpose from 127.0.0.1: the first gateway tolerates them,
    # the second locks an address out after three (its lockout test uses other loopback addresses).
    s = Stack(state_dir, services={"gateway": {"options": {"pairing_max_failures": 1000}}, "gateway2": {
        "role": "gateway", "metrics_port": 0,
        "options": {"port": g2_port, "tls_cert": "operator/cert.pem", "tls_key": "operator/key.pem",
                    "auth_deadline_s": G2_DEADLINE_S, "pairing_code_valid_s": G2_CODE_VALID_S,
                    "pairing_max_failures": G2_MAX_FAILURES, "pairing_lockout_s": 600}}})
    cert_pem, key_pem, _ = _self_signed("operator.example")
    (state_dir / "operator").mkdir(mode=0o700)
    (state_dir / "operator" / "cert.pem").write_bytes(cert_pem)
    (state_dir / "operator" / "key.pem").write_bytes(key_pem)
    os.chmod(state_dir / "operator" / "key.pem", 0o600)
    s.start()
    s.g2_url = f"wss://127.0.0.1:{g2_port}/ws"  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


class Target:
    """Where one gateway replica listens and which certificate it serves."""

    def __init__(self, url: str, fingerprint: str, token: str) -> None:
        self.url, self.fingerprint, self.token = url, fingerprint, token

    def client(self, name: str = "test") -> GatewayClient:
        return GatewayClient(self.url, self.fingerprint, client_name=name)


@pytest.fixture(scope="module")
def g1(stack: Stack) -> Target:
    state = StateDir(stack.state_dir)
    return Target(stack.stack["gateway_url"], state.gateway_fingerprint("gateway"), state.client_token())


@pytest.fixture(scope="module")
def g2(stack: Stack) -> Target:
    state = StateDir(stack.state_dir)
    return Target(stack.g2_url, state.gateway_fingerprint("gateway2"), state.client_token())  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def operator(g1: Target) -> AsyncIterator[GatewayClient]:
    """A client on the first gateway authenticated with the local token (operator)."""
    c = g1.client("op")
    await c.connect(g1.token)
    try:
        yield c
    finally:
        await c.close()


async def reply(client: GatewayClient, frame: Any) -> Any:
    """Send ``frame`` and return the next frame that is not an event."""
    await client.send(frame)
    while True:
        got = await asyncio.wait_for(client.receive(), timeout=30)
        if got.type != "event":
            return got


async def code_for(op: GatewayClient, user: str, name: str = "laptop", operator: bool = False) -> str:
    got = await reply(op, PairingCodeRequest(user=user, client_name=name, operator=operator))
    assert isinstance(got, PairingCode), got
    return got.code


async def paired(target: Target, op: GatewayClient, user: str, name: str = "laptop",
                 key_type: str = "ed25519") -> tuple[str, ClientKeyPair]:
    """A key paired for ``user``: (key_id, key)."""
    key = ClientKeyPair.generate(key_type)  # type: ignore[arg-type]
    code = await code_for(op, user, name)
    c = target.client(name)
    try:
        p = await c.pair(code, key)
    finally:
        await c.close()
    return p.key_id, key


async def raw_ws(target: Target) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse, bytes]:
    """A bare WebSocket after hello and challenge: (session, ws, challenge nonce)."""
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(target.url, ssl=aiohttp.Fingerprint(bytes.fromhex(target.fingerprint)))
    hello = await ws.receive_json(timeout=10)
    assert hello["type"] == "hello"
    challenge = await ws.receive_json(timeout=10)
    assert challenge["type"] == "challenge"
    return http, ws, base64.b64decode(challenge["nonce"])


async def refused(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The auth_error the gateway sends, after which it closes the connection."""
    frame = await ws.receive_json(timeout=10)
    assert frame["type"] == "auth_error", frame
    closing = await ws.receive(timeout=10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    return frame


def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          check=False, capture_output=True, text=True, timeout=60)


# -- TLS ---------------------------------------------------------------------------------------


async def _peer_fingerprint(url: str) -> str:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    import hashlib
    return hashlib.sha256(der).hexdigest()


async def test_https_get_serves_the_landing_page_and_the_web_app_directory(g1: Target) -> None:
    base = g1.url.replace("wss://", "https://").removesuffix("/ws")
    pin = aiohttp.Fingerprint(bytes.fromhex(g1.fingerprint))
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/", ssl=pin) as r:
            assert r.status == 200 and "devsilo gateway" in await r.text()
        async with http.get(base + "/app", ssl=pin) as r:
            assert r.status == 200 and '<script type="module" src="app.js">' in await r.text()
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get(base + "/app/../../../etc/passwd", ssl=pin) as r:
            assert r.status in (403, 404)


async def test_operator_certificate_is_served_and_the_self_signed_pin_fails_on_it(g1: Target,
                                                                                   g2: Target) -> None:
    assert g2.fingerprint != g1.fingerprint
    assert await _peer_fingerprint(g2.url) == g2.fingerprint
    c = g2.client()
    assert await c.connect(g2.token) == "local"
    await c.close()
    wrong = GatewayClient(g2.url, g1.fingerprint)
    with pytest.raises(GatewayError, match="does not match the pinned fingerprint"):
        await wrong.connect(g1.token)


def test_operator_certificate_mismatch_and_unreadable_files_are_clear_errors(tmp_path: Path,
                                                                                state_dir: StateDir) -> None:
    cert_a, key_a, _ = _self_signed("a")
    _, key_b, _ = _self_signed("b")
    (tmp_path / "a.crt").write_bytes(cert_a)
    (tmp_path / "a.key").write_bytes(key_a)
    (tmp_path / "b.key").write_bytes(key_b)
    assert operator_certificate(tmp_path / "a.crt", tmp_path / "a.key").operator
    with pytest.raises(ConfigError, match="do not match"):
        operator_certificate(tmp_path / "a.crt", tmp_path / "b.key")
    with pytest.raises(ConfigError, match="cannot read the gateway's key"):
        operator_certificate(tmp_path / "a.crt", tmp_path / "missing.key")
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        operator_certificate(tmp_path / "junk.crt", tmp_path / "a.key")
    with pytest.raises(ConfigError, match="go together"):
        gateway_certificate(state_dir, {"tls_cert": str(tmp_path / "a.crt")})
    own = gateway_certificate(state_dir, {})
    assert not own.operator and own.fingerprint == state_dir.gateway_fingerprint()


# -- the local token ---------------------------------------------------------------------------


async def test_local_token_authenticates_as_the_operator(g1: Target) -> None:
    c = g1.client()
    assert await c.connect(g1.token) == "local"
    assert c.auth is not None and c.auth.operator and c.auth.key_id is None
    assert c.hello is not None and c.hello.versions == (1,) and c.hello.auth_deadline_s == 30.0
    await c.close()


async def test_wrong_token_is_refused_and_the_connection_closes(g1: Target) -> None:
    http, ws, _ = await raw_ws(g1)
    try:
        wrong = "0" * 64 if g1.token != "0" * 64 else "1" * 64
        await ws.send_str(Authenticate(method="token", token=wrong).model_dump_json())
        assert "invalid token" in (await refused(ws))["message"]
    finally:
        await ws.close()
        await http.close()


def test_a_token_file_others_can_read_stops_the_gateway_with_a_clear_error(stack: Stack) -> None:
    token = StateDir(stack.state_dir).token_path
    listen, metrics = free_ports(2)
    os.chmod(token, 0o640)
    try:
        r = subprocess.run([sys.executable, "-m", "devsilo.cli", "service", "gateway", "--id", "gateway2",
                            "--state-dir", str(stack.state_dir), "--nats", stack.stack["nats_url"],
                            "--metrics-port", str(metrics), "--listen", f"127.0.0.1:{listen}"],
                           check=False, capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(token, 0o600)
    assert r.returncode == 1
    assert f"{token} has mode 0o640, readable by others (must be 0o600)" in r.stderr


# -- pairing and signed challenges -----------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256"])
async def test_pairing_registers_a_key_that_then_signs_challenges(g1: Target, g2: Target, operator: GatewayClient,
                                                                  key_type: str) -> None:
    key = ClientKeyPair.generate(key_type)  # type: ignore[arg-type]
    code = await code_for(operator, "alice", f"phone-{key_type}")
    assert len(code) == 8 and set(code) <= set(PAIRING_ALPHABET)
    c = g1.client("what-the-client-calls-itself")
    p = await c.pair(code, key)
    assert (p.user, p.operator) == ("alice", False)
    assert c.auth is not None and c.auth.user == "alice" and c.auth.key_id == p.key_id
    assert isinstance(await reply(c, ListSessions()), Sessions)
    await c.close()
    # Later connections, on either replica, sign a fresh challenge bound to that replica's certificate.
    for target in (g1, g2):
        again = target.client()
        assert await again.connect_key(p.key_id, key) == "alice"
        await again.close()
    listed = await reply(operator, ListClients())
    mine = [k for k in listed.clients if k.key_id == p.key_id]
    assert len(mine) == 1 and mine[0].client_name == f"phone-{key_type}" and mine[0].key_type == key_type
    assert mine[0].last_seen is not None and mine[0].last_seen >= mine[0].created_at


async def test_wrong_code_is_refused(g1: Target) -> None:
    c = g1.client()
    with pytest.raises(AuthError, match="not valid"):
        await c.pair("ABCDEFGH", ClientKeyPair.generate())
    await c.close()


async def test_a_code_is_used_once(g1: Target, operator: GatewayClient) -> None:
    code = await code_for(operator, "alice")
    first = g1.client()
    await first.pair(code, ClientKeyPair.generate())
    await first.close()
    second = g1.client()
    with pytest.raises(AuthError, match="already used"):
        await second.pair(code, ClientKeyPair.generate())
    await second.close()


async def test_two_clients_racing_with_one_code_pair_exactly_once(g1: Target, g2: Target,
                                                                  operator: GatewayClient) -> None:
    code = await code_for(operator, "alice")
    clients = [g1.client(), g2.client(), g1.client(), g2.client()]

    async def attempt(c: GatewayClient) -> bool:
        try:
            await c.pair(code, ClientKeyPair.generate())
            return True
        except AuthError:
            return False
        finally:
            await c.close()
    assert sorted(await asyncio.gather(*(attempt(c) for c in clients))) == [False, False, False, True]


async def test_an_expired_code_is_refused(g2: Target) -> None:
    op = g2.client("op")
    await op.connect(g2.token)
    code = await code_for(op, "alice")
    await op.close()
    await asyncio.sleep(G2_CODE_VALID_S + 0.3)
    c = g2.client()
    with pytest.raises(AuthError, match="expired"):
        await c.pair(code, ClientKeyPair.generate())
    await c.close()


@pytest.mark.parametrize(("key_type", "public_key"), [
    ("ecdsa-p256", base64.b64encode(b"\x04" + b"\x01" * 64).decode()),  # not a point on the curve
    ("ed25519", base64.b64encode(b"\x01" * 31).decode()),
    ("ed25519", "not base64!"),
], ids=["off-curve-p256", "short-ed25519", "not-base64"])
async def test_a_public_key_that_is_no_key_is_refused_and_leaves_the_code_usable(
        g1: Target, operator: GatewayClient, key_type: str, public_key: str) -> None:
    code = await code_for(operator, "alice")
    http, ws, _ = await raw_ws(g1)
    try:
        await ws.send_json({"type": "pair", "v": 1, "code": code, "client_name": "x", "key_type": key_type,
                            "public_key": public_key})
        message = (await refused(ws))["message"]
        assert f"not a valid {key_type} key" in message or "not base64" in message
    finally:
        await ws.close()
        await http.close()
    c = g1.client()
    assert (await c.pair(code, ClientKeyPair.generate())).user == "alice"
    await c.close()


async def test_wrong_signature_is_refused(g1: Target, operator: GatewayClient) -> None:
    key_id, key = await paired(g1, operator, "alice")
    c = g1.client()
    with pytest.raises(AuthError, match="signature does not verify"):
        await c.connect_key(key_id, ClientKeyPair.generate())  # someone else's key
    await c.close()
    # The right key over the right challenge, but signed for another gateway's certificate.
    http, ws, nonce = await raw_ws(g1)
    try:
        other = key.sign(challenge_message("ab" * 32, nonce))
        await ws.send_str(Authenticate(method="key", key_id=key_id, signature=other).model_dump_json())
        assert "signature does not verify" in (await refused(ws))["message"]
    finally:
        await ws.close()
        await http.close()


async def test_a_signature_replayed_on_a_new_connection_is_refused(g1: Target, operator: GatewayClient) -> None:
    key_id, key = await paired(g1, operator, "alice")
    http, ws, nonce = await raw_ws(g1)
    signed = Authenticate(method="key", key_id=key_id, signature=key.sign(challenge_message(g1.fingerprint, nonce)))
    try:
        await ws.send_str(signed.model_dump_json())
        assert (await ws.receive_json(timeout=10))["type"] == "auth_ok"
    finally:
        await ws.close()
        await http.close()
    http, ws, _ = await raw_ws(g1)
    try:
        await ws.send_str(signed.model_dump_json())
        assert "signature does not verify" in (await refused(ws))["message"]
    finally:
        await ws.close()
        await http.close()


async def test_revoking_a_key_closes_its_connections_on_every_replica_at_once(g1: Target, g2: Target,
                                                                              operator: GatewayClient) -> None:
    key_id, key = await paired(g1, operator, "carol")
    on_g1, on_g2 = g1.client(), g2.client()
    await on_g1.connect_key(key_id, key)
    await on_g2.connect_key(key_id, key)
    got = await reply(operator, RevokeClient(key_id=key_id))
    assert isinstance(got, ClientRevoked)
    for c in (on_g1, on_g2):
        frame = await asyncio.wait_for(c.receive(), timeout=10)
        assert isinstance(frame, AuthErrorFrame) and frame.code == "revoked"
        with pytest.raises(GatewayError, match="closed"):
            await asyncio.wait_for(c.receive(), timeout=10)
        await c.close()
    again = g1.client()
    with pytest.raises(AuthError, match="no client key"):
        await again.connect_key(key_id, key)
    await again.close()
    assert key_id not in [k.key_id for k in (await reply(operator, ListClients())).clients]


async def test_silo_pair_and_silo_clients_list_and_revoke(stack: Stack, g1: Target) -> None:
    r = silo(stack, "pair", "--user", "dave", "--name", "tablet", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["user"] == "dave" and out["fingerprint"] == g1.fingerprint and out["valid_s"] == 120
    c = g1.client()
    p = await c.pair(out["code"], ClientKeyPair.generate())
    r = silo(stack, "clients", "list")
    line = [x for x in r.stdout.splitlines() if x.startswith(p.key_id)]
    assert len(line) == 1 and "dave  tablet  ed25519" in line[0] and "last seen 20" in line[0]
    r = silo(stack, "clients", "revoke", p.key_id)
    assert r.returncode == 0 and "revoked" in r.stdout
    frame = await asyncio.wait_for(c.receive(), timeout=10)
    assert isinstance(frame, AuthErrorFrame) and frame.code == "revoked"
    await c.close()
    r = silo(stack, "clients", "revoke", p.key_id)
    assert r.returncode == 1 and f"no client key {p.key_id} visible to you" in r.stderr


# -- deadline, versions, malformed handshakes, rate limits ---------------------------------------------


async def test_no_authentication_within_the_deadline_closes_the_connection(g2: Target) -> None:
    http, ws, _ = await raw_ws(g2)
    try:
        frame = await refused(ws)  # nothing sent: the gateway gives up after its deadline
        assert frame["code"] == "timeout" and f"within {G2_DEADLINE_S:.0f} s" in frame["message"]
    finally:
        await ws.close()
        await http.close()


@pytest.mark.parametrize("v", [2, 0, "1", None, True, 1.0])
async def test_an_unknown_protocol_version_is_refused_naming_the_supported_ones(g1: Target, v: object) -> None:
    http, ws, _ = await raw_ws(g1)
    try:
        # A version-2 frame may carry fields version 1 does not know: the version is checked first.
        await ws.send_json({"type": "authenticate", "v": v, "method": "token", "token": g1.token,
                            "new_in_v2": True})
        frame = await refused(ws)
        assert frame["code"] == "unsupported_version" and frame["versions"] == [1]
        assert "speaks version(s) 1" in frame["message"]
    finally:
        await ws.close()
        await http.close()
    c = g1.client()  # and the gateway is still there
    assert await c.connect(g1.token) == "local"
    await c.close()


@pytest.mark.parametrize("payload", [
    b"\x00\x01binary",
    "not json",
    "[1, 2]",
    json.dumps({"type": "list_sessions"}),
    json.dumps({"type": "authenticate", "method": "key", "key_id": "00" * 8}),
    json.dumps({"type": "authenticate", "method": "token", "token": "x" * 10_000}),
    json.dumps({"type": "pair", "code": "IIIIIIII", "public_key": "AA==", "client_name": "x"}),
], ids=["binary", "not-json", "array", "request-before-auth", "key-without-signature", "huge-token",
        "code-outside-alphabet"])
async def test_a_malformed_first_frame_is_refused_with_auth_error(g1: Target, payload: str | bytes) -> None:
    http, ws, _ = await raw_ws(g1)
    try:
        if isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
        assert (await refused(ws))["code"] == "auth_failed"
    finally:
        await ws.close()
        await http.close()


async def _pair_from(target: Target, address: str, code: str) -> dict[str, Any]:
    """Pair a fresh key from a given loopback address; the gateway's first answer."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
    try:
        ws = await http.ws_connect(target.url, ssl=aiohttp.Fingerprint(bytes.fromhex(target.fingerprint)))
        for expected in ("hello", "challenge"):
            assert (await ws.receive_json(timeout=10))["type"] == expected
        await ws.send_json({"type": "pair", "v": 1, "code": code, "client_name": "x",
                            "public_key": ClientKeyPair.generate().public_key()})
        answer: dict[str, Any] = await ws.receive_json(timeout=10)
        await ws.close()
        return answer
    finally:
        await http.close()


async def test_failed_pairing_attempts_lock_the_address_out(stack: Stack, g2: Target,
                                                            operator: GatewayClient) -> None:
    before = stack.metric("gateway2", "silo_pairing_lockouts_total")
    for _ in range(G2_MAX_FAILURES):
        answer = await _pair_from(g2, "127.0.0.2", "ZZZZZZZZ")
        assert answer["type"] == "auth_error" and "not valid" in answer["message"]
    assert stack.metric("gateway2", "silo_pairing_lockouts_total") == before + 1
    code = await code_for(operator, "alice")
    answer = await _pair_from(g2, "127.0.0.2", code)  # even the right code: the limiter answers first
    assert answer["code"] == "rate_limited"
    assert "too many failed pairing attempts from your address" in answer["message"]
    # Another address is not locked out, and the refused attempt did not spend the code.
    assert (await _pair_from(g2, "127.0.0.3", code))["type"] == "paired"


def test_pairing_limiter_counts_per_address_and_globally_within_a_window() -> None:
    now = [1000.0]
    lim = PairingLimiter(per_address=3, global_max=4, window_s=60, lockout_s=120, clock=lambda: now[0])
    assert not lim.failed("a") and not lim.failed("a")
    now[0] += 61  # those two left the window
    assert not lim.failed("a") and not lim.failed("a")
    lim.check("a")
    assert lim.failed("a")  # third within the window
    with pytest.raises(PairingRefused, match="from your address") as exc:
        lim.check("a")
    assert exc.value.outcome == "locked_out"
    lim.check("b")  # others are not locked out ...
    lim.failed("b")
    with pytest.raises(PairingRefused, match="on this gateway") as exc:
        lim.check("c")  # ... until the global budget (4 in the window) is spent
    assert exc.value.outcome == "global_limit"
    now[0] += 61
    lim.check("c")
    with pytest.raises(PairingRefused):
        lim.check("a")  # still locked out: 120 s from its third failure
    now[0] += 60
    lim.check("a")


# -- users and sessions ------------------------------------------------------------------------------


async def test_a_user_sees_and_drives_only_their_own_sessions(g1: Target, operator: GatewayClient,
                                                              tmp_path: Path) -> None:
    alice_id, alice_key = await paired(g1, operator, "alice", "alice-laptop")
    bob_id, bob_key = await paired(g1, operator, "bob", "bob-laptop")
    alice, bob = g1.client("alice-laptop"), g1.client("bob-laptop")
    await alice.connect_key(alice_id, alice_key)
    await bob.connect_key(bob_id, bob_key)
    try:
        ws = tmp_path / "alice-ws"
        ws.mkdir()
        (ws / "notes.txt").write_text("alice's\n")
        # A user's workspace comes from their own machine; the executors' own files are the operator's.
        create = CreateSession(workspace=str(ws), workspace_host="alice-host", llm="mock",
                               script=json.dumps({"responses": [{"text": "hello"}]}))
        got = await reply(alice, create)
        assert isinstance(got, ErrorFrame) and "only an operator works on the executors' own files" in got.message
        needed = await reply(alice, WorkspaceCommand(op="lock", path=str(ws), workspace_host="alice-host"))
        assert isinstance(needed, WorkspaceUploadNeeded) and "only an operator" in needed.reason
        got = await reply(bob, ShellOpenFrame(workspace=str(ws), command="true", tty=False))
        assert isinstance(got, ErrorFrame) and "only an operator opens shells" in got.message
        out = io.StringIO()
        remote = RemoteWorkspace(alice, tmp_path / "transfers", ws, "alice-host", out, chunk_size=64 * 1024,
                                 progress=out)
        assert await remote.lock(needed.executor, as_json=True) == 0, out.getvalue()
        created = await reply(alice, create)
        assert isinstance(created, SessionCreated), created
        sid = created.session_id
        listed = await reply(bob, ListSessions())
        assert sid not in [s.session_id for s in listed.sessions]
        assert sid in [s.session_id for s in (await reply(operator, ListSessions())).sessions]
        assert sid in [s.session_id for s in (await reply(alice, ListSessions())).sessions]
        assert str(ws) not in json.dumps((await reply(bob, WorkspaceCommand(op="list"))).workspaces)
        for target in (sid, "nosuchsession"):  # foreign and absent look the same
            for frame in (Attach(session_id=target), Prompt(session_id=target, text="hi"),
                          Interrupt(session_id=target), Shutdown(session_id=target),
                          ShellOpenFrame(session_id=target, command="true", tty=False)):
                got = await reply(bob, frame)
                assert isinstance(got, ErrorFrame), (frame, got)
                assert got.message == f"no session {target} visible to you", (frame, got)
        # A user asks codes for themselves only, and never for an operator.
        for req in (PairingCodeRequest(user="alice", client_name="x"),
                    PairingCodeRequest(client_name="x", operator=True)):
            got = await reply(bob, req)
            assert isinstance(got, ErrorFrame) and "only an operator" in got.message
        own = await reply(bob, PairingCodeRequest(client_name="bob-phone"))
        assert isinstance(own, PairingCode) and own.user == "bob" and not own.operator
        # ... and lists and revokes only their own keys.
        assert {k.user for k in (await reply(bob, ListClients())).clients} == {"bob"}
        got = await reply(bob, RevokeClient(key_id=alice_id))
        assert isinstance(got, ErrorFrame) and got.message == f"no client key {alice_id} visible to you"
        # Alice drives her own session.
        await alice.send(Attach(session_id=sid))
        await alice.send(Prompt(session_id=sid, text="hello there"))
        kinds: list[str] = []
        while "shutdown" not in kinds:
            frame = await asyncio.wait_for(alice.receive(), timeout=60)
            if frame.type == "event":
                kinds.append(frame.kind)
                if frame.kind == "turn_complete":
                    await alice.send(Shutdown(session_id=sid))
        assert "user_prompt" in kinds and "assistant_text" in kinds
    finally:
        await alice.close()
        await bob.close()


async def test_pairing_grants_operator_only_when_an_operator_asks(g1: Target, operator: GatewayClient) -> None:
    key = ClientKeyPair.generate()
    c = g1.client()
    p = await c.pair(await code_for(operator, "erin", operator=True), key)
    assert p.operator and c.auth is not None and c.auth.operator
    got = await reply(c, PairingCodeRequest(user="frank", client_name="desk"))
    assert isinstance(got, PairingCode) and got.user == "frank"
    await c.close()


# -- restarts and metrics -----------------------------------------------------------------------------


async def test_certificate_and_keys_survive_a_gateway_restart(stack: Stack, g1: Target,
                                                              operator: GatewayClient) -> None:
    key_id, key = await paired(g1, operator, "alice")
    fp = await _peer_fingerprint(g1.url)
    assert fp == g1.fingerprint
    pid = stack.live_pid("gateway")
    assert pid is not None
    os.kill(pid, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and stack.live_pid("gateway") in (None, pid):
        await asyncio.sleep(0.1)
    assert stack.live_pid("gateway") not in (None, pid)
    while True:  # /healthz answers before the TLS listener is up
        try:
            again = await _peer_fingerprint(g1.url)
            break
        except OSError:
            assert time.monotonic() < deadline, "the restarted gateway never listened"
            await asyncio.sleep(0.1)
    assert again == fp
    c = g1.client()
    assert await c.connect_key(key_id, key) == "alice"
    await c.close()


def test_auth_metrics_count_outcomes_by_method(stack: Stack) -> None:
    # known outcomes are pre-declared (zeros), so count them rather than look for their names
    assert stack.metric("gateway2", "silo_auth_total", 'method="key",outcome="ok"') >= 1
    assert stack.metric("gateway2", "silo_auth_total", 'method="none",outcome="timeout"') >= 1
    assert stack.metric("gateway2", "silo_pairing_attempts_total", 'outcome="expired_code"') >= 1
    assert stack.metric("gateway2", "silo_pairing_attempts_total", 'outcome="locked_out"') >= 1
    assert stack.metric("gateway2", "silo_client_connections_accepted_total") >= 1
    assert stack.metric("gateway2", "silo_auth_total", 'method="token",outcome="ok"') >= 1
