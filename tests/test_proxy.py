"""The public ASGI apps, called directly, against a recording fake origin and relay.

Every upstream call goes through one ``httpx.MockTransport`` that records it, so
"nothing reached an upstream" is an exact count, not a hope.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import string
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from edgeproxy.edge import proxy as proxy_module
from edgeproxy.edge import scripts as scripts_module
from edgeproxy.config import ProxySettings, RoutesSettings, Settings, UpstreamSettings
from edgeproxy.errors import ConfigError
from edgeproxy.edge.proxy import (
    EdgeProxy,
    ForwardRequest,
    Site,
    accepts_gzip,
    content_coding,
    etag_matches,
    forward_headers,
    forwarded_for,
    host_from_headers,
    normalize_host,
    parse_trusted_hops,
    relay_response_headers,
    tls_server_name,
)

SHOP = "shop.example.test"
OTHER = "other.example.test"
PENDING = "pending.example.test"
SITES = {SHOP: Site(SHOP, True), OTHER: Site(OTHER, True), PENDING: Site(PENDING, False)}
ORIGIN_HOST = "cdn.vendor.invalid"
RELAY_HOST = "relay.vendor.invalid"
TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
SCRIPT_V1 = (
    b'/* vendor v1 */ var a="https://relay.vendor.invalid/collect";'
    b' var b="https://relay.vendor.invalid/ingest/batch"; var self="__SELF__"; var h="{host}";'
)
SCRIPT_V2 = b'/* vendor v2 */ var a="https://relay.vendor.invalid/collect";'
TTL = 60.0


def make_settings(**proxy: Any) -> Settings:
    return Settings(
        upstream=UpstreamSettings(
            script=f"https://{ORIGIN_HOST}/latest.js",
            relay=f"https://{RELAY_HOST}/ingest/",
            rewrite={"https://relay.vendor.invalid": "https://{host}{api_path}",
                     "__SELF__": "https://{host}{script_path}"},
            script_ttl=TTL,
            connect_timeout=1.5,
            timeout=4.0,
        ),
        routes=RoutesSettings(script_path="/js/app.js", api_path="/api/v1/m"),
        proxy=ProxySettings(**{"max_body": 1024, "trusted_hops": ("10.0.0.0/8", "2001:db8::1"), **proxy}),
    )


# -- the fake upstreams -----------------------------------------------------------------


@dataclass
class Upstreams:
    """Recording MockTransport handler for the script origin and the relay."""

    script: bytes = SCRIPT_V1
    origin_mode: str = "ok"  # ok | status | connect | timeout
    origin_gate: asyncio.Event | None = None
    relay_mode: str = "ok"
    relay_status: int = 202
    relay_body: bytes = b'{"ok":true}'
    relay_headers: list[tuple[str, str]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def origin_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == ORIGIN_HOST]

    def relay_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == RELAY_HOST]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(await request.aread())
        if request.url.host == ORIGIN_HOST:
            if self.origin_gate is not None:
                await self.origin_gate.wait()
            mode = self.origin_mode
            if mode == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            if mode == "timeout":
                raise httpx.ReadTimeout("timed out", request=request)
            if mode == "status":
                return httpx.Response(500, content=b"origin broken")
            return httpx.Response(200, content=self.script, headers={
                "content-type": "application/javascript", "set-cookie": "origin=1; Path=/"})
        if self.relay_mode == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if self.relay_mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(self.relay_status, content=self.relay_body,
                              headers=[("content-type", "application/json"), *self.relay_headers])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    received: int  # how many receive() calls the app made

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == key]


App = Callable[[Any, Any, Any], Awaitable[None]]


async def call(
    app: App,
    *,
    method: str = "GET",
    path: str = "/",
    raw_path: bytes | None = None,
    query: bytes = b"",
    host: str | None = SHOP,
    sni: str | None = SHOP,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | list[bytes] = b"",
    client: tuple[str, int] | None = ("198.51.100.7", 50123),
    http_version: str = "1.1",
    tls: bool = True,
) -> Reply:
    raw_headers = [(b"host", host.encode("latin-1"))] if host is not None else []
    raw_headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version,
        "method": method, "scheme": "https" if tls else "http", "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": query, "root_path": "", "headers": raw_headers,
        "client": client, "server": ("127.0.0.1", 443 if tls else 80),
        "extensions": {"tls": {"server_name": sni}} if tls else {},
    }
    chunks = body if isinstance(body, list) else [body]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return Reply(0, [], b"", received)
    assert sent[0]["type"] == "http.response.start"
    body_out = b"".join(m.get("body", b"") for m in sent[1:])
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    assert not sent[-1].get("more_body", False)
    return Reply(sent[0]["status"], list(sent[0]["headers"]), body_out, received)


@dataclass
class Env:
    proxy: EdgeProxy
    up: Upstreams
    clock: Clock
    challenges: dict[str, tuple[str, str]]
    lookups: list[str]

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        async def main() -> None:
            try:
                await coro
            finally:
                await self.proxy.aclose()

        asyncio.run(main())


def make_env(**proxy_settings: Any) -> Env:
    up = Upstreams()
    clock = Clock()
    challenges = {TOKEN: (SHOP, KEYAUTH), "pendingtoken": (PENDING, "pendingtoken.thumb")}
    lookups: list[str] = []

    async def challenge(token: str) -> tuple[str, str] | None:
        lookups.append(token)
        return challenges.get(token)

    edge = EdgeProxy(make_settings(**proxy_settings), resolve=SITES.get, challenge=challenge,
                     transport=httpx.MockTransport(up), clock=clock)
    return Env(edge, up, clock, challenges, lookups)


@pytest.fixture
def env() -> Env:
    return make_env()


# -- the host gate (pure) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"shop.example.test", SHOP),
        (b"SHOP.Example.TEST", SHOP),
        (b"shop.example.test:443", SHOP),
        (b"shop.example.test.", SHOP),
        (b"shop.example.test.:8443", SHOP),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"shop.example.test..", None),  # only ONE trailing dot is the same name
        (b"", None),
        (b".", None),
        (b"user@shop.example.test", None),
        (b"user:pw@shop.example.test", None),
        (b"[::1]", None),
        (b"[::1]:443", None),
        (b"::1", None),
        (b"shop.example.test:", None),
        (b"shop.example.test:http", None),
        (b"shop.example.test:99999", None),
        (b"shop.example.test:443:443", None),
        (b"shop example.test", None),
        (b" shop.example.test", None),
        (b"shop.example.test/evil", None),
        (b"shop_1.example.test", None),
        (b"-shop.example.test", None),
        (b"shop..example.test", None),
        ("b\u00fccher.example".encode(), None),
        (b"a" * 64 + b".example", None),
        (b"shop.example.test\x00", None),
    ],
)
def test_normalize_host(value: bytes, expected: str | None) -> None:
    assert normalize_host(value) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"host", b"Shop.Example.Test:443")], SHOP),
        ([(b"Host", b"shop.example.test")], SHOP),
        ([], None),
        ([(b"host", b"shop.example.test"), (b"host", b"shop.example.test")], None),
        ([(b"host", b"shop.example.test"), (b"host", b"other.example.test")], None),
        ([(b":authority", b"shop.example.test:443")], SHOP),
        ([(b":authority", b"shop.example.test"), (b"host", b"shop.example.test")], SHOP),
        ([(b":authority", b"shop.example.test"), (b"host", b"other.example.test")], None),
        ([(b"host", b"")], None),  # hypercorn's HTTP/2 placeholder when :authority is missing
    ],
)
def test_host_from_headers(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert host_from_headers(headers) == expected


def test_tls_server_name() -> None:
    assert tls_server_name({"extensions": {"tls": {"server_name": SHOP}}}) == SHOP
    assert tls_server_name({"extensions": {"tls": {"server_name": None}}}) is None
    assert tls_server_name({"extensions": {"tls": {"server_name": ""}}}) is None
    assert tls_server_name({"extensions": {}}) is None
    assert tls_server_name({}) is None


# -- the XFF / header policy (pure) ------------------------------------------------------

TRUSTED = parse_trusted_hops(["10.0.0.0/8", "2001:db8::1"])


def test_forwarded_for_policy() -> None:
    assert forwarded_for([], "198.51.100.7", TRUSTED) == b"198.51.100.7"
    # An untrusted peer's own X-Forwarded-For is ignored entirely.
    assert forwarded_for([b"203.0.113.9"], "198.51.100.7", TRUSTED) == b"198.51.100.7"
    # A trusted hop's chain is kept and the hop appended (multiple field lines combine).
    assert forwarded_for([b"203.0.113.9", b" 192.0.2.1 "], "10.1.2.3", TRUSTED) == b"203.0.113.9, 192.0.2.1, 10.1.2.3"
    assert forwarded_for([b"203.0.113.9"], "2001:db8::1", TRUSTED) == b"203.0.113.9, 2001:db8::1"
    assert forwarded_for([b"203.0.113.9"], "::ffff:10.0.0.5", TRUSTED) == b"203.0.113.9, ::ffff:10.0.0.5"
    assert forwarded_for([b"203.0.113.9"], "2001:db8::2", TRUSTED) == b"2001:db8::2"
    assert forwarded_for([b"203.0.113.9"], "10.1.2.3", ()) == b"10.1.2.3"
    assert forwarded_for([b"203.0.113.9"], "not-an-ip", TRUSTED) == b"not-an-ip"
    assert forwarded_for([b"203.0.113.9"], None, TRUSTED) is None


def test_parse_trusted_hops_rejects_garbage() -> None:
    assert len(parse_trusted_hops(["127.0.0.1", "10.0.0.0/8", "::1"])) == 3
    with pytest.raises(ConfigError, match="trusted_hops"):
        parse_trusted_hops(["10.0.0.0/33"])
    with pytest.raises(ConfigError):
        EdgeProxy(make_settings(trusted_hops=("nonsense",)), resolve=SITES.get,
                  challenge=lambda t: asyncio.sleep(0, None))


def test_forward_headers_policy() -> None:
    inbound = [
        (b"host", b"shop.example.test"), (b"cookie", b"session=secret"), (b"authorization", b"Bearer x"),
        (b"proxy-authorization", b"Basic x"),
        (b"connection", b"keep-alive, X-Secret"), (b"keep-alive", b"timeout=5"), (b"x-secret", b"s"),
        (b"te", b"trailers"), (b"trailer", b"x"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"),
        (b"proxy-connection", b"keep-alive"), (b"content-length", b"2"),
        (b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-host", b"evil.example"),
        (b"x-forwarded-proto", b"http"), (b"forwarded", b"for=1.2.3.4"),
        (b"content-type", b"application/json"), (b"user-agent", b"UA/1"), (b"origin", b"https://shop.example"),
    ]
    out = forward_headers(inbound, peer="198.51.100.7", trusted=TRUSTED, host=SHOP)
    assert out == [
        (b"content-type", b"application/json"), (b"user-agent", b"UA/1"), (b"origin", b"https://shop.example"),
        (b"x-forwarded-for", b"198.51.100.7"), (b"x-forwarded-host", SHOP.encode()),
        (b"x-forwarded-proto", b"https"),
    ]


def test_relay_response_headers_allowlist() -> None:
    back = relay_response_headers([
        (b"Content-Type", b"application/json"), (b"set-cookie", b"a=1"), (b"connection", b"close, retry-after"),
        (b"retry-after", b"5"), (b"transfer-encoding", b"chunked"), (b"strict-transport-security", b"max-age=1"),
        (b"cache-control", b"no-store"), (b"keep-alive", b"timeout=5"),
    ])
    assert back == ((b"content-type", b"application/json"), (b"cache-control", b"no-store"))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], False),
        ([b"gzip"], True),
        ([b"GZIP"], True),
        ([b"br, gzip;q=0.5"], True),
        ([b"gzip;q=0"], False),
        ([b"gzip; q=0.000"], False),
        ([b"gzip;q=0.001"], True),
        ([b"*"], True),
        ([b"*;q=0"], False),
        ([b"*, gzip;q=0"], False),  # an explicit q=0 beats the wildcard
        ([b"identity"], False),
        ([b"x-gzip"], True),
        ([b"br", b"gzip"], True),  # several field lines combine
        ([b"gzip;q=2"], False),  # malformed qvalue: not acceptable
        ([b"gzip;q=abc"], False),
        ([b"deflate, br"], False),
    ],
)
def test_accepts_gzip(values: list[bytes], expected: bool) -> None:
    assert accepts_gzip(values) is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], b""),
        ([b"gzip, deflate, br"], b"br"),  # browsers: Brotli preferred on a tie
        ([b"gzip, deflate, br, zstd"], b"br"),
        ([b"br;q=0.5, gzip"], b"gzip"),  # the client's qvalues win
        ([b"br;q=0, gzip"], b"gzip"),
        ([b"br"], b"br"),
        ([b"*"], b"br"),
        ([b"*, br;q=0"], b"gzip"),
        ([b"gzip;q=0, br;q=0, *;q=0"], b""),
        ([b"x-gzip"], b"gzip"),
        ([b"identity"], b""),
        ([b"BR"], b"br"),  # content codings are case-insensitive
    ],
)
def test_content_coding(values: list[bytes], expected: bytes) -> None:
    assert content_coding(values) == expected
    assert content_coding(values, br=False) == (b"gzip" if accepts_gzip(values) else b"")


def test_script_brotli_preferred_once_compressed_with_an_etag_per_coding(env: Env) -> None:
    import brotli

    async def main() -> None:
        app = env.proxy.https_app
        plain = await call(app, path="/js/app.js")
        gz = await call(app, path="/js/app.js", headers=[("accept-encoding", "gzip")])
        # Concurrent first requests share the one compression of the variant.
        first = await asyncio.gather(*(call(app, path="/js/app.js", headers=[("accept-encoding", "gzip, deflate, br")])
                                       for _ in range(5)))
        assert {r.header("content-encoding") for r in first} == {"br"}
        br = first[0]
        assert brotli.decompress(br.body) == plain.body
        assert len(br.body) < len(gz.body)  # why we bother
        assert br.header("content-length") == str(len(br.body)) and br.header("vary") == "accept-encoding"
        tags = {plain.header("etag"), gz.header("etag"), br.header("etag")}
        assert len(tags) == 3 and None not in tags  # strong validators differ per coding (RFC 9110 8.8.3)
        assert {r.header("etag") for r in first} == {br.header("etag")}
        nm = await call(app, path="/js/app.js", headers=[("accept-encoding", "br"),
                                                        ("if-none-match", br.header("etag") or "")])
        assert nm.status == 304 and nm.header("etag") == br.header("etag")
        cross = await call(app, path="/js/app.js", headers=[("accept-encoding", "gzip"),
                                                           ("if-none-match", br.header("etag") or "")])
        assert cross.status == 200 and cross.header("content-encoding") == "gzip"
        head = await call(app, method="HEAD", path="/js/app.js", headers=[("accept-encoding", "br")])
        assert head.body == b"" and head.header("content-length") == str(len(br.body))
        assert head.header("content-encoding") == "br"

    env.run(main())


def test_etag_matches() -> None:
    assert etag_matches([b'"abc"'], b'"abc"')
    assert etag_matches([b'W/"abc"'], b'"abc"')  # If-None-Match uses the weak comparison
    assert etag_matches([b'"x", "abc"'], b'"abc"')
    assert etag_matches([b"*"], b'"abc"')
    assert not etag_matches([b'"abcd"'], b'"abc"')
    assert not etag_matches([b"abc"], b'"abc"')


# -- HTTPS gate -------------------------------------------------------------------------


def test_sni_mismatch_is_421_and_reaches_nothing(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy.proxy")

    async def main() -> None:
        cases = [
            dict(host=SHOP, sni=OTHER, path="/js/app.js"),  # registered Host, another registered SNI
            dict(host=OTHER, sni=SHOP, method="POST", path="/api/v1/m/collect", body=b"{}"),
            dict(host=SHOP, sni=None, path="/js/app.js"),  # no SNI at all
            dict(host=SHOP, sni=None, path="/js/app.js", tls=False),
            dict(host="nobody.example.test", sni="nobody.example.test", path="/js/app.js"),
            dict(host=PENDING, sni=PENDING, path="/js/app.js"),  # registered, no certificate yet
            dict(host=None, sni=SHOP, path="/js/app.js"),
            dict(host="SHOP.example.test.", sni="shop.example.test.", path="/js/app.js"),
        ]
        for case in cases:
            reply = await call(env.proxy.https_app, **case)  # type: ignore[arg-type]
            assert reply.status == 421, case
            assert reply.body == b"misdirected request\n"
        assert env.up.requests == []
        assert env.proxy.stats["https_misdirected"] == len(cases)

    env.run(main())
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused https_misdirected")]
    assert len(refusals) == 8
    assert f"host='{SHOP}'" in refusals[0].getMessage() and f"sni='{OTHER}'" in refusals[0].getMessage()
    assert "client=198.51.100.7" in refusals[0].getMessage() and "path='/js/app.js'" in refusals[0].getMessage()


def test_host_equal_to_sni_is_served_with_port_and_case(env: Env) -> None:
    async def main() -> None:
        reply = await call(env.proxy.https_app, host="Shop.Example.Test:443", sni=SHOP, path="/js/app.js")
        assert reply.status == 200
        h2 = await call(env.proxy.https_app, host=SHOP, sni=SHOP, path="/js/app.js", http_version="2")
        assert h2.status == 200

    env.run(main())


def test_unknown_path_is_404_and_reaches_nothing(env: Env) -> None:
    async def main() -> None:
        for method, path in [("GET", "/"), ("GET", "/js/app.js.map"), ("POST", "/api/v1/mxyz"),
                             ("POST", "/api/v1"), ("GET", "/.well-known/acme-challenge/" + TOKEN)]:
            reply = await call(env.proxy.https_app, method=method, path=path, body=b"{}")
            assert reply.status == 404, path
            assert reply.body == b"not found\n"
        assert env.up.requests == []
        assert env.lookups == []

    env.run(main())


def test_websocket_is_closed(env: Env) -> None:
    async def main() -> None:
        for app in (env.proxy.http_app, env.proxy.https_app):
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "websocket.connect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "websocket", "path": "/", "headers": [(b"host", SHOP.encode())],
                     "extensions": {"tls": {"server_name": SHOP}}}
            await app(scope, receive, send)
            assert [m["type"] for m in sent] == ["websocket.close"]
        assert env.up.requests == []

    env.run(main())


def test_lifespan_starts_and_stops_both_apps(env: Env) -> None:
    async def lifespan(app: App, kind: str) -> list[str]:
        events = [{"type": f"lifespan.{kind}"}]
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            if events:
                return events.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        task = asyncio.create_task(app({"type": "lifespan"}, receive, send))
        for _ in range(50):
            await asyncio.sleep(0)
            if sent:
                break
        if kind == "shutdown":
            await task
        else:
            task.cancel()
        return sent

    async def main() -> None:
        assert await lifespan(env.proxy.http_app, "startup") == ["lifespan.startup.complete"]
        assert await lifespan(env.proxy.https_app, "startup") == ["lifespan.startup.complete"]
        assert len(env.up.origin_requests()) == 1  # startup prefetches the script, once
        script = await call(env.proxy.https_app, path="/js/app.js")
        assert script.status == 200
        assert len(env.up.origin_requests()) == 1  # ... and the first request is served from it
        assert await lifespan(env.proxy.http_app, "shutdown") == ["lifespan.shutdown.complete"]
        assert env.proxy._client is not None  # the other app still runs
        assert await lifespan(env.proxy.https_app, "shutdown") == ["lifespan.shutdown.complete"]
        assert env.proxy._client is None

    env.run(main())


# -- port 80 ------------------------------------------------------------------------------


def test_unknown_host_on_port_80_is_404_logged_and_never_forwarded(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeproxy.proxy")

    async def main() -> None:
        for host in ["user@shop.example.test", "[::1]", ""]:  # malformed: no lookup at all
            reply = await call(env.proxy.http_app, host=host, path="/.well-known/acme-challenge/" + TOKEN, tls=False)
            assert reply.status == 404
        assert env.lookups == []
        # A well-formed unknown name may ask for a token, but SHOP's token names SHOP.
        reply = await call(env.proxy.http_app, host="nobody.example.test", path="/.well-known/acme-challenge/" + TOKEN, tls=False)
        assert reply.status == 404
        assert env.lookups == [TOKEN]
        for path in ["/", "/js/app.js"]:
            reply = await call(env.proxy.http_app, host="nobody.example.test", path=path, tls=False)
            assert reply.status == 404
        reply = await call(env.proxy.http_app, host=None, path="/", tls=False)
        assert reply.status == 404
        assert env.up.requests == []
        assert env.proxy.stats["http_unknown_host"] == 6

    env.run(main())
    lines = [r.getMessage() for r in caplog.records if "refused http_unknown_host" in r.getMessage()]
    assert len(lines) == 6
    assert "host='user@shop.example.test'" in lines[0] and "sni=None" in lines[0]


def test_challenge_answered_before_the_host_map_catches_up(env: Env) -> None:
    """A registration made a moment ago: the CA's check may arrive before this
    worker's host map knows the name. The token itself names the host."""
    env.challenges["freshtoken"] = ("fresh.example.test", "freshtoken.thumb")

    async def main() -> None:
        reply = await call(env.proxy.http_app, host="fresh.example.test", path="/.well-known/acme-challenge/freshtoken", tls=False)
        assert (reply.status, reply.body) == (200, b"freshtoken.thumb")
        other = await call(env.proxy.http_app, host="fresh.example.test", path="/js/app.js", tls=False)
        assert other.status == 404  # still unknown for everything else
        assert env.up.requests == []

    env.run(main())


