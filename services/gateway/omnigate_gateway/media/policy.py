"""Which media URLs the gateway may fetch, and the exact address each fetch connects to (SSRF protection).

A URL is checked before any connection is made, and again for every redirect hop:

1. Scheme: only http and https reach this module (data: URLs are decoded locally, everything else is
   refused by the fetcher).
2. Host: parsed the way browsers and libcurl do, so that other spellings of an address cannot slip
   through: decimal (``2130706433``), octal (``0177.0.0.1``), hex (``0x7f.1``) and shortened
   (``127.1``) IPv4 forms are read as the IPv4 address they mean; IPv6 literals are unwrapped when they
   embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64
   ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo).
3. Domain lists: a deny-list always wins; when an allow-list is set, only its domains (and their
   subdomains) may be fetched.
4. Addresses: a name is resolved once, by the injected resolver, and *every* address it resolves to must
   be public: loopback, private (RFC 1918, ULA), link-local (169.254.169.254 and fd00:ec2::254, the cloud
   metadata services), carrier-grade NAT (100.100.100.200, Alibaba's metadata), shared, reserved,
   multicast, broadcast, unspecified and documentation ranges are refused. Names that only ever mean
   something inside a network (``localhost``, ``*.local``, ``*.internal`` such as
   ``metadata.google.internal``) are refused without a lookup, and so are names longer than DNS allows
   (253 characters, 63 per label), which no resolver could answer.

The checked addresses travel with the result (``Destination``) and the fetcher connects to one of them
directly: the HTTP library never resolves the name a second time, so a DNS answer that changes between
the check and the connection (DNS rebinding) cannot redirect the fetch. ``allow_private_networks`` (the
local-development switch) and ``allowed_networks`` (CIDR exceptions, e.g. an internal media store) relax
step 4 only; steps 1-3 and the pinning always apply.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from omnigate.errors import quote
from omnigate_gateway.errors import ForbiddenSource, MediaFetchError
from omnigate_gateway.media.resolver import IPAddress, Resolver

HTTP_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Names that only mean something inside a network; refused without asking DNS (unless private networks
# are allowed).
_LOCAL_NAMES = frozenset({"localhost", "metadata", "instance-data", "metadata.google.internal"})
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (translation gateways).
_NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

_HEX_PART = re.compile(r"^0[xX][0-9a-fA-F]*\Z")
_OCTAL_PART = re.compile(r"0[0-7]+")
_DECIMAL_PART = re.compile(r"[0-9]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_MAX_NAME = 253  # characters of a DNS name (without a trailing dot)
_MAX_LABEL = 63  # characters of one label of it
_DETAIL_LIMIT = 120  # characters of a parser's reason a message repeats

# Non-public ranges (IANA special-purpose registries), listed here rather than taken from ``ipaddress``
# alone, whose idea of "private" differs between Python releases (3.11.7 calls 192.0.0.192, Oracle
# Cloud's metadata address, global). Checked before ``ipaddress``'s own properties.
_SPECIAL_NETWORKS = [
    (ipaddress.ip_network(network), label)
    for network, label in (
        ("0.0.0.0/8", 'an address of "this network"'),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (where cloud metadata services live)"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("100::/64", "a discard-only address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
]


@dataclass(frozen=True)
class UrlPolicy:
    """What an operator allows. The defaults are the safe ones: public addresses only, no lists."""

    allow_private_networks: bool = False  # local development only: every address allowed
    allowed_networks: tuple[str, ...] = ()  # CIDR blocks allowed even when private networks are not
    allowed_domains: tuple[str, ...] = ()  # when non-empty, only these domains and their subdomains
    denied_domains: tuple[str, ...] = ()  # never these domains or their subdomains


@dataclass(frozen=True)
class Destination:
    """A checked http(s) URL and the addresses the fetch may connect to (in order)."""

    url: httpx.URL
    host: str  # lowercase ASCII (IDNA) name without a trailing dot, or the canonical IP text
    port: int
    addresses: tuple[IPAddress, ...]
    is_ip_literal: bool = False
    host_header: str = field(default="", compare=False)

    def connect_url(self, address: IPAddress) -> httpx.URL:
        """The URL with its host replaced by ``address``: what the HTTP client actually connects to."""
        return self.url.copy_with(host=str(address))

    @property
    def sni_hostname(self) -> str | None:
        """The TLS server name (and certificate name) for https to a named host."""
        return self.host if self.url.scheme == "https" and not self.is_ip_literal else None


class DestinationChecker:
    """Applies a ``UrlPolicy`` to URLs, resolving names with ``resolver``."""

    def __init__(self, policy: UrlPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver
        self._allowed_networks = tuple(ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks)
        self._allowed_domains = tuple(normalize_domain(d) for d in policy.allowed_domains if d.strip())
        self._denied_domains = tuple(normalize_domain(d) for d in policy.denied_domains if d.strip())

    @property
    def policy(self) -> UrlPolicy:
        return self._policy

    async def check(self, url: str, *, shown_as: str) -> Destination:
        """Checks an http(s) URL and resolves its host; raises ForbiddenSource or MediaFetchError.

        ``shown_as`` is how messages name the URL (scheme and host only: paths of signed URLs are secret).
        """
        try:
            parsed = httpx.URL(url)
            scheme = parsed.scheme.lower()
            raw_host = parsed.raw_host.decode("ascii")
            port = parsed.port
            host_header = httpx.Request("GET", parsed).headers.get("host", raw_host)
        except (httpx.InvalidURL, ValueError) as e:  # UnicodeError is a ValueError
            # httpx refuses some spellings of an address (octal "0177.0.0.1"); a forbidden address
            # is still reported as forbidden, not merely as a malformed URL.
            literal = _ip_host_of_unparsable(url)
            if literal is not None:
                self._check_address(literal, shown_as)
            raise MediaFetchError(f"the URL {shown_as} is not valid: {_detail(e)}") from None
        if scheme not in HTTP_SCHEMES:
            shown_scheme = f"{scheme}:" if _SCHEME.fullmatch(scheme) else f"the scheme {quote(scheme)}"
            raise ForbiddenSource(
                f"{shown_scheme if scheme else 'relative'} URLs are not allowed; use http://, https:// or data:"
            )
        if not raw_host:
            raise MediaFetchError(f"the URL {shown_as} has no host")
        port = port or _DEFAULT_PORTS[scheme]

        literal = parse_ip_host(raw_host)  # raises MediaFetchError for a malformed numeric host
        host = str(literal) if literal is not None else normalize_domain(raw_host)
        if literal is None:
            _check_name_length(host, shown_as)
        self._check_domain_lists(host, shown_as)
        if literal is not None:
            self._check_address(literal, shown_as)
            return Destination(parsed, host, port, (literal,), True, host_header)
        if not self._policy.allow_private_networks and _is_local_name(host):
            raise ForbiddenSource(
                f"{shown_as} names a host inside the local network ({quote(host)}); only public internet "
                "hosts may be fetched"
            )
        addresses = await self._resolver.resolve(host, port)
        for address in addresses:  # every answer, so that a mix of public and private is refused
            self._check_address(address, shown_as, resolved_from=host)
        return Destination(parsed, host, port, tuple(addresses), False, host_header)

    def _check_domain_lists(self, host: str, shown_as: str) -> None:
        if any(_in_domain(host, d) for d in self._denied_domains):
            raise ForbiddenSource(f"{shown_as} is on this gateway's deny-list of media domains")
        if self._allowed_domains and not any(_in_domain(host, d) for d in self._allowed_domains):
            raise ForbiddenSource(
                f"{shown_as} is not on this gateway's allow-list of media domains "
                f"({', '.join(self._allowed_domains)})"
            )

    def _check_address(self, address: IPAddress, shown_as: str, *, resolved_from: str | None = None) -> None:
        if self._policy.allow_private_networks:
            return
        if any(address.version == n.version and address in n for n in self._allowed_networks):
            return
        reason = forbidden_reason(address)
        if reason is None:
            return
        verb = "resolves to" if resolved_from else "points to"
        raise ForbiddenSource(
            f"{shown_as} {verb} {address}, {reason}; only public internet addresses may be fetched"
        )


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be fetched from ("a loopback address", ...); None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            if inner is not None:
                return f"the IPv6 form of {embedded}, {inner}"
    for network, label in _SPECIAL_NETWORKS:
        if address.version == network.version and address in network:
            return label
    if address.is_loopback or address.is_unspecified:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "an address that is not publicly routable"
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the IPv4-embedding forms."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client address; (server, client)
    if any(address in prefix for prefix in _NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE and int(address) > 0xFFFF:  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_ip_host(host: str) -> IPAddress | None:
    """The IP address a URL host denotes, or None when it is a name.

    IPv6 literals come without brackets; a zone id ("%25eth0") is dropped (zones only qualify link-local
    addresses, which are refused anyway). An IPv4 host follows the WHATWG URL rules: a host whose last
    label is a number is an IPv4 address, written in one to four parts, each decimal, octal (leading 0)
    or hex (0x); anything else that ends in a number is invalid (MediaFetchError), never a name to
    resolve.
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            raise MediaFetchError(f"the host {quote(f'[{host}]')} is not a valid IPv6 address") from None
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot is allowed ("127.0.0.1.")
    last = labels[-1] if labels else ""
    if not (last.isdigit() or _HEX_PART.match(last)):
        return None
    numbers = [_parse_ipv4_part(label, host) for label in labels]
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise MediaFetchError(f"the host {quote(host)} is not a valid IPv4 address")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _check_name_length(host: str, shown_as: str) -> None:
    """Refuses a host name no DNS name can be (too long in all, or a label too long)."""
    longest = max((len(label) for label in host.split(".")), default=0)
    if len(host) > _MAX_NAME or longest > _MAX_LABEL:
        raise MediaFetchError(
            f"the host of {shown_as} is {len(host)} characters long with a label of {longest}; host names "
            f"are at most {_MAX_NAME} characters, {_MAX_LABEL} per label"
        )


