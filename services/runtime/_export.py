"""``silo init --export``: the part of a state directory one host needs, and nothing more.

A bundle is itself a state directory (same layout, 0700 directories, 0600
files) that ``silo service ROLE --state-dir BUNDLE --nats URL`` runs from.
What goes in, by the roles the host runs:

=================  =============================================================
every host         ``roster.json`` (public keys only), ``tls/ca.crt`` (the CA's
                   certificate, never its key), ``bundle.json`` (what this is)
each service of    ``keys/<id>.sign`` and ``nats/<id>.nk`` of that service; its
a listed role      entry in ``config.json`` (options included)
``gateway``        ``tls/gateway.crt`` and ``.key``, ``gateway/token``, and the
                   operator's ``tls_cert``/``tls_key`` when those are set
``nats``           a NATS server certificate for HOST signed by the internal
                   CA (``tls/nats.crt``, ``.key``) and ``nats/server.conf``
                   (public nkeys and permissions of every service)
=================  =============================================================

``config.json`` lists only the bundle's services, so an executor host never
sees the egress's ``credentials`` store or the harness's ``models`` settings.
Secrets those options name by absolute path (``api_key_file``, a
credential's ``file``) stay where the operator put them on that host; the
export lists them so they can be placed there, and never copies them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from devsilo.protocol import ConfigError, Role, TrustRoster

from ._state import (
    DIR_MODE,
    INTERNAL_CERT_DAYS,
    ServiceConfig,
    StackConfig,
    StateDir,
    _builder,
    _cert_pem,
    _key_pem,
    _new_key,
    _read_private,
    _san,
    render_nats_config,
    write_private,
)

NATS_ROLE = "nats"
"""The pseudo-role of a host that runs a nats-server node."""
EXPORT_ROLES = (*(r.value for r in Role), NATS_ROLE)
DEFAULT_INSTALL_DIR = "/etc/devsilo/nats"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def parse_roles(text: str) -> list[str]:
    """``"executor,egress"`` -> the roles, checked; ConfigError naming a bad one."""
    roles = [r.strip() for r in text.split(",") if r.strip()]
    if not roles:
        raise ConfigError("--roles names no role")
    for r in roles:
        if r not in EXPORT_ROLES:
            raise ConfigError(f"unknown role {r!r} in --roles (known: {', '.join(EXPORT_ROLES)})")
    return sorted(set(roles), key=EXPORT_ROLES.index)


def _host_files(role: Role, options: dict[str, Any]) -> list[str]:
    """Secret files an option names by path on the host (never copied)."""
    found: list[str] = []
    if role is Role.EGRESS:
        for cred in (options.get("credentials") or {}).values():
            if isinstance(cred, dict) and cred.get("file"):
                found.append(str(cred["file"]))
    if role is Role.HARNESS:
        for provider in (options.get("models") or {}).values():
            if isinstance(provider, dict) and provider.get("api_key_file"):
                found.append(str(provider["api_key_file"]))
    return found


class _Writer:
    """Writes a bundle's files, creating private directories as needed."""

    def __init__(self, out: StateDir) -> None:
        self.out = out
        self.files: list[str] = []

    def write(self, path: Path, data: bytes) -> None:
        rel = path.relative_to(self.out.root)
        parent = self.out.root
        for part in rel.parts[:-1]:
            parent = parent / part
            if not parent.exists():
                parent.mkdir(mode=DIR_MODE)
                os.chmod(parent, DIR_MODE)
        write_private(path, data)
        self.files.append(str(rel))