def test_challenge_answers(env: Env) -> None:
    async def main() -> None:
        prefix = "/.well-known/acme-challenge/"
        ok = await call(env.proxy.http_app, host=SHOP, path=prefix + TOKEN, tls=False)
        assert ok.status == 200
        assert ok.body == KEYAUTH.encode()
        assert ok.header("content-type") == "text/plain"
        # A registered host without a certificate yet answers its own tokens (that is how it gets one).
        pending = await call(env.proxy.http_app, host=f"{PENDING}:80", path=prefix + "pendingtoken", tls=False)
        assert (pending.status, pending.body) == (200, b"pendingtoken.thumb")
        # Another registered host must not answer SHOP's token.
        wrong = await call(env.proxy.http_app, host=OTHER, path=prefix + TOKEN, tls=False)
        assert wrong.status == 404
        unknown_token = await call(env.proxy.http_app, host=SHOP, path=prefix + "nosuchtoken", tls=False)
        assert unknown_token.status == 404
        assert env.lookups == [TOKEN, "pendingtoken", TOKEN, "nosuchtoken"]
        # Token syntax is base64url: anything else is refused before the lookup.
        for bad in ["", "a.b", "a/b", "..", "a%2Fb", "tok en", "a+b=", "x" * 300, "\u00e9t\u00e9"]:
            reply = await call(env.proxy.http_app, host=SHOP, path=prefix + bad, tls=False)
            assert reply.status == 404, bad
        assert env.lookups == [TOKEN, "pendingtoken", TOKEN, "nosuchtoken"]
        assert env.up.requests == []

    env.run(main())


