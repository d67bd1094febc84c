"""The signed envelope: every way a message can be untrustworthy is rejected, for its reason."""

from __future__ import annotations

import json
import time

import pytest
from devsilo.protocol import (
    Ack,
    BadSignature,
    Expired,
    GrantError,
    InvalidBody,
    Malformed,
    Oversized,
    Replayed,
    Role,
    RoleNotAllowed,
    ServiceIdentity,
    SessionGrant,
    SessionInput,
    Signer,
    TrustRoster,
    UnknownSender,
    Verifier,
    WrongKey,
    WrongSubject,
    open_grant,
    seal_grant,
    subjects,
)
from nacl.signing import SigningKey

SUBJECT = "silo.session.s1.input"


def ident(name: str, role: Role) -> ServiceIdentity:
    return ServiceIdentity(name, role, SigningKey.generate())


@pytest.fixture
def gateway() -> ServiceIdentity:
    return ident("gateway", Role.GATEWAY)


@pytest.fixture
def harness() -> ServiceIdentity:
    return ident("harness", Role.HARNESS)


@pytest.fixture
def verifier(gateway: ServiceIdentity, harness: ServiceIdentity) -> Verifier:
    return Verifier(TrustRoster([gateway.roster_entry(), harness.roster_entry()]))


def prompt() -> SessionInput:
    return SessionInput(kind="prompt", text="hello")


def resign(key: SigningKey, doc: dict[str, object]) -> bytes:
    return bytes(key.sign(json.dumps(doc).encode()))