def _fresh_dir(root: Path) -> None:
    """Refuse an ``-o`` that exists and is not an empty directory; make its parent."""
    if os.path.lexists(root):
        if root.is_symlink() or not root.is_dir():
            raise ConfigError(f"{root} exists and is not a directory; choose another -o")
        if any(root.iterdir()):
            raise ConfigError(f"{root} is not empty; a bundle goes into a new or empty directory")
    root.parent.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class NatsNode:
    """How the NATS node of a ``nats`` bundle listens, and its cluster peers.

    ``routes`` are the *other* nodes' cluster addresses (``host:port``); with
    none the node runs alone. Routes use TLS with the internal CA both ways:
    a node accepts a route only from a certificate that CA signed.
    """

    listen: str | None = None
    """Client listen address (default: loopback for a loopback HOST, else every address)."""
    port: int | None = None
    """Client port (default: config.json's ``nats.port``)."""
    routes: tuple[str, ...] = ()
    cluster_port: int = 6222
    cluster_name: str = "devsilo"

    def __post_init__(self) -> None:
        for route in self.routes:
            host, _, port = route.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"cluster route {route!r} is not HOST:PORT")
        if not 0 < self.cluster_port < 65536:
            raise ConfigError(f"cluster port {self.cluster_port} is out of range")


