"""Local stand-ins for the vendor's script origin and queue relay (tests and ``edgeproxy demo``),
and for the edge's :80 listener where renewal runs without a whole edge (tests, bench).

Owns: tiny threaded HTTP servers on 127.0.0.1.
They are real servers speaking real HTTP, so the edge's client pool, timeouts
and header handling are exercised exactly as in production.
Must not import: anything of ours.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

__all__ = ["Http01Responder", "RecordedRequest", "RecordingRelay", "ScriptOrigin", "DEMO_SCRIPT", "PIXEL_GIF"]

# A 1x1 transparent GIF (42 bytes), what a vendor's pixel endpoint answers image beacons with.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

# What a vendor tracker looks like to the edge: it names the vendor's relay.
DEMO_SCRIPT = """/* vendor tracker v1 */
(function () {
  var endpoint = "https://relay.vendor.invalid/collect";
  var body = JSON.stringify({ type: "pageview", url: location.href, ts: Date.now() });
  navigator.sendBeacon ? navigator.sendBeacon(endpoint, body)
                       : fetch(endpoint, { method: "POST", body: body, keepalive: true });
})();
"""


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; the last value wins
    header_list: list[tuple[str, str]]
    body: bytes


class _Backlogged(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of new connections (a replay
    # window, a load test) would see dropped SYNs and 1 s connect retries.
    request_queue_size = 256


class _Server:
    """A ThreadingHTTPServer on a free loopback port, run in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> None:
        self._httpd = _Backlogged(("127.0.0.1", 0), handler)
        if tls is not None:
            # The handshake happens on the handler thread's first read, not in the accept loop.
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self._scheme = "http" if tls is None else "https"
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=type(self).__name__, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def start(self) -> "_Server":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real origin

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class ScriptOrigin(_Server):
    """Serves ``script`` at ``/latest.js``; ``fail = True`` makes it answer 503."""

    def __init__(self, script: str = DEMO_SCRIPT) -> None:
        self.script = script
        self.fail = False
        self.fetches = 0
        super().__init__(_ScriptHandler)

    @property
    def script_url(self) -> str:
        return f"{self.url}/latest.js"


class _ScriptHandler(_QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        origin: ScriptOrigin = self.server.owner  # type: ignore[attr-defined]
        origin.fetches += 1
        if origin.fail or self.path.split("?")[0] != "/latest.js":
            self._reply(503 if origin.fail else 404, b"unavailable\n", "text/plain")
            return
        self._reply(200, origin.script.encode(), "application/javascript")

    do_HEAD = do_GET


class RecordingRelay(_Server):
    """Records every request; answers ``status`` with a small JSON body.

    ``on_request`` (optional) is called with each recorded request, e.g. to print it.
    ``down = True`` makes it read each request and close the connection without an
    answer (what a crashed relay behind a load balancer looks like); nothing is recorded.
    ``tls`` (a server context) makes it speak HTTPS.

    What the answer looks like can be changed between requests: ``body`` replaces the
    JSON body, ``headers`` are added to it (``Content-Type`` among them replaces the
    default), ``content_encoding`` ("gzip" or "gzip, gzip") compresses the body that
    many times and labels it, ``delay`` waits before answering, and ``stall_after``
    bytes into the body the relay pauses ``stall`` seconds before sending the rest.
    ``pixel = True`` answers a GET whose path ends in ``.gif`` with 200 and
    :data:`PIXEL_GIF` (``image/gif``), as a vendor's pixel endpoint does: a browser's
    image beacon only "loads" when the answer is an image.
    """

    def __init__(self, status: int = 202, on_request: Callable[[RecordedRequest], None] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.down = False
        self.on_request = on_request
        self.body: bytes | None = None
        self.headers: list[tuple[str, str]] = []
        self.content_encoding = ""
        self.delay = 0.0
        self.stall_after: int | None = None
        self.stall = 0.0
        self.pixel = False
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        super().__init__(_RelayHandler, tls)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)

    def snapshot(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)


class _RelayHandler(_QuietHandler):
    def _handle(self) -> None:
        relay: RecordingRelay = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if relay.down:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        pairs = [(k.lower(), v) for k, v in self.headers.items()]
        relay.record(RecordedRequest(self.command, self.path, dict(pairs), pairs, body))
        if relay.delay:
            time.sleep(relay.delay)
        if relay.pixel and self.command == "GET" and self.path.split("?")[0].endswith(".gif"):
            self._reply(200, PIXEL_GIF, "image/gif")
            return
        answer = relay.body if relay.body is not None else json.dumps({"ok": relay.status < 400}).encode()
        extra = list(relay.headers)
        if relay.content_encoding:
            for coding in relay.content_encoding.split(","):
                assert coding.strip() == "gzip", "the test relay only speaks gzip"
                answer = gzip.compress(answer)
            extra.append(("Content-Encoding", relay.content_encoding))
        self.send_response(relay.status)
        if not any(name.lower() == "content-type" for name, _ in extra):
            self.send_header("Content-Type", "application/json")
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if relay.stall_after is not None:
            self.wfile.write(answer[:relay.stall_after])
            self.wfile.flush()
            time.sleep(relay.stall)
            answer = answer[relay.stall_after:]
        self.wfile.write(answer)

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle


class _Challenge(Protocol):
    hostname: str
    key_authorization: str


class Http01Responder:
    """Answers the CA's ``/.well-known/acme-challenge/<token>`` fetch (RFC 8555
    section 8.3) from a store, as the edge's :80 listener does: by token, and only
    when the Host is the name the token was published for. Hosts in ``refuse``
    get 404, which the CA sees as a real failed validation.

    Serves on 127.0.0.1:``port`` until ``close()``; ``lookup`` (a store's
    ``get_challenge``) may be given later, before the first order."""

    def __init__(self, lookup: Callable[[str], _Challenge | None] | None = None) -> None:
        self.lookup = lookup
        self.refuse: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                token = self.path.rsplit("/", 1)[-1]
                assert outer.lookup is not None, "Http01Responder.lookup was never set"
                challenge = outer.lookup(token)
                host = (self.headers.get("Host") or "").split(":")[0]
                if challenge is None or challenge.hostname != host or host in outer.refuse:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = challenge.key_authorization.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256  # a renewal burst validates hundreds of names at once
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
