"""A fast stand-in for the vendor's queue relay, for benchmarks only.

Owns: one asyncio process speaking just enough HTTP/1.1 (keep-alive,
Content-Length bodies) to answer every request ``202 {"ok":true}`` as fast as
the loop allows. ``devtools.upstreams.RecordingRelay`` (a ThreadingHTTPServer
that records every request) is the right relay for tests and far too slow to
measure the edge against.

With ``--script BODY HEADERS`` it is instead the fast script origin Caddy's
``reverse_proxy`` scenario proxies to: every request gets ``200`` with the
bytes in the file BODY and the header lines in the file HEADERS (the script
exactly as the edge served it, captured by ``run.py``). The edge fetches its
origin once and caches; Caddy asks the origin every time, so the origin must
not be what limits Caddy.

Usage: ``python bench/relay.py PORT [--script BODY HEADERS]`` (prints ``ready`` once listening).
"""

from __future__ import annotations

import asyncio
import sys

BODY = b'{"ok":true}'
RESPONSE = (b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


class RelayProtocol(asyncio.Protocol):
    response = RESPONSE

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end].lower()
            length = 0
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17: stop if stop >= 0 else len(head)].strip())
            total = end + 4 + length
            if len(self.buf) < total:
                break
            self.buf = self.buf[total:]
            out.append(self.response)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def main(port: int) -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--script":
        body = open(sys.argv[3], "rb").read()
        head = open(sys.argv[4], "rb").read().strip()
        RelayProtocol.response = (b"HTTP/1.1 200 OK\r\n" + head + b"\r\ncontent-length: "
                                  + str(len(body)).encode() + b"\r\n\r\n" + body)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RelayProtocol, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
