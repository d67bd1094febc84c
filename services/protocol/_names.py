"""Host names as the egress (and the gateway's limits) compare them, and the allow-list.

A name is normalised once, on the way in, so that every comparison after it
is a plain string comparison: surrounding whitespace is an error (not
stripped: a sandbox must not get two spellings of one name), one trailing
dot is dropped, and the rest goes through IDNA 2008 with the UTS #46
mapping (which also folds case), giving the ASCII form (``xn--…`` labels).
IP literals are kept in their canonical ``ipaddress`` text. Anything that is
not a name or an address — empty, ``..``, a port, a path, a NUL, a label
over 63 or a name over 253 octets, characters IDNA refuses — raises
:class:`BadHost` with the reason.

The allow-list (REQUIREMENTS §4): exact names, and ``*.example.com``, which
covers ``example.com`` itself and every name below it. An empty list denies
everything. Entries are normalised the same way as the names they are
matched against, so ``*.Bücher.example.`` allows ``xn--bcher-kva.example``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import idna

MAX_NAME = 253
MAX_LABEL = 63


class BadHost(ValueError):
    """A host name or allow-list entry that is not one; the message says why."""


def normalise_host(raw: str) -> str:
    """The one spelling of ``raw`` that every comparison uses; :class:`BadHost` if none."""
    if not isinstance(raw, str) or not raw:
        raise BadHost("empty host name")
    if raw != raw.strip() or any(ch in raw for ch in "\x00/\\@ \t\r\n"):
        raise BadHost(f"not a host name: {raw!r}")
    text = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass  # not an address: a name, checked below
    if ":" in raw or raw.startswith("["):
        raise BadHost(f"not a host name: {raw!r}")
    name = raw.removesuffix(".")
    if not name or name.startswith(".") or name.endswith(".") or ".." in name:
        raise BadHost(f"not a host name: {raw!r}")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise BadHost(f"not a host name: {raw!r} ({exc})") from None
    ascii_name = ascii_name.lower()
    if len(ascii_name) > MAX_NAME or any(len(label) > MAX_LABEL for label in ascii_name.split(".")):
        raise BadHost(f"host name too long: {raw[:80]!r}")
    return ascii_name


class AllowList:
    """Which hosts a session may reach; built from the grant's ``allow_domains``."""

    def __init__(self, entries: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        for entry in entries:
            if entry.startswith("*."):
                base = normalise_host(entry[2:])
                if _is_address(base):
                    raise BadHost(f"a wildcard cannot cover an address: {entry!r}")
                suffixes.add(base)
            elif "*" in entry:
                raise BadHost(f"a wildcard may only be a whole first label ('*.example.com'): {entry!r}")
            else:
                exact.add(normalise_host(entry))
        self._exact = frozenset(exact)
        self._suffixes = frozenset(suffixes)

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffixes)

    def allows(self, host: str) -> bool:
        """Whether the (already normalised) ``host`` is on the list."""
        if host in self._exact:
            return True
        if _is_address(host):
            return False
        if host in self._suffixes:
            return True
        dot = host.find(".")
        while dot != -1:
            if host[dot + 1:] in self._suffixes:
                return True
            dot = host.find(".", dot + 1)
        return False

    def entries(self) -> tuple[str, ...]:
        """The normalised entries, wildcards spelled ``*.name``; sorted."""
        return tuple(sorted(self._exact) + sorted(f"*.{s}" for s in self._suffixes))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
