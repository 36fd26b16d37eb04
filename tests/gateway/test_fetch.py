"""Fetching media: data: URLs, http from a local server, limits, redirects, refusals and local paths."""

from __future__ import annotations

import base64
import os
import socket
import time
from urllib.parse import quote_from_bytes

import httpx
import pytest

from omnigate_gateway.errors import (
    ErrorCode,
    ForbiddenSource,
    LimitExceeded,
    MediaFetchError,
    MediaFetchTimeout,
)
from omnigate_gateway.media.fetch import FetchLimits, MediaFetcher, RequestBudget, Validators
from omnigate_gateway.media.resolver import StaticResolver
from tests.support.media_factory import make_png, make_wav

LOCAL = FetchLimits(allow_private_networks=True, max_bytes=1_000_000, max_redirects=3)
PUBLIC_ONLY = FetchLimits(allow_private_networks=False, max_bytes=1_000_000)


@pytest.fixture
async def fetcher():
    async with MediaFetcher(LOCAL) as f:
        yield f


@pytest.fixture
async def public_fetcher():
    async with MediaFetcher(PUBLIC_ONLY) as f:
        yield f


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- data: URLs


async def test_data_url_base64(fetcher):
    wav = make_wav(0.1)
    url = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    assert await fetcher.fetch(url) == wav


async def test_data_url_base64_urlsafe_unpadded_and_wrapped(fetcher):
    payload = bytes(range(256)) + b"\xff\xfe"
    text = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert await fetcher.fetch("data:application/octet-stream;base64," + wrapped) == payload


async def test_data_url_percent_encoded(fetcher):
    payload = bytes(range(256))
    assert await fetcher.fetch("data:application/octet-stream," + quote_from_bytes(payload)) == payload
    assert await fetcher.fetch("DATA:,hello%20world") == b"hello world"


async def test_data_url_invalid_base64(fetcher):
    with pytest.raises(MediaFetchError, match="not valid base64"):
        await fetcher.fetch("data:image/png;base64,!!!not*base64!!!")


async def test_data_url_without_comma(fetcher):
    with pytest.raises(MediaFetchError, match="no ','"):
        await fetcher.fetch("data:image/png;base64")


async def test_data_url_over_size_cap():
    async with MediaFetcher(FetchLimits(max_bytes=1000)) as f:
        assert len(await f.fetch("data:;base64," + base64.b64encode(b"x" * 1000).decode())) == 1000
        with pytest.raises(LimitExceeded, match="the limit is 1000 bytes") as info:
            await f.fetch("data:;base64," + base64.b64encode(b"x" * 1001).decode())
        assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED
        with pytest.raises(LimitExceeded):
            await f.fetch("data:," + "x" * 5000)


# ----------------------------------------------------------------------------------------------- http


async def test_http_fetch(fetcher, media_server):
    png = make_png(16, 16)
    assert await fetcher.fetch(media_server.serve("/fetch/image.png", png)) == png


async def test_http_chunked_body(fetcher, media_server):
    wav = make_wav(0.5)
    media_server.serve("/fetch/chunked.wav", wav)
    assert await fetcher.fetch(media_server.url("/chunked/fetch/chunked.wav")) == wav


async def test_size_cap_from_content_length(media_server):
    url = media_server.serve("/fetch/big.bin", b"\x01" * 5000)
    async with MediaFetcher(FetchLimits(allow_private_networks=True, max_bytes=4999)) as f:
        with pytest.raises(LimitExceeded, match="5000 bytes; the limit is 4999 bytes"):
            await f.fetch(url)
    async with MediaFetcher(FetchLimits(allow_private_networks=True, max_bytes=5000)) as f:
        assert len(await f.fetch(url)) == 5000


async def test_size_cap_while_streaming(media_server):
    media_server.serve("/fetch/streamed.bin", b"\x02" * 5000)
    async with MediaFetcher(FetchLimits(allow_private_networks=True, max_bytes=3000)) as f:
        with pytest.raises(LimitExceeded, match="the limit is 3000 bytes"):
            await f.fetch(media_server.url("/chunked/fetch/streamed.bin"))


async def test_size_cap_stops_an_endless_body(media_server):
    limits = FetchLimits(allow_private_networks=True, max_bytes=1_000_000, total_timeout_s=10)
    started = time.monotonic()
    async with MediaFetcher(limits) as f:
        with pytest.raises(LimitExceeded, match="at least"):
            await f.fetch(media_server.url("/endless"))
    assert time.monotonic() - started < 5


async def test_redirect_followed(fetcher, media_server):
    media_server.serve("/fetch/target.bin", b"target")
    assert await fetcher.fetch(media_server.url("/redirect?to=/fetch/target.bin")) == b"target"
    assert await fetcher.fetch(media_server.url("/chain/3")) == b"end of chain"  # exactly max_redirects hops