def test_challenge_lookup_failure_is_503(env: Env) -> None:
    async def broken(token: str) -> tuple[str, str] | None:
        raise RuntimeError("database is locked")

    edge = EdgeProxy(make_settings(), resolve=SITES.get, challenge=broken, transport=httpx.MockTransport(env.up))

    async def main() -> None:
        reply = await call(edge.http_app, host=SHOP, path="/.well-known/acme-challenge/" + TOKEN, tls=False)
        assert reply.status == 503
        await edge.aclose()

    env.run(main())


def test_port_80_redirects_active_hosts_only(env: Env) -> None:
    async def main() -> None:
        reply = await call(env.proxy.http_app, host=f"{SHOP}:80", path="/js/app.js", query=b"x=1&y=%20",
                           tls=False)
        assert reply.status == 308
        assert reply.header("location") == f"https://{SHOP}/js/app.js?x=1&y=%20"
        encoded = await call(env.proxy.http_app, host=SHOP, path="/a b", raw_path=b"/a%20b", tls=False)
        assert encoded.header("location") == f"https://{SHOP}/a%20b"
        post = await call(env.proxy.http_app, method="POST", host=SHOP, path="/api/v1/m", tls=False)
        assert post.status == 308
        pending = await call(env.proxy.http_app, host=PENDING, path="/js/app.js", tls=False)
        assert pending.status == 404
        unknown = await call(env.proxy.http_app, host="nobody.example.test", path="/js/app.js", tls=False)
        assert unknown.status == 404
        absolute = await call(env.proxy.http_app, host=SHOP, path="http://evil.example/",
                              raw_path=b"http://evil.example/", tls=False)
        assert absolute.status == 404
        assert env.up.requests == []

    env.run(main())


