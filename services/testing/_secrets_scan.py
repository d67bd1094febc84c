"""Looking for secrets in everything a stack kept: files, client frames, every NATS stream.

A :class:`Secret` is a name and the byte strings that would betray it: the
value itself and its obvious encodings (base64 at any alignment, standard and
URL-safe; hex; URL-encoding; JSON-escaping). Private keys add their raw bytes,
PEM and DER forms. :func:`find` reports every (secret, place, form) hit.

:func:`state_secrets` collects the secrets a state directory holds (the
client token, service signing seeds, NATS nkey seeds, TLS private keys), and
:func:`nats_dump` reads every message of every JetStream stream (KV buckets
and object stores are streams too), each with the first service identity
the server lets read it.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MIN_NEEDLE = 16
"""Shorter encodings are not searched: they would match by chance."""


@dataclass(frozen=True)
class Secret:
    """A secret by name, with every form of it a search looks for."""

    name: str
    needles: tuple[tuple[str, bytes], ...]
    """(form, bytes) pairs, e.g. ("base64", b"c2stYW50...")."""


@dataclass(frozen=True)
class Blob:
    """Bytes from one place (a file, a frame, a stream message)."""

    where: str
    data: bytes


@dataclass(frozen=True)
class Hit:
    """A secret found: which, where, and in which form."""

    secret: str
    where: str
    form: str


def base64_cores(data: bytes) -> list[tuple[str, bytes]]:
    """The base64 text ``data`` turns into wherever it sits in a longer encoded string.

    Encoded at byte offset 0, 1 or 2 (mod 3) of a larger input, the
    characters that depend only on ``data`` differ; each alignment's are
    returned, in the standard and URL-safe alphabets, without padding.
    """
    out = []
    for pad in range(3):
        first = -(-pad // 3) * 3  # the first 3-byte group wholly inside data
        last = (pad + len(data)) // 3 * 3
        if last - first < 3:
            continue
        std = base64.b64encode(b"\0" * pad + data)[first // 3 * 4:last // 3 * 4]
        out.append((f"base64@{pad}", std))
        url = std.replace(b"+", b"-").replace(b"/", b"_")
        if url != std:
            out.append((f"base64url@{pad}", url))
    return out


def encodings(value: bytes) -> list[tuple[str, bytes]]:
    """``value`` raw, hex (both cases), base64 at every alignment."""
    forms = [("raw", value), ("hex", binascii.hexlify(value)), ("HEX", binascii.hexlify(value).upper()),
             *base64_cores(value)]
    return forms


def text_needles(value: str) -> list[tuple[str, bytes]]:
    """A text secret's forms: its encodings, URL-encoded and JSON-escaped."""
    forms = encodings(value.encode())
    forms.append(("url", urllib.parse.quote(value, safe="").encode()))
    forms.append(("url+", urllib.parse.quote_plus(value).encode()))
    forms.append(("json", json.dumps(value)[1:-1].encode()))
    forms.append(("json-utf8", json.dumps(value, ensure_ascii=False)[1:-1].encode()))
    return forms


PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def key_needles(key: PrivateKey) -> list[tuple[str, bytes]]:
    """A private key's forms: its raw secret bytes, PKCS#8 (and SEC1) DER and PEM, and their encodings."""
    if isinstance(key, Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        formats = [("pkcs8", serialization.PrivateFormat.PKCS8)]
    else:
        raw = key.private_numbers().private_value.to_bytes(32, "big")
        formats = [("pkcs8", serialization.PrivateFormat.PKCS8),
                   ("sec1", serialization.PrivateFormat.TraditionalOpenSSL)]
    forms = [(f"key-{name}", needle) for name, needle in encodings(raw)]
    for label, fmt in formats:
        der = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
        pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
        forms += [(f"{label}-der-{name}", needle) for name, needle in encodings(der)]
        forms += [(f"{label}-pem-{name}", needle) for name, needle in text_needles(pem)]
    return forms


def secret(name: str, forms: Iterable[tuple[str, bytes]]) -> Secret:
    """A :class:`Secret` from its forms (duplicates and too-short ones dropped)."""
    seen: dict[bytes, str] = {}
    for form, needle in forms:
        if len(needle) >= MIN_NEEDLE and needle not in seen:
            seen[needle] = form
    return Secret(name, tuple((form, needle) for needle, form in seen.items()))


def text_secret(name: str, value: str, *, part: int | None = None) -> Secret:
    """A text secret (an API key, a token); with ``part``, each run of that many of its characters
    is searched too (raw), so that a cut-off copy is found."""
    parts = [] if part is None else [(f"part@{i}", value[i:i + part].encode())
                                     for i in range(len(value) - part + 1)]
    return secret(name, [*text_needles(value), *parts])


def key_secret(name: str, key: PrivateKey) -> Secret:
    """A private key."""
    return secret(name, key_needles(key))


def state_secrets(state_dir: Path) -> tuple[list[Secret], list[Path]]:
    """Every secret a state directory keeps, and the files they are in (which hold them by right).

    The local client token, each service's Ed25519 signing seed and NATS
    nkey seed, and the private keys of the internal CA, the NATS server and
    the gateway.
    """
    from devsilo.runtime._state import StateDir

    state = StateDir(state_dir)
    found = [text_secret("client token", state.client_token())]
    files = [state.token_path]
    for path in sorted((state_dir / "keys").glob("*.sign")):
        seed = path.read_text().strip()
        found.append(secret(f"signing seed {path.stem}", [
            *text_needles(seed),
            *key_needles(Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed)))]))
        files.append(path)
    for path in sorted((state_dir / "nats").glob("*.nk")):
        found.append(text_secret(f"nkey seed {path.stem}", path.read_text().strip()))
        files.append(path)
    for path in sorted((state_dir / "tls").glob("*.key")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey), path
        found.append(key_secret(f"TLS key {path.name}", key))
        files.append(path)
    return found, files


