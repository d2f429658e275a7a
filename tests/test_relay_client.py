"""The relay POST on aiohttp directly, against a real local relay over HTTP and HTTPS.

``upstream.client = "aiohttp"`` with no injected transport: ``EdgeProxy._forward``
uses ``relay._AiohttpClient``, not httpx. Each test pins one guarantee the httpx
client gave (house rule 5, the 1 MiB answer limit, the error codes, the relay's
view of a call) with real sockets: nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from edgeproxy.edge import relay as relay_module
from edgeproxy.config import ProxySettings, RoutesSettings, Settings, UpstreamSettings
from edgeproxy.devtools.pebble import _write_https_identity
from edgeproxy.devtools.upstreams import RecordingRelay
from edgeproxy.edge.proxy import EdgeProxy, ForwardRequest, ForwardResult, Site

SHOP = "shop.example.test"
MIB = 1024 * 1024
HEADERS = ((b"content-type", b"application/json"), (b"user-agent", b"Mozilla/5.0 test"),
           (b"x-forwarded-for", b"198.51.100.7"), (b"x-forwarded-host", SHOP.encode()),
           (b"x-forwarded-proto", b"https"), (b"idempotency-key", b"k" * 32))


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throwaway CA and a 127.0.0.1/localhost certificate it signed."""
    return _write_https_identity(tmp_path_factory.mktemp("relay-tls"))


def server_context(identity: tuple[Path, Path, Path]) -> ssl.SSLContext:
    _ca, cert, key = identity
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(params=["http", "https"])
def relay(request: pytest.FixtureRequest, identity: tuple[Path, Path, Path],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingRelay]:
    """A real relay; over HTTPS the edge trusts the throwaway CA (and only it)."""
    if request.param == "https":
        ca = str(identity[0])
        monkeypatch.setattr(relay_module, "upstream_ssl_context", lambda: ssl.create_default_context(cafile=ca))
        server = RecordingRelay(tls=server_context(identity))
    else:
        server = RecordingRelay()
    with server:
        yield server


def make_proxy(relay_url: str, transport: httpx.AsyncBaseTransport | None = None,
               observe: Any = None, **upstream: Any) -> EdgeProxy:
    settings = Settings(
        upstream=UpstreamSettings(**{"relay": relay_url, "connect_timeout": 1.0, "timeout": 2.0, **upstream}),
        routes=RoutesSettings(api_path="/api/v1/m"),
        proxy=ProxySettings(max_body=4096),
    )

    async def no_challenge(_token: str) -> None:
        return None

    return EdgeProxy(settings, resolve={SHOP: Site(SHOP, True)}.get, challenge=no_challenge, transport=transport,
                     observe_relay=observe)


def forward(proxy: EdgeProxy, *targets: str, headers: tuple[tuple[bytes, bytes], ...] = HEADERS,
            body: bytes = b'{"e":1}') -> list[ForwardResult]:
    """``proxy.forward`` each target in turn on one event loop, then close the proxy."""
    async def main() -> list[ForwardResult]:
        try:
            results = [await proxy.forward(ForwardRequest(t, headers, body, SHOP)) for t in targets]
            assert_direct(proxy)
            return results
        finally:
            await proxy.aclose()

    return asyncio.run(main())


def assert_direct(proxy: EdgeProxy) -> None:
    """The calls went through aiohttp directly: the httpx client was never even built."""
    assert proxy.relay._aiohttp is not None and proxy.relay._aiohttp._session is not None
    assert proxy.relay._httpx is None


# -- success ------------------------------------------------------------------------------


def test_status_allowlisted_headers_and_body_pass_through(relay: RecordingRelay) -> None:
    relay.status = 201
    relay.body = b'{"queued":3}'
    relay.headers = [("Content-Type", "application/vnd.relay+json"), ("Cache-Control", "no-store"),
                     ("Retry-After", "7"), ("Strict-Transport-Security", "max-age=1"),
                     ("Access-Control-Allow-Origin", "*"), ("X-Relay-Secret", "s")]
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect?v=2")
    assert (result.status, result.body, result.error) == (201, b'{"queued":3}', None)
    assert result.headers == ((b"content-type", b"application/vnd.relay+json"), (b"cache-control", b"no-store"),
                              (b"retry-after", b"7"))
    [seen] = relay.snapshot()
    assert (seen.method, seen.path, seen.body) == ("POST", "/ingest/collect?v=2", b'{"e":1}')
    assert proxy.stats["api_forwarded"] == 1 and proxy.stats["api_relay_error"] == 0


