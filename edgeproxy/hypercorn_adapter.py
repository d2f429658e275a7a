"""Everything edgeproxy takes from hypercorn beyond its public API, in one place.

hypercorn's public API is ``hypercorn.asyncio.serve`` and ``Config``; edgeproxy
drives its connection handler (``TCPServer``) itself (``server.py`` says why)
and corrects a few decisions hypercorn takes before our app runs. Each override
names the private hypercorn attribute it relies on; ``_check()`` verifies them
all at import time, so a hypercorn upgrade that renames one fails at start-up
with the name, not in a request. Written against hypercorn 0.18.0. Nothing of
hypercorn is replaced process-wide: ``EdgeTCPServer`` builds
``_EdgeProtocolWrapper``, which builds this module's two protocols.

What is corrected here, and why:
- HTTP/2 DATA after an early answer kills the connection (pgjones/hypercorn#329).
- Read timeout per read and a 30 s linger after the peer closed.
- ``Upgrade: h2c`` over TLS is ignored: RFC 9113 section 3.1 deprecates the h2c
  upgrade, RFC 7540 section 3.3 never allowed it over TLS, and answering 101
  lets a front proxy be smuggled past (h2c smuggling). hypercorn sends the 101
  from inside its HTTP/1.1 handler.
- A request with both Content-Length and Transfer-Encoding is handled with TE
  (h11 does that) and its connection closed after the response: RFC 9112
  section 6.1 ("the server MUST close the connection after responding").
- An HTTP/2 header block over ``h2_max_header_list_size`` is answered 431
  (RFC 9113 section 10.5.1, RFC 6585 section 5) on its stream; hypercorn's h2
  connection instead tears the whole connection down (GOAWAY
  ENHANCE_YOUR_CALM). Blocks over ``H2_HARD_HEADER_LIMIT`` still do that.
- Absolute-form request targets (RFC 9112 section 3.2.2) reach the app as a
  path; ``absolute_form`` turns them into origin-form with the target's host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import h2.errors
import h2.events
import hpack
import hypercorn
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Response
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

__all__ = [
    "ASGIWrapper",
    "EdgeTCPServer",
    "H2_HARD_HEADER_LIMIT",
    "WorkerContext",
    "absolute_form",
    "edge_config",
]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

# Header blocks between hypercorn's advertised limit (64 KiB) and this get a 431
# on their stream; larger ones still end the connection (they are an attack,
# not a client with too many cookies).
H2_HARD_HEADER_LIMIT = 256 * 1024
# Seconds a connection accepted just before a drain may take to send its first
# request (EdgeTCPServer._idle_timeout); below hypercorn's graceful_timeout (5 s).
DRAIN_FIRST_REQUEST_GRACE = 2.0


def _check() -> None:
    """Fail at import when hypercorn no longer has what the overrides below rely on."""
    needed = {
        TCPServer: ("_read_data", "_idle_timeout", "_initiate_server_close", "protocol", "reader", "writer",
                    "idle_task", "loop", "config", "context", "run", "_close", "protocol_send", "app", "state"),
        H2Protocol: ("_handle_events", "_flush", "streams", "connection", "config"),
        H11Protocol: ("_check_protocol", "stream_send", "ssl", "connection", "context"),
        HypercornConfig: ("response_headers", "h2_max_header_list_size", "include_server_header",
                          "keep_alive_timeout", "graceful_timeout", "ssl_handshake_timeout", "read_timeout"),
    }
    missing = [f"{cls.__module__}.{cls.__name__}.{name}" for cls, names in needed.items() for name in names
               if not hasattr(cls, name) and name not in getattr(cls, "__annotations__", {})
               and name not in _INSTANCE_ATTRIBUTES]
    wrapper = inspect.signature(ProtocolWrapper.__init__).parameters
    if list(wrapper)[1:] != ["app", "config", "context", "task_group", "state", "ssl", "client", "server", "send",
                             "alpn_protocol"]:
        missing.append("hypercorn.protocol.ProtocolWrapper(app, config, ..., send, alpn_protocol)")
    if not {f.name for f in dataclasses.fields(Response)} >= {"stream_id", "headers", "status_code"}:
        missing.append("hypercorn.protocol.events.Response(stream_id, headers, status_code)")
    if not isinstance(getattr(hpack.Decoder(), "max_header_list_size", None), int):
        missing.append("hpack.Decoder.max_header_list_size")
    if missing:
        raise ImportError("edgeproxy.hypercorn_adapter: this hypercorn lacks " + ", ".join(missing)
                          + " (written against hypercorn 0.18.0)")


# Set in __init__ of the classes above, so absent on the class itself.
_INSTANCE_ATTRIBUTES = {"protocol", "reader", "writer", "idle_task", "loop", "config", "context", "streams",
                        "connection", "ssl", "app", "state"}


class _CappedDecoder(hpack.Decoder):
    """hpack's decoder, accepting header lists up to ``H2_HARD_HEADER_LIMIT``.

    h2 sets ``max_header_list_size`` to the value we advertise once the peer
    acknowledges our SETTINGS, and a larger block then ends the connection. We
    keep advertising hypercorn's limit but decode up to the hard cap, so that
    ``_H2Protocol`` can answer 431 on the one stream instead."""

    @property
    def max_header_list_size(self) -> int:
        return H2_HARD_HEADER_LIMIT

    @max_header_list_size.setter
    def max_header_list_size(self, _value: int) -> None:
        pass


def _header_list_size(headers: list[tuple[bytes, bytes]]) -> int:
    """RFC 9113 section 6.5.2: name + value + 32 octets per field."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