def find(secrets: Iterable[Secret], blobs: Iterable[Blob]) -> list[Hit]:
    """Every form of every secret found in any blob."""
    secrets = list(secrets)
    hits = []
    for blob in blobs:
        for s in secrets:
            for form, needle in s.needles:
                if needle in blob.data:
                    hits.append(Hit(s.name, blob.where, form))
    return hits


def file_blobs(root: Path, *, skip: Iterable[Path] = ()) -> list[Blob]:
    """Every regular file under ``root`` (symlinks not followed), except ``skip``."""
    skipped = {p.resolve() for p in skip}
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.resolve() in skipped:
            continue
        out.append(Blob(str(path), path.read_bytes()))
    return out


async def stream_names(nc: Any) -> list[str]:
    """The names of every stream on the server (all pages), as this connection may list them."""
    names: list[str] = []
    while True:
        msg = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": len(names)}).encode(), timeout=10)
        page = json.loads(msg.data)
        if "error" in page:
            raise AssertionError(f"listing streams failed: {page['error']}")
        got = page.get("streams") or []
        names += got
        if not got or len(names) >= page.get("total", 0):
            return names


async def nats_dump(state_dir: Path, url: str) -> tuple[list[Blob], dict[str, str]]:
    """Every message of every JetStream stream: (blobs, stream -> the service that read it).

    Stream names come from the server, not from a list kept here. Each stream
    is read by a service whose role may read it (``subjects.STREAMS``, what
    its NATS permissions are made from); a stream no role may read fails.
    Each message is one blob (subject, headers and data); each subject's
    messages concatenated in order are one more (an object store's chunks).
    """
    import nats.js.errors
    from devsilo.protocol import subjects
    from devsilo.runtime._natsconn import connect_nats
    from devsilo.runtime._state import StateDir

    state = StateDir(state_dir)
    cfg = state.config()
    readers: dict[str, str] = {}
    for sid in cfg.service_ids():
        for stream in subjects.STREAMS.get(cfg.role_of(sid), ()):
            readers.setdefault(stream, sid)
    conns = {sid: await connect_nats(state, sid, url) for sid in sorted(set(readers.values()))}
    blobs: list[Blob] = []
    read_by: dict[str, str] = {}
    try:
        for name in sorted(await stream_names(next(iter(conns.values())))):
            if name not in readers:
                raise AssertionError(f"no service may read the stream {name}")
            js = conns[readers[name]].jetstream()
            info = await js.stream_info(name)
            by_subject: dict[str, list[bytes]] = {}
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue  # deleted (a KV key overwritten or purged)
                head = json.dumps(msg.headers or {}).encode()
                data = msg.data or b""
                blobs.append(Blob(f"nats {name} #{seq} {msg.subject}",
                                  (msg.subject or "").encode() + b"\n" + head + b"\n" + data))
                by_subject.setdefault(msg.subject or "", []).append(data)
            for subject, parts in by_subject.items():
                if len(parts) > 1:
                    blobs.append(Blob(f"nats {name} {subject} (joined)", b"".join(parts)))
            read_by[name] = readers[name]
    finally:
        for nc in conns.values():
            await nc.close()
    return blobs, read_by
