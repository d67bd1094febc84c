"""The egress's pure rules: host names, the allow-list and the address guard (REQUIREMENTS §4)."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
from devsilo.egress._ca import SessionCA
from devsilo.egress._guard import (
    BLOCKED_V4,
    BLOCKED_V6,
    GuardExceptions,
    check_address,
    embedded_ipv4,
)
from devsilo.protocol._names import AllowList, BadHost, normalise_host


@pytest.mark.parametrize(("raw", "want"), [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("10.0.0.5", "10.0.0.5"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("2001:DB8::1", "2001:db8::1"),
])
def test_names_are_normalised_to_one_spelling(raw: str, want: str) -> None:
    assert normalise_host(raw) == want


@pytest.mark.parametrize("raw", [
    "", " example.com", "example.com ", "exa mple.com", "example..com", ".example.com", "example.com..",
    "example.com:443", "example.com/x", "user@example.com", "exa\x00mple.com", "a" * 64 + ".com",
    ".".join(["a" * 60] * 5), "[example.com]", "ex_ample.com\n",
])
def test_what_is_not_a_host_name_is_refused_with_a_reason(raw: str) -> None:
    with pytest.raises(BadHost) as info:
        normalise_host(raw)
    assert str(info.value)


def test_wildcards_cover_the_apex_and_everything_below_only() -> None:
    allow = AllowList(["*.Example.com", "api.other.org."])
    for host in ("example.com", "a.example.com", "a.b.example.com"):
        assert allow.allows(normalise_host(host)), host
    for host in ("badexample.com", "example.com.evil.net", "other.org", "x.api.other.org", "com"):
        assert not allow.allows(normalise_host(host)), host
    assert allow.allows(normalise_host("API.OTHER.ORG."))


def test_idna_entries_match_either_spelling() -> None:
    allow = AllowList(["*.bücher.example"])
    assert allow.allows(normalise_host("shop.xn--bcher-kva.example"))
    assert allow.allows(normalise_host("SHOP.BÜCHER.EXAMPLE."))
    assert not allow.allows(normalise_host("bucher.example"))


def test_an_empty_list_denies_everything() -> None:
    allow = AllowList([])
    assert not allow
    assert not allow.allows("example.com")


def test_addresses_match_only_exactly_and_never_by_wildcard() -> None:
    allow = AllowList(["203.0.113.9"])
    assert allow.allows(normalise_host("203.0.113.9"))
    assert not allow.allows(normalise_host("203.0.113.10"))
    with pytest.raises(BadHost):
        AllowList(["*.10.0.0.1"])
    with pytest.raises(BadHost):
        AllowList(["api.*.example.com"])
    with pytest.raises(BadHost):
        AllowList(["*example.com"])


@pytest.mark.parametrize(("addr", "words"), [
    ("0.1.2.3", "this network"), ("10.0.0.5", "private"), ("100.64.0.1", "carrier-grade"),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("169.254.169.254", "link-local"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.0.0.8", "IETF"),
    ("192.0.2.1", "TEST-NET-1"), ("192.168.1.1", "private"), ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"), ("198.51.100.7", "TEST-NET-2"), ("203.0.113.1", "TEST-NET-3"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fd00::1", "unique local"),
    ("fc00::1", "unique local"), ("ff02::1", "multicast"), ("2001:db8::5", "documentation"),
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1"), ("::ffff:10.0.0.5", "IPv4-mapped 10.0.0.5"),
    ("::a00:5", "IPv4-compatible 10.0.0.5"), ("64:ff9b::a00:5", "NAT64 10.0.0.5"),
    ("64:ff9b::a9fe:a9fe", "NAT64 169.254.169.254"), ("2002:a00:5::1", "6to4 10.0.0.5"),
    ("2002:7f00:1::", "6to4 127.0.0.1"),
    # Teredo: server 10.0.0.5 in bits 32-63; client 127.0.0.1 stored inverted in the low 32 bits
    ("2001:0:a00:5::5efe:c0a8:101", "Teredo server 10.0.0.5"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client 127.0.0.1"),
])
def test_every_blocked_range_is_refused_with_what_it_is(addr: str, words: str) -> None:
    reason = check_address(addr)
    assert reason is not None, addr
    assert reason.startswith(f"address {ipaddress.ip_address(addr)} is ")
    assert words in reason


@pytest.mark.parametrize("addr", [
    "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "198.20.0.1", "11.0.0.1",
    "2606:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34",
    "2001:0:4136:e378:8000:63bf:a247:27dd",
])
def test_public_addresses_pass(addr: str) -> None:
    assert check_address(addr) is None


def test_each_range_edge_is_inside_and_the_next_address_outside() -> None:
    for net, _why in BLOCKED_V4 + BLOCKED_V6:
        assert check_address(net.network_address) is not None, net
        assert check_address(net.broadcast_address) is not None, net
        after = int(net.broadcast_address) + 1
        if after < 2 ** net.max_prefixlen:
            outside = ipaddress.ip_address(after) if net.version == 4 else ipaddress.IPv6Address(after)
            covered = any(outside in other for other, _ in BLOCKED_V4 + BLOCKED_V6 if other.version == net.version)
            carried = net.version == 6 and any(check_address(i) for i, _ in embedded_ipv4(outside))  # type: ignore[arg-type]
            assert (check_address(outside) is None) == (not covered and not carried), outside


def test_operator_exceptions_are_by_exact_host_only() -> None:
    guard = GuardExceptions.of(["git.home.example"])
    assert guard.check("git.home.example", "192.168.1.10") is None
    assert guard.check("other.home.example", "192.168.1.10") is not None
    assert guard.check("x.git.home.example", "192.168.1.10") is not None


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake in memory; raises what the client's verification raises."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_hostname=name)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (cli, srv):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass  # waiting for the other side's flight, moved below
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if cli.version() is not None and srv.version() is not None:
            return
    raise AssertionError("handshake did not finish")


def test_a_session_ca_cannot_vouch_for_a_name_off_its_allow_list() -> None:
    """Even with its key, a session's CA only signs for its allowed names: verifiers refuse the rest."""
    ca = SessionCA("s1", AllowList(["*.example.com", "api.other.org"]).entries())
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    _handshake(ca.server_context("www.example.com"), client, "www.example.com")
    _handshake(ca.server_context("api.other.org"), client, "api.other.org")
    for outside in ("evil.net", "example.com.evil.net", "x.api.other.org.evil.net"):
        with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
            _handshake(ca.server_context(outside), client, outside)
    empty = SessionCA("s2", AllowList([]).entries())
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        _handshake(empty.server_context("www.example.com"),
                   ssl.create_default_context(cadata=empty.cert_pem.decode()), "www.example.com")