# -- the script ---------------------------------------------------------------------------


def test_script_is_rewritten_per_host(env: Env) -> None:
    async def main() -> None:
        shop = await call(env.proxy.https_app, path="/js/app.js")
        other = await call(env.proxy.https_app, host=OTHER, sni=OTHER, path="/js/app.js")
        assert shop.status == other.status == 200
        text = shop.body.decode()
        assert 'var a="https://shop.example.test/api/v1/m/collect"' in text
        # The relay URL itself (longest match first) maps to the api path; one pass, no chaining.
        assert 'var b="https://shop.example.test/api/v1/m/batch"' in text
        assert 'var self="https://shop.example.test/js/app.js"' in text
        assert 'var h="{host}"' in text  # placeholders live in rule values, never in the script
        assert "relay.vendor.invalid" not in text
        assert "shop.example.test" not in other.body.decode()
        assert f"https://{OTHER}/api/v1/m/collect" in other.body.decode()
        assert shop.header("content-type") == "application/javascript; charset=utf-8"
        assert shop.header("cache-control") == "public, max-age=60"
        assert shop.header("vary") == "accept-encoding"
        assert shop.header("x-content-type-options") == "nosniff"
        assert shop.header("content-length") == str(len(shop.body))
        assert shop.header("etag") != other.header("etag")
        assert len(env.up.origin_requests()) == 1  # one origin copy serves every host

    env.run(main())