async def test_redirect_cap(fetcher, media_server):
    with pytest.raises(MediaFetchError, match="redirected more than 3 times") as info:
        await fetcher.fetch(media_server.url("/chain/4"))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


async def test_redirect_to_forbidden_scheme(fetcher, media_server):
    with pytest.raises(ForbiddenSource, match="redirected to a file: URL by http://127.0.0.1") as info:
        await fetcher.fetch(media_server.url("/redirect?to=file:///etc/passwd"))
    assert str(info.value).endswith("redirects may only go to http:// or https:// URLs")


async def test_http_404_is_a_clear_invalid_argument(fetcher, media_server):
    with pytest.raises(MediaFetchError, match="HTTP 404") as info:
        await fetcher.fetch(media_server.url("/no/such/file.png?token=SECRET"))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "SECRET" not in str(info.value)  # paths and queries (signed URLs) stay out of messages


async def test_unreachable_port(fetcher):
    port = _unused_port()
    with pytest.raises(MediaFetchError, match=f"could not connect to http://127.0.0.1:{port}") as info:
        await fetcher.fetch(f"http://127.0.0.1:{port}/a.wav")
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


async def test_unresolvable_host():
    async with MediaFetcher(PUBLIC_ONLY, resolver=StaticResolver({})) as f:  # no DNS in tests
        with pytest.raises(MediaFetchError, match="could not resolve the host"):
            await f.fetch("http://no-such-host.invalid/a.wav")


async def test_read_timeout(media_server):
    limits = FetchLimits(allow_private_networks=True, read_timeout_s=0.2)
    async with MediaFetcher(limits) as f:
        with pytest.raises(MediaFetchTimeout, match="0.2 s") as info:
            await f.fetch(media_server.url("/slow?seconds=2"))
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED


async def test_total_timeout(media_server):
    limits = FetchLimits(allow_private_networks=True, read_timeout_s=5, total_timeout_s=0.3)
    async with MediaFetcher(limits) as f:
        with pytest.raises(MediaFetchTimeout, match="longer than the limit of 0.3 s"):
            await f.fetch(media_server.url("/slow?seconds=2"))


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.wav",
        "gopher://example.com/",
        "FILE:///etc/passwd",
        "/etc/passwd",
    ],
)
async def test_forbidden_scheme(fetcher, url):
    with pytest.raises(ForbiddenSource, match="http://, https:// or data:") as info:
        await fetcher.fetch(url)
    assert info.value.code == ErrorCode.PERMISSION_DENIED


async def test_loopback_refused_without_private_networks(public_fetcher, media_server):
    url = media_server.serve("/fetch/private.bin", b"secret")
    before = len(media_server.requests)
    with pytest.raises(ForbiddenSource, match="a loopback address"):
        await public_fetcher.fetch(url)
    with pytest.raises(ForbiddenSource, match="inside the local network"):
        await public_fetcher.fetch(f"http://localhost:{media_server.port}/fetch/private.bin")
    assert len(media_server.requests) == before  # refused before connecting


async def test_loopback_allowed_with_private_networks(fetcher, media_server):
    url = media_server.serve("/fetch/private-ok.bin", b"fine")
    assert await fetcher.fetch(url) == b"fine"


def fake_public_web(request: httpx.Request) -> httpx.Response:
    """A fake internet: /to-private redirects to a private address, anything else answers b"public"."""
    if request.url.path == "/to-private":
        return httpx.Response(302, headers={"Location": "http://10.1.2.3/internal"})
    return httpx.Response(200, content=b"public")


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.1",  # multicast
        "240.0.0.1",  # reserved
        "[::1]",
        "[::]",
        "[fe80::1]",
        "[fc00::1]",
        "[ff02::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[::ffff:a00:1]",  # IPv4-mapped 10.0.0.1
        "[2002:7f00:1::1]",  # 6to4 around 127.0.0.1
    ],
)
async def test_non_public_addresses_refused(host):
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(fake_public_web)) as f:
        with pytest.raises(ForbiddenSource):
            await f.fetch(f"http://{host}/a.png")


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "[2606:4700:4700::1111]"])
async def test_public_addresses_allowed(host):
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(fake_public_web)) as f:
        assert await f.fetch(f"http://{host}/a.png") == b"public"


async def test_redirect_hop_to_private_address_refused():
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(fake_public_web)) as f:
        with pytest.raises(ForbiddenSource, match=r"http://10\.1\.2\.3"):
            await f.fetch("http://93.184.215.14/to-private")