def test_the_relay_sees_what_the_httpx_client_sent(relay: RecordingRelay) -> None:
    """Same header fields as through httpx over aiohttp (the previous default, still what
    an injected transport gets; only their order may differ), and the target httpx sends."""
    targets = ["/collect", "", "?x=1", "/c|d{e}", "/a%7eb%2Fc%zz", "/x?q=a|b&r={1}&s=%20&t=\"'<>`^\\",
               "/%41%e2%82%ac?%41=%7e"]
    bare = ((b"content-type", b"text/plain"), (b"x-utf8", "café".encode()))  # no User-Agent
    views = []
    for transport in (relay_module._aiohttp_transport(4), None):
        relay.requests.clear()
        proxy = make_proxy(f"{relay.url}/ingest", transport=transport)

        async def main(proxy: EdgeProxy = proxy) -> None:
            try:
                for target in targets:
                    await proxy.forward(ForwardRequest(target, HEADERS, b'{"e":1}', SHOP))
                await proxy.forward(ForwardRequest("/bare", bare, b'{"e":1}', SHOP))
            finally:
                await proxy.aclose()

        asyncio.run(main())
        assert (proxy.relay._aiohttp is None) == (transport is not None)
        views.append([(r.path, sorted(r.header_list), r.body) for r in relay.snapshot()])
    old, new = views
    assert len(new) == len(targets) + 1
    # Header fields and bodies as through httpx over aiohttp ...
    assert [(h, b) for _, h, b in new] == [(h, b) for _, h, b in old]
    # ... and the target as httpx puts it on the wire (httpx.URL's raw_path), which keeps
    # a query byte for byte: yarl's requoting (the httpx-over-aiohttp path) turned a
    # query's %2F into "/", changing what an image beacon carries.
    assert [p for p, _, _ in new] == [httpx.URL(f"{relay.url}/ingest{t}").raw_path.decode()
                                      for t in [*targets, "/bare"]]
    assert new[6][0] == "/ingest/%41%e2%82%ac?%41=%7e"
    assert ("user-agent", f"python-httpx/{httpx.__version__}") in new[-1][1]
    # What the clients can decode (br: the brotli package the script's compression brings).
    assert ("accept-encoding", "gzip, deflate, br") in new[0][1]
    assert ("connection", "keep-alive") in new[0][1]


def test_no_content_type_is_added(relay: RecordingRelay) -> None:
    proxy = make_proxy(f"{relay.url}/ingest")
    forward(proxy, "/a", headers=((b"user-agent", b"ua"),), body=b"raw")
    [seen] = relay.snapshot()
    assert "content-type" not in seen.headers
    assert seen.headers["content-length"] == "3"


# -- house rule 5 -------------------------------------------------------------------------


def test_session_policy(relay: RecordingRelay) -> None:
    """No cookie jar, nothing from the environment, the configured pool and timeouts."""
    proxy = make_proxy(f"{relay.url}/ingest", pool_size=7, connect_timeout=0.7, timeout=3.5)

    async def main() -> None:
        await proxy.forward(ForwardRequest("/c", HEADERS, b"{}", SHOP))
        assert proxy.relay._aiohttp is not None
        session = proxy.relay._aiohttp._session
        assert session is not None
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert session.trust_env is False
        assert session.connector is not None and session.connector.limit == 7
        assert (session.timeout.sock_connect, session.timeout.sock_read, session.timeout.connect,
                session.timeout.total) == (0.7, 3.5, 3.5, None)
        await proxy.aclose()
        assert session.closed and proxy.relay._aiohttp._session is None

    asyncio.run(main())