def test_script_etag_304_head_and_gzip(env: Env) -> None:
    async def main() -> None:
        plain = await call(env.proxy.https_app, path="/js/app.js")
        etag = plain.header("etag")
        assert etag is not None and etag.startswith('"') and etag.endswith('"')
        again = await call(env.proxy.https_app, path="/js/app.js")
        assert again.header("etag") == etag and again.body == plain.body

        gz = await call(env.proxy.https_app, path="/js/app.js", headers=[("accept-encoding", "gzip, deflate")])
        assert gz.header("content-encoding") == "gzip"
        assert gzip.decompress(gz.body) == plain.body
        assert gz.header("etag") not in (None, etag)  # a strong validator per content coding
        refused = await call(env.proxy.https_app, path="/js/app.js",
                             headers=[("accept-encoding", "gzip;q=0, br;q=0, deflate")])
        assert refused.header("content-encoding") is None and refused.body == plain.body

        for inm in [etag, f"W/{etag}", f'"nope", {etag}', "*"]:
            nm = await call(env.proxy.https_app, path="/js/app.js", headers=[("if-none-match", inm)])
            assert nm.status == 304, inm
            assert nm.body == b""
            assert nm.header("etag") == etag and nm.header("cache-control") == "public, max-age=60"
            assert nm.header("content-length") is None
        nm_gz = await call(env.proxy.https_app, path="/js/app.js",
                           headers=[("if-none-match", gz.header("etag") or ""), ("accept-encoding", "gzip")])
        assert nm_gz.status == 304
        cross = await call(env.proxy.https_app, path="/js/app.js",
                           headers=[("if-none-match", etag), ("accept-encoding", "gzip")])
        assert cross.status == 200  # the identity tag does not validate the gzip representation
        stale = await call(env.proxy.https_app, path="/js/app.js", headers=[("if-none-match", '"old"')])
        assert stale.status == 200

        head = await call(env.proxy.https_app, method="HEAD", path="/js/app.js")
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") == str(len(plain.body)) and head.header("etag") == etag
        post = await call(env.proxy.https_app, method="POST", path="/js/app.js")
        assert post.status == 405 and post.header("allow") == "GET, HEAD"
        assert len(env.up.origin_requests()) == 1

    env.run(main())


