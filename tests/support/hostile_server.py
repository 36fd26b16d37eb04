"""A misbehaving HTTP server on a loopback address (OS-chosen port) for ingestion tests.

Real sockets, real HTTP/1.1; every route stops by itself (bounded sleeps) or when the client hangs up.

Routes:
  /files/NAME               a file added with ``serve`` (ETag, Last-Modified and Cache-Control as given;
                            answers conditional requests with 304)
  /typed/NAME?type=T        a file served with Content-Type T (which the gateway must ignore)
  /redirect?to=URL          302 to URL (absolute or relative)
  /chain/N                  302 to /chain/N-1 ... /chain/0 serves b"end of chain"
  /loop                     302 to itself
  /status/NNN               an empty answer with that status
  /drip?interval=S          Content-Length 10 MB, then one byte every S seconds (slow drip)
  /stall                    headers (Content-Length 1000), then no body
  /silent                   accepts the connection and never answers
  /endless                  chunked zeros forever
  /lie?declared=N&sent=M    Content-Length N, M bytes, then the connection closes
  /huge-length              Content-Length of 10 TB, a few bytes
  /gzip                     a gzip bomb (64 MB of zeros, ~64 KB compressed) with Content-Encoding: gzip
  /reset                    half a body, then a TCP reset
Every request is recorded in ``requests`` (path, headers); ``hangups[path]`` holds when a streaming route
saw its client go away.
"""

from __future__ import annotations

import gzip
import hashlib
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_HANDLER_S = 60.0  # no route keeps a connection longer than this


class HostileServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.files: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hangups: dict[str, float] = {}
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hostile-server", daemon=True)
        self._bomb: bytes | None = None

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def serve(self, name: str, data: bytes, headers: dict[str, str] | None = None) -> str:
        """Adds /files/NAME and returns its URL."""
        self.files[name] = (data, dict(headers or {}))
        return self.url(f"/files/{name}")

    def hits(self, path: str) -> list[dict[str, str]]:
        """Headers of every request made for ``path`` (without the query)."""
        return [h for p, h in self.requests if urlsplit(p).path == path]

    def gzip_bomb(self) -> bytes:
        if self._bomb is None:
            self._bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=9)
        return self._bomb

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def etag_of(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def _make_handler(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            path = parts.path
            try:
                if path.startswith("/files/") and path.removeprefix("/files/") in server.files:
                    self._file(*server.files[path.removeprefix("/files/")])
                elif path.startswith("/typed/") and path.removeprefix("/typed/") in server.files:
                    data, _ = server.files[path.removeprefix("/typed/")]
                    self._send(200, data, {"Content-Type": query.get("type", "image/png")})
                elif path == "/redirect":
                    self._redirect(query["to"])
                elif path.startswith("/chain/"):
                    remaining = int(path.removeprefix("/chain/"))
                    if remaining <= 0:
                        self._send(200, b"end of chain")
                    else:
                        self._redirect(f"/chain/{remaining - 1}")
                elif path == "/loop":
                    self._redirect("/loop")
                elif path.startswith("/status/"):
                    self._send(int(path.removeprefix("/status/")), b"")
                elif path == "/drip":
                    self._drip(path, float(query.get("interval", "0.5")))
                elif path == "/stall":
                    self._stall(path)
                elif path == "/silent":
                    self._wait_for_hangup(path, MAX_HANDLER_S)
                elif path == "/endless":
                    self._endless(path)
                elif path == "/lie":
                    self._lie(int(query.get("declared", "100000")), int(query.get("sent", "10")))
                elif path == "/huge-length":
                    self._headers(200, {"Content-Length": str(10 * 1024**4)})
                    self.wfile.write(b"RIFF")
                    self.close_connection = True
                elif path == "/gzip":
                    self._send(200, server.gzip_bomb(), {"Content-Encoding": "gzip"})
                elif path == "/reset":
                    self._reset()
                else:
                    self._send(404, b"not found")
            except OSError:  # the client hung up mid-answer
                self.close_connection = True

        def _headers(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self._headers(
                status,
                {
                    "Content-Type": "application/octet-stream",
                    **(headers or {}),
                    "Content-Length": str(len(body)),
                },
            )
            self.wfile.write(body)

        def _file(self, data: bytes, headers: dict[str, str]) -> None:
            etag = headers.get("ETag")
            modified = headers.get("Last-Modified")
            if (etag and self.headers.get("If-None-Match") == etag) or (
                modified and not etag and self.headers.get("If-Modified-Since") == modified
            ):
                self._headers(304, {**headers, "Content-Length": "0"})
                return
            self._send(200, data, headers)

        def _redirect(self, location: str) -> None:
            self._headers(302, {"Location": location, "Content-Length": "0"})

        def _drip(self, path: str, interval: float) -> None:
            self._headers(200, {"Content-Length": str(10 * 1024 * 1024)})
            deadline = time.monotonic() + MAX_HANDLER_S
            try:
                while time.monotonic() < deadline:
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    if self._hung_up(interval):
                        break
            except OSError:
                pass
            server.hangups[path] = time.monotonic()
            self.close_connection = True

        def _stall(self, path: str) -> None:
            self._headers(200, {"Content-Length": "1000"})
            self._wait_for_hangup(path, MAX_HANDLER_S)

        def _wait_for_hangup(self, path: str, limit_s: float) -> None:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline:
                if self._hung_up(0.05):
                    break
            server.hangups[path] = time.monotonic()
            self.close_connection = True

        def _hung_up(self, wait_s: float) -> bool:
            """Waits up to ``wait_s``; True once the client has closed its end."""
            readable, _, _ = select.select([self.connection], [], [], wait_s)
            if not readable:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _endless(self, path: str) -> None:
            self._headers(200, {"Transfer-Encoding": "chunked"})
            block = b"\x00" * 65536
            deadline = time.monotonic() + MAX_HANDLER_S
            try:
                while time.monotonic() < deadline:
                    self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            except OSError:
                pass
            server.hangups[path] = time.monotonic()
            self.close_connection = True

        def _lie(self, declared: int, sent: int) -> None:
            self._headers(200, {"Content-Length": str(declared)})
            self.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * max(0, sent - 8))
            self.wfile.flush()
            self.close_connection = True

        def _reset(self) -> None:
            self._headers(200, {"Content-Length": "100000"})
            self.wfile.write(b"\x00" * 50000)
            self.wfile.flush()
            # SO_LINGER with a zero timeout turns close() into a TCP reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    return Handler