def test_proxy_settings_in_the_environment_are_ignored(relay: RecordingRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (202, None)


def test_relay_cookies_are_never_kept_nor_sent(relay: RecordingRelay) -> None:
    # By name, not by IP: a real cookie jar ignores cookies from IP-address hosts.
    relay.headers = [("Set-Cookie", "relay=alice; Path=/"), ("Set-Cookie", "other=1; Path=/ingest")]
    proxy = make_proxy(f"{relay.url.replace('127.0.0.1', 'localhost')}/ingest")
    first, second = forward(proxy, "/collect", "/collect")
    assert first.status == second.status == 202
    assert all(name != b"set-cookie" for name, _ in first.headers + second.headers)
    one, two = relay.snapshot()
    assert "cookie" not in one.headers
    assert "cookie" not in two.headers  # alice's relay cookie never reaches the next visitor


def test_a_redirect_comes_back_as_is(relay: RecordingRelay) -> None:
    relay.status = 307  # a followed 307 would POST again
    relay.headers = [("Location", f"{relay.url}/elsewhere")]
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (307, None)
    assert all(name != b"location" for name, _ in result.headers)
    assert [r.path for r in relay.snapshot()] == ["/ingest/collect"]


def test_tls_is_verified(identity: tuple[Path, Path, Path]) -> None:
    """A relay whose certificate the default trust store does not know is a connect error."""
    with RecordingRelay(tls=server_context(identity)) as relay:
        proxy = make_proxy(f"{relay.url}/ingest")
        [result] = forward(proxy, "/collect")
        assert (result.status, result.error) == (502, "connect")
        assert relay.snapshot() == []


def test_distinct_beacon_targets_each_go_out_as_sent_and_the_parsed_targets_stay_bounded(
        relay: RecordingRelay) -> None:
    """Parsed targets are kept per URL string (an event route's POST target repeats); a
    flood of distinct beacon queries must neither mix them up nor grow that store."""
    targets = [f"/b?n=pv&u=https%3A%2F%2Fshop%2Fp%2F{i}&t={i}" for i in range(300)]
    targets.append(targets[7])
    proxy = make_proxy(f"{relay.url}/ingest")

    async def main() -> None:
        try:
            for target in targets:
                result = await proxy.forward(ForwardRequest(target, HEADERS, b"", SHOP, method="GET"))
                assert (result.status, result.error) == (202, None)
            assert proxy.relay._aiohttp is not None and 0 < len(proxy.relay._aiohttp._urls) <= 256
        finally:
            await proxy.aclose()

    asyncio.run(main())
    assert [(r.method, r.path) for r in relay.snapshot()] == [("GET", f"/ingest{t}") for t in targets]


# -- the answer limit and content codings -------------------------------------------------


def test_an_answer_of_exactly_1_mib_passes(relay: RecordingRelay) -> None:
    relay.body = b"a" * MIB
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, len(result.body), result.error) == (202, MIB, None)


def test_an_answer_over_1_mib_stops_reading_and_is_too_large(relay: RecordingRelay) -> None:
    """The relay sends 1 MiB + 1 byte, then stalls longer than the read timeout: a reader
    that waited for the whole body would say "timeout"."""
    relay.body = b"a" * (2 * MIB)
    relay.stall_after, relay.stall = MIB + 1, 3.0
    proxy = make_proxy(f"{relay.url}/ingest", timeout=1.0)
    started = time.monotonic()
    [result] = forward(proxy, "/collect")
    assert (result.status, result.body, result.error) == (502, b"relay unavailable\n", "too_large")
    assert time.monotonic() - started < 1.0
    assert proxy.stats["api_relay_error"] == 1


def test_a_too_large_answer_does_not_poison_the_pool(relay: RecordingRelay) -> None:
    relay.body = b"a" * (MIB + 100)
    proxy = make_proxy(f"{relay.url}/ingest", pool_size=1)

    async def main() -> list[ForwardResult]:
        try:
            first = await proxy.forward(ForwardRequest("/big", HEADERS, b"{}", SHOP))
            relay.body = None
            second = await proxy.forward(ForwardRequest("/small", HEADERS, b"{}", SHOP))
            assert_direct(proxy)
            return [first, second]
        finally:
            await proxy.aclose()

    first, second = asyncio.run(main())
    assert first.error == "too_large"
    assert (second.status, second.body, second.error) == (202, b'{"ok": true}', None)