@pytest.mark.parametrize("mode", ["status", "connect", "timeout"])
def test_script_origin_failure_serves_last_good_copy(mode: str, env: Env, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        first = await call(env.proxy.https_app, path="/js/app.js")
        assert first.status == 200
        env.up.origin_mode = mode
        env.clock.now += TTL + 1
        stale = await call(env.proxy.https_app, path="/js/app.js")
        assert (stale.status, stale.body) == (200, first.body)
        assert await env.proxy.refresh_script() is False
        after = await call(env.proxy.https_app, path="/js/app.js")
        assert (after.status, after.body) == (200, first.body)
        assert len(env.up.origin_requests()) == 2  # no hammering right after a failure
        assert env.proxy.stats["script_origin_error"] == 1

    env.run(main())
    assert any("serving the last good copy" in r.getMessage() for r in caplog.records)


def test_script_without_any_copy_is_502_then_recovers(env: Env) -> None:
    env.up.origin_mode = "status"

    async def main() -> None:
        reply = await call(env.proxy.https_app, path="/js/app.js")
        assert reply.status == 502
        again = await call(env.proxy.https_app, path="/js/app.js")
        assert again.status == 502
        assert len(env.up.origin_requests()) == 1  # retried after a short pause, not per request
        env.up.origin_mode = "ok"
        env.clock.now += 1.5
        ok = await call(env.proxy.https_app, path="/js/app.js")
        assert ok.status == 200 and b"shop.example.test" in ok.body
        assert len(env.up.origin_requests()) == 2

    env.run(main())


def test_script_fetch_is_single_flight(env: Env) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        env.up.origin_gate = gate
        hosts = [SHOP, OTHER] * 10
        tasks = [asyncio.create_task(call(env.proxy.https_app, host=h, sni=h, path="/js/app.js")) for h in hosts]
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(env.up.origin_requests()) == 1  # everyone waits on the same fetch
        gate.set()
        replies = await asyncio.gather(*tasks)
        assert [r.status for r in replies] == [200] * 20
        assert len(env.up.origin_requests()) == 1
        assert len({r.body for r in replies}) == 2  # one variant per host

    env.run(main())


def test_script_ttl_refresh_with_injected_clock(env: Env) -> None:
    async def main() -> None:
        v1 = await call(env.proxy.https_app, path="/js/app.js")
        env.up.script = SCRIPT_V2
        env.clock.now += TTL - 1
        fresh = await call(env.proxy.https_app, path="/js/app.js")
        assert fresh.body == v1.body
        assert len(env.up.origin_requests()) == 1
        env.clock.now += 2  # past the TTL
        stale = await call(env.proxy.https_app, path="/js/app.js")
        assert stale.body == v1.body  # served at once from memory while one refresh runs
        assert await env.proxy.refresh_script() is True  # joins the refresh the request started
        assert len(env.up.origin_requests()) == 2
        v2 = await call(env.proxy.https_app, path="/js/app.js")
        assert b"vendor v2" in v2.body and b"https://shop.example.test/api/v1/m/collect" in v2.body
        assert v2.header("etag") != v1.header("etag")
        old = await call(env.proxy.https_app, path="/js/app.js", headers=[("if-none-match", v1.header("etag") or "")])
        assert old.status == 200

    env.run(main())


def test_script_variants_are_bounded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts_module, "_SCRIPT_CACHE_SIZE", 3)
    names = [f"s{i}.example.test" for i in range(6)]
    edge = EdgeProxy(make_settings(), resolve=lambda h: Site(h, True) if h in names else None,
                     challenge=lambda t: asyncio.sleep(0, None), transport=httpx.MockTransport(env.up))

    async def main() -> None:
        for name in names:
            reply = await call(edge.https_app, host=name, sni=name, path="/js/app.js")
            assert f"https://{name}/api/v1/m/collect".encode() in reply.body
        assert list(edge._scripts["script"].variants) == names[-3:]
        assert len(env.up.origin_requests()) == 1
        await edge.aclose()

    env.run(main())


# -- the API forward ----------------------------------------------------------------------


