"""edgeproxy/h1fast.py in-process, on loopback TCP with short timeouts: its timeouts,
its drain, the app's task outliving a client that leaves, the tasks it registers,
and the hand-off to hypercorn's handler (``EdgeTCPServer``, as ``server.py`` wires it).

Behaviour over TLS and with the real app (the host gate, the route table, hostile
input, pipelining) is tested against a real edge in tests/test_http_hygiene.py and
tests/test_hostile_input.py, on both paths."""

from __future__ import annotations

import asyncio
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.worker_context import WorkerContext

from edgeproxy.h1fast import FastConnections
from edgeproxy.hypercorn_adapter import EdgeTCPServer, edge_config


class App:
    """Answers ``ok``; ``/slow`` waits for ``release`` first; ``/leave`` too, and then
    records what ``receive()`` says next (the client is gone by then)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished: list[str] = []
        self.after_body: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        body = message.get("body", b"")
        if scope["path"] in ("/slow", "/leave"):
            await self.release.wait()
        if scope["path"] == "/leave":
            self.after_body.append(await receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body) + 2).encode())]})
        await send({"type": "http.response.body", "body": b"ok" + body})
        self.finished.append(scope["path"])


async def _serve(app: App, *, read_timeout: float = 60.0, keep_alive: float = 30.0,
                 grace: float = 0.2) -> tuple[asyncio.AbstractServer, int, FastConnections]:
    config = edge_config()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def hypercorn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await EdgeTCPServer(ASGIWrapper(app), loop, config, WorkerContext(None), {}, reader, writer)  # type: ignore[arg-type]

    fast = FastConnections(app, hypercorn, lambda: config.response_headers("h11"), tasks,  # type: ignore[arg-type]
                           keep_alive_timeout=keep_alive, read_timeout=read_timeout, first_request_grace=grace)
    server = await loop.create_server(fast.protocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], fast


GET = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (EOF), or fail after 5 s."""
    return await asyncio.wait_for(reader.read(), timeout=5)


def test_simple_requests_are_answered_here_and_their_tasks_leave_the_listener() -> None:
    async def main() -> None:
        app = App()
        server, port, fast = await _serve(app)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                writer.write(GET)
                head = await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")  # the lean path (hypercorn: no reason phrase)
                assert b"\r\nserver: edge\r\n" in head and b"\r\ndate: " in head
            await asyncio.sleep(0.05)
            assert not fast.tasks  # a drain waits for these: none may linger once answered
            assert len(fast.open) == 1
            writer.close()
            await asyncio.sleep(0.05)
            assert not fast.open

    asyncio.run(main())


def test_a_silent_half_request_is_aborted_after_the_read_timeout() -> None:
    async def main() -> bytes:
        server, port, _ = await _serve(App(), read_timeout=0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /a HTTP/1.1\r\nHost: a")  # half a request, then nothing
            data = await _closed(reader)
            writer.close()
            return data

    assert b"200" not in asyncio.run(main())


def test_a_slow_but_live_client_is_served_and_an_idle_one_closed_after_keep_alive() -> None:
    async def main() -> tuple[bytes, bytes]:
        server, port, _ = await _serve(App(), read_timeout=0.3, keep_alive=0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(0, len(GET), 4):  # 0.1 s apart: 0.7 s in all, > read_timeout
                writer.write(GET[i:i + 4])
                await asyncio.sleep(0.1)
            answer = await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5)
            rest = await _closed(reader)  # then idle: closed after keep_alive_timeout
            writer.close()
            return answer, rest

    answer, rest = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200 OK") and rest == b""


def test_the_app_outlives_a_client_that_leaves_and_sees_the_disconnect() -> None:
    """Zero loss: an event whose client hung up is still handled to its end."""

    async def main() -> App:
        app = App()
        server, port, fast = await _serve(app)
        async with server:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /leave HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
            await asyncio.sleep(0.1)
            writer.close()  # gone before the app answers
            await asyncio.sleep(0.1)
            app.release.set()
            await asyncio.wait_for(asyncio.gather(*fast.tasks), timeout=5)
        return app

    app = asyncio.run(main())
    assert app.finished == ["/leave"]
    assert app.after_body == [{"type": "http.disconnect"}]


def test_a_drain_closes_idle_connections_and_ends_busy_ones_after_their_response() -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        app = App()
        server, port, fast = await _serve(app, grace=0.2)
        async with server:
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
            idle_w.write(GET)
            await asyncio.wait_for(idle_r.readuntil(b"ok"), timeout=5)
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
            busy_w.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            new_r, new_w = await asyncio.open_connection("127.0.0.1", port)  # no request yet
            await asyncio.sleep(0.1)
            fast.drain()
            idle = await _closed(idle_r)
            app.release.set()
            busy = await _closed(busy_r)
            new_w.write(GET)  # within the first-request grace: still answered, then closed
            new = await _closed(new_r)
            for w in (idle_w, busy_w, new_w):
                w.close()
        return idle, busy, new

    idle, busy, new = asyncio.run(main())
    assert idle == b""
    assert busy.startswith(b"HTTP/1.1 200 OK") and b"\r\nconnection: close\r\n" in busy
    assert new.startswith(b"HTTP/1.1 200 OK") and b"\r\nconnection: close\r\n" in new


def test_a_request_that_is_not_simple_moves_the_connection_to_hypercorn() -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        server, port, fast = await _serve(App())
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            first = await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5)
            writer.write(b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            second = await asyncio.wait_for(reader.readuntil(b"ok{}"), timeout=5)
            assert not fast.open  # no longer ours
            writer.write(GET)
            third = await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5)
            writer.close()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert second.startswith(b"HTTP/1.1 200 \r\n")  # hypercorn (h11: empty reason phrase)
    assert third.startswith(b"HTTP/1.1 200 \r\n")  # and it keeps the connection