# --------------------------------------------------------------------------------------- local files


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "a.wav").write_bytes(b"inside")
    (root / "sub" / "b.png").write_bytes(b"nested")
    (root / "big.bin").write_bytes(b"\x00" * 2000)
    (tmp_path / "outside.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.txt", root / "escape.txt")
    os.symlink(root / "a.wav", root / "alias.wav")
    return root


async def test_read_local_inside_root(media_root):
    async with MediaFetcher(FetchLimits(local_files_root=str(media_root))) as fetcher:
        assert fetcher.read_local("a.wav") == b"inside"
        assert fetcher.read_local("sub/b.png") == b"nested"
        assert fetcher.read_local(str(media_root / "sub" / "b.png")) == b"nested"
        assert fetcher.read_local("alias.wav") == b"inside"  # a symlink that stays inside is fine


@pytest.mark.parametrize("path", ["../outside.txt", "sub/../../outside.txt", "escape.txt", "/etc/passwd"])
async def test_read_local_outside_root_refused(media_root, path):
    async with MediaFetcher(FetchLimits(local_files_root=str(media_root))) as fetcher:
        with pytest.raises(ForbiddenSource, match="must be inside"):
            fetcher.read_local(path)


async def test_read_local_errors(media_root):
    async with MediaFetcher(FetchLimits(local_files_root=str(media_root), max_bytes=1000)) as fetcher:
        with pytest.raises(MediaFetchError, match="no such file"):
            fetcher.read_local("missing.wav")
        with pytest.raises(MediaFetchError, match="not a regular file"):
            fetcher.read_local("sub")
        with pytest.raises(LimitExceeded, match="2000 bytes; the limit is 1000 bytes"):
            fetcher.read_local("big.bin")
        with pytest.raises(MediaFetchError, match="not a valid local path"):
            fetcher.read_local("a\x00.wav")


async def test_read_local_disabled_without_root():
    async with MediaFetcher(FetchLimits()) as fetcher:
        with pytest.raises(ForbiddenSource, match="not enabled"):
            fetcher.read_local("/etc/passwd")


# ------------------------------------------------------------------- pinning: connect to what was checked