def test_forward_headers_body_and_path(env: Env) -> None:
    env.up.relay_headers = [("set-cookie", "relay=1; Path=/"), ("connection", "close"),
                            ("keep-alive", "timeout=5"), ("x-vendor-debug", "1"), ("retry-after", "3")]

    async def main() -> None:
        reply = await call(
            env.proxy.https_app, method="POST", path="/api/v1/m/collect", query=b"v=1&k=a|b",
            body=b'{"type":"pageview"}',
            headers=[("content-type", "application/json"), ("cookie", "session=secret"),
                     ("authorization", "Bearer token"), ("x-forwarded-for", "203.0.113.9"),
                     ("connection", "x-hop"), ("x-hop", "1"), ("te", "trailers"), ("upgrade", "h2c"),
                     ("proxy-connection", "keep-alive"), ("keep-alive", "300"), ("trailer", "x"),
                     ("origin", "https://www.shop.example"), ("content-length", "19")],
        )
        assert reply.status == 202
        assert reply.body == b'{"ok":true}'
        assert reply.header("content-type") == "application/json"
        assert reply.header("retry-after") == "3"
        for name in ("set-cookie", "connection", "keep-alive", "x-vendor-debug"):
            assert reply.header(name) is None, name
        assert reply.header("access-control-allow-origin") == "https://www.shop.example"
        [sent] = env.up.relay_requests()
        assert str(sent.url) == "https://relay.vendor.invalid/ingest/collect?v=1&k=a|b"
        assert sent.method == "POST"
        assert env.up.bodies[-1] == b'{"type":"pageview"}'
        assert sent.headers["x-forwarded-for"] == "198.51.100.7"
        assert sent.headers["x-forwarded-host"] == SHOP
        assert sent.headers["x-forwarded-proto"] == "https"
        assert sent.headers["host"] == RELAY_HOST
        assert sent.headers["content-type"] == "application/json"
        for name in ("cookie", "authorization", "x-hop", "te", "upgrade", "proxy-connection", "trailer"):
            assert name not in sent.headers, name
        assert sent.headers.get("keep-alive") is None

    env.run(main())


def test_forward_trusted_hop_appends_to_inbound_xff(env: Env) -> None:
    async def main() -> None:
        await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}", client=("10.9.8.7", 1),
                   headers=[("x-forwarded-for", "203.0.113.9")])
        await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}", client=("11.9.8.7", 1),
                   headers=[("x-forwarded-for", "203.0.113.9")])
        trusted, untrusted = env.up.relay_requests()
        assert trusted.headers["x-forwarded-for"] == "203.0.113.9, 10.9.8.7"
        assert untrusted.headers["x-forwarded-for"] == "11.9.8.7"
        assert str(trusted.url) == "https://relay.vendor.invalid/ingest"  # the api path itself

    env.run(main())


def test_api_paths_that_must_not_forward(env: Env) -> None:
    async def main() -> None:
        cases: list[tuple[str, bytes | None, int]] = [
            ("/api/v1/mxyz", None, 404),
            ("/api/v1/m/../../admin", None, 404),
            ("/api/v1/m/%2e%2e/admin", b"/api/v1/m/%2e%2e/admin", 404),
            ("/api/v1/m/../x", b"/api/v1/m%2F..%2Fx", 404),
            ("/api/v1/m/collect", b"/api/v1/%6D/collect", 404),
            ("/api/v1/m/a#b", b"/api/v1/m/a#b", 400),
        ]
        for path, raw, status in cases:
            reply = await call(env.proxy.https_app, method="POST", path=path, raw_path=raw, body=b"{}")
            assert reply.status == status, path
        put = await call(env.proxy.https_app, method="PUT", path="/api/v1/m/collect")
        assert put.status == 405 and put.header("allow") == "GET, HEAD, POST, OPTIONS"
        head = await call(env.proxy.https_app, method="HEAD", path="/api/v1/m/p.gif")
        assert head.status == 204  # answered locally: nothing to forward
        assert env.up.requests == []

    env.run(main())


def test_cors_preflight_is_answered_locally(env: Env) -> None:
    async def main() -> None:
        reply = await call(env.proxy.https_app, method="OPTIONS", path="/api/v1/m/collect",
                           headers=[("origin", "https://www.shop.example"),
                                    ("access-control-request-method", "POST")])
        assert reply.status == 204
        assert reply.header("access-control-allow-origin") == "https://www.shop.example"
        assert reply.header("access-control-allow-methods") == "GET, POST"
        assert reply.header("access-control-allow-headers") == "Content-Type"
        assert reply.header("access-control-allow-credentials") is None
        assert env.up.requests == []

    env.run(main())


def test_body_over_max_body_is_413_and_not_forwarded(env: Env) -> None:
    async def main() -> None:
        declared = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"x" * 2000,
                              headers=[("content-length", "2000")])
        assert declared.status == 413
        assert declared.received == 0  # refused on Content-Length, before reading a byte
        chunked = await call(env.proxy.https_app, method="POST", path="/api/v1/m/c",
                             body=[b"x" * 500, b"x" * 500, b"x" * 500, b"x" * 500],
                             headers=[("transfer-encoding", "chunked")])
        assert chunked.status == 413
        assert chunked.received == 4  # the small rest is drained so an HTTP/1.1 client sees the 413
        huge = await call(env.proxy.https_app, method="POST", path="/api/v1/m/c", body=[b"z" * 65536] * 200)
        assert huge.status == 413
        assert huge.received <= 6  # ... but draining is bounded (256 KiB), not the whole 12.5 MiB
        lying = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=[b"x" * 1000, b"x" * 100],
                           headers=[("content-length", "10")])
        assert lying.status == 413
        bad = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                         headers=[("content-length", "2"), ("content-length", "2")])
        assert bad.status == 400
        assert env.up.requests == []
        exact = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=[b"y" * 1000, b"y" * 24])
        assert exact.status == 202
        assert env.up.bodies == [b"y" * 1024]

    env.run(main())


def test_client_gone_mid_body_forwards_nothing(env: Env) -> None:
    async def main() -> None:
        sent: list[Any] = []
        messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/v1/m", "raw_path": b"/api/v1/m",
                 "query_string": b"", "headers": [(b"host", SHOP.encode())], "client": ("198.51.100.7", 1),
                 "extensions": {"tls": {"server_name": SHOP}}}
        await env.proxy.https_app(scope, receive, send)
        assert sent == []
        assert env.up.requests == []

    env.run(main())


