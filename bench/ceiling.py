"""The ceiling: a trivial raw-ASGI app on plain hypercorn 0.18, same TLS, same bytes.

Owns: nothing but answering as fast as hypercorn can. GET returns the exact
bytes and headers the edge served for the script (captured by the benchmark
from the edge itself); POST reads the body and returns what the bench relay
returns. One worker (``workers`` > 1: that many processes forked after binding,
accepting on the same sockets, as the edge's workers do), the same certificate
chain and ALPN as the edge.

Usage: ``python bench/ceiling.py CONFIG.json`` with keys ``port``, ``certfile``,
``keyfile``, ``script_body`` (hex), ``script_headers`` ([[name, value], ...]),
optional ``workers``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, cast

from hypercorn.asyncio import serve
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.utils import wrap_app

RELAY_BODY = b'{"ok":true}'


def make_app(script_body: bytes, script_headers: list[tuple[bytes, bytes]]) -> Any:
    post_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(RELAY_BODY)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        # The edge's event route answers POSTs and GET beacons with the relay's answer.
        if scope["method"] == "POST" or scope["path"].startswith("/api/"):
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
            await send({"type": "http.response.start", "status": 202, "headers": post_headers})
            await send({"type": "http.response.body", "body": RELAY_BODY})
            return
        await send({"type": "http.response.start", "status": 200, "headers": script_headers})
        await send({"type": "http.response.body", "body": script_body})

    return app


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    config = Config()
    config.bind = [f"127.0.0.1:{spec['port']}"]
    config.certfile = spec["certfile"]
    config.keyfile = spec["keyfile"]
    config.alpn_protocols = ["h2", "http/1.1"]
    config.keep_alive_timeout = 30
    if spec.get("read_timeout"):
        config.read_timeout = spec["read_timeout"]  # the edge sets 60 s (slow-client defence)
    config.backlog = 1024
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    headers = [(k.encode(), v.encode()) for k, v in spec["script_headers"]]
    # hypercorn types its apps with its own scope TypedDicts; ours is plain ASGI (as in server.py).
    app = cast(Any, make_app(bytes.fromhex(spec["script_body"]), headers))
    workers = int(spec.get("workers", 1))
    if workers == 1:
        asyncio.run(serve(app, config))
        return
    sockets = config.create_sockets()
    for _ in range(workers - 1):
        if os.fork() == 0:  # the benchmark stops the whole process group
            break
    asyncio.run(worker_serve(wrap_app(app, config.wsgi_max_body_size, None), config, sockets=sockets))


if __name__ == "__main__":
    main()