class _H2Protocol(H2Protocol):
    """hypercorn 0.18.0's HTTP/2 handler with two corrections.

    1. When the app answers before the request body has fully arrived (413, or
    a 421 to a misdirected POST), DATA frames still in flight hit a stream that
    no longer exists and a ``KeyError`` kills the whole connection
    (pgjones/hypercorn#329; unreleased fixes #334/#365). We acknowledge such
    frames, so flow control stays right, and drop them.
    2. A header block over ``config.h2_max_header_list_size`` gets 431 on its
    stream (RFC 9113 section 10.5.1), then RST_STREAM(NO_ERROR) if the client
    is still sending (RFC 9113 section 8.1); the connection lives on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection.decoder = _CappedDecoder()  # before any frame: nothing decoded yet

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        # One event at a time: a batch often carries a stream's HEADERS and its
        # DATA together, and the stream exists only once HEADERS is handled.
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                await self._flush()
                continue
            if isinstance(event, h2.events.RequestReceived) and event.headers is not None \
                    and _header_list_size(list(event.headers)) > self.config.h2_max_header_list_size:
                await self._too_large(event)
                continue
            await super()._handle_events([event])

    async def _too_large(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        headers = [(b":status", b"431"), (b"content-length", b"0"), *self.config.response_headers("h2")]
        self.connection.send_headers(stream_id, headers, end_stream=True)
        if event.stream_ended is None:  # the client may still send a body: stop it, without error
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        await self._flush()


class _H11Protocol(H11Protocol):
    """hypercorn 0.18.0's HTTP/1.1 handler: no h2c upgrade over TLS, and
    Content-Length + Transfer-Encoding closes the connection (module docstring)."""

    _close_after_response = False

    async def _check_protocol(self, event: Any) -> None:
        names = {name.lower() for name, _value in event.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            self._close_after_response = True
        if self.ssl and any(name.lower() == b"upgrade" and value.strip().lower() == b"h2c"
                            for name, value in event.headers):
            return  # answered as the HTTP/1.1 request it also is
        await super()._check_protocol(event)

    async def stream_send(self, event: Any) -> None:
        # While the server drains (context.terminated), hypercorn closes the connection
        # after this response; saying so lets a keep-alive client open a new one for its
        # next request instead of racing the close (RFC 9112 section 9.6).
        if (self._close_after_response or self.context.terminated.is_set()) and isinstance(event, Response) \
                and event.status_code >= 200:
            # h11 ends keep-alive when the response says "close"; hypercorn then closes.
            event = dataclasses.replace(event, headers=[*event.headers, (b"connection", b"close")])
        await super().stream_send(event)


class EdgeTCPServer(TCPServer):
    """hypercorn 0.18's connection handler with a cheaper read timeout, and
    without its idle-disconnect linger.

    hypercorn wraps every ``reader.read()`` in ``asyncio.wait_for`` when
    ``read_timeout`` is set: a new Task and timer per read, which cost plain
    hypercorn about a quarter of its keep-alive throughput on 2 cores
    (bench/README.md). Here one timer per connection checks, when it fires,
    whether anything arrived during the last ``read_timeout`` seconds and re-arms
    itself if so; a connection silent that long is aborted, which ends the read
    loop as hypercorn's timeout does (the app sees a disconnect). Unlike
    hypercorn's graceful close, output still buffered for that peer is dropped:
    a peer silent for ``read_timeout`` is treated as gone.

    The linger: when a peer closes an idle connection (before its first request,
    or between keep-alive requests: what browsers and every TLS probe do),
    hypercorn's HTTP/1.1 handler ignores the ``Closed`` event and the
    connection's task group waits for the idle timer, i.e. ``keep_alive_timeout``
    (30 s), before it closes. Every such connection kept its task, TLS objects
    and buffers for those 30 s: about 40 KB each, 1 GB at 1,000 new connections
    per second (measured as RSS growing by ~200 MB per 5 s of
    handshakes). Once the read loop ends the peer is gone, so we stop the idle
    timer there; a request still in flight still runs to its end.
    """

    _received = False  # any bytes from the peer yet (its first request is under way)

    async def run(self) -> None:
        """hypercorn 0.18's ``TCPServer.run``, building :class:`_EdgeProtocolWrapper`
        (hypercorn's names its own ``ProtocolWrapper``, which we would otherwise have to
        replace in its module for every server in the process)."""
        socket = self.writer.get_extra_info("socket")
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            ssl_object = self.writer.get_extra_info("ssl_object")
            if ssl_object is not None:
                tls, alpn_protocol = True, ssl_object.selected_alpn_protocol()
            else:
                tls, alpn_protocol = False, "http/1.1"
            async with TaskGroup(self.loop) as task_group:
                self._task_group = task_group
                self.protocol = _EdgeProtocolWrapper(
                    self.app, self.config, self.context, task_group, ConnectionState(self.state), tls, client,
                    server, self.protocol_send, alpn_protocol)
                await self.protocol.initiate()
                await self.idle_task.restart(task_group, self._idle_timeout)
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def _idle_timeout(self) -> None:
        """hypercorn closes idle connections at once when the server drains. A
        connection accepted moments before the drain has not sent its first
        request yet; closed, that request fails although the client did nothing
        wrong (measured: 3 of ~1,000 events in a restart under load). Such a
        connection gets ``DRAIN_FIRST_REQUEST_GRACE`` to send it; the request
        then runs as usual and the connection closes after its response
        (hypercorn: no keep-alive once terminated). An idle keep-alive
        connection that has already been used closes as before.

        ``asyncio.timeout`` instead of hypercorn's ``wait_for``: on Python 3.11,
        ``wait_for`` returns the result when its inner wait completes in the
        same loop pass as the task is cancelled (cpython gh-86296), so a request
        that arrived as the drain began (``idle_task.stop()``) was closed
        anyway, its response discarded: measured, 3 to 8 lost responses per
        restart under load, although the relay had received every event."""
        try:
            async with asyncio.timeout(self.config.keep_alive_timeout):
                await self.context.terminated.wait()
        except TimeoutError:
            pass
        else:
            if not self._received:
                await asyncio.sleep(DRAIN_FIRST_REQUEST_GRACE)  # cancelled when the request arrives
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # a request arrived meanwhile: not idle after all
        await asyncio.shield(self._initiate_server_close())

    async def _read_data(self) -> None:
        if self.config.read_timeout is None:
            await super()._read_data()
        else:
            await self._read_with_watchdog(self.config.read_timeout)
        # The peer has gone: end the connection now, not when the idle timer fires.
        await self.idle_task.stop()

    async def _read_with_watchdog(self, timeout: float) -> None:
        loop = self.loop
        reader = self.reader
        last_data = loop.time()
        watchdog: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal watchdog
            remaining = last_data + timeout - loop.time()
            if remaining > 0:
                watchdog = loop.call_later(remaining, check)
            else:
                self.writer.transport.abort()

        watchdog = loop.call_later(timeout, check)
        try:
            while not reader.at_eof():
                try:
                    data = await reader.read(MAX_RECV)
                except (ConnectionError, OSError, ssl.SSLError):
                    break
                last_data = loop.time()
                self._received = True
                await self.protocol.handle(RawData(data))
        finally:
            if watchdog is not None:
                watchdog.cancel()
        await self.protocol.handle(Closed())


class _EdgeConfig(HypercornConfig):
    """hypercorn's settings with a neutral ``Server`` header: the edge names
    neither its software nor the vendor behind it."""

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        return [*super().response_headers(protocol), (b"server", b"edge")]


def edge_config() -> HypercornConfig:
    config = _EdgeConfig()
    config.include_server_header = False  # replaced by the neutral one above
    config.keep_alive_timeout = 30
    config.graceful_timeout = 5
    config.ssl_handshake_timeout = 10
    # A connection that sends nothing for a minute (mid-request included) is
    # closed; idle keep-alive connections go after keep_alive_timeout.
    config.read_timeout = 60
    return config


def absolute_form(app: ASGIApp) -> ASGIApp:
    """Accept ``GET https://host/path HTTP/1.1`` (RFC 9112 section 3.2.2).

    hypercorn hands the whole absolute URI to the app as the path. A server
    "MUST accept the absolute-form" and "MUST ignore the received Host header
    field ... and instead use the host information of the request-target": the
    request reaches the app in origin-form with the target's authority as its
    only Host, so the proxy's Host gate (which must match the SNI on TLS)
    decides on the name the client actually asked for. A target with userinfo
    (RFC 9110 section 4.2.4 forbids it for http(s)) gets 400.
    """

    async def call(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        raw = scope.get("raw_path") or b""
        scheme = raw[:8].lower()
        if scope["type"] == "http" and (scheme.startswith(b"http://") or scheme == b"https://"):
            rest = raw.split(b"://", 1)[1]
            authority, slash, path = rest.partition(b"/")
            if not authority or b"@" in authority:
                await _bad_request(send)
                return
            origin = b"/" + path
            scope = dict(scope)
            scope["raw_path"] = origin
            scope["path"] = unquote(origin.decode("latin-1"))
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n.lower() != b"host"] + [(b"host", authority)]
        await app(scope, receive, send)

    return call


async def _bad_request(send: Callable[[Any], Awaitable[None]]) -> None:
    body = b"bad request target\n"
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _EdgeProtocolWrapper(ProtocolWrapper):
    """hypercorn's ProtocolWrapper with this module's two protocols.

    Its own looks ``H11Protocol``/``H2Protocol`` up in ``hypercorn.protocol`` at
    each connection; this one names ours, so nothing of hypercorn's is replaced
    process-wide. ``__init__`` does not call hypercorn's (it would build
    hypercorn's protocol first); ``handle`` is hypercorn 0.18's, with our classes.
    """

    def __init__(self, app: Any, config: HypercornConfig, context: Any, task_group: Any, state: ConnectionState,
                 ssl: bool, client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Callable[[Any], Awaitable[None]], alpn_protocol: str | None = None) -> None:
        self.app, self.config, self.context, self.task_group = app, config, context, task_group
        self.ssl, self.client, self.server, self.send, self.state = ssl, client, server, send, state
        self.protocol: H11Protocol | H2Protocol = (_H2Protocol if alpn_protocol == "h2" else _H11Protocol)(
            app, config, context, task_group, state, ssl, client, server, send)

    def _h2(self) -> H2Protocol:
        return _H2Protocol(self.app, self.config, self.context, self.task_group, self.state, self.ssl,
                           self.client, self.server, self.send)

    async def handle(self, event: Any) -> None:
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:  # the HTTP/2 preface on a cleartext HTTP/1.1 connection
            self.protocol = self._h2()
            await self.protocol.initiate()
            if error.data != b"":
                return await self.protocol.handle(RawData(data=error.data))
        except H2CProtocolRequiredError as error:  # h2c upgrade (port 80; ignored over TLS by _H11Protocol)
            self.protocol = self._h2()
            await self.protocol.initiate(error.headers, error.settings)
            if error.data != b"":
                return await self.protocol.handle(RawData(data=error.data))
        return None


_check()
