"""The state directory: service keys, trust roster, TLS, NATS credentials, client token.

Layout (every directory 0700, every file 0600, all owned by the running user)::

    <root>/
      config.json            service id -> role and ports; NATS and gateway addresses
      roster.json            the trust roster (service id -> role -> public keys)
      keys/<id>.sign         Ed25519 signing seed of a service (base64)
      nats/<id>.nk           NATS user nkey seed of a service ("SU...")
      nats/server.conf       the embedded nats-server's config, rewritten on every start
      tls/ca.crt, ca.key     internal CA that signs the NATS server certificate
      tls/nats.crt, nats.key NATS server certificate
      tls/gateway.crt, .key  the gateway's self-signed certificate (clients pin it)
      gateway/token          local client token (64 hex digits)

``StateDir.initialize`` creates what is missing and keeps what exists;
``rotate=True`` replaces every secret. The loaders refuse files that are
missing, symlinked, owned by someone else, or readable by group or world, with
one line naming the file and saying to run ``silo init``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nkeys  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from devsilo.protocol import (
    DEFAULT_MAX_BYTES,
    ConfigError,
    Role,
    ServiceIdentity,
    TrustRoster,
    subjects,
)
from nacl.signing import SigningKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

STATE_ENV = "DEVSILO_STATE_DIR"
DEFAULT_STATE_DIR = "~/.devsilo"

DIR_MODE = 0o700
FILE_MODE = 0o600

# CA and NATS certificate live inside the stack; ten years keeps a forgotten
# install working, and initialize() renews them well before they expire.
INTERNAL_CERT_DAYS = 3650
# Apple platforms refuse TLS server certificates valid for more than 825 days,
# even self-signed ones a user accepted; the web app must work on a phone.
GATEWAY_CERT_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)

_TOKEN = re.compile(r"^[0-9a-f]{64}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


# --------------------------------------------------------------------------- config


class ServiceConfig(BaseModel):
    """One service of the stack: its role and where it serves /metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    metrics_port: int = Field(ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    options: dict[str, Any] = Field(default_factory=dict)
    """Role-specific settings, e.g. an executor's ``capacity``, ``per_user``, ``backends``."""


class NatsSettings(BaseModel):
    """Where the (embedded) NATS server listens and its payload limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=4222, ge=0, le=65535)
    max_payload: int = Field(default=DEFAULT_MAX_BYTES, ge=1024, le=64 * 1024 * 1024)
    replicas: int = Field(default=1, ge=1, le=5)
    """JetStream replicas of every stream and bucket services create (3 in a three-node cluster)."""

    @property
    def url(self) -> str:
        """The URL a client on this machine connects to (``tls://host:port``)."""
        return nats_url(self.host, self.port)


class GatewaySettings(BaseModel):
    """Where the gateway's TLS WebSocket listens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=7443, ge=0, le=65535)


class StackConfig(BaseModel):
    """``config.json``: which services make up the stack and where they listen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    services: dict[str, ServiceConfig]
    nats: NatsSettings = NatsSettings()
    gateway: GatewaySettings = GatewaySettings()

    @field_validator("services")
    @classmethod
    def _ids_are_subject_safe(cls, value: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for sid in value:
            try:
                subjects.check_id(sid, "service id")
            except ConfigError as exc:  # pydantic reports only ValueErrors as validation errors
                raise ValueError(str(exc)) from None
        return value

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Service id -> its /metrics port."""
        return {sid: c.metrics_port for sid, c in self.services.items()}

    @classmethod
    def default(cls) -> StackConfig:
        """One service of each role, named after its role, default ports."""
        ports = {Role.GATEWAY: 9301, Role.HARNESS: 9302, Role.EXECUTOR: 9303, Role.EGRESS: 9304}
        return cls(
            services={
                role.value: ServiceConfig(role=role, metrics_port=port)
                for role, port in ports.items()
            }
        )

    def role_of(self, service_id: str) -> Role:
        """The role of ``service_id``; ConfigError when the stack has no such service."""
        try:
            return self.services[service_id].role
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise ConfigError(
                f"unknown service id {service_id!r} (config.json has: {known})"
            ) from None

    def service_ids(self, role: Role | None = None) -> list[str]:
        """Ids of all services, or of those holding ``role``, sorted."""
        return sorted(s for s, c in self.services.items() if role is None or c.role == role)


def client_host(host: str) -> str:
    """The address a local client dials for a listen address: wildcards become loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def nats_url(host: str, port: int) -> str:
    """``tls://`` URL for a listen address (see ``client_host``)."""
    host = client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"tls://{host}:{port}"


# --------------------------------------------------------------------------- files


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _check_owned_private(path: Path, st: os.stat_result, kind: str) -> None:
    """Refuse anything another user could have planted or can read."""
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{kind} {path} is a symlink; devsilo refuses it: use a real {kind}")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{kind} {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
            f"use your own state directory"
        )


def _read_private(path: Path) -> bytes:
    """Read a state file, refusing missing, symlinked, foreign or group/world-readable ones."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; run `silo init`") from None
    except OSError as exc:
        if exc.errno == getattr(os, "ELOOP", -1) or path.is_symlink():
            raise ConfigError(f"{path} is a symlink; remove it and run `silo init`") from None
        raise ConfigError(f"cannot read {path}: {exc.strerror}; run `silo init`") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file; remove it and run `silo init`")
        _check_owned_private(path, st, "file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{path} has mode {_mode(st)}, readable by others (must be 0o600); run `silo init`"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
    )
    try:
        os.fchmod(fd, FILE_MODE)  # umask may have removed bits we rely on; never added any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- TLS


def _hostname() -> str | None:
    """This machine's host name when it is usable as a DNS SAN."""
    name = socket.gethostname().rstrip(".")
    if name and all(_DNS_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _cert_names(extra: Iterable[str] = ()) -> list[str]:
    host = _hostname()
    return ["127.0.0.1", "::1", "localhost", *([host] if host else []), *extra]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    cert = (
        _builder(
            f"devsilo internal CA ({_hostname() or 'localhost'})", None, key, INTERNAL_CERT_DAYS
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(builder: x509.CertificateBuilder, names: list[str]) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
    )


def _new_nats_cert(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = _leaf(_builder("devsilo nats", ca.subject, key, INTERNAL_CERT_DAYS), _cert_names())
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def _new_gateway_cert(
    extra_names: list[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    subject = f"devsilo gateway ({_hostname() or 'localhost'})"
    builder = _leaf(_builder(subject, None, key, GATEWAY_CERT_DAYS), _cert_names(extra_names))
    return builder.sign(key, hashes.SHA256()), key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _expiring(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() < RENEW_BEFORE


# --------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class StateDir:
    """A devsilo state directory; see the module docstring for its layout."""

    root: Path

    @classmethod
    def resolve(cls, arg: str | os.PathLike[str] | None = None) -> StateDir:
        """The state directory to use: ``arg``, else ``$DEVSILO_STATE_DIR``, else ``~/.devsilo``.

        The path is made absolute but symlinks are not followed, so that a
        symlinked state directory is seen (and refused) as one.
        """
        raw = os.fspath(arg) if arg is not None else os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
        return cls(Path(raw).expanduser().absolute())

    # paths ----------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """``config.json``."""
        return self.root / "config.json"

    @property
    def roster_path(self) -> Path:
        """``roster.json``."""
        return self.root / "roster.json"

    @property
    def keys_dir(self) -> Path:
        """Directory of the services' Ed25519 signing seeds."""
        return self.root / "keys"

    @property
    def nats_dir(self) -> Path:
        """Directory of the NATS nkey seeds and the embedded server's config."""
        return self.root / "nats"

    @property
    def tls_dir(self) -> Path:
        """Directory of the CA, NATS and gateway certificates and keys."""
        return self.root / "tls"

    @property
    def gateway_dir(self) -> Path:
        """Directory of the gateway's client token."""
        return self.root / "gateway"

    def signing_key_path(self, service_id: str) -> Path:
        """``keys/<service_id>.sign``."""
        return self.keys_dir / f"{subjects.check_id(service_id, 'service id')}.sign"

    def nkey_path(self, service_id: str) -> Path:
        """``nats/<service_id>.nk``."""
        return self.nats_dir / f"{subjects.check_id(service_id, 'service id')}.nk"

    @property
    def nats_conf_path(self) -> Path:
        """``nats/server.conf``, written by the embedded server on start."""
        return self.nats_dir / "server.conf"

    @property
    def jetstream_dir(self) -> Path:
        """Default JetStream store of the embedded server."""
        return self.nats_dir / "jetstream"

    @property
    def ca_cert_path(self) -> Path:
        """``tls/ca.crt``."""
        return self.tls_dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """``tls/ca.key``."""
        return self.tls_dir / "ca.key"

    @property
    def nats_cert_path(self) -> Path:
        """``tls/nats.crt``."""
        return self.tls_dir / "nats.crt"

    @property
    def nats_key_path(self) -> Path:
        """``tls/nats.key``."""
        return self.tls_dir / "nats.key"

    @property
    def gateway_cert_path(self) -> Path:
        """``tls/gateway.crt``."""
        return self.tls_dir / "gateway.crt"

    @property
    def gateway_key_path(self) -> Path:
        """``tls/gateway.key``."""
        return self.tls_dir / "gateway.key"

    @property
    def token_path(self) -> Path:
        """``gateway/token``."""
        return self.gateway_dir / "token"

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    # checks ---------------------------------------------------------------

    def check_root(self) -> None:
        """Refuse a root that is missing, a symlink, foreign or open to group/world."""
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            raise ConfigError(
                f"state directory {self.root} does not exist; run `silo init`"
            ) from None
        _check_owned_private(self.root, st, "state directory")
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"state directory {self.root} is not a directory")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"state directory {self.root} has mode {_mode(st)}, open to group or world; "
                f"its keys may have leaked: check them, then `chmod 700 {self.root}`"
            )

    def _ensure_dir(self, path: Path, done: list[str]) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.mkdir(mode=DIR_MODE)
            os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by umask
            done.append(f"created {self._rel(path)}/")
            return
        _check_owned_private(path, st, "directory")
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{path} is not a directory; move it away and run `silo init`")
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.chmod(path, DIR_MODE)
            done.append(f"fixed mode of {self._rel(path)}/ ({_mode(st)} -> 0o700)")

    def _fix_file_mode(self, path: Path, done: list[str]) -> bool:
        """Whether ``path`` exists; refuses symlinks and foreign files, tightens a loose mode.

        Safe to tighten: the root is private, so nobody else could reach the file.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        _check_owned_private(path, st, "file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file; move it away and run `silo init`")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)
            done.append(f"fixed mode of {self._rel(path)} ({_mode(st)} -> 0o600)")
        return True

    def _have_all(self, paths: tuple[Path, ...], done: list[str]) -> bool:
        present = [
            self._fix_file_mode(p, done) for p in paths
        ]  # visit every file, no short-circuit
        return all(present)

    # initialize -------------------------------------------------------------

    def initialize(self, rotate: bool = False) -> list[str]:
        """Create whatever is missing; with ``rotate`` replace every key, certificate and token.

        Idempotent: a second run changes nothing and says so. Existing files
        with a loose mode are tightened (the root being private, nobody else
        could have read them). Returns one human-readable line per action.
        """
        done: list[str] = []
        if not os.path.lexists(self.root):
            self.root.mkdir(mode=DIR_MODE, parents=True)
            os.chmod(self.root, DIR_MODE)
            done.append(f"created state directory {self.root}")
        self.check_root()
        for d in (self.keys_dir, self.nats_dir, self.tls_dir, self.gateway_dir):
            self._ensure_dir(d, done)

        if self._fix_file_mode(self.config_path, done):
            cfg = self.config()
        else:
            cfg = StackConfig.default()
            write_private(self.config_path, (cfg.model_dump_json(indent=2) + "\n").encode())
            done.append(f"created config.json ({', '.join(cfg.service_ids())})")

        self._init_identities(cfg, rotate, done)
        self._init_tls(cfg, rotate, done)
        self._init_token(rotate, done)
        self._init_roster(cfg, done)
        self._init_nats_conf(cfg, done)
        if not done:
            done.append(f"state directory {self.root} is complete; nothing to do")
        return done

    def _init_nats_conf(self, cfg: StackConfig, done: list[str]) -> None:
        """The NATS server config for config.json's address (`silo up` rewrites it per start)."""
        conf = render_nats_config(self, host=cfg.nats.host, port=cfg.nats.port, store_dir=self.jetstream_dir,
                                  max_payload=cfg.nats.max_payload).encode()
        try:
            if self.nats_conf_path.read_bytes() == conf:
                return
        except OSError:
            pass  # not written yet
        write_private(self.nats_conf_path, conf)
        done.append(f"wrote {self._rel(self.nats_conf_path)} (one nkey user per service, per-role permissions)")

    def _init_identities(self, cfg: StackConfig, rotate: bool, done: list[str]) -> None:
        """Signing keys and nkeys of every service in the config."""
        for sid in cfg.service_ids():
            path = self.signing_key_path(sid)
            if self._fix_file_mode(path, done) and not rotate:
                self._signing_key(sid)  # refuse a damaged key rather than silently replace it
            else:
                key = SigningKey.generate()
                write_private(path, base64.b64encode(bytes(key)) + b"\n")
                ident = ServiceIdentity(sid, cfg.role_of(sid), key)
                done.append(
                    f"{'rotated' if rotate else 'created'} {self._rel(path)} (key id {ident.kid})"
                )

            npath = self.nkey_path(sid)
            if self._fix_file_mode(npath, done) and not rotate:
                self.nats_public_key(sid)  # refuse a damaged seed rather than silently replace it
            else:
                seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
                write_private(npath, seed + b"\n")
                pub = nkeys.from_seed(bytearray(seed)).public_key.decode()
                done.append(f"{'rotated' if rotate else 'created'} {self._rel(npath)} ({pub})")

    def _init_tls(self, cfg: StackConfig, rotate: bool, done: list[str]) -> None:
        verb = "rotated" if rotate else "created"
        have_ca = self._have_all((self.ca_cert_path, self.ca_key_path), done)
        ca_new = rotate or not have_ca
        if ca_new:
            ca, ca_key = _new_ca()
            self._write_pair(self.ca_cert_path, ca, self.ca_key_path, ca_key)
            done.append(f"{verb} internal CA tls/ca.crt")
        else:
            ca, ca_key = self._load_pair(self.ca_cert_path, self.ca_key_path)
            if _expiring(ca):
                ca, ca_key = _new_ca()
                self._write_pair(self.ca_cert_path, ca, self.ca_key_path, ca_key)
                ca_new = True
                done.append("renewed internal CA tls/ca.crt (was about to expire)")

        have_nats = self._have_all((self.nats_cert_path, self.nats_key_path), done)
        why = "" if ca_new or not have_nats else self._nats_cert_problem(ca)
        if ca_new or not have_nats or why:
            cert, key = _new_nats_cert(ca, ca_key)
            self._write_pair(self.nats_cert_path, cert, self.nats_key_path, key)
            done.append(f"{'renewed' if why else verb} NATS server certificate tls/nats.crt{why}")

        have_gw = self._have_all((self.gateway_cert_path, self.gateway_key_path), done)
        why = "" if rotate or not have_gw else self._gateway_cert_problem()
        if rotate or not have_gw or why:
            cert, key = _new_gateway_cert([cfg.gateway.host])
            self._write_pair(self.gateway_cert_path, cert, self.gateway_key_path, key)
            fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
            done.append(
                f"{'renewed' if why else verb} gateway certificate tls/gateway.crt{why}; "
                f"clients must pin the new fingerprint {fp}"
            )

    def _nats_cert_problem(self, ca: x509.Certificate) -> str:
        cert, key = self._load_pair(self.nats_cert_path, self.nats_key_path)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # it does not chain to our CA
            return " (not issued by the current CA)"
        if not _same_public_key(cert, key):
            return " (certificate and key did not match)"
        if _expiring(cert):
            return " (was about to expire)"
        return ""

    def _gateway_cert_problem(self) -> str:
        cert, key = self._load_pair(self.gateway_cert_path, self.gateway_key_path)
        if not _same_public_key(cert, key):
            return " (certificate and key did not match)"
        if _expiring(cert):
            return " (was about to expire)"
        return ""

    def _init_token(self, rotate: bool, done: list[str]) -> None:
        if self._fix_file_mode(self.token_path, done) and not rotate:
            self.client_token()
            return
        write_private(self.token_path, (secrets.token_hex(32) + "\n").encode())
        done.append(f"{'rotated' if rotate else 'created'} client token gateway/token")

    def _init_roster(self, cfg: StackConfig, done: list[str]) -> None:
        """Trust exactly the current key of every local service; keep entries of other hosts.

        Old keys of local services are dropped: after a rotation nothing signed
        with them may be trusted again.
        """
        existed = self._fix_file_mode(self.roster_path, done)
        old = self.roster() if existed else TrustRoster()
        local = set(cfg.service_ids())
        roster = TrustRoster([e for e in old.entries() if e.service_id not in local])
        for sid in cfg.service_ids():
            roster.add(
                ServiceIdentity(sid, cfg.role_of(sid), self._signing_key(sid)).roster_entry()
            )
        text = roster.to_json()
        if not existed or old.to_json() != text:
            write_private(self.roster_path, text.encode())
            done.append(
                f"{'rewrote' if existed else 'created'} roster.json ({len(roster.entries())} keys)"
            )

    # key material ----------------------------------------------------------------

    def _write_pair(
        self,
        cert_path: Path,
        cert: x509.Certificate,
        key_path: Path,
        key: ec.EllipticCurvePrivateKey,
    ) -> None:
        # key first: a crash in between leaves a mismatch that the next init repairs
        write_private(key_path, _key_pem(key))
        write_private(cert_path, _cert_pem(cert))

    def _load_cert(self, path: Path) -> x509.Certificate:
        self.check_root()
        try:
            return x509.load_pem_x509_certificate(_read_private(path))
        except ValueError as exc:
            raise ConfigError(
                f"{path} is not a PEM certificate ({exc}); run `silo init --rotate`"
            ) from None

    def _load_pair(
        self, cert_path: Path, key_path: Path
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = self._load_cert(cert_path)
        try:
            key = serialization.load_pem_private_key(_read_private(key_path), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{key_path} is not an unencrypted PEM key ({exc}); run `silo init --rotate`"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an ECDSA key; run `silo init --rotate`")
        return cert, key

    def _signing_key(self, service_id: str) -> SigningKey:
        path = self.signing_key_path(service_id)
        self.check_root()
        try:
            seed = base64.b64decode(_read_private(path).strip(), validate=True)
            if len(seed) != 32:
                raise ValueError(f"{len(seed)} bytes, expected 32")
            return SigningKey(seed)
        except ValueError as exc:
            raise ConfigError(
                f"{path} is not a base64 Ed25519 seed ({exc}); run `silo init --rotate`"
            ) from None

    def _nkey_pair(self, service_id: str) -> nkeys.KeyPair:
        path = self.nkey_path(service_id)
        seed = self.nats_seed(service_id)
        try:
            kp = nkeys.from_seed(bytearray(seed))
            if not kp.public_key.startswith(b"U"):
                raise ValueError("not a user nkey")
            return kp
        except (nkeys.NkeysError, ValueError) as exc:
            raise ConfigError(
                f"{path} is not a NATS user nkey seed ({exc!r}); run `silo init --rotate`"
            ) from None

    # loaders -------------------------------------------------------------------------

    def config(self) -> StackConfig:
        """Parse ``config.json``."""
        self.check_root()
        raw = _read_private(self.config_path)
        try:
            return StackConfig.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(f"{self.config_path}: {where}: {first['msg']}") from None

    def roster(self) -> TrustRoster:
        """Parse ``roster.json``."""
        self.check_root()
        raw = _read_private(self.roster_path)
        return TrustRoster.from_json(raw.decode("utf-8", "replace"), str(self.roster_path))

    def identity(self, service_id: str) -> ServiceIdentity:
        """A service's id, role (from ``config.json``) and signing key."""
        role = self.config().role_of(service_id)
        return ServiceIdentity(service_id, role, self._signing_key(service_id))

    def nats_seed(self, service_id: str) -> bytes:
        """A service's NATS nkey seed (``b"SU..."``), for nats-py's ``nkeys_seed_str``."""
        self.check_root()
        return _read_private(self.nkey_path(service_id)).strip()

    def nats_public_key(self, service_id: str) -> str:
        """A service's NATS user public key (``"U..."``), as the server config names it."""
        kp = self._nkey_pair(service_id)
        try:
            return str(kp.public_key.decode())
        finally:
            kp.wipe()

    def nats_client_tls(self) -> ssl.SSLContext:
        """A client TLS context that trusts only the internal CA and checks the host name."""
        self.check_root()
        pem = _read_private(self.ca_cert_path)
        # not create_default_context(): it would also trust the system store
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"{self.ca_cert_path} is not a PEM certificate ({exc}); run `silo init --rotate`"
            ) from None
        return ctx

    def self_signed_fingerprint(self) -> str:
        """SHA-256 of the self-signed gateway certificate's DER, lowercase hex without colons."""
        cert = self._load_cert(self.gateway_cert_path)
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def gateway_fingerprint(self, service_id: str | None = None) -> str:
        """SHA-256 (hex) of the certificate a gateway serves, which its clients pin.

        That is the first certificate of the gateway's ``tls_cert`` option (the
        operator's own) when set, else the self-signed one. ``service_id``
        defaults to the first gateway in config.json.
        """
        cert_opt = None
        if self.config_path.exists():
            cfg = self.config()
            ids = cfg.service_ids(Role.GATEWAY)
            sid = service_id or (ids[0] if ids else None)
            if sid in cfg.services:
                cert_opt = cfg.services[sid].options.get("tls_cert")
        if not cert_opt:
            return self.self_signed_fingerprint()
        path = self.root / str(cert_opt)
        try:
            cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the gateway's tls_cert {path}: {exc}") from None
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def client_token(self) -> str:
        """The local client token (64 lowercase hex digits)."""
        self.check_root()
        token = _read_private(self.token_path).decode("ascii", "replace").strip()
        if not _TOKEN.match(token):
            raise ConfigError(f"{self.token_path} is not 64 hex digits; run `silo init --rotate`")
        return token

    def check_tls_files(self) -> None:
        """Refuse missing or exposed NATS TLS files before handing their paths to nats-server."""
        self.check_root()
        for path in (self.ca_cert_path, self.nats_cert_path, self.nats_key_path):
            _read_private(path)


# --------------------------------------------------------------------------- NATS config


def _stream_subjects(stream: str) -> str | None:
    """The subjects a stream holds, where devsilo defines them."""
    if stream == subjects.EVENTS_STREAM:
        return subjects.EVENTS_SUBJECTS
    if stream == subjects.JOURNAL_STREAM:
        return subjects.JOURNAL_SUBJECTS
    if stream.startswith("KV_"):
        return f"$KV.{stream[3:]}.>"
    if stream.startswith("OBJ_"):
        return f"$O.{stream[4:]}.>"
    return None


def jetstream_permissions(role: Role) -> list[str]:
    """JetStream subjects ``role`` may publish on (API requests, acks), limited to its streams.

    Every role with a stream may read it: stream info, message get (API and
    direct), consumers of every kind, acks and flow control. A role that may
    publish on a stream's subjects owns it and may also create, update, purge
    and delete it; KV buckets and object stores are writable by every role
    that lists them. Roles without streams get no JetStream API at all.
    Nothing here needs a subscribe permission: API replies and consumer
    deliveries arrive on the client's own inbox.
    """
    streams = subjects.STREAMS.get(role, ())
    if not streams:
        return []
    pub = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    for s in streams:
        pub += [
            f"$JS.API.STREAM.INFO.{s}",
            f"$JS.API.STREAM.MSG.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}.>",
            f"$JS.API.CONSUMER.CREATE.{s}",
            f"$JS.API.CONSUMER.CREATE.{s}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.*",
            f"$JS.API.CONSUMER.INFO.{s}.*",
            f"$JS.API.CONSUMER.DELETE.{s}.*",
            f"$JS.API.CONSUMER.NAMES.{s}",
            f"$JS.API.CONSUMER.LIST.{s}",
            f"$JS.API.CONSUMER.MSG.NEXT.{s}.*",
            f"$JS.ACK.{s}.>",
            f"$JS.FC.{s}.>",
        ]
        held = _stream_subjects(s)
        kv_or_obj = s.startswith(("KV_", "OBJ_"))
        owner = kv_or_obj or (
            held is not None
            and any(subjects.subject_matches(p, held) for p in subjects.PUBLISH.get(role, ()))
        )
        if owner:
            pub += [
                f"$JS.API.STREAM.CREATE.{s}",
                f"$JS.API.STREAM.UPDATE.{s}",
                f"$JS.API.STREAM.PURGE.{s}",
                f"$JS.API.STREAM.DELETE.{s}",
                f"$JS.API.STREAM.MSG.DELETE.{s}",
            ]
        if kv_or_obj and held:
            pub.append(held)
    return pub


def inbox_prefix(service_id: str) -> str:
    """The reply-inbox prefix of a service; the server lets only that service subscribe to it."""
    return f"{subjects.INBOX_PREFIX}{subjects.check_id(service_id, 'service id')}"


def nats_permissions(service_id: str, role: Role) -> dict[str, dict[str, list[str]]]:
    """The nats-server ``permissions`` block of one service.

    Publish: the role's subjects, every ``_INBOX.>`` (replies) and its
    JetStream API. Subscribe: the role's subjects and its own inbox prefix
    only, so that no service can read the replies (or JetStream deliveries)
    meant for another.
    """
    publish = [
        *subjects.PUBLISH.get(role, ()),
        f"{subjects.INBOX_PREFIX}>",
        *jetstream_permissions(role),
    ]
    subscribe = [*subjects.SUBSCRIBE.get(role, ()), f"{inbox_prefix(service_id)}.>"]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def render_nats_config(
    state: StateDir,
    *,
    host: str,
    port: int,
    store_dir: Path,
    cluster: None = None,
    max_payload: int = DEFAULT_MAX_BYTES,
    server_name: str = "devsilo",
) -> str:
    """A nats-server config: TLS, JetStream, one nkey user per service with its role's subjects.

    There is no anonymous user, no monitoring port and no plain-text listener.
    ``cluster`` is reserved for a multi-server deployment and must be None.
    """
    if cluster is not None:
        raise ConfigError("NATS clustering is configured in deploy/, not by the embedded server")
    state.check_tls_files()
    cfg = state.config()
    users = [
        {"nkey": state.nats_public_key(sid), "permissions": nats_permissions(sid, cfg.role_of(sid))}
        for sid in cfg.service_ids()
    ]
    if not users:
        raise ConfigError(f"{state.config_path} lists no services; NATS would admit nobody")
    conf = {
        "server_name": server_name,
        "host": host,
        "port": port,
        "max_payload": max_payload,
        "jetstream": {"store_dir": str(store_dir)},
        "tls": {
            "cert_file": str(state.nats_cert_path),
            "key_file": str(state.nats_key_path),
            "ca_file": str(state.ca_cert_path),
            "timeout": 2.0,
        },
        "authorization": {"timeout": 2.0, "users": users},
    }
    # nats-server reads JSON; quoted strings keep "$JS..." from being taken as variables
    header = "# Written by devsilo on every start of the embedded NATS server; edits are lost.\n"
    return header + json.dumps(conf, indent=2) + "\n"
