"""The URL policy: every spelling of a non-public address is refused, before any connection is made."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnigate_gateway.errors import ErrorCode, ForbiddenSource, MediaFetchError
from omnigate_gateway.media.policy import (
    DestinationChecker,
    UrlPolicy,
    embedded_ipv4,
    forbidden_reason,
    parse_ip_host,
)
from omnigate_gateway.media.resolver import StaticResolver

HOSTS = {
    "media.example": "93.184.215.14",
    "internal.example": "10.1.2.3",
    "metadata.example": "169.254.169.254",
    "mixed.example": ["93.184.215.14", "192.168.0.10"],
    "v6.example": "2606:4700:4700::1111",
    "ula.example": "fd00:ec2::254",
    "mapped.example": "::ffff:127.0.0.1",
    "cdn.allowed.example": "93.184.215.20",
    "localhost": "127.0.0.1",
}


def checker(**policy) -> tuple[DestinationChecker, StaticResolver]:
    resolver = StaticResolver(HOSTS)
    return DestinationChecker(UrlPolicy(**policy), resolver), resolver


async def check(url: str, **policy):
    c, _ = checker(**policy)
    return await c.check(url, shown_as="the URL")


# ----------------------------------------------------------------------------------- address spellings


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),  # decimal
        ("0x7f000001", "127.0.0.1"),  # hex
        ("0177.0.0.1", "127.0.0.1"),  # octal
        ("0x7f.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),  # shortened
        ("127.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("017700000001", "127.0.0.1"),
        ("169.254.43518", "169.254.169.254"),  # last part covers two bytes
        ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),
        ("127.0.0.1.", "127.0.0.1"),  # trailing dot
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("fe80::1%25eth0", "fe80::1"),  # zone dropped
    ],
)
def test_numeric_hosts_are_read_as_addresses(host, address):
    assert parse_ip_host(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "localhost", "a1", "1a.example", "0x7f.example"])
def test_names_are_names(host):
    assert parse_ip_host(host) is None


@pytest.mark.parametrize(
    "host",
    [
        "1.2.3.4.5",
        "256.0.0.1",
        "1.2.3.0x100",
        "08.0.0.1",
        "4294967296",
        "1..2",
        # what int() would also take: a sign (fuzzer finding: "0-6.00" reached ipaddress as -100663296),
        # underscores, spaces, non-ASCII digits
        "0-6.00",
        "0+7.1",
        "1_0.0.0.1",
        "0_7.1",
        "0x1_0.1",
        "1 .2",
        "١٢٧.0.0.1",
    ],
)
def test_malformed_numeric_hosts_are_invalid_not_names(host):
    with pytest.raises(MediaFetchError, match="not a valid IPv4 address"):
        parse_ip_host(host)


@given(st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_every_ipv4_spelling_means_what_inet_aton_says(value):
    address = ipaddress.IPv4Address(value)
    a, b, c, d = address.packed
    spellings = [
        str(value),
        hex(value),
        "0" + oct(value)[2:],
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{hex(a)}.{hex(b)}.{hex(c)}.{hex(d)}",
        f"0{oct(a)[2:]}.0{oct(b)[2:]}.0{oct(c)[2:]}.0{oct(d)[2:]}",
    ]
    for spelling in spellings:
        assert parse_ip_host(spelling) == address, spelling
        assert socket.inet_aton(spelling) == address.packed, spelling  # what the C resolver would do


# ------------------------------------------------------------------------------------------- refusals

FORBIDDEN_URLS = [
    "http://127.0.0.1/a.png",
    "http://127.8.9.10/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::1]/",
    "http://[::]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://100.100.100.200/",  # Alibaba Cloud metadata
    "http://192.0.0.192/",  # Oracle Cloud metadata
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://198.18.0.1/",  # benchmarking
    "http://192.0.2.1/",  # documentation
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
    "http://[ff02::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:a9fe:a9fe]/",  # mapped 169.254.169.254
    "http://[0:0:0:0:0:ffff:10.0.0.1]/",
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of the metadata address
    "http://[2002:7f00:1::1]/",  # 6to4 around 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",  # Teredo, client 127.0.0.1
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/",
    "http://printer.local/",
    "http://internal.example/",  # resolves to 10.1.2.3
    "http://metadata.example/",  # resolves to 169.254.169.254
    "http://mixed.example/",  # one public and one private answer
    "http://ula.example/",
    "http://mapped.example/",
    "https://internal.example:8443/a?sig=SECRET",
    "http://user:pass@127.0.0.1/",
    "http://public.example@127.0.0.1/",  # the host is 127.0.0.1; the rest is userinfo
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
async def test_non_public_destinations_refused(url):
    c, resolver = checker()
    with pytest.raises(ForbiddenSource) as info:
        await c.check(url, shown_as="the URL")
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    message = str(info.value)
    assert "SECRET" not in message
    assert any(
        word in message
        for word in (
            "loopback",
            "private",
            "link-local",
            "multicast",
            "unspecified",
            "broadcast",
            "reserved",
            "not publicly routable",
            "local network",
            "this network",
            "shared",
            "IETF",
            "documentation",
            "benchmarking",
        )
    ), message


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://media.example/a.png", "93.184.215.14"),
        ("https://v6.example/a.png", "2606:4700:4700::1111"),
        ("http://8.8.8.8/", "8.8.8.8"),
        ("http://134744072/", "8.8.8.8"),  # decimal 8.8.8.8 is as public as 8.8.8.8
        ("http://[2606:4700:4700::1111]:8080/", "2606:4700:4700::1111"),
    ],
)
async def test_public_destinations_pinned_to_the_checked_address(url, address):
    destination = await check(url)
    assert [str(a) for a in destination.addresses] == [address]
    connect = destination.connect_url(destination.addresses[0])
    assert connect.host == address  # the client connects to the address, not the name
    assert connect.path == destination.url.path and connect.scheme == destination.url.scheme


async def test_host_header_and_tls_name_keep_the_original_name():
    destination = await check("https://media.example:8443/a.png?x=1")
    assert destination.host_header == "media.example:8443"
    assert destination.sni_hostname == "media.example"
    assert str(destination.connect_url(destination.addresses[0])) == "https://93.184.215.14:8443/a.png?x=1"
    plain = await check("http://media.example/a.png")
    assert plain.host_header == "media.example" and plain.sni_hostname is None
    literal = await check("https://8.8.8.8/")
    assert literal.sni_hostname is None  # an IP literal has no server name


async def test_each_check_resolves_once():
    c, resolver = checker()
    await c.check("http://media.example/a", shown_as="x")
    assert resolver.lookups == ["media.example"]
    await c.check("http://8.8.8.8/", shown_as="x")  # literals are never looked up
    assert resolver.lookups == ["media.example"]


async def test_private_networks_switch_allows_everything_but_still_pins():
    destination = await check("http://internal.example/a", allow_private_networks=True)
    assert [str(a) for a in destination.addresses] == ["10.1.2.3"]
    assert (await check("http://127.0.0.1:8000/", allow_private_networks=True)).port == 8000
    assert (
        await check("http://localhost/", allow_private_networks=True, denied_domains=())
    ).host == "localhost"


async def test_allowed_networks_are_exceptions():
    destination = await check("http://internal.example/", allowed_networks=("10.0.0.0/8",))
    assert str(destination.addresses[0]) == "10.1.2.3"
    with pytest.raises(ForbiddenSource):
        await check("http://192.168.0.1/", allowed_networks=("10.0.0.0/8",))
    with pytest.raises(ForbiddenSource):
        await check("http://metadata.example/", allowed_networks=("10.0.0.0/8",))


async def test_domain_deny_list():
    with pytest.raises(ForbiddenSource, match="deny-list"):
        await check("http://media.example/a", denied_domains=("example",))
    with pytest.raises(ForbiddenSource, match="deny-list"):
        await check("http://MEDIA.Example./a", denied_domains=("*.media.example", "media.example"))
    # Deny wins over allow, and applies even with private networks allowed.
    with pytest.raises(ForbiddenSource, match="deny-list"):
        await check(
            "http://media.example/a",
            allowed_domains=("media.example",),
            denied_domains=("media.example",),
            allow_private_networks=True,
        )
    assert await check("http://media.example/a", denied_domains=("other.example",))


async def test_domain_allow_list():
    allowed = {"allowed_domains": ("allowed.example",)}
    assert await check("http://cdn.allowed.example/a", **allowed)
    with pytest.raises(ForbiddenSource, match="allow-list"):
        await check("http://media.example/a", **allowed)
    with pytest.raises(ForbiddenSource, match="allow-list"):
        await check("http://notallowed.example/a", **allowed)  # a suffix is not a subdomain
    with pytest.raises(ForbiddenSource, match="allow-list"):
        await check("http://8.8.8.8/a", **allowed)
    # Being on the allow-list does not make a private address fetchable.
    with pytest.raises(ForbiddenSource, match="private"):
        await check("http://internal.example/a", allowed_domains=("internal.example",))


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http:///a.png", "no host"),
        ("http://[::1/a.png", "not valid"),
        ("http://1.2.3.4.5/", "not a valid IPv4"),
        ("http://999.1.1.1/", "not valid"),
        ("http://nowhere.example/", "could not resolve"),
    ],
)
async def test_malformed_hosts_are_invalid(url, fragment):
    with pytest.raises(MediaFetchError, match=fragment) as info:
        await check(url)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/"])
async def test_only_http_schemes_reach_the_checker(url):
    with pytest.raises(ForbiddenSource, match="not allowed"):
        await check(url)


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("64:ff9b::808:808", "8.8.8.8"),
        ("2002:0a00:0001::1", "10.0.0.1"),
        ("::7f00:1", "127.0.0.1"),
        ("2606:4700:4700::1111", None),
        ("::1", None),
    ],
)
def test_embedded_ipv4(address, embedded):
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (str(found) if found else None) == embedded


@given(st.integers(min_value=0, max_value=2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_ipv4_and_its_ipv6_forms_agree(value):
    v4 = ipaddress.IPv4Address(value)
    if forbidden_reason(v4) is None:
        return
    for v6 in (
        ipaddress.IPv6Address(f"::ffff:{v4}"),
        ipaddress.IPv6Address((0x64FF9B << 96) | value),
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80)),
    ):
        assert forbidden_reason(v6) is not None, (v4, v6)
