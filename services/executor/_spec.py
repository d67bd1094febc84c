"""What every sandbox backend is asked to build: one frozen spec, the same for all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

WORKSPACE = "/workspace"
"""Where every backend mounts the workspace, read-write."""
HOME = "/home/silo"
"""The sandbox user's home: per-sandbox scratch, read-write."""
TMP = "/tmp"
"""Per-sandbox scratch tmp, read-write."""
HELPER_PATH = "/.devsilo/helper.py"
"""Where the helper's source sits inside the sandbox, read-only."""
RELAY_SOCKET = "/.devsilo/egress.sock"
"""Where the session's egress relay socket is bound inside the sandbox."""
TRUST_DIR = "/.devsilo/trust"
"""Where the session's trust directory (``spec.trust_dir``) is bound inside, read-only."""
CA_CERT = f"{TRUST_DIR}/ca.pem"
"""Where the session's CA certificate is inside the sandbox (when there is one)."""
PROXY_PORT = 3128
"""The helper's HTTP(S) proxy listener on the sandbox's loopback."""
INNER_UID = 1000
"""The sandbox user's uid as seen inside; outside it is the sandbox uid."""
INNER_GID = 1000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits per sandbox (cgroups where the backend allows)."""

    memory_bytes: int = 2 * 1024**3
    cpus: float = 1.0
    pids: int = 512
    disk_bytes: int | None = None


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to start one session's sandbox.

    ``workspace`` is mounted read-write at :data:`WORKSPACE`; ``allow_read``
    host paths read-only at the same paths (already checked against the risk
    list by the executor); ``relay_socket`` is a unix socket the executor
    listens on for this one session, bound at :data:`RELAY_SOCKET`;
    ``trust_dir`` is the executor's directory holding the session CA's
    certificate (no key, ever; see :mod:`devsilo.executor._trust`), bound
    read-only as a directory at :data:`TRUST_DIR` so that the executor can
    replace the certificate while the sandbox runs (it is then at
    :data:`CA_CERT`); ``env`` is added to the sandbox's environment.
    """

    session_id: str
    workspace: Path
    sandbox_uid: int
    sandbox_gid: int
    scratch_root: Path
    allow_read: tuple[Path, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    relay_socket: Path | None = None
    trust_dir: Path | None = None
    limits: SandboxLimits = SandboxLimits()


def sandbox_env(spec: SandboxSpec) -> dict[str, str]:
    """The environment every backend sets inside: proxy, CA bundle, home, tmp, then ``spec.env``."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    env = {
        "HOME": HOME,
        "TMPDIR": TMP,
        "USER": "silo",
        "LANG": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy,
        "http_proxy": proxy, "https_proxy": proxy, "all_proxy": proxy,
        "NO_PROXY": "", "no_proxy": "",
    }
    if spec.trust_dir is not None:
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                     "NODE_EXTRA_CA_CERTS", "PIP_CERT", "CARGO_HTTP_CAINFO"):
            env[name] = CA_CERT
    env.update(spec.env)
    return env
