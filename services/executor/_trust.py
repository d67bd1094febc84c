"""A session sandbox's trust files: the directory of CA certificates it verifies TLS against.

The egress intercepts a session's TLS with a per-session CA whose key lives
only in the egress's memory, so an egress that restarts opens the session
again with a new CA. The sandbox must then trust the new certificate and no
longer the old one, while it keeps running. So the executor keeps each
session's trust files in a host directory of its own (:class:`SessionTrust`),
which every backend binds read-only at :data:`~devsilo.executor._spec.TRUST_DIR`
as a *directory*: a file renamed into it on the host is what the sandbox
opens next. Each certificate is written complete beside the directory, then
renamed over :data:`TRUST_FILE` (one ``rename``: a reader sees the old
certificate or the new one, never a mix or nothing).

Processes inside read the file when they set up TLS: each new ``curl``,
``git``, ``pip`` or ``python`` run trusts the current CA; a long-running
process that loaded the file before the swap (a Node process reads
``NODE_EXTRA_CA_CERTS`` once, at start) keeps the old one and fails closed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from devsilo.protocol import SandboxError

__all__ = ["MAX_TRUST_BYTES", "TRUST_FILE", "SessionTrust"]

TRUST_FILE = "ca.pem"
"""The session CA's certificate inside the trust directory."""
MAX_TRUST_BYTES = 16 * 1024
"""Bigger than any one CA certificate: more is refused."""


class SessionTrust:
    """One session's trust directory on the host; the executor's to write, the sandbox's to read.

    Made under ``root`` (a directory only the executor writes), mode 0755 with
    a 0444 certificate, owned by the executor: the sandbox reads it through a
    read-only bind and owns nothing in it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, root: Path, ca_pem: bytes) -> SessionTrust:
        """A new trust directory under ``root`` holding ``ca_pem``; SandboxError when it is no CA certificate."""
        _check_certificate(ca_pem)
        try:
            root.mkdir(mode=0o711, parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="session-", dir=root))
        except OSError as exc:
            raise SandboxError(f"cannot make a trust directory for the sandbox in {root}: {exc.strerror}") from None
        trust = cls(path)
        try:
            os.chmod(path, 0o755)  # mkdtemp makes it 0700; the sandbox uid reads it
            trust.install(ca_pem)
        except OSError as exc:
            trust.remove()
            raise SandboxError(f"cannot open trust directory {path} to the sandbox: {exc.strerror}") from None
        except BaseException:
            trust.remove()
            raise
        return trust

    @property
    def ca_file(self) -> Path:
        """The certificate's host path."""
        return self.path / TRUST_FILE

    def install(self, ca_pem: bytes) -> None:
        """Trust ``ca_pem`` instead of what was trusted: written whole, then renamed into place."""
        _check_certificate(ca_pem)
        self._replace(ca_pem)

    def distrust(self) -> None:
        """Trust nothing any more (an empty file): every TLS check inside fails, closed."""
        self._replace(b"")

    def _replace(self, data: bytes) -> None:
        # Written next to the directory, not in it: the sandbox never sees a partial file.
        staging = self.path.with_name(f".{self.path.name}-{secrets.token_hex(6)}.pem")
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
            try:
                os.fchmod(fd, 0o444)  # the umask filters open's mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(staging, self.ca_file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staging.unlink()
            raise SandboxError(f"cannot write the session's trusted CA in {self.path}: {exc.strerror}") from None

    def remove(self) -> None:
        """Delete the directory (the sandbox is closed)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _check_certificate(pem: bytes) -> None:
    """Exactly one CA certificate, PEM, and nothing else (never a key)."""
    if len(pem) > MAX_TRUST_BYTES:
        raise SandboxError(f"the session CA certificate is {len(pem)} bytes; at most {MAX_TRUST_BYTES}")
    if b"PRIVATE KEY" in pem:
        raise SandboxError("the session CA for the sandbox holds a private key: refused")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SandboxError("the session CA is no certificate at all (no PEM CERTIFICATE block)")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise SandboxError(f"the session CA certificate is not a PEM certificate ({exc})") from None
    if len(certs) != 1:
        raise SandboxError(f"the session CA must be one certificate, got {len(certs)}")
    try:
        is_ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise SandboxError("the session CA certificate is not a CA (no basicConstraints CA:TRUE)")
