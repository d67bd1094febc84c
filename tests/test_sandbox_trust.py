"""The session CA a running sandbox trusts: replaced by the executor, never by the sandbox.

When the egress restarts, every open session gets a new CA (the old key died
with the old egress), and the executor renames the new certificate into the
session's trust directory, bound read-only into the sandbox. For every real
backend: real TLS handshakes from inside, over a unix socket bound into the
sandbox, to a server presenting leaves of real session CAs, show that the
sandbox trusts the new CA afterwards and no longer the old one; and the
sandbox, attacking its trust files, changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from devsilo.egress._ca import SessionCA
from devsilo.executor._sandbox import BwrapSandbox, Sandbox, prepare_workspace_ownership
from devsilo.executor._sandbox import probe as bwrap_probe
from devsilo.executor._spec import CA_CERT, RELAY_SOCKET, TRUST_DIR, SandboxSpec
from devsilo.executor._trust import TRUST_FILE, SessionTrust
from devsilo.protocol import SandboxError

AS_ROOT = os.geteuid() == 0
SANDBOX_UID = SANDBOX_GID = 64123 if AS_ROOT else os.getuid()
HOST = "www.example.test"


def _gvisor_unavailable() -> str | None:
    if not AS_ROOT:
        return "the gvisor backend needs root"
    from devsilo.executor._gvisor import probe

    return probe()


def _docker_unavailable() -> str | None:
    if not AS_ROOT:
        return "the docker tests start their own dockerd: run as root"
    if not os.access("/usr/sbin/dockerd", os.X_OK):
        return "dockerd is not installed (apt-get install docker.io)"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed"
    return None


BACKENDS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(bool(bwrap_probe()), reason=f"bwrap: {bwrap_probe()}")),
    pytest.param("gvisor", marks=pytest.mark.skipif(_gvisor_unavailable() is not None,
                                                     reason=f"gvisor: {_gvisor_unavailable()}")),
    pytest.param("docker", marks=pytest.mark.skipif(_docker_unavailable() is not None,
                                                     reason=f"docker: {_docker_unavailable()}")),
]


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private dockerd with the base image (started only if a docker case runs)."""
    from devsilo.testing._dockerd import Dockerd

    with Dockerd(tmp_path_factory.mktemp("dockerd"), runsc=None) as daemon:
        daemon.build_base_image()
        yield daemon


class TlsServer:
    """A TLS server on a unix socket, presenting a leaf for HOST from whichever CA is ``ca`` now."""

    def __init__(self, path: Path, ca: SessionCA) -> None:
        self.path = path
        self.ca = ca
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        if AS_ROOT:
            os.chown(self.path, SANDBOX_UID, SANDBOX_GID)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.ca.server_context(HOST))
            writer.write(f"hello from the CA {self.ca.certificate.serial_number}\n".encode())
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass  # the client refused our certificate: what some cases want
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


# Run inside: one TLS handshake against the trust file the sandbox's environment names.
HANDSHAKE = (
    "import os, socket, ssl\n"
    "ctx = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    f"s.connect({RELAY_SOCKET!r})\n"
    "try:\n"
    f"    t = ctx.wrap_socket(s, server_hostname={HOST!r})\n"
    "    print(t.recv(100).decode().strip())\n"
    "except ssl.SSLCertVerificationError as exc:\n"
    "    print('refused:', exc.verify_message)\n"
)

