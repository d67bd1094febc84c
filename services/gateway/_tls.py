"""The gateway's TLS certificate: the state directory's self-signed one, or the operator's own.

The self-signed certificate is made once by ``silo init`` (and renewed only
near its end), so its SHA-256 fingerprint, which clients pin, stays the same
across restarts. An operator names their own PEM certificate (chain) and
unencrypted PEM key with the gateway options ``tls_cert`` and ``tls_key``
(paths absolute or relative to the state directory); both are checked before
the gateway listens, and a missing, unreadable or mismatched pair stops it
with a message naming the files.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from devsilo.protocol import ConfigError
from devsilo.runtime._state import StateDir


@dataclass(frozen=True)
class GatewayCertificate:
    """The certificate the gateway serves and its fingerprint."""

    cert_path: Path
    key_path: Path
    fingerprint: str
    """SHA-256 of the (leaf) certificate's DER, lowercase hex."""
    operator: bool
    """The operator's own certificate (else the state directory's self-signed one)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the gateway's {what} {path}: {exc.strerror}; fix the gateway "
                          "options tls_cert and tls_key (or remove both to use the self-signed certificate)") from None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def operator_certificate(cert_path: Path, key_path: Path) -> GatewayCertificate:
    """Check an operator's certificate and key: readable, PEM, unencrypted key, and a matching pair."""
    pem = _read(cert_path, "certificate (tls_cert)")
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigError(f"the gateway's tls_cert {cert_path} is not a PEM certificate ({exc})") from None
    key_pem = _read(key_path, "key (tls_key)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"the gateway's tls_key {key_path} is encrypted; give it an unencrypted PEM key "
                          "(readable only by the gateway's user)") from None
    except ValueError as exc:
        raise ConfigError(f"the gateway's tls_key {key_path} is not a PEM private key ({exc})") from None
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise ConfigError(f"the gateway's tls_cert {cert_path} and tls_key {key_path} do not match: the "
                          "key is not the certificate's; give the key that belongs to this certificate")
    fp = hashlib.sha256(chain[0].public_bytes(serialization.Encoding.DER)).hexdigest()
    return GatewayCertificate(cert_path, key_path, fp, operator=True)


def gateway_certificate(state: StateDir, options: dict[str, Any]) -> GatewayCertificate:
    """The certificate named by the options ``tls_cert``/``tls_key``, else the self-signed one."""
    cert, key = options.get("tls_cert"), options.get("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError("the gateway options tls_cert and tls_key go together: give both "
                          "(or neither, for the self-signed certificate)")
    if cert and key:
        return operator_certificate(state.root / str(cert), state.root / str(key))
    return GatewayCertificate(state.gateway_cert_path, state.gateway_key_path,
                              state.self_signed_fingerprint(), operator=False)


def server_tls(cert: GatewayCertificate) -> ssl.SSLContext:
    """A TLS server context for the gateway's certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use {cert.cert_path} with {cert.key_path} for TLS: {exc}") from None
    return ctx