class FakeRecordingInternet:
    """A fake internet for MockTransport that records what the client asked for."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/to-named-private":
            return httpx.Response(302, headers={"Location": "http://intranet.example/x"})
        if request.url.path == "/relative":
            return httpx.Response(302, headers={"Location": "/landed"})
        return httpx.Response(200, content=b"public")


async def test_connection_goes_to_the_checked_address_with_the_original_host_header():
    recorder = FakeRecordingInternet()
    resolver = StaticResolver({"media.example": "93.184.215.14"})
    transport = httpx.MockTransport(recorder)
    async with MediaFetcher(PUBLIC_ONLY, transport=transport, resolver=resolver) as f:
        assert await f.fetch("https://media.example:8443/a.png?sig=1") == b"public"
    (request,) = recorder.requests
    assert request.url.host == "93.184.215.14" and request.url.port == 8443
    assert request.url.path == "/a.png" and request.url.query == b"sig=1"
    assert request.headers["host"] == "media.example:8443"
    assert request.extensions["sni_hostname"] == "media.example"  # TLS name and certificate check


class FakeRebindingResolver:
    """A fake DNS server that answers public first and private afterwards (a DNS rebinding attack)."""

    def __init__(self) -> None:
        self.answers = [["93.184.215.14"], ["127.0.0.1"]]
        self.calls = 0

    async def resolve(self, host: str, port: int):
        import ipaddress

        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [ipaddress.ip_address(a) for a in answer]


async def test_dns_rebinding_cannot_redirect_the_connection():
    recorder = FakeRecordingInternet()
    resolver = FakeRebindingResolver()
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(recorder), resolver=resolver) as f:
        assert await f.fetch("http://rebind.example/a.png") == b"public"
        assert resolver.calls == 1  # resolved once; httpx never resolved the name again
        assert recorder.requests[0].url.host == "93.184.215.14"
        # The next lookup (a new request) gets the private answer and is refused before connecting.
        with pytest.raises(ForbiddenSource, match="loopback"):
            await f.fetch("http://rebind.example/a.png")
    assert len(recorder.requests) == 1


async def test_redirect_to_a_name_resolving_privately_is_refused_before_connecting():
    recorder = FakeRecordingInternet()
    resolver = StaticResolver({"media.example": "93.184.215.14", "intranet.example": "10.9.8.7"})
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(recorder), resolver=resolver) as f:
        with pytest.raises(ForbiddenSource, match=r"intranet\.example resolves to 10\.9\.8\.7"):
            await f.fetch("http://media.example/to-named-private")
    assert [r.url.host for r in recorder.requests] == ["93.184.215.14"]


async def test_relative_redirect_resolves_against_the_name_not_the_address():
    recorder = FakeRecordingInternet()
    resolver = StaticResolver({"media.example": "93.184.215.14"})
    async with MediaFetcher(PUBLIC_ONLY, transport=httpx.MockTransport(recorder), resolver=resolver) as f:
        assert await f.fetch("http://media.example/relative") == b"public"
    assert [r.headers["host"] for r in recorder.requests] == ["media.example", "media.example"]
    assert recorder.requests[1].url.path == "/landed"


async def test_real_connection_is_pinned(hostile_server):
    """Over real sockets: a name resolved by the test resolver reaches the server at that address."""
    url = hostile_server.serve("pinned.bin", b"pinned")
    resolver = StaticResolver({"media.test": "127.0.0.1"})
    async with MediaFetcher(LOCAL, resolver=resolver) as f:
        data = await f.fetch(url.replace("127.0.0.1", "media.test"))
    assert data == b"pinned"
    assert hostile_server.hits("/files/pinned.bin")[-1]["host"] == f"media.test:{hostile_server.port}"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 whose certificate names media.test (a throwaway CA signs it)."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=omnigate test CA")  # fmt: skip
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=media.test",
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:media.test\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "srv.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = f"hello {self.headers['Host']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "srv.pem", d / "srv.key")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(d / "ca.pem"))
    yield httpd.server_address[1], client_context
    httpd.shutdown()
    httpd.server_close()


async def test_https_is_pinned_and_verified_against_the_name(tls_server):
    port, client_context = tls_server
    resolver = StaticResolver({"media.test": "127.0.0.1", "other.test": "127.0.0.1"})
    async with MediaFetcher(LOCAL, resolver=resolver, verify=client_context) as f:
        # Connected to 127.0.0.1, TLS server name and certificate check against media.test.
        assert await f.fetch(f"https://media.test:{port}/a") == f"hello media.test:{port}".encode()
        # Same address, a name the certificate does not cover: refused by the certificate check.
        with pytest.raises(MediaFetchError, match="certificate"):
            await f.fetch(f"https://other.test:{port}/a")


# ----------------------------------------------------------------------------------- bodies and caching


async def test_compressed_body_refused_not_inflated(hostile_server):
    async with MediaFetcher(LOCAL) as f:
        with pytest.raises(MediaFetchError, match="gzip-encoded body"):
            await f.fetch(hostile_server.url("/gzip"))


async def test_request_budget_stops_streaming(hostile_server):
    url = hostile_server.serve("budget.bin", b"\x03" * 6000)
    budget = RequestBudget(10_000)
    async with MediaFetcher(LOCAL) as f:
        assert len(await f.fetch(url, budget=budget)) == 6000
        with pytest.raises(LimitExceeded, match="per-request limit"):
            await f.fetch(url, budget=budget)


async def test_per_call_cap_is_lower_than_the_limits(hostile_server):
    url = hostile_server.serve("cap.bin", b"\x04" * 3000)
    async with MediaFetcher(LOCAL) as f:
        with pytest.raises(LimitExceeded, match="the limit is 2000 bytes"):
            await f.fetch(url, max_bytes=2000)
        assert len(await f.fetch(url, max_bytes=10**9)) == 3000  # never above the fetcher's own cap


async def test_validators_and_not_modified(hostile_server):
    data = b"cacheable"
    headers = {
        "ETag": '"v1"',
        "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
        "Cache-Control": "max-age=60",
    }
    url = hostile_server.serve("cacheable.bin", data, headers)
    async with MediaFetcher(LOCAL) as f:
        first = await f.fetch_media(url)
        assert first.data == data and first.max_age_s == 60 and not first.no_store
        assert first.validators == Validators('"v1"', "Wed, 21 Oct 2015 07:28:00 GMT")
        again = await f.fetch_media(url, validators=first.validators)
        assert again.not_modified and again.data is None
    assert hostile_server.hits("/files/cacheable.bin")[-1]["if-none-match"] == '"v1"'


@pytest.mark.parametrize(
    ("header", "max_age", "no_store"),
    [
        ("max-age=30", 30.0, False),
        ("no-store", None, True),
        ("no-cache, max-age=30", 0.0, False),
        ("", None, False),
    ],
)
async def test_cache_control(hostile_server, header, max_age, no_store):
    name = "cc-" + "".join(c for c in header if c.isalnum())
    url = hostile_server.serve(name, b"x", {"Cache-Control": header} if header else {})
    async with MediaFetcher(LOCAL) as f:
        fetched = await f.fetch_media(url)
    assert (fetched.max_age_s, fetched.no_store) == (max_age, no_store)
