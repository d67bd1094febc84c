"""Per-session certificate authorities for TLS interception.

Each session gets its own CA when its policy is installed: an EC P-256 key
that lives only in this process's memory (never written to disk, never
sent anywhere) and a self-signed certificate, the only part that leaves —
the executor puts it in the sandbox's trust store. The CA is constrained:
``pathLenConstraint=0`` and X.509
name constraints permitting only the allowed names (nothing at all for an
empty list), so that even a leaked
session CA could not vouch for any other host. It is dropped with the
session.

Leaf certificates are made on demand per host (one leaf key per session,
certificates cached per host), valid for a day. Python's ``ssl`` loads keys
only from files, so :meth:`SessionCA.server_context` hands it the leaf's
chain and key through an anonymous memory file (``memfd_create``), closed
as soon as it is loaded: the key still never touches a disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from devsilo.protocol._names import BadHost, normalise_host

VALIDITY = dt.timedelta(days=1)
BACKDATE = dt.timedelta(minutes=5)  # sandbox clocks are the host's, but leave room
LEAF_CACHE = 512


class SessionCA:
    """One session's CA: memory-only key, public certificate, cached leaf contexts."""

    def __init__(self, session_id: str, allowed: Iterable[str] = (), alpn: Iterable[str] = ("http/1.1",)) -> None:
        self.session_id = session_id
        self._alpn = list(alpn)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devsilo egress"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"devsilo session {session_id}"[:64]),
        ])
        self._name = name
        builder = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
        )
        builder = builder.add_extension(_name_constraints(allowed), critical=True)
        self.certificate = builder.sign(self._key, hashes.SHA256())
        self.cert_pem: bytes = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def leaf(self, host: str) -> x509.Certificate:
        """A fresh leaf certificate for ``host`` (a normalised name or an address)."""
        now = dt.datetime.now(dt.UTC)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            # No CN for an address: verifiers would check it against the DNS name constraints.
            subject = x509.Name([])
        except ValueError:
            san = x509.DNSName(host)
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def server_context(self, host: str) -> ssl.SSLContext:
        """The TLS server context that presents ``host``'s leaf; cached per host."""
        ctx = self._contexts.get(host)
        if ctx is not None:
            self._contexts.move_to_end(host)
            return ctx
        chain = self.leaf(host).public_bytes(serialization.Encoding.PEM) + self.cert_pem
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(self._alpn)
        ctx.sni_callback = _sni_must_be(host)
        fd = os.memfd_create(f"leaf-{self.session_id}", os.MFD_CLOEXEC)
        try:
            os.write(fd, chain + self._leaf_key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._contexts[host] = ctx
        while len(self._contexts) > LEAF_CACHE:
            self._contexts.popitem(last=False)
        return ctx


def _sni_must_be(host: str) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
    """A handshake check: a ClientHello naming another host than the tunnel's fails."""

    def check(_conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if server_name is None:
            return None  # no SNI (an address, or an old client): the tunnel's target stands
        try:
            named = normalise_host(server_name)
        except BadHost:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None if named == host else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    return check


def _name_constraints(allowed: Iterable[str]) -> x509.NameConstraints:
    """Permitted subtrees for the (normalised) allow-list entries."""
    permitted: list[x509.GeneralName] = []
    for entry in allowed:
        base = entry.removeprefix("*.")
        try:
            addr = ipaddress.ip_address(base)
        except ValueError:
            # A DNSName constraint covers the name and every name below it (RFC 5280
            # §4.2.1.10), which is wider than an exact entry: the proxy's own allow
            # decision stays the rule, the constraint only bounds a leaked CA.
            permitted.append(x509.DNSName(base))
            continue
        prefix = 32 if addr.version == 4 else 128
        permitted.append(x509.IPAddress(ipaddress.ip_network(f"{addr}/{prefix}")))
    if not permitted:
        permitted.append(x509.DNSName("invalid"))  # RFC 2606: an empty allow-list vouches for nothing
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)