def test_relay_status_and_body_pass_through(env: Env) -> None:
    env.up.relay_status = 400
    env.up.relay_body = b'{"error":"bad event"}'

    async def main() -> None:
        reply = await call(env.proxy.https_app, method="POST", path="/api/v1/m/collect", body=b"{}")
        assert (reply.status, reply.body) == (400, b'{"error":"bad event"}')
        assert reply.header("content-type") == "application/json"

    env.run(main())


def test_relay_redirect_is_not_followed(env: Env) -> None:
    env.up.relay_status = 307
    env.up.relay_headers = [("location", "https://elsewhere.invalid/")]

    async def main() -> None:
        reply = await call(env.proxy.https_app, method="POST", path="/api/v1/m/collect", body=b"{}")
        assert reply.status == 307
        assert reply.header("location") is None
        assert len(env.up.requests) == 1

    env.run(main())


@pytest.mark.parametrize(("mode", "error"), [("connect", "connect"), ("timeout", "timeout")])
def test_relay_down_is_502(mode: str, error: str, env: Env) -> None:
    env.up.relay_mode = mode

    async def main() -> None:
        reply = await call(env.proxy.https_app, method="POST", path="/api/v1/m/collect", body=b"{}")
        assert reply.status == 502
        assert reply.body == b"relay unavailable\n"
        result = await env.proxy.forward(ForwardRequest("/collect", ((b"content-type", b"text/plain"),), b"x", SHOP))
        assert (result.status, result.error) == (502, error)
        assert env.proxy.stats["api_relay_error"] == 2

    env.run(main())


def test_forward_seam_returns_relay_answer(env: Env) -> None:
    async def main() -> None:
        result = await env.proxy.forward(ForwardRequest("/collect?x=1", ((b"x-forwarded-host", SHOP.encode()),),
                                                        b"payload", SHOP))
        assert (result.status, result.body, result.error) == (202, b'{"ok":true}', None)
        assert result.headers == ((b"content-type", b"application/json"),)
        [sent] = env.up.relay_requests()
        assert str(sent.url) == "https://relay.vendor.invalid/ingest/collect?x=1"

    env.run(main())


def test_client_configuration_and_no_cookie_persistence(env: Env) -> None:
    env.up.relay_headers = [("set-cookie", "relay=alice; Path=/; Domain=relay.vendor.invalid")]

    async def main() -> None:
        client = env.proxy._http()
        assert client.trust_env is False
        assert client.follow_redirects is False
        assert client.timeout.connect == 1.5 and client.timeout.read == 4.0
        await call(env.proxy.https_app, path="/js/app.js")  # the origin sets a cookie too
        await call(env.proxy.https_app, method="POST", path="/api/v1/m/collect", body=b"{}",
                   headers=[("cookie", "session=alice")])
        await call(env.proxy.https_app, host=OTHER, sni=OTHER, method="POST", path="/api/v1/m/collect",
                   body=b"{}")
        first, second = env.up.relay_requests()
        assert "cookie" not in first.headers
        assert "cookie" not in second.headers  # alice's relay cookie never reaches the next user
        assert len(client.cookies.jar) == 0
        client.cookies.extract_cookies(httpx.Response(200, headers={"set-cookie": "a=1"},
                                                      request=httpx.Request("GET", "https://relay.vendor.invalid/")))
        assert len(client.cookies.jar) == 0

    env.run(main())


# -- the outage invariant ------------------------------------------------------------------


def _random_name(rng: random.Random) -> str:
    """A Host/SNI that is not an active registered site (registered-but-pending is allowed)."""
    while True:
        name = _candidate(rng)
        if normalize_host(name.encode("latin-1")) not in (SHOP, OTHER):
            return name


def _candidate(rng: random.Random) -> str:
    label = "".join(rng.choices(string.ascii_lowercase + string.digits + "-_.", k=rng.randint(0, 20)))
    return rng.choice([
        f"{label}.example.test", label, f"{SHOP}.{label}", f"{label}.{SHOP}", f"{SHOP}:{label}",
        f"{label}@{SHOP}", f"[{label}]", f"{SHOP}..", "", " " + SHOP, f"{label}.{ORIGIN_HOST}", RELAY_HOST,
        "127.0.0.1", f"{PENDING}", f"{SHOP}\t",
    ])


def test_fuzz_unknown_hosts_and_sni_never_reach_an_upstream(env: Env) -> None:
    rng = random.Random(20261123)

    async def main() -> None:
        statuses: list[int] = []
        for i in range(1000):
            name = _random_name(rng)
            path = rng.choice(["/api/v1/m", "/api/v1/m/collect", "/js/app.js", "/",
                               "/.well-known/acme-challenge/" + TOKEN])
            method = "POST" if path.startswith("/api") else "GET"
            kind = i % 4
            if kind == 0:  # unknown SNI and Host
                reply = await call(env.proxy.https_app, method=method, path=path, host=name, sni=name, body=b"{}")
            elif kind == 1:  # a registered SNI, Host names someone else
                reply = await call(env.proxy.https_app, method=method, path=path, host=name, sni=SHOP, body=b"{}")
            elif kind == 2:  # unknown SNI carrying a registered Host
                reply = await call(env.proxy.https_app, method=method, path=path, host=SHOP,
                                   sni=name or None, body=b"{}")
            else:  # port 80
                reply = await call(env.proxy.http_app, method=method, path=path, host=name, tls=False, body=b"{}")
            statuses.append(reply.status)
        assert env.up.requests == []
        assert set(statuses) <= {421, 404}, sorted(set(statuses))
        assert statuses.count(421) == 750
        # Port 80 looks tokens up by token; none of these random names owns one.
        assert all(token == TOKEN for token in env.lookups)

    env.run(main())