def _detail(error: Exception) -> str:
    """A parser's reason for a message, cut to a bounded length (it may quote the URL)."""
    text = "".join(c if c.isprintable() else " " for c in str(error))
    return text if len(text) <= _DETAIL_LIMIT else f"{text[:_DETAIL_LIMIT]}... ({len(text)} characters)"


def _ip_host_of_unparsable(url: str) -> IPAddress | None:
    try:
        host = urlsplit(url).hostname
        return parse_ip_host(host) if host else None
    except (ValueError, MediaFetchError):
        return None


def _parse_ipv4_part(label: str, host: str) -> int:
    # Digits only, checked here: int() also takes a sign, underscores and spaces ("0-6" parsed as -6 and
    # reached ipaddress as a negative address: a fuzzer finding).
    if _HEX_PART.match(label):
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):  # octal, or nothing ("08" is invalid)
        if _OCTAL_PART.fullmatch(label):
            return int(label[1:], 8)
    elif _DECIMAL_PART.fullmatch(label):
        return int(label)
    raise MediaFetchError(f"the host {quote(host)} is not a valid IPv4 address")


def normalize_domain(domain: str) -> str:
    """Lowercase ASCII (IDNA) form without a trailing dot or a leading "*." / "."."""
    domain = domain.strip().lower().rstrip(".")
    if domain.startswith("*."):
        domain = domain[2:]
    domain = domain.lstrip(".")
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return domain


def _in_domain(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def _is_local_name(host: str) -> bool:
    return host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES)