def export_bundle(state: StateDir, out: Path, host: str, roles: Iterable[str], *,
                  install_dir: str = DEFAULT_INSTALL_DIR, nats_store: str | None = None,
                  node: NatsNode | None = None, service_ids: Iterable[str] | None = None) -> list[str]:
    """Write the bundle for ``host`` running ``roles`` into ``out``; one line per thing done.

    ``install_dir`` is where the bundle will live on ``host`` and ``nats_store``
    (default ``<install_dir>/nats/jetstream``) where a NATS node keeps its
    JetStream data; only the NATS server's config names paths. ``node`` says
    how that node listens and which peers it routes to. ``service_ids``
    narrows the bundle to those services (e.g. one executor of several).
    """
    roles = parse_roles(",".join(roles))
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"--export needs a host name or address, got {host!r}")
    state.check_root()
    cfg = state.config()
    roster = state.roster()  # validated before it is handed on
    service_roles = {Role(r) for r in roles if r != NATS_ROLE}
    services = {sid: c for sid, c in cfg.services.items() if c.role in service_roles}
    if service_ids is not None:
        wanted = set(service_ids)
        for sid in sorted(wanted - set(services)):
            if sid in cfg.services:
                raise ConfigError(f"service {sid} holds role {cfg.role_of(sid).value}, not one of --roles")
            cfg.role_of(sid)  # raises: unknown service id
        services = {sid: c for sid, c in services.items() if sid in wanted}
    missing = sorted(r.value for r in service_roles if not any(c.role is r for c in services.values()))
    if missing:
        raise ConfigError(f"config.json has no service of role {', '.join(missing)}")

    final = out.expanduser().absolute()
    _fresh_dir(final)
    # built beside its final place and renamed into it: a failed export leaves nothing half-written
    bundle = StateDir(final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp"))
    bundle.root.mkdir(mode=DIR_MODE)
    os.chmod(bundle.root, DIR_MODE)  # mkdir's mode is filtered by umask
    try:
        done = _write_bundle(state, bundle, cfg, roster, services, service_roles, host, roles,
                             install_dir, nats_store, node)
        os.replace(bundle.root, final)
    except BaseException:
        shutil.rmtree(bundle.root, ignore_errors=True)
        raise
    done.insert(0, f"wrote the bundle for {host} ({', '.join(roles)}) to {final}")
    return done


def _write_bundle(state: StateDir, bundle: StateDir, cfg: StackConfig, roster: TrustRoster,
                  services: dict[str, ServiceConfig], service_roles: set[Role], host: str,
                  roles: list[str], install_dir: str, nats_store: str | None,
                  node: NatsNode | None) -> list[str]:
    w = _Writer(bundle)
    done: list[str] = []
    sub = StackConfig(services=services, nats=cfg.nats, gateway=cfg.gateway)
    w.write(bundle.config_path, (sub.model_dump_json(indent=2) + "\n").encode())
    w.write(bundle.roster_path, roster.to_json().encode())
    w.write(bundle.ca_cert_path, _read_private(state.ca_cert_path))
    host_files: list[str] = []
    for sid, svc in sorted(services.items()):
        w.write(bundle.signing_key_path(sid), _read_private(state.signing_key_path(sid)))
        w.write(bundle.nkey_path(sid), _read_private(state.nkey_path(sid)))
        host_files += _host_files(svc.role, svc.options)
        if svc.role is Role.GATEWAY:
            _gateway_files(state, w, svc.options)
        done.append(f"{sid} ({svc.role.value}): signing key, NATS nkey, config")
    if Role.GATEWAY in service_roles:
        w.write(bundle.gateway_cert_path, _read_private(state.gateway_cert_path))
        w.write(bundle.gateway_key_path, _read_private(state.gateway_key_path))
        w.write(bundle.token_path, _read_private(state.token_path))
        done.append("gateway: TLS certificate and key, client token")
    if NATS_ROLE in roles:
        store = nats_store or str(Path(install_dir) / "nats" / "jetstream")
        listen = _nats_files(state, bundle, w, host, install_dir, store, node or NatsNode())
        done.append(f"nats: server certificate for {host}, nats/server.conf "
                    f"(listens on {listen}, JetStream in {store})")
    manifest = {"host": host, "roles": roles, "services": sorted(services), "files": sorted(w.files),
                "host_files": sorted(set(host_files))}
    w.write(bundle.root / "bundle.json", (json.dumps(manifest, indent=2) + "\n").encode())
    for path in sorted(set(host_files)):
        done.append(f"not copied, put it on {host} yourself: {path}")
    return done


def _gateway_files(state: StateDir, w: _Writer, options: dict[str, Any]) -> None:
    """The operator's own certificate and key, when the gateway's options name them."""
    for opt in ("tls_cert", "tls_key"):
        rel = options.get(opt)
        if not rel:
            continue
        src = (state.root / str(rel)).resolve()
        if not src.is_relative_to(state.root.resolve()):
            raise ConfigError(f"the gateway's {opt} {rel} is outside the state directory; "
                              f"name it relative to it to export it")
        # the certificate chain is public (0644 is fine); the key must be private
        data = src.read_bytes() if opt == "tls_cert" else _read_private(src)
        w.write(w.out.root / src.relative_to(state.root.resolve()), data)


def nats_listen_host(host: str) -> str:
    """Where a NATS node for ``host`` listens: loopback for a loopback name, else every address."""
    return "127.0.0.1" if host in LOOPBACK_NAMES else "0.0.0.0"


def _node_certificate(state: StateDir, host: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A NATS node's certificate for ``host``: server auth for clients and routes, client auth
    for the routes it dials."""
    ca, ca_key = state._load_pair(state.ca_cert_path, state.ca_key_path)
    key = _new_key()
    names = [host, "localhost", "127.0.0.1", "::1"]
    builder = _builder(f"devsilo nats ({host})", ca.subject, key, INTERNAL_CERT_DAYS)
    builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(_san(names), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    return builder.sign(ca_key, hashes.SHA256()), key


def _nats_files(state: StateDir, bundle: StateDir, w: _Writer, host: str, install_dir: str,
                store: str, node: NatsNode) -> str:
    """A server certificate naming ``host`` and the server config with paths under ``install_dir``;
    returns the address it listens on."""
    cert, key = _node_certificate(state, host)
    w.write(bundle.nats_key_path, _key_pem(key))
    w.write(bundle.nats_cert_path, _cert_pem(cert))
    cfg = state.config()
    listen = node.listen or nats_listen_host(host)
    conf = json.loads(render_nats_config(state, host=listen, port=node.port or cfg.nats.port,
                                         store_dir=Path(store),
                                         max_payload=cfg.nats.max_payload, server_name=host)
                      .split("\n", 1)[1])
    root = Path(install_dir)
    tls = {"cert_file": str(root / "tls" / "nats.crt"), "key_file": str(root / "tls" / "nats.key"),
           "ca_file": str(root / "tls" / "ca.crt")}
    conf["tls"].update(tls)
    if node.routes:
        # Routes: TLS both ways with the internal CA (verify: a peer must present a certificate
        # the CA signed), host names checked against the route URLs.
        conf["cluster"] = {
            "name": node.cluster_name, "host": listen, "port": node.cluster_port,
            "routes": [f"tls://{r}" for r in node.routes],
            "tls": {**tls, "verify": True, "timeout": 2.0},
        }
    header = f"# devsilo NATS server for {host}, written by `silo init --export`.\n"
    w.write(bundle.nats_conf_path, (header + json.dumps(conf, indent=2) + "\n").encode())
    return listen