def test_a_gzip_answer_reaches_the_browser_decoded_and_unlabelled(relay: RecordingRelay) -> None:
    relay.body = b'{"ok":"gzip"}' * 50
    relay.content_encoding = "gzip"
    proxy = make_proxy(f"{relay.url}/ingest")

    async def main() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        sent: list[dict[str, Any]] = []
        body = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return body.pop(0) if body else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "https", "path": "/api/v1/m/collect", "raw_path": b"/api/v1/m/collect",
                 "query_string": b"", "root_path": "", "client": ("198.51.100.7", 5000),
                 "server": ("127.0.0.1", 443), "extensions": {"tls": {"server_name": SHOP}},
                 "headers": [(b"host", SHOP.encode()), (b"accept-encoding", b"gzip"),
                             (b"content-type", b"application/json")]}
        try:
            await proxy.https_app(scope, receive, send)
            assert_direct(proxy)
        finally:
            await proxy.aclose()
        return sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:])

    status, headers, body = asyncio.run(main())
    assert status == 202
    assert body == b'{"ok":"gzip"}' * 50
    assert (b"content-length", str(len(body)).encode()) in headers
    assert all(name != b"content-encoding" for name, _ in headers)
    [seen] = relay.snapshot()
    assert seen.headers["accept-encoding"] == "gzip, deflate, br"  # what we can decode, not the browser's


def test_a_coding_the_client_does_not_decode_keeps_its_label(relay: RecordingRelay) -> None:
    relay.body = b'{"ok":"twice"}'
    relay.content_encoding = "gzip, gzip"  # one field, two codings: aiohttp leaves it alone
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect")
    assert result.error is None
    assert (b"content-encoding", b"gzip, gzip") in result.headers
    assert gzip.decompress(gzip.decompress(result.body)) == b'{"ok":"twice"}'


def test_a_half_decoded_answer_is_an_error(relay: RecordingRelay) -> None:
    relay.body = gzip.compress(b'{"ok":"twice"}')
    relay.content_encoding = "gzip"  # gzip(gzip(body)) in two fields: aiohttp removes one coding
    relay.headers = [("Content-Encoding", "gzip")]
    proxy = make_proxy(f"{relay.url}/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (502, "content_encoding")


# -- relay trouble --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_slow_relay_is_a_timeout_502_counted_and_logged(relay: RecordingRelay,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    relay.delay = 2.0
    observed: list[tuple[int, float, str | None]] = []
    proxy = make_proxy(f"{relay.url}/ingest", timeout=0.4,
                       observe=lambda status, seconds, error: observed.append((status, seconds, error)))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="edgeproxy.relay"):
        [result] = forward(proxy, "/collect")
    assert time.monotonic() - started < 1.5
    assert (result.status, result.headers, result.body, result.error) == (
        502, ((b"content-type", b"text/plain; charset=utf-8"),), b"relay unavailable\n", "timeout")
    assert proxy.stats["api_relay_error"] == 1 and proxy.stats["api_forwarded"] == 0
    assert [(status, error) for status, _, error in observed] == [(502, "timeout")]
    assert f"relay {relay.url}/ingest failed for host {SHOP}: timeout" in caplog.text


def test_a_refused_connection_is_a_connect_502() -> None:
    proxy = make_proxy(f"http://127.0.0.1:{free_port()}/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (502, "connect")
    assert proxy.stats["api_relay_error"] == 1


def test_a_relay_that_hangs_up_is_a_502_named_after_the_error() -> None:
    with RecordingRelay() as relay:
        relay.down = True
        proxy = make_proxy(f"{relay.url}/ingest")
        [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (502, "ServerDisconnectedError")


def test_a_relay_url_that_cannot_be_used_is_invalid_url() -> None:
    proxy = make_proxy("http://127.0.0.1:99999/ingest")
    [result] = forward(proxy, "/collect")
    assert (result.status, result.error) == (502, "invalid_url")