# Run inside: every way the sandbox user might change what it trusts; each prints its errno.
ATTACKS = (
    "import ctypes, errno, os\n"
    "ca = os.environ['SSL_CERT_FILE']\n"
    "d = os.path.dirname(ca)\n"
    "open('/tmp/evil.pem', 'w').write('evil')\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def mount():\n"
    "    if libc.mount(b'none', d.encode(), b'tmpfs', 0, None) != 0:\n"
    "        e = ctypes.get_errno()\n"
    "        raise OSError(e, os.strerror(e))\n"
    "attempts = {\n"
    "    'write': lambda: open(ca, 'a').write('x'),\n"
    "    'truncate': lambda: os.truncate(ca, 0),\n"
    "    'create': lambda: open(d + '/evil.pem', 'x'),\n"
    "    'rename': lambda: os.rename(ca, d + '/old.pem'),\n"
    "    'unlink': lambda: os.unlink(ca),\n"
    "    'chmod': lambda: os.chmod(ca, 0o666),\n"
    "    'symlink': lambda: os.symlink('/tmp/evil.pem', d + '/x.pem'),\n"
    "    'replace': lambda: os.replace('/tmp/evil.pem', ca),\n"
    "    'move_dir': lambda: os.rename(d, d + '-moved'),\n"
    "    'chmod_dir': lambda: os.chmod(d, 0o777),\n"
    "    'mount': mount,\n"
    "}\n"
    "for name, attempt in attempts.items():\n"
    "    try:\n"
    "        attempt()\n"
    "        print(name, 'DONE')\n"
    "    except OSError as exc:\n"
    "        print(name, errno.errorcode.get(exc.errno, exc.errno))\n"
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    if AS_ROOT:
        prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


@pytest_asyncio.fixture
async def started(request: pytest.FixtureRequest, tmp_path: Path, workspace: Path) -> AsyncIterator[
        tuple[Sandbox, SessionTrust, TlsServer, SessionCA]]:
    """A sandbox of the backend under test trusting a first session CA, with a TLS server bound in."""
    backend: str = request.param
    first = SessionCA("s1", allowed=(HOST,))
    trust = SessionTrust.create(tmp_path / "trust", first.cert_pem)
    async with TlsServer(tmp_path / "tls.sock", first) as server:
        spec = SandboxSpec(session_id="s1", workspace=workspace, sandbox_uid=SANDBOX_UID,
                           sandbox_gid=SANDBOX_GID, scratch_root=tmp_path / "scratch",
                           relay_socket=server.path, trust_dir=trust.path)
        sb: Sandbox
        if backend == "bwrap":
            sb = BwrapSandbox(spec)
        elif backend == "gvisor":
            from devsilo.executor._gvisor import GvisorSandbox

            sb = GvisorSandbox(spec)
        else:
            from devsilo.executor._docker import DockerSandbox

            daemon = request.getfixturevalue("dockerd")
            sb = DockerSandbox(spec, runtime="runc", docker_url=daemon.url)  # type: ignore[attr-defined]
        await sb.start()
        try:
            yield sb, trust, server, first
        finally:
            await sb.close()
            trust.remove()


async def _inside(sb: Sandbox, code: str) -> str:
    result = await sb.helper.exec(f"python3 -I -S -c {shlex.quote(code)}")
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_the_executor_writes_only_one_ca_certificate(tmp_path: Path) -> None:
    ca = SessionCA("s1", allowed=(HOST,))
    trust = SessionTrust.create(tmp_path / "trust", ca.cert_pem)
    key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    cases = {
        "holds a private key": ca.cert_pem + key,
        "not a PEM certificate": b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        "no certificate at all": b"hello",
        "one certificate, got 2": ca.cert_pem + SessionCA("s2").cert_pem,
        "at most": ca.cert_pem + b"\n" * 20_000,
        "is not a CA": ca.leaf(HOST).public_bytes(serialization.Encoding.PEM),
    }
    for why, pem in cases.items():
        with pytest.raises(SandboxError, match=why):
            trust.install(pem)
        assert trust.ca_file.read_bytes() == ca.cert_pem, why  # what was trusted stays
    assert os.listdir(trust.path) == [TRUST_FILE]
    assert oct(trust.ca_file.stat().st_mode & 0o777) == oct(0o444)
    assert oct(trust.path.stat().st_mode & 0o777) == oct(0o755)
    trust.distrust()
    assert trust.ca_file.read_bytes() == b""
    assert sorted(p.name for p in trust.path.parent.iterdir()) == [trust.path.name]  # no staging left
    trust.remove()
    assert not trust.path.exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SandboxError, match="cannot make a trust directory"):
        SessionTrust.create(tmp_path / "a-file" / "trust", ca.cert_pem)


@pytest.mark.parametrize("started", BACKENDS, indirect=True)
async def test_a_running_sandbox_trusts_the_new_session_ca_and_no_longer_the_old_one(
        started: tuple[Sandbox, SessionTrust, TlsServer, SessionCA]) -> None:
    sb, trust, server, first = started
    assert await _inside(sb, HANDSHAKE) == f"hello from the CA {first.certificate.serial_number}"
    # The egress restarted: its new CA signs the leaves; the sandbox still trusts the first.
    second = SessionCA("s1", allowed=(HOST,))
    server.ca = second
    assert (await _inside(sb, HANDSHAKE)).startswith("refused:")
    trust.install(second.cert_pem)  # what the executor does when it opens the session again
    assert await _inside(sb, HANDSHAKE) == f"hello from the CA {second.certificate.serial_number}"
    assert await _inside(sb, f"print(open({CA_CERT!r}).read())") == second.cert_pem.decode().strip()
    # Someone holding the old CA (its key did not die after all) is no longer believed.
    server.ca = first
    assert (await _inside(sb, HANDSHAKE)).startswith("refused:")


@pytest.mark.parametrize("started", BACKENDS, indirect=True)
async def test_the_sandbox_cannot_change_its_trust_files(
        started: tuple[Sandbox, SessionTrust, TlsServer, SessionCA]) -> None:
    sb, trust, _server, first = started
    out = dict(line.split(" ", 1) for line in (await _inside(sb, ATTACKS)).splitlines())
    assert set(out) == {"write", "truncate", "create", "rename", "unlink", "chmod", "symlink", "replace",
                        "move_dir", "chmod_dir", "mount"}, out
    # Refused by the read-only bind (EROFS), the files' owner (EACCES/EPERM), the mount point
    # (EBUSY), the mount boundary (EXDEV) or seccomp (EPERM): never done.
    assert set(out.values()) <= {"EROFS", "EACCES", "EPERM", "EBUSY", "EXDEV"}, out
    assert os.listdir(trust.path) == [TRUST_FILE]
    assert trust.ca_file.read_bytes() == first.cert_pem
    assert await _inside(sb, HANDSHAKE) == f"hello from the CA {first.certificate.serial_number}"
    assert await _inside(sb, f"import os; print(sorted(os.listdir({TRUST_DIR!r})))") == "['ca.pem']"
