"""Resolve once, check every answer, connect to a checked address.

The only way the egress opens a connection. :meth:`Upstream.resolve` asks
the configured name servers (dnspython; the system's ``/etc/resolv.conf``
when none are configured) for A and AAAA records, and
:meth:`Upstream.connect` refuses the whole name if *any* answer is blocked —
a name with both a public and a private answer is as suspect as one with
only a private answer — then connects to the addresses it checked, in the
order returned, never looking the name up again. A rebinding name that
answers public now and private later can therefore only ever be connected
to at the public address it was checked at.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from ._guard import GuardExceptions, IPAddress

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 5.0


class Refused(Exception):
    """The egress will not make this connection; ``reason`` is the one-line why, ``label`` the metric label."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label


@dataclass(frozen=True)
class Checked:
    """A name and the addresses it resolved to, every one of them checked."""

    host: str
    addresses: tuple[IPAddress, ...]


class Upstream:
    """Resolution, the address guard and connecting, in one place."""

    def __init__(
        self,
        *,
        nameservers: Sequence[str] = (),
        dns_port: int = 53,
        exceptions: GuardExceptions | None = None,
        trust: ssl.SSLContext | None = None,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = list(nameservers)
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.port = dns_port
        self._resolver.lifetime = RESOLVE_TIMEOUT
        self._resolver.cache = None  # resolve once per connection; no stale answers across them
        self.exceptions = exceptions or GuardExceptions()
        self.trust = trust or client_context()

    async def resolve(self, host: str) -> Checked:
        """``host``'s addresses, each passed by the guard; :class:`Refused` otherwise."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            addresses = []
            failures = 0
            answers = await asyncio.gather(  # both at once: one round trip, not two
                *(self._resolver.resolve(host, rdtype, search=False) for rdtype in ("A", "AAAA")),
                return_exceptions=True)
            for answer in answers:
                if isinstance(answer, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)):
                    continue
                if isinstance(answer, (dns.resolver.NoNameservers, dns.exception.Timeout)):
                    failures += 1
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                addresses.extend(ipaddress.ip_address(r.address) for r in answer)
            if not addresses:
                if failures:
                    raise Refused(f"cannot resolve {host}: no name server answered", "dns_failed")
                raise Refused(f"{host} does not resolve", "dns_nxdomain")
        for addr in addresses:
            why = self.exceptions.check(host, addr)
            if why is not None:
                raise Refused(why if literal is not None else f"{host} resolves to {why.removeprefix('address ')}",
                              "address_blocked")
        return Checked(host, tuple(addresses))

    async def connect(
        self, host: str, port: int, *, tls: bool, alpn: Sequence[str] = ("http/1.1",),
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IPAddress]:
        """A connection (TLS, verified for ``host``, when ``tls``) to a checked address of ``host``."""
        checked = await self.resolve(host)
        errors: list[str] = []
        for addr in checked.addresses:
            try:
                ctx: ssl.SSLContext | None = None
                if tls:
                    ctx = self.trust
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        str(addr), port, ssl=ctx,
                        server_hostname=host if tls else None,
                        family=socket.AF_INET if addr.version == 4 else socket.AF_INET6,
                        limit=1 << 20),
                    CONNECT_TIMEOUT)
            except ssl.SSLCertVerificationError as exc:
                raise Refused(f"upstream certificate for {host} not trusted: {exc.verify_message}",
                              "upstream_cert") from None
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                errors.append(f"{addr}: {exc or type(exc).__name__}")
                continue
            return reader, writer, addr
        raise Refused(f"cannot connect to {host}:{port} ({'; '.join(errors)})", "connect_failed")


def client_context(extra_cas: Sequence[str] = ()) -> ssl.SSLContext:
    """Verification against the system store plus the operator's CA bundles."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in extra_cas:
        ctx.load_verify_locations(cafile=path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
