"""The state directory: layout, modes, idempotence, rotation, refusals, loaders."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import ssl
import stat
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from devsilo.protocol import ConfigError, Role, RosterEntry, TrustRoster, key_id
from devsilo.runtime._state import GATEWAY_CERT_DAYS, StackConfig, StateDir
from nacl.signing import SigningKey

SERVICES = ("gateway", "harness", "executor", "egress")
SECRETS = (
    *(f"keys/{s}.sign" for s in SERVICES),
    *(f"nats/{s}.nk" for s in SERVICES),
    "nats/server.conf",
    "tls/ca.crt",
    "tls/ca.key",
    "tls/nats.crt",
    "tls/nats.key",
    "tls/gateway.crt",
    "tls/gateway.key",
    "gateway/token",
)
EXPECTED_FILES = {"config.json", "roster.json", *SECRETS}


def snapshot(state: StateDir) -> dict[str, bytes]:
    """Every file under the state directory, by relative path."""
    return {
        str(p.relative_to(state.root)): p.read_bytes() for p in state.root.rglob("*") if p.is_file()
    }


def test_init_creates_every_file_with_private_modes(state_dir: StateDir) -> None:
    files = {str(p.relative_to(state_dir.root)) for p in state_dir.root.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES
    assert stat.S_IMODE(state_dir.root.stat().st_mode) == 0o700
    for p in state_dir.root.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.lstat().st_mode) == want, p


def test_init_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = StateDir(tmp_path / "state")
        state.initialize()
    finally:
        os.umask(old)
    for p in [state.root, *state.root.rglob("*")]:
        assert stat.S_IMODE(p.lstat().st_mode) in (0o600, 0o700), p


def test_default_config(state_dir: StateDir) -> None:
    cfg = state_dir.config()
    assert {s: cfg.role_of(s) for s in cfg.service_ids()} == {s: Role(s) for s in SERVICES}
    assert cfg.metrics_ports == {"gateway": 9301, "harness": 9302, "executor": 9303, "egress": 9304}
    assert (cfg.nats.host, cfg.nats.port, cfg.nats.max_payload) == ("127.0.0.1", 4222, 1 << 20)
    assert cfg.nats.url == "tls://127.0.0.1:4222"
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 7443)
    with pytest.raises(ConfigError, match="unknown service id 'nobody'"):
        cfg.role_of("nobody")


def test_rerun_keeps_every_file(state_dir: StateDir) -> None:
    before = snapshot(state_dir)
    lines = state_dir.initialize()
    assert snapshot(state_dir) == before
    assert lines == [f"state directory {state_dir.root} is complete; nothing to do"]


def test_rotate_replaces_every_secret_and_the_roster_trusts_only_new_keys(
    state_dir: StateDir,
) -> None:
    old_kids = {s: state_dir.identity(s).kid for s in SERVICES}
    before = snapshot(state_dir)
    state_dir.initialize(rotate=True)
    after = snapshot(state_dir)
    for name in SECRETS:
        assert after[name] != before[name], name
    assert after["config.json"] == before["config.json"]
    roster = state_dir.roster()
    for s in SERVICES:
        assert roster.lookup(old_kids[s]) is None
        new = state_dir.identity(s)
        entry = roster.lookup(new.kid)
        assert entry is not None and (entry.service_id, entry.role) == (s, new.role)
    assert len(roster.entries()) == len(SERVICES)


def test_missing_file_is_recreated_and_others_kept(state_dir: StateDir) -> None:
    before = snapshot(state_dir)
    (state_dir.root / "gateway/token").unlink()
    lines = state_dir.initialize()
    after = snapshot(state_dir)
    assert lines == ["created client token gateway/token"]
    assert {k for k in after if after[k] != before[k]} == {"gateway/token"}


def test_new_ca_reissues_the_nats_certificate(state_dir: StateDir) -> None:
    old_nats = state_dir.nats_cert_path.read_bytes()
    state_dir.ca_key_path.unlink()
    state_dir.initialize()
    ca = x509.load_pem_x509_certificate(state_dir.ca_cert_path.read_bytes())
    nats = x509.load_pem_x509_certificate(state_dir.nats_cert_path.read_bytes())
    assert state_dir.nats_cert_path.read_bytes() != old_nats
    nats.verify_directly_issued_by(ca)


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o705, 0o701])
def test_refuses_group_or_world_accessible_state_dir(state_dir: StateDir, mode: int) -> None:
    state_dir.root.chmod(mode)
    with pytest.raises(ConfigError, match="open to group or world"):
        state_dir.initialize()
    with pytest.raises(ConfigError, match="open to group or world"):
        state_dir.identity("harness")
    assert stat.S_IMODE(state_dir.root.stat().st_mode) == mode  # not silently "fixed"


def test_refuses_symlinked_state_dir(state_dir: StateDir, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(state_dir.root)
    with pytest.raises(ConfigError, match="symlink"):
        StateDir(link).initialize()
    with pytest.raises(ConfigError, match="symlink"):
        StateDir(link).client_token()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another uid")
def test_refuses_state_dir_owned_by_another_user(state_dir: StateDir) -> None:
    os.chown(state_dir.root, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        state_dir.initialize()


def test_refuses_symlinked_key_file(state_dir: StateDir, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sign"
    target.write_bytes(state_dir.signing_key_path("harness").read_bytes())
    target.chmod(0o600)
    state_dir.signing_key_path("harness").unlink()
    state_dir.signing_key_path("harness").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        state_dir.identity("harness")
    with pytest.raises(ConfigError, match="symlink"):
        state_dir.initialize()


def test_missing_file_error_names_it_and_says_run_init(state_dir: StateDir) -> None:
    path = state_dir.nkey_path("egress")
    path.unlink()
    with pytest.raises(ConfigError) as err:
        state_dir.nats_seed("egress")
    assert str(path) in str(err.value) and "silo init" in str(err.value)
    assert "\n" not in str(err.value)


def test_loose_file_mode_is_refused_then_fixed_by_init(state_dir: StateDir) -> None:
    state_dir.token_path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"token has mode 0o644.*silo init"):
        state_dir.client_token()
    token_before = state_dir.token_path.read_text()
    lines = state_dir.initialize()
    assert lines == ["fixed mode of gateway/token (0o644 -> 0o600)"]
    assert state_dir.client_token() == token_before.strip()


def test_damaged_key_is_refused_not_replaced(state_dir: StateDir) -> None:
    path = state_dir.signing_key_path("gateway")
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"gateway\.sign is not a base64 Ed25519 seed"):
        state_dir.initialize()
    assert path.read_text() == "not a key\n"


def test_signing_key_and_nkey_formats(state_dir: StateDir) -> None:
    raw = base64.b64decode(state_dir.signing_key_path("harness").read_text().strip())
    ident = state_dir.identity("harness")
    assert ident.role is Role.HARNESS
    assert (
        bytes(ident.signing_key) == raw
        and SigningKey(raw).verify_key == ident.signing_key.verify_key
    )
    seed = state_dir.nats_seed("harness")
    assert seed.startswith(b"SU")
    assert nkeys.from_seed(bytearray(seed)).public_key.decode() == state_dir.nats_public_key(
        "harness"
    )
    assert state_dir.nats_public_key("harness").startswith("U")


def test_fingerprint_is_sha256_of_gateway_der_and_stable_across_reloads(
    state_dir: StateDir,
) -> None:
    fp = state_dir.gateway_fingerprint()
    der = ssl.PEM_cert_to_DER_cert(state_dir.gateway_cert_path.read_text())
    assert fp == hashlib.sha256(der).hexdigest()
    assert len(fp) == 64 and fp == fp.lower() and ":" not in fp
    state_dir.initialize()
    assert StateDir.resolve(str(state_dir.root)).gateway_fingerprint() == fp


def test_roster_round_trip(state_dir: StateDir) -> None:
    roster = state_dir.roster()
    assert state_dir.roster_path.read_text() == roster.to_json()
    assert TrustRoster.from_json(roster.to_json()).to_json() == roster.to_json()
    assert {e.kid for e in roster.entries()} == {state_dir.identity(s).kid for s in SERVICES}
    for s in SERVICES:
        assert roster.services(Role(s)) == [s]


def test_init_keeps_roster_entries_of_services_on_other_hosts(state_dir: StateDir) -> None:
    remote = SigningKey.generate().verify_key
    roster = state_dir.roster()
    roster.add(RosterEntry("executor-b", Role.EXECUTOR, key_id(remote), remote))
    state_dir.roster_path.write_text(roster.to_json())
    state_dir.initialize(rotate=True)
    assert state_dir.roster().services(Role.EXECUTOR) == ["executor", "executor-b"]


def test_service_added_to_config_gets_its_keys(state_dir: StateDir) -> None:
    cfg = json.loads(state_dir.config_path.read_text())
    cfg["services"]["executor-2"] = {"role": "executor", "metrics_port": 9313}
    state_dir.config_path.write_text(json.dumps(cfg))
    state_dir.initialize()
    assert state_dir.identity("executor-2").role is Role.EXECUTOR
    assert state_dir.nats_seed("executor-2").startswith(b"SU")
    assert state_dir.roster().services(Role.EXECUTOR) == ["executor", "executor-2"]


def test_bad_config_is_one_clear_line(state_dir: StateDir) -> None:
    state_dir.config_path.write_text(
        '{"services": {"x y": {"role": "gateway", "metrics_port": 1}}}'
    )
    with pytest.raises(ConfigError, match=r"config\.json: services: .*invalid service id") as err:
        state_dir.config()
    assert "\n" not in str(err.value)


def test_resolve_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DEVSILO_STATE_DIR", raising=False)
    assert StateDir.resolve(None).root == tmp_path / "home/.devsilo"
    monkeypatch.setenv("DEVSILO_STATE_DIR", str(tmp_path / "env"))
    assert StateDir.resolve(None).root == tmp_path / "env"
    assert StateDir.resolve(str(tmp_path / "arg")).root == tmp_path / "arg"


def test_certificates(state_dir: StateDir) -> None:
    ca = x509.load_pem_x509_certificate(state_dir.ca_cert_path.read_bytes())
    nats = x509.load_pem_x509_certificate(state_dir.nats_cert_path.read_bytes())
    gw = x509.load_pem_x509_certificate(state_dir.gateway_cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    nats.verify_directly_issued_by(ca)
    gw.verify_directly_issued_by(gw)  # self-signed
    for cert in (nats, gw):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = set(san.get_values_for_type(x509.IPAddress))
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= ips
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = gw.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    lifetime = gw.not_valid_after_utc - gw.not_valid_before_utc
    assert dt.timedelta(days=365) < lifetime <= dt.timedelta(days=GATEWAY_CERT_DAYS, hours=1)


def test_client_tls_trusts_the_internal_ca_only(state_dir: StateDir) -> None:
    ctx = state_dir.nats_client_tls()
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1


def test_client_token_is_64_hex(state_dir: StateDir) -> None:
    token = state_dir.client_token()
    assert len(token) == 64 and int(token, 16) >= 0 and token == token.lower()


def test_stack_config_is_frozen() -> None:
    cfg = StackConfig.default()
    with pytest.raises(Exception, match="frozen"):
        cfg.version = 1


def test_init_writes_the_nats_config_with_one_user_per_service(tmp_path: Path) -> None:
    import json as _json

    state = StateDir(tmp_path / "st")
    state.initialize()
    conf = state.nats_conf_path
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    body = _json.loads(conf.read_text().split("\n", 1)[1])
    users = body["authorization"]["users"]
    assert sorted(u["nkey"] for u in users) == sorted(state.nats_public_key(s) for s in state.config().services)
    assert "tls" in body and "jetstream" in body
    assert state.initialize() == [f"state directory {state.root} is complete; nothing to do"]


async def test_a_service_that_says_it_is_not_ready_is_not_healthy_until_it_is(
        state_dir: StateDir, nats_server: object, free_port: int) -> None:
    """The gateway is healthy only once it listens: `silo up` (and the demo) trust /healthz."""
    import asyncio

    import aiohttp
    from devsilo.runtime._service import ServiceContext, run_service

    go = asyncio.Event()

    async def body(ctx: ServiceContext) -> None:
        ctx.status["ready"] = False
        await go.wait()  # e.g. buckets still opening, the listener not bound yet
        ctx.status["ready"] = True
        await ctx.stopping.wait()

    async def health() -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{free_port}/healthz") as r:
            return r.status, await r.json()

    service = asyncio.create_task(run_service(Role.GATEWAY, "gateway", state_dir, nats_server.url,  # type: ignore[attr-defined]
                                              body, metrics_port=free_port))
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    code, status = await health()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        assert code == 503 and status["nats_connected"] is True and status["ready"] is False
        go.set()
        await asyncio.sleep(0.05)
        code, status = await health()
        assert code == 200 and status["ok"] is True
    finally:
        service.cancel()
        await asyncio.gather(service, return_exceptions=True)
