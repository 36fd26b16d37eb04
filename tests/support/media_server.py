"""A local HTTP media server on 127.0.0.1 (OS-chosen port) for tests: real sockets, real HTTP."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class MediaServer:
    """Serves ``files`` ({path: bytes}) over HTTP on 127.0.0.1, plus a few routes that misbehave.

    Routes besides the files:
      /redirect?to=PATH      302 to PATH
      /chain/N               302 to /chain/N-1, ... /chain/0 serves b"end of chain"
      /chunked/PATH          serves a file with chunked encoding (no Content-Length)
      /endless               streams zero bytes forever, chunked, until the client hangs up
      /slow?seconds=S        sends headers, then waits S seconds before the body
      anything else          404
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="media-server", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, data: bytes) -> str:
        """Adds a file and returns its URL."""
        self.files[path] = data
        return self.url(path)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _make_handler(server: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            server.requests.append(self.path)
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            path = parts.path
            if path in server.files:
                self._send(200, server.files[path])
            elif path == "/redirect":
                self._redirect(query["to"][0])
            elif path.startswith("/chain/"):
                remaining = int(path.removeprefix("/chain/"))
                if remaining == 0:
                    self._send(200, b"end of chain")
                else:
                    self._redirect(f"/chain/{remaining - 1}")
            elif path.startswith("/chunked/") and path.removeprefix("/chunked") in server.files:
                self._send_chunked(server.files[path.removeprefix("/chunked")])
            elif path == "/endless":
                self._send_endless()
            elif path == "/slow":
                self._send_slow(float(query.get("seconds", ["2"])[0]))
            else:
                self._send(404, b"not found")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _start_chunked(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def _send_chunked(self, body: bytes) -> None:
            self._start_chunked()
            for start in range(0, len(body), 1024):
                self._chunk(body[start : start + 1024])
            self.wfile.write(b"0\r\n\r\n")

        def _send_endless(self) -> None:
            self._start_chunked()
            try:
                while True:
                    self._chunk(b"\x00" * 65536)
            except OSError:  # the client hung up, as it should
                self.close_connection = True

        def _send_slow(self, seconds: float) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.flush()
            time.sleep(seconds)
            try:
                self.wfile.write(b"late")
            except OSError:
                self.close_connection = True

    return Handler
