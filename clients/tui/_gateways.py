"""The gateways a user knows: a known-gateways file with pinned fingerprints and paired keys.

``gateways.json`` (in ``$XDG_CONFIG_HOME/devsilo`` or ``~/.config/devsilo``)
lists each remote gateway's URL, the SHA-256 fingerprint of the certificate
pinned when it was paired, and the id of the key registered there. Each
private key lives in its own 0600 PEM file next to it (``keys/NAME.pem``).
The local gateway needs no entry: it is reached with the state directory's token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devsilo.cli._client import ClientKeyPair, GatewayClient
from devsilo.protocol import ConfigError
from devsilo.runtime._state import write_private
from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
FINGERPRINT_PATTERN = r"^[0-9a-f]{64}$"


def config_dir() -> Path:
    """Where the TUI keeps its files: ``$XDG_CONFIG_HOME/devsilo`` or ``~/.config/devsilo``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "devsilo"


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as 64 lowercase hex digits (colons and a ``SHA256`` prefix allowed)."""
    fp = text.strip().removeprefix("SHA256").strip().replace(":", "").lower()
    if not re.fullmatch(FINGERPRINT_PATTERN, fp):
        raise ConfigError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return fp


class KnownGateway(BaseModel):
    """A remote gateway this user paired with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(pattern=r"^wss://", max_length=2048)
    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN)
    key_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    user: str = ""


class KnownGatewaysFile(BaseModel):
    """The contents of ``gateways.json``."""

    model_config = ConfigDict(extra="forbid")
    gateways: list[KnownGateway] = []


class KnownGateways:
    """Read and write the known-gateways file and the private keys beside it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or config_dir()
        self.path = self.root / "gateways.json"

    def load(self) -> list[KnownGateway]:
        """Every known gateway (none when the file does not exist yet)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return KnownGatewaysFile.model_validate_json(raw).gateways
        except ValueError as exc:
            raise ConfigError(f"{self.path} is not a valid known-gateways file: {exc}") from None

    def key_path(self, name: str) -> Path:
        """The 0600 PEM file of the key paired with gateway ``name``."""
        return self.root / "keys" / f"{name}.pem"

    def key(self, gw: KnownGateway) -> ClientKeyPair:
        """The private key paired with ``gw``; refuses a key file others can read."""
        path = self.key_path(gw.name)
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"{path} is readable by others; chmod 600 it")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigError(f"the key for gateway {gw.name} is missing ({path}); pair it again") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return ClientKeyPair("ed25519", key)

    def add(self, gw: KnownGateway, key: ClientKeyPair) -> None:
        """Save ``gw`` (replacing one of the same name) and its private key (0600)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "keys").mkdir(mode=0o700, exist_ok=True)
        pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        write_private(self.key_path(gw.name), pem)
        others = [g for g in self.load() if g.name != gw.name]
        data = KnownGatewaysFile(gateways=[*others, gw]).model_dump_json(indent=2)
        write_private(self.path, data.encode())

    async def pair(self, name: str, url: str, fingerprint: str, code: str,
                   client_name: str = "tui") -> KnownGateway:
        """Pair with a remote gateway by code (pinning ``fingerprint``) and remember it."""
        fp = normalize_fingerprint(fingerprint)
        key = ClientKeyPair.generate("ed25519")
        async with GatewayClient(url, fp, client_name=client_name) as client:
            paired = await client.pair(code.strip().upper(), key)
        gw = KnownGateway(name=name, url=url, fingerprint=fp, key_id=paired.key_id, user=paired.user)
        self.add(gw, key)
        return gw


def gateway_name_for(url: str, taken: set[str]) -> str:
    """A short unused name for a gateway at ``url`` (its host and port)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", url.removeprefix("wss://").split("/", 1)[0])[:56] or "gateway"
    name, n = host, 2
    while name in taken:
        name, n = f"{host}-{n}", n + 1
    return name


def dump_json(gws: list[KnownGateway]) -> str:
    """The gateways as JSON (for display)."""
    return json.dumps([g.model_dump() for g in gws], indent=2)
