"""The lean HTTP/1.1 path: simple requests on the public TLS listener, without hypercorn.

Owns: one asyncio ``Protocol`` per TLS connection that frames and parses plain
HTTP/1.1 requests itself (llhttp through ``httptools``, a C parser: the parser
under uvicorn), runs the same ASGI app as hypercorn would (the route table, the
Host/SNI gate, the header policy, the spool: all in the app, all unchanged) and
writes the response itself; and the hand-off of the connection to hypercorn
(``server.py``'s connection callback) the moment anything is not simple.

Why: hypercorn + h11 + asyncio streams were ~45 % of the edge's CPU per
forwarded event and the script GET (py-spy, bench/README.md, "Against Caddy"): a
Task, a queue, events and a stream per request. This path is a dict of
callbacks and one ``transport.write`` per response.

What is simple (everything else goes to hypercorn, from the first byte of the
request that is not, for the rest of the connection): ALPN not ``h2``; a
request head of at most ``MAX_HEAD`` bytes with CRLF line ends only; HTTP/1.1;
GET, HEAD, POST or OPTIONS; an origin-form target (starts with ``/``); exactly
one Host; no Transfer-Encoding, Upgrade, Expect or HTTP2-Settings; at most one
Content-Length of at most ``MAX_BODY`` bytes; Connection absent, ``keep-alive``
or ``close``; and llhttp accepting it (strict mode: no lenient flags). So every
malformed, ambiguous or hostile request (smuggling shapes, header floods, huge
or chunked bodies, absolute-form targets, h2c upgrades) is answered by exactly
the code that answered it before, and tests/test_hostile_input.py and
tests/test_http_hygiene.py run against both paths.

Timeouts as hypercorn's (``edge_config``): an idle keep-alive connection closes
after ``keep_alive_timeout``; a connection that sends nothing for
``read_timeout`` while a request is incomplete is aborted; both from one
lazily re-armed timer per connection. A drain (``FastConnections.drain``)
closes idle connections, lets the request in flight finish with
``Connection: close``, and gives a connection that has not sent its first
request ``first_request_grace`` seconds, as ``hypercorn_adapter`` does.

The app's task is never cancelled when the client goes away: a forwarded
event is spooled or delivered whatever the client does (zero loss); the app
sees ``http.disconnect`` from ``receive()``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools

__all__ = ["FastConnections", "FastHTTP1", "MAX_BODY", "MAX_HEAD"]

log = logging.getLogger("edgeproxy.h1fast")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
Handoff = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# A request head larger than this, or a body larger than MAX_BODY, is not simple:
# hypercorn takes the connection and applies its own limits (431, 413 ...).
# Browsers' heads are ~0.5-2 KB; events are ~0.2-4 KB.
MAX_HEAD = 8 * 1024
MAX_BODY = 64 * 1024
MAX_HEADERS = 64
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"OPTIONS"})
_NOT_SIMPLE = frozenset({b"transfer-encoding", b"upgrade", b"expect", b"http2-settings"})
_CONNECTION_OK = frozenset({b"keep-alive", b"close"})
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# RFC 9110 section 6.4.1: no content in these responses, whatever the app sends.
_NO_BODY = frozenset({204, 304})


class _NotSimple(Exception):
    """This request is for hypercorn."""


@dataclass
class FastConnections:
    """The listener's shared settings and its open fast connections (for the drain).

    ``app`` is the listener's ASGI app; ``handoff`` the stream callback hypercorn
    runs a connection with; ``response_headers`` hypercorn's own ``date`` and
    ``server`` headers (``edge_config().response_headers``); ``tasks`` the
    listener's set of running connection tasks, which a drain waits for: each
    app task is in it while it runs."""

    app: ASGIApp
    handoff: Handoff
    response_headers: Callable[[], list[tuple[bytes, bytes]]]
    tasks: set[asyncio.Task[None]]
    keep_alive_timeout: float = 30.0
    read_timeout: float = 60.0
    first_request_grace: float = 2.0
    draining: bool = False
    open: set[FastHTTP1] = field(default_factory=set)

    def protocol(self) -> FastHTTP1:
        """A protocol factory for ``loop.create_server``."""
        return FastHTTP1(self)

    def drain(self) -> None:
        """Stop keep-alive: idle connections close now (or after the first-request
        grace), busy ones after their current response."""
        self.draining = True
        for conn in list(self.open):
            conn.drain()


class _Request:
    """httptools callbacks for one request head (a fresh parser per request)."""

    __slots__ = ("url", "headers", "complete", "body", "close")

    def __init__(self) -> None:
        self.close = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class FastHTTP1(asyncio.Protocol):
    """One public TLS connection: simple HTTP/1.1 requests here, the rest to hypercorn."""

    def __init__(self, shared: FastConnections) -> None:
        self.shared = shared
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a request's app task is running
        self.closing = False  # close after the current response
        self.gone = False  # the transport is closed (by either side)
        self.received = False  # any request bytes yet
        self.eof = False
        self.handed_off = False
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.sni: str | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.disconnected: asyncio.Future[None] | None = None
        self.writable: asyncio.Event | None = None  # set while the transport accepts writes

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._handoff()
            return
        self.sni = getattr(ssl_object, "edgeproxy_sni", None)
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        self.shared.open.add(self)
        self.last_data = self.loop.time()
        self.timer = self.loop.call_later(min(self.shared.keep_alive_timeout, self.shared.read_timeout),
                                          self._check_timeout)
        if self.shared.draining:
            self.drain()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.received = True
        self.last_data = self.loop.time()
        if self.busy:
            if len(self.buf) > MAX_HEAD + MAX_BODY and self.transport is not None:
                self.transport.pause_reading()  # a pipelining client waits for our answers
            return
        self._next()

    def eof_received(self) -> bool | None:
        # Over TLS the transport closes after the peer's close_notify whatever we
        # return (asyncio's sslproto); a response in flight is then lost, as on hypercorn.
        self.eof = True
        if not self.busy:
            self._close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            # As server.py logs a connection hypercorn ran: TLS errors after the
            # handshake (a renegotiation probe, an alert) at INFO, resets at DEBUG.
            where = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.log(logging.INFO if isinstance(exc, ssl.SSLError) else logging.DEBUG,
                    "https connection from %s ended: %s", where,
                    getattr(exc, "reason", None) or exc.__class__.__name__)
        self.gone = True
        self.shared.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_result(None)
        if self.writable is not None:
            self.writable.set()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()

    # -- requests -----------------------------------------------------------------------
    def _next(self) -> None:
        """Start the next complete request in ``buf``, wait for more, or hand off."""
        if self.closing or self.gone:
            return
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._handoff()
            return
        head = buf[:end + 4]
        try:
            request, parser, length = self._parse_head(head)
        except _NotSimple:
            self._handoff()
            return
        if len(buf) < end + 4 + length:
            return  # the body is on its way
        if length:
            try:
                parser.feed_data(buf[end + 4:end + 4 + length])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self._handoff()
                return
        if not request.complete:
            self._handoff()
            return
        self.buf = buf[end + 4 + length:]
        method = parser.get_method().decode("ascii")
        if request.close:  # HTTP/1.1: keep-alive unless the client says close
            self.closing = True
        self.busy = True
        task = self.loop.create_task(self._run(method, request))
        tasks = self.shared.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _parse_head(self, head: bytes) -> tuple[_Request, httptools.HttpRequestParser, int]:
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
            raise _NotSimple  # bare CR or LF: let h11 decide what that is
        request = _Request()
        parser = httptools.HttpRequestParser(request)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise _NotSimple from exc  # (HttpParserUpgrade is not an HttpParserError)
        if parser.get_http_version() != "1.1" or parser.get_method() not in _METHODS:
            raise _NotSimple
        if not request.url.startswith(b"/") or not request.url.isascii():
            raise _NotSimple  # absolute-form, authority-form, asterisk-form; h11 judges raw bytes
        hosts = 0
        length = -1
        if len(request.headers) > MAX_HEADERS:
            raise _NotSimple
        for name, value in request.headers:
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                if length >= 0 or not value.isdigit():
                    raise _NotSimple
                length = int(value)
            elif name in _NOT_SIMPLE:
                raise _NotSimple
            elif name == b"connection":
                token = value.lower()
                if token not in _CONNECTION_OK:
                    raise _NotSimple
                # (llhttp's should_keep_alive() is reset once the message completes.)
                request.close = request.close or token == b"close"
        if hosts != 1 or length > MAX_BODY:
            raise _NotSimple
        return request, parser, max(length, 0)

    async def _run(self, method: str, request: _Request) -> None:
        raw_path, _, query = request.url.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.server,
            "extensions": {"tls": {"server_name": self.sni}},
        }
        response = _Response(self, method == "HEAD")
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            if self.disconnected is None:
                self.disconnected = self.loop.create_future()
                if self.gone:
                    self.disconnected.set_result(None)
            await self.disconnected
            return {"type": "http.disconnect"}

        try:
            await self.shared.app(scope, receive, response.send)
        except Exception:
            log.exception("error in the app on the HTTP/1.1 fast path")
            if not response.started:
                await response.error(500)
            else:
                self.closing = True  # the response is cut short: the client must see it end
        else:
            if not response.started:
                await response.error(500)  # the app returned without answering (hypercorn: 500)
            elif not response.finished:
                self.closing = True
        finally:
            self.disconnected = None
            self._done()

    def _done(self) -> None:
        self.busy = False
        if self.gone:
            return
        if self.closing or self.eof:
            self._close()
            return
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()
        self.last_data = self.loop.time()
        self._next()

    # -- connection state ---------------------------------------------------------------
    def drain(self) -> None:
        if self.busy:
            self.closing = True
        elif self.buf or not self.received:
            # A request under way, or none yet: hypercorn's drain grace (hypercorn_adapter).
            self.loop.call_later(self.shared.first_request_grace, self._close_if_idle)
        else:
            self._close()

    def _close_if_idle(self) -> None:
        if self.busy:
            self.closing = True
        else:
            self._close()

    def _check_timeout(self) -> None:
        """Fires at least every min(keep_alive_timeout, read_timeout): a connection
        that goes from idle to half a request is then held to the read timeout."""
        if self.gone:
            return
        shared = self.shared
        period = min(shared.keep_alive_timeout, shared.read_timeout)
        waited = self.loop.time() - self.last_data
        if self.busy:
            limit, waited = period, 0.0  # the app's own timeouts bound a request
        elif self.buf:
            limit = shared.read_timeout  # a request under way: slowloris
        else:
            limit = shared.keep_alive_timeout
        if waited >= limit:
            if self.buf and self.transport is not None:
                self.transport.abort()
            else:
                self._close()
            return
        self.timer = self.loop.call_later(min(limit - waited, period), self._check_timeout)

    def _close(self) -> None:
        if not self.gone and self.transport is not None:
            self.gone = True
            self.transport.close()

    def _handoff(self) -> None:
        """hypercorn takes the connection from here on, starting with ``buf``."""
        transport = self.transport
        assert transport is not None
        self.handed_off = True
        self.shared.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        reader = asyncio.StreamReader(loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, self.shared.handoff, loop=self.loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buf:
            protocol.data_received(self.buf)
            self.buf = b""
        if self.eof:
            protocol.eof_received()
        if not transport.is_reading():
            transport.resume_reading()


class _Response:
    """Serializes one ASGI response (h11's framing: Content-Length as given, else chunked)."""

    __slots__ = ("conn", "head_only", "started", "finished", "chunked", "suppress", "pending")

    def __init__(self, conn: FastHTTP1, head_only: bool) -> None:
        self.conn = conn
        self.head_only = head_only
        self.started = False
        self.finished = False
        self.chunked = False
        self.suppress = head_only
        self.pending = b""  # the head, sent with the first body bytes (one TLS record)

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start" and not self.started:
            self.started = True
            status = int(message["status"])
            conn = self.conn
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            has_length = False
            for name, value in message.get("headers", ()):
                name = bytes(name).lower()
                if name == b"content-length":
                    has_length = True
                elif name == b"connection":
                    continue  # ours to say (hop-by-hop)
                lines.append(b"%s: %s\r\n" % (name, bytes(value)))
            for name, value in conn.shared.response_headers():
                lines.append(b"%s: %s\r\n" % (name, value))
            if status in _NO_BODY or status < 200:
                self.suppress = True
            elif not has_length and not self.head_only:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            if conn.closing or conn.shared.draining:
                conn.closing = True
                lines.append(b"connection: close\r\n")
            lines.append(b"\r\n")
            self.pending = b"".join(lines)
        elif kind == "http.response.body" and self.started and not self.finished:
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            out = self.pending
            self.pending = b""
            if body and not self.suppress:
                out += b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body
            if not more:
                self.finished = True
                if self.chunked:
                    out += b"0\r\n\r\n"
            if out:
                await self._write(out)

    async def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn.gone or conn.transport is None:
            return
        conn.transport.write(data)
        if conn.writable is not None and not conn.writable.is_set():
            await conn.writable.wait()

    async def error(self, status: int) -> None:
        self.conn.closing = True
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-length", b"0")]})
        await self.send({"type": "http.response.body", "body": b""})


def _address(value: Any) -> tuple[str, int] | None:
    """hypercorn's ``parse_socket_addr`` for TCP: (host, port)."""
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None
