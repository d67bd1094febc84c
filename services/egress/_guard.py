"""The address guard: which addresses the egress will never connect to.

Applied to the address actually connected to (the caller resolves once,
checks every answer with :func:`check_address`, and connects to a checked
address: there is no second lookup for DNS rebinding to slip into). The
ranges are REQUIREMENTS §4's, kept here as data. IPv6 addresses that carry
an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) are
judged by the IPv4 address they carry — both of Teredo's, server and
client — as well as by their own range.

Operator exceptions are by exact host name only (``GuardExceptions``): a
name the operator listed may resolve to a blocked address (a git server on
the home network); nothing else may, and no exception is ever by address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (network, what it is) — the words go into refusals: "address 10.0.0.5 is private".
BLOCKED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why) for net, why in (
        ("0.0.0.0/8", "in 'this network' (0/8)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),  # before 240/4, which holds it: the closer name wins
        ("240.0.0.0/4", "reserved"),
    )
)

BLOCKED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why) for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("fc00::/7", "unique local (private)"),
        ("ff00::/8", "multicast"),
        ("2001:db8::/32", "documentation"),
    )
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[tuple[ipaddress.IPv4Address, str]]:
    """The IPv4 addresses an IPv6 address carries, each with the mechanism's name."""
    value = int(addr)
    found: list[tuple[ipaddress.IPv4Address, str]] = []
    if addr in _MAPPED:
        found.append((ipaddress.IPv4Address(value & 0xFFFFFFFF), "IPv4-mapped"))
    elif addr in _COMPAT:
        found.append((ipaddress.IPv4Address(value & 0xFFFFFFFF), "IPv4-compatible"))
    if addr in _NAT64:
        found.append((ipaddress.IPv4Address(value & 0xFFFFFFFF), "NAT64"))
    if addr in _6TO4:
        found.append((ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF), "6to4"))
    if addr in _TEREDO:
        found.append((ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF), "Teredo server"))
        found.append((ipaddress.IPv4Address(~value & 0xFFFFFFFF), "Teredo client"))
    return found


def check_address(addr: IPAddress | str) -> str | None:
    """Why ``addr`` must not be connected to (``"address 10.0.0.5 is private"``), or None."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, ipaddress.IPv4Address):
        why = _v4_reason(ip)
        return f"address {ip} is {why}" if why else None
    for net, why in BLOCKED_V6:
        if ip in net:
            return f"address {ip} is {why}"
    for inner, mechanism in embedded_ipv4(ip):
        why = _v4_reason(inner)
        if why:
            return f"address {ip} is {why} ({mechanism} {inner})"
    return None


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, why in BLOCKED_V4:
        if ip in net:
            return why
    return None


@dataclass(frozen=True)
class GuardExceptions:
    """Host names (normalised, exact) the operator lets reach blocked addresses."""

    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, hosts: Iterable[str]) -> GuardExceptions:
        from devsilo.protocol._names import normalise_host

        return cls(frozenset(normalise_host(h) for h in hosts))

    def check(self, host: str, addr: IPAddress | str) -> str | None:
        """Like :func:`check_address`, except for the operator's exact hosts."""
        if host in self.hosts:
            return None
        return check_address(addr)
