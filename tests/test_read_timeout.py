"""hypercorn_adapter.EdgeTCPServer: the per-connection read-timeout watchdog that replaces hypercorn's
per-read ``wait_for``. A silent connection is closed; a slow but live one is not;
keep-alive requests are still answered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config

from edgeproxy.hypercorn_adapter import EdgeTCPServer as _TCPServer


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _serve(read_timeout: float | None, live: set[asyncio.Task[Any]] | None = None
                 ) -> tuple[asyncio.AbstractServer, int]:
    config = Config()
    config.read_timeout = read_timeout
    config.keep_alive_timeout = 30
    context = WorkerContext(None)
    loop = asyncio.get_running_loop()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if live is not None and task is not None:
            live.add(task)
            task.add_done_callback(live.discard)
        await _TCPServer(ASGIWrapper(_app), loop, config, context, {}, reader, writer)  # type: ignore[arg-type]

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_silent_connection_is_closed_after_the_read_timeout() -> None:
    async def main() -> float:
        server, port = await _serve(0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a")  # half a request, then nothing
            start = asyncio.get_running_loop().time()
            data = await asyncio.wait_for(reader.read(), timeout=5)  # EOF when the server gives up
            writer.close()
            assert b"200" not in data
            return asyncio.get_running_loop().time() - start

    assert 0.25 <= asyncio.run(main()) < 3


def test_a_slow_but_live_client_and_keep_alive_requests_are_served() -> None:
    async def main() -> list[bytes]:
        server, port = await _serve(0.3)
        answers = []
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
            for _ in range(2):
                for i in range(0, len(request), 4):  # 8 pieces, 0.1 s apart: 0.7 s > read_timeout
                    writer.write(request[i:i + 4])
                    await asyncio.sleep(0.1)
                answers.append(await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5))
            writer.close()
        return answers

    answers = asyncio.run(main())
    assert len(answers) == 2 and all(a.startswith(b"HTTP/1.1 200") for a in answers)


@pytest.mark.parametrize("read_timeout", [60.0, None])
@pytest.mark.parametrize("sends", [b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"])
def test_a_connection_the_peer_closes_while_idle_ends_at_once(read_timeout: float | None, sends: bytes) -> None:
    """hypercorn kept such a connection (task, buffers, TLS state) until
    keep_alive_timeout (30 s here): before its first request, or after a
    keep-alive answer. It must end as soon as the peer has gone."""

    async def main() -> float:
        live: set[asyncio.Task[Any]] = set()
        server, port = await _serve(read_timeout, live)
        async with server:
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if sends:
                    writer.write(sends)
                    await asyncio.wait_for(reader.readuntil(b"ok"), timeout=5)
                writer.close()
            start = asyncio.get_running_loop().time()
            while live or asyncio.get_running_loop().time() - start < 0.05:
                await asyncio.sleep(0.01)
                assert asyncio.get_running_loop().time() - start < 5, f"{len(live)} connections linger"
            return asyncio.get_running_loop().time() - start

    assert asyncio.run(main()) < 5
