"""Raw sockets against the real public listeners: hostile input gets a fixed answer and reaches nothing.

Each case speaks bytes, not a client library, so that malformed request lines,
absolute-form targets, odd Host headers, header floods and huge bodies reach the
server exactly as an attacker would send them.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from conftest import HOSTS, PebbleFactory, Stack, edge_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "hypercorn"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          pebble_factory_module: PebbleFactory) -> Iterator[Stack]:
    """Every case on both HTTPS paths: the lean HTTP/1.1 path (edgeproxy/h1fast.py, which
    hands anything unusual to hypercorn) and hypercorn alone (``proxy.http1_fast_path``)."""
    yield from edge_stack(tmp_path_factory, pebble_factory_module, proxy={"http1_fast_path": request.param})


@contextmanager
def raw_connection(stack: Stack, *, tls: bool, sni: str | None = HOSTS[0]) -> Iterator[socket.socket]:
    port = stack.edge.config.https_port if tls else stack.edge.config.http_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if tls:
            ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in stack.roots))
            ctx.check_hostname = sni is not None
            sock = ctx.wrap_socket(sock, server_hostname=sni)
        yield sock
    finally:
        sock.close()


def exchange(stack: Stack, request: bytes, *, tls: bool, sni: str | None = HOSTS[0]) -> bytes:
    """Send ``request`` and read until the server closes or a full short response arrived."""
    with raw_connection(stack, tls=tls, sni=sni) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the server may refuse before we finished sending
        chunks: list[bytes] = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
                head = b"".join(chunks)
                if b"\r\n\r\n" in head and b"content-length: 0" in head.lower():
                    break
                if head.count(b"\r\n\r\n") and _complete(head):
                    break
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            pass
        return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(response: bytes) -> int | None:
    if not response.startswith(b"HTTP/1.1 "):
        return None  # connection closed without an answer
    return int(response[9:12])


@pytest.fixture
def relay_untouched(stack: Stack) -> Iterator[None]:
    before_relay, before_origin = len(stack.relay.snapshot()), stack.origin.fetches
    yield
    assert len(stack.relay.snapshot()) == before_relay, "a hostile request reached the relay"
    assert stack.origin.fetches == before_origin, "a hostile request reached the script origin"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize(
    "request_line",
    [b"GARBAGE", b"GET / HTTP/9.9", b"GET\x00/ HTTP/1.1", b"GET /\x7f HTTP/1.1", b"POST /api/v1/m HTTP/1.1 extra",
     b"\xff\xfe / HTTP/1.1", b"GET " + b"/a" * 20000 + b" HTTP/1.1"],
    ids=["garbage", "version", "nul", "del", "extra-token", "binary", "20k-target"],
)
def test_malformed_request_lines_are_refused(stack: Stack, relay_untouched: None, tls: bool, request_line: bytes) -> None:
    response = exchange(stack, request_line + b"\r\nHost: " + HOSTS[0].encode() + b"\r\n\r\n", tls=tls)
    # A fixed answer or a closed connection; h11 accepts any HTTP/d.d, so a
    # registered host may get its ordinary 308 to https. Nothing reaches an upstream.
    assert status_of(response) in (None, 308, 400, 404, 414, 421, 431), response[:200]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_absolute_form_naming_the_admin_listener_never_reaches_it(stack: Stack, relay_untouched: None, tls: bool) -> None:
    admin = f"127.0.0.1:{stack.edge.config.admin_port}"
    for host in (admin, HOSTS[0]):
        request = (f"GET http://{admin}/v1/domains HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {stack.edge.config.token_file.read_text().strip()}\r\n\r\n").encode()
        response = exchange(stack, request, tls=tls)
        assert status_of(response) in (400, 404, 421), response[:300]
        assert b"snippet" not in response and b"domains" not in response.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (HOSTS[0] + ":443", 200),          # a port is allowed and ignored
        (HOSTS[0].upper(), 200),           # hostnames are case-insensitive
        (HOSTS[0] + ".", 200),             # one trailing dot is the same name
        (HOSTS[0] + "..", 421),
        ("user@" + HOSTS[0], 421),         # userinfo is not a Host
        (HOSTS[0] + ":99999", 421),
        (HOSTS[0] + ":", 421),
        ("[::1]", 421),
        (HOSTS[1], 421),                   # another customer's name on this TLS connection
        ("", 421),
    ],
)
def test_host_variants_against_the_sni(stack: Stack, host: str, expected: int) -> None:
    request = f"GET /js/app.js HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    assert status_of(exchange(stack, request, tls=True)) == expected


def test_two_host_headers_are_misdirected(stack: Stack, relay_untouched: None) -> None:
    request = (f"POST /api/v1/m HTTP/1.1\r\nHost: {HOSTS[0]}\r\nHost: {HOSTS[1]}\r\n"
               "Content-Length: 2\r\n\r\n{}").encode()
    assert status_of(exchange(stack, request, tls=True)) in (400, 421)


@pytest.mark.parametrize("shape", ["many", "huge"])
def test_header_floods_are_refused_and_the_server_stays_up(stack: Stack, relay_untouched: None, shape: str) -> None:
    if shape == "many":
        flood = b"".join(b"X-Flood-%d: y\r\n" % i for i in range(20000))
    else:
        flood = b"X-Huge: " + b"a" * 1_000_000 + b"\r\n"
    request = b"POST /api/v1/m HTTP/1.1\r\nHost: " + HOSTS[0].encode() + b"\r\n" + flood + b"Content-Length: 2\r\n\r\n{}"
    assert status_of(exchange(stack, request, tls=True)) in (None, 400, 431)
    healthy = exchange(stack, f"GET /js/app.js HTTP/1.1\r\nHost: {HOSTS[0]}\r\nConnection: close\r\n\r\n".encode(), tls=True)
    assert status_of(healthy) == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_megabyte_body_gets_413_and_is_not_forwarded(stack: Stack, relay_untouched: None, chunked: bool) -> None:
    body = b"x" * 1_000_000
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        framing = b"Content-Length: %d\r\n\r\n" % len(body) + body
    request = b"POST /api/v1/m HTTP/1.1\r\nHost: " + HOSTS[0].encode() + b"\r\n" + framing
    assert status_of(exchange(stack, request, tls=True)) == 413


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_slowloris_does_not_starve_normal_clients(stack: Stack, relay_untouched: None, tls: bool) -> None:
    """200 connections dribbling headers; a normal client keeps being answered meanwhile."""
    stop = threading.Event()
    sockets: list[socket.socket] = []
    ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in stack.roots))

    def dribble() -> None:
        for _ in range(200):
            try:
                port = stack.edge.config.https_port if tls else stack.edge.config.http_port
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if tls:
                    sock = ctx.wrap_socket(sock, server_hostname=HOSTS[0])
                sock.sendall(b"GET / HTTP/1.1\r\nHost: " + HOSTS[0].encode() + b"\r\n")
                sockets.append(sock)
            except OSError:
                pass
        while not stop.is_set():
            for sock in list(sockets):
                try:
                    sock.sendall(b"X-a: b\r\n")
                except OSError:
                    sockets.remove(sock)
            stop.wait(1.0)

    attacker = threading.Thread(target=dribble, daemon=True)
    attacker.start()
    try:
        deadline = time.monotonic() + 10
        while len(sockets) < 150 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sockets) >= 150, "could not open the slow connections"
        latencies = []
        with httpx.Client(verify=False, timeout=5, trust_env=False) as client:
            for _ in range(20):
                started = time.monotonic()
                response = client.get(f"{stack.https}/js/app.js", headers={"Host": HOSTS[0]},
                                      extensions={"sni_hostname": HOSTS[0]})
                latencies.append(time.monotonic() - started)
                assert response.status_code == 200
        assert max(latencies) < 2.0, latencies
    finally:
        stop.set()
        attacker.join(5)
        for sock in sockets:
            sock.close()
