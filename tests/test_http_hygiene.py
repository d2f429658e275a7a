"""HTTP hygiene on the public TLS listener, checked on the wire.

Raw sockets for HTTP/1.1 (what a smuggling or h2c probe sends), the ``h2``
library for HTTP/2. The fixes live in ``edgeproxy/hypercorn_adapter.py``
(hypercorn decides these before our app runs) and ``server.py`` (logging).
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin

from conftest import VENDOR_RELAY
from tlshelpers import seed

HOST = "hygiene.example.test"
OTHER = "other.example.test"


@dataclass
class Edge:
    proc: EdgeProcess
    relay: RecordingRelay
    fast: bool  # proxy.http1_fast_path

    @property
    def port(self) -> int:
        return self.proc.config.https_port


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "hypercorn"])
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """Every case on both HTTPS paths: the lean HTTP/1.1 path (edgeproxy/h1fast.py, which
    hands anything unusual to hypercorn) and hypercorn alone (``proxy.http1_fast_path``)."""
    tmp = tmp_path_factory.mktemp("hygiene")
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(state_dir=tmp, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                            extra={"renew": {"interval": 3600.0}, "monitor": {"interval": 0.0},
                                   "proxy": {"http1_fast_path": request.param},
                                   "upstream": {"rewrite": {VENDOR_RELAY: "https://{host}{api_path}"}}})
        seed(config.db_path, HOST)
        seed(config.db_path, OTHER)
        with EdgeProcess(config) as proc:
            yield Edge(proc, relay, request.param)


def _tls(port: int, alpn: str = "http/1.1", sni: str = HOST) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=sni)


def _exchange(port: int, request: bytes, wait: float = 3.0, sni: str = HOST) -> tuple[bytes, bool]:
    """(everything received, whether the server closed the connection within ``wait``)."""
    with _tls(port, sni=sni) as sock:
        sock.sendall(request)
        sock.settimeout(wait)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (socket.timeout, TimeoutError):
            return received, False
        return received, True


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_content_length_and_transfer_encoding_uses_te_and_closes(edge: Edge) -> None:
    before = len(edge.relay.snapshot())
    request = (f"POST /api/v1/m HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
               "Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
               "7\r\n{\"a\":1}\r\n0\r\n\r\n").encode()
    response, closed = _exchange(edge.port, request)
    assert _status(response) == 202, response
    assert b"\r\nconnection: close\r\n" in response.lower()
    assert closed  # RFC 9112 section 6.1: the server MUST close the connection
    received = edge.relay.snapshot()[before:]
    assert [r.body for r in received] == [b'{"a":1}']  # the chunked body, not 40 bytes of whatever followed


def test_plain_keep_alive_is_not_closed(edge: Edge) -> None:
    """The control for the test above: without both framing headers the connection stays open."""
    response, closed = _exchange(edge.port, f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), wait=1.5)
    assert _status(response) == 200 and not closed


def test_h2c_upgrade_over_tls_is_ignored(edge: Edge) -> None:
    request = (f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n").encode()
    response, _closed = _exchange(edge.port, request, wait=1.5)
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert b"101" not in response.split(b"\r\n", 1)[0]
    assert b"upgrade: h2c" not in response.lower()
    # Still HTTP/1.1 after the response: no HTTP/2 SETTINGS frame follows.
    head, _, body = response.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert len(body) == length


def test_absolute_form_target_is_accepted_and_its_host_wins(edge: Edge) -> None:
    request = f"GET https://{HOST}/js/app.js HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n"
    response, _ = _exchange(edge.port, request.encode())
    assert _status(response) == 200, response[:300]
    assert f"https://{HOST}/api/v1/m".encode() in response  # the script rewritten for the target's host
    # With a port and a query. (A request without any Host stays 400: RFC 9112 section 3.2.)
    request = f"GET https://{HOST}:443/js/app.js?v=2 HTTP/1.1\r\nHost: {OTHER}\r\nConnection: close\r\n\r\n"
    assert _status(_exchange(edge.port, request.encode())[0]) == 200


def test_absolute_form_host_must_match_sni(edge: Edge) -> None:
    # The target names another registered host than the SNI: misdirected, whatever Host says.
    request = f"GET https://{OTHER}/js/app.js HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    assert _status(_exchange(edge.port, request.encode(), sni=HOST)[0]) == 421
    request = f"GET https://user@{HOST}/js/app.js HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    assert _status(_exchange(edge.port, request.encode())[0]) == 400


def test_admin_api_unreachable_through_absolute_form(edge: Edge) -> None:
    token = edge.proc.config.token_file.read_text().strip()
    admin = f"127.0.0.1:{edge.proc.config.admin_port}"
    for target in (f"http://{admin}/v1/domains", f"https://{HOST}/v1/domains", f"http://{admin}/healthz"):
        request = (f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
                   "Connection: close\r\n\r\n")
        response, _ = _exchange(edge.port, request.encode())
        assert _status(response) in (404, 421), (target, response[:300])
        assert b"hostname" not in response and b'"ok"' not in response


def _statuses(response: bytes) -> list[bytes]:
    """Status lines in a stream of responses (the script holds no status line)."""
    return re.findall(rb"(HTTP/1\.1 \d{3} [^\r\n]*)\r\n", response)


def test_simple_requests_take_the_configured_path(edge: Edge) -> None:
    """The control for the parametrization: the lean path answers a plain GET itself
    (with a reason phrase; hypercorn's is empty), hypercorn answers it otherwise."""
    response, _ = _exchange(edge.port, f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    assert _statuses(response) == ([b"HTTP/1.1 200 OK"] if edge.fast else [b"HTTP/1.1 200 "])


def test_pipelined_requests_are_answered_in_order(edge: Edge) -> None:
    before = len(edge.relay.snapshot())
    request = (f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
               f"POST /api/v1/m HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
               "Content-Length: 9\r\n\r\n{\"n\":\"p\"}"
               f"HEAD /js/app.js HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").encode()
    response, closed = _exchange(edge.port, request)
    assert [_status(line + b" ") for line in _statuses(response)] == [200, 202, 200], response[-600:]
    assert closed
    assert response.endswith(b"\r\n\r\n")  # HEAD: no body after the last head
    assert [r.body for r in edge.relay.snapshot()[before:]] == [b'{"n":"p"}']


def test_a_connection_moves_to_hypercorn_at_the_first_unusual_request(edge: Edge) -> None:
    """Simple, then chunked (not simple), then simple again, on one connection: each
    answered once, the chunked body forwarded whole; on the lean path hypercorn serves
    from the chunked request on (its status lines have no reason phrase)."""
    before = len(edge.relay.snapshot())
    with _tls(edge.port) as sock:
        sock.settimeout(5)

        def ask(request: bytes, expect: int) -> bytes:
            sock.sendall(request)
            received = b""
            while len(_statuses(received)) < 1 or not _complete(received):
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            assert _status(received) == expect, received[:300]
            return received.split(b"\r\n", 1)[0]

        first = ask(f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 200)
        second = ask((f"POST /api/v1/m HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n9\r\n{\"n\":\"c\"}\r\n0\r\n\r\n").encode(), 202)
        third = ask(f"GET /js/app.js HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 200)
    assert [r.body for r in edge.relay.snapshot()[before:]] == [b'{"n":"c"}']
    if edge.fast:
        assert (first, second, third) == (b"HTTP/1.1 200 OK", b"HTTP/1.1 202 ", b"HTTP/1.1 200 ")


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return True


def _h2_request(conn: h2.connection.H2Connection, sock: ssl.SSLSocket, stream_id: int,
                extra: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """Send one GET; (status, whether the connection was terminated)."""
    conn.send_headers(stream_id, [(b":method", b"GET"), (b":path", b"/js/app.js"), (b":scheme", b"https"),
                                  (b":authority", HOST.encode()), *extra], end_stream=True)
    sock.sendall(conn.data_to_send())
    status: int | None = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            return status, True
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers)[b":status"])
            if isinstance(event, h2.events.ConnectionTerminated):
                return status, True
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and event.stream_id == stream_id:
                sock.sendall(conn.data_to_send())
                return status, False
        sock.sendall(conn.data_to_send())
    return status, False


def test_http2_header_block_over_the_limit_gets_431_and_the_connection_lives(edge: Edge) -> None:
    with _tls(edge.port, alpn="h2") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        assert _h2_request(conn, sock, 1, [(b"x-big", b"a" * 70_000)]) == (431, False)
        assert _h2_request(conn, sock, 3, []) == (200, False)  # same connection, next request served


def test_tls_error_after_handshake_is_one_info_line(edge: Edge) -> None:
    """A TLS 1.2 renegotiation attempt (what scanners probe) is refused; the log
    says so in one line with the peer and the reason, without a traceback."""
    log_start = len(edge.proc.log_text())
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{edge.port}", "-servername", HOST,
                             "-tls1_2"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    time.sleep(1)
    proc.stdin.write(b"R\n")
    proc.stdin.flush()
    time.sleep(1)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in edge.proc.log_text()[log_start:].splitlines() if line.startswith("{")]
        if any("ended" in str(line.get("msg")) for line in lines):
            break
        time.sleep(0.1)
    ended = [line for line in lines if "connection from 127.0.0.1:" in str(line.get("msg"))]
    assert len(ended) == 1, lines
    assert ended[0]["level"] == "info" and "HANDSHAKE_FAILURE" in str(ended[0]["msg"])
    assert not [line for line in lines if line.get("level") == "error" or "exc" in line], lines


def test_adapter_refuses_a_hypercorn_without_what_it_relies_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeproxy import hypercorn_adapter

    hypercorn_adapter._check()  # this hypercorn passes

    class Bare:
        pass

    monkeypatch.setattr(hypercorn_adapter, "H11Protocol", Bare)
    with pytest.raises(ImportError, match=r"Bare\._check_protocol"):
        hypercorn_adapter._check()