def test_valid_message_opens_with_its_body(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, mid = Signer(gateway).seal(prompt(), SUBJECT, sid="s1")
    env = verifier.open(wire, SUBJECT)
    assert env.header.mid == mid and env.header.sender == "gateway"
    assert env.expect(SessionInput).text == "hello"


def test_flipped_byte_is_bad_signature(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway).seal(prompt(), SUBJECT)
    tampered = wire.replace(b"hello", b"HELLO")
    with pytest.raises(BadSignature):
        verifier.open(tampered, SUBJECT)


def test_unsigned_json_is_malformed_or_bad_signature(verifier: Verifier) -> None:
    with pytest.raises(Malformed):
        verifier.open(b'{"type":"ack"}', SUBJECT)
    with pytest.raises((BadSignature, Malformed)):
        verifier.open(b"\0" * 64 + b'{"type":"ack"}', SUBJECT)


def test_unknown_key_is_unknown_sender(verifier: Verifier) -> None:
    stranger = ident("gateway", Role.GATEWAY)
    wire, _ = Signer(stranger).seal(prompt(), SUBJECT)
    with pytest.raises(UnknownSender):
        verifier.open(wire, SUBJECT)


def test_key_of_another_service_is_wrong_key(gateway: ServiceIdentity, harness: ServiceIdentity,
                                              verifier: Verifier) -> None:
    # The harness signs with its own key but claims to be the gateway.
    doc = json.loads(Signer(harness).seal(prompt(), SUBJECT)[0][64:])
    doc.update(sender="gateway", role="gateway")
    with pytest.raises(WrongKey):
        verifier.open(resign(harness.signing_key, doc), SUBJECT)


def test_role_may_not_publish_on_subject(harness: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(harness).seal(prompt(), SUBJECT)
    with pytest.raises(RoleNotAllowed):
        verifier.open(wire, SUBJECT)


def test_type_not_allowed_on_subject(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway).seal(Ack(), SUBJECT)
    with pytest.raises(RoleNotAllowed):
        verifier.open(wire, SUBJECT)


def test_moved_to_another_subject_is_wrong_subject(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway).seal(prompt(), SUBJECT)
    with pytest.raises(WrongSubject):
        verifier.open(wire, "silo.session.other.input")


def test_expired_message(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway, clock=lambda: time.time() - 120).seal(prompt(), SUBJECT)
    with pytest.raises(Expired):
        verifier.open(wire, SUBJECT)


def test_message_from_the_future(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway, clock=lambda: time.time() + 3600).seal(prompt(), SUBJECT)
    with pytest.raises(Expired):
        verifier.open(wire, SUBJECT)


def test_overlong_lifetime(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway, ttl=86400).seal(prompt(), SUBJECT)
    with pytest.raises(Expired):
        verifier.open(wire, SUBJECT)


def test_replayed_message(gateway: ServiceIdentity, verifier: Verifier) -> None:
    wire, _ = Signer(gateway).seal(prompt(), SUBJECT)
    verifier.open(wire, SUBJECT)
    with pytest.raises(Replayed):
        verifier.open(wire, SUBJECT)


def test_oversized_message(gateway: ServiceIdentity) -> None:
    v = Verifier(TrustRoster([gateway.roster_entry()]), max_bytes=512)
    wire, _ = Signer(gateway).seal(SessionInput(kind="prompt", text="x" * 600), SUBJECT)
    with pytest.raises(Oversized):
        v.open(wire, SUBJECT)


@pytest.mark.parametrize("payload", [b"not json", b"[1,2]", b'{"v":1}', "{\"v\":\"\udc80\"}".encode("utf-8", "surrogatepass")])
def test_garbage_after_signature_is_malformed(verifier: Verifier, payload: bytes) -> None:
    with pytest.raises(Malformed):
        verifier.open(b"\1" * 64 + payload, SUBJECT)


def test_signed_body_that_breaks_its_schema(gateway: ServiceIdentity, verifier: Verifier) -> None:
    doc = json.loads(Signer(gateway).seal(prompt(), SUBJECT)[0][64:])
    doc["body"] = {"kind": "format-disk", "text": 3}
    with pytest.raises(InvalidBody):
        verifier.open(resign(gateway.signing_key, doc), SUBJECT)


def test_unknown_type(gateway: ServiceIdentity, verifier: Verifier) -> None:
    doc = json.loads(Signer(gateway).seal(prompt(), SUBJECT)[0][64:])
    doc["type"] = "launch_missiles"
    with pytest.raises(InvalidBody):
        verifier.open(resign(gateway.signing_key, doc), SUBJECT)


def grant(**kw: object) -> SessionGrant:
    now = time.time()
    base: dict[str, object] = dict(grant_id="g" * 12, session_id="s1", user="alice", workspace="/w",
                                   issued_at=now, expires_at=now + 3600)
    base.update(kw)
    return SessionGrant.model_validate(base)


def test_grant_round_trip(gateway: ServiceIdentity, verifier: Verifier) -> None:
    g = open_grant(verifier, seal_grant(Signer(gateway), grant()), session_id="s1")
    assert g.user == "alice"


def test_grant_not_signed_by_a_gateway_is_refused(harness: ServiceIdentity, verifier: Verifier) -> None:
    doc = json.loads(Signer(harness).seal(grant(), subjects.GRANT, sid="s1")[0][64:])
    import base64

    forged = base64.b64encode(resign(harness.signing_key, doc)).decode()
    with pytest.raises(GrantError, match="role_not_allowed|may not publish"):
        open_grant(verifier, forged)


def test_grant_widened_after_signing_is_refused(gateway: ServiceIdentity, verifier: Verifier) -> None:
    import base64

    wire = base64.b64decode(seal_grant(Signer(gateway), grant()))
    widened = wire.replace(b'"allow_domains":[]', b'"allow_domains":["evil.example"]')
    assert widened != wire
    with pytest.raises(GrantError, match="bad_signature"):
        open_grant(verifier, base64.b64encode(widened).decode())


def test_expired_grant_is_refused(gateway: ServiceIdentity, verifier: Verifier) -> None:
    old = grant(issued_at=time.time() - 7200, expires_at=time.time() - 3600)
    with pytest.raises(GrantError, match="expired"):
        open_grant(verifier, seal_grant(Signer(gateway), old))


def test_grant_for_another_session_is_refused(gateway: ServiceIdentity, verifier: Verifier) -> None:
    with pytest.raises(GrantError, match="not s2"):
        open_grant(verifier, seal_grant(Signer(gateway), grant()), session_id="s2")


def test_subject_ids_cannot_inject_wildcards() -> None:
    from devsilo.protocol import ConfigError

    for bad in ("a.b", "*", ">", "", "a b"):
        with pytest.raises(ConfigError):
            subjects.session_input(bad)
