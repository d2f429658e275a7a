"""The route table: script, event (GET beacons too), passthrough and asset routes.

Every upstream call goes through one recording ``httpx.MockTransport``; the spool
tests use a real spool file. The real-browser proof is ``tests/test_browser.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.config import (ProxySettings, RouteSettings, RoutesSettings, Settings, UpstreamSettings,
                              load_settings)
from edgeproxy.errors import ConfigError
from edgeproxy.edge.proxy import EdgeProxy, ForwardRequest, ForwardResult, Site
from edgeproxy.edge.relay import HttpRelay
from edgeproxy.rules.routes import route_table, site_routes
from edgeproxy.edge.spool import (RefusalLog, Replayer, ReplayFilters, Spool, SpoolingRelay, acknowledgement,
                             move_refusals, replay_failed)
from edgeproxy.storage import open_storage

from test_proxy import call

SHOP = "shop.example.test"
SITES = {SHOP: Site(SHOP, True)}
ORIGIN = "cdn.vendor.invalid"
RELAY = "relay.vendor.invalid"
CONFIG_HOST = "config.vendor.invalid"
ASSETS = "static.vendor.invalid"
SECRET = "0123456789abcdef-secret"

TABLE = (
    RouteSettings(name="script", kind="script", path="/js/app.js"),
    RouteSettings(name="addon", kind="script", path="/js/addon.js", upstream=f"https://{ORIGIN}/addon.js",
                  rewrite={"__PIXEL__": "https://{host}{pixel_path}"}),
    RouteSettings(name="api", kind="event", path="/api/v1/m"),
    RouteSettings(name="pixel", kind="event", path="/px", request_rewrite={"t=pv&": "type=pageview&"}),
    RouteSettings(name="flags", kind="passthrough", path="/flags", upstream=f"https://{CONFIG_HOST}/v1"),
    RouteSettings(name="static", kind="asset", path="/static", upstream=f"https://{ASSETS}/files", max_bytes=64),
)


class Upstream:
    """Answers for the script origin, the relay, the config service and the asset origin."""

    def __init__(self) -> None:
        self.requests: list[tuple[httpx.Request, bytes]] = []
        self.relay_status = 202
        self.relay_down = False
        self.config_mode = "ok"

    def seen(self, host: str) -> list[tuple[httpx.Request, bytes]]:
        return [(r, b) for r, b in self.requests if r.url.host == host]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append((request, body))
        host = request.url.host
        if host == ORIGIN:
            if request.url.path == "/addon.js":
                return httpx.Response(200, content=b'var px="__PIXEL__";')
            return httpx.Response(200, content=b'var api="https://relay.vendor.invalid/collect";')
        if host == RELAY:
            if self.relay_down:
                raise httpx.ConnectError("refused", request=request)
            if request.method == "GET" and request.url.path.endswith(".gif"):
                return httpx.Response(200, content=b"GIF89a-relay", headers={"content-type": "image/gif"})
            return httpx.Response(self.relay_status, content=b'{"ok":true}',
                                  headers={"content-type": "application/json", "set-cookie": "r=1"})
        if host == CONFIG_HOST:
            if self.config_mode == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            if self.config_mode == "connect":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, content=b'{"flag":true}',
                                  headers={"content-type": "application/json", "set-cookie": "c=1",
                                           "strict-transport-security": "max-age=1"})
        if host == ASSETS:
            if request.url.path.endswith("/big.bin"):
                return httpx.Response(200, content=b"x" * 100)
            if request.url.path.endswith("/logo.svg"):
                return httpx.Response(200, content=b"<svg/>", headers={
                    "content-type": "image/svg+xml", "set-cookie": "a=1",
                    "access-control-allow-origin": "*", "strict-transport-security": "max-age=1"})
            return httpx.Response(404)
        raise AssertionError(f"unexpected upstream {request.url}")


def settings(table: tuple[RouteSettings, ...] = TABLE, **proxy: Any) -> Settings:
    return Settings(
        upstream=UpstreamSettings(script=f"https://{ORIGIN}/latest.js", relay=f"https://{RELAY}/ingest",
                                  rewrite={f"https://{RELAY}": "https://{host}{api_path}"}, client="httpx"),
        routes=RoutesSettings(route=table),
        proxy=ProxySettings(**{"max_body": 1024, **proxy}),
    )


def edge(up: Upstream, conf: Settings | None = None, **kw: Any) -> EdgeProxy:
    async def no_challenge(_t: str) -> None:
        return None

    return EdgeProxy(conf or settings(), resolve=SITES.get, challenge=no_challenge,
                     transport=httpx.MockTransport(up), **kw)


def run(proxy: EdgeProxy, coro: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro
        finally:
            await proxy.aclose()

    return asyncio.run(main())


# -- configuration ------------------------------------------------------------------------


def test_route_table_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[routes.route]]\nname = "script"\nkind = "script"\npath = "/t.js"\n'
        '[[routes.route]]\nname = "beacon"\nkind = "event"\npath = "/b/"\nsamples = ["/p.gif?e=1"]\n'
        'request_rewrite = { "e=" = "event=" }\n')
    loaded = load_settings(path, env={})
    assert [(r.name, r.kind, r.path) for r in loaded.routes.route] == [
        ("script", "script", "/t.js"), ("beacon", "event", "/b/")]
    assert loaded.routes.route[1].request_rewrite == {"e=": "event="}
    assert loaded.routes.route[1].samples == ("/p.gif?e=1",)
    override = json.dumps([{"name": "script", "kind": "script", "path": "/x.js"}])
    assert load_settings(path, env={"EDGEPROXY_ROUTES_ROUTE": override}).routes.route == (
        RouteSettings(name="script", kind="script", path="/x.js"),)


@pytest.mark.parametrize("entries, message", [
    ([{"name": "s", "kind": "script", "path": "/a.js"}, {"name": "s", "kind": "event", "path": "/e"}], "twice"),
    ([{"name": "s", "kind": "script", "path": "/a.js"}, {"name": "e", "kind": "queue", "path": "/e"}], "kind"),
    ([{"name": "s", "kind": "script", "path": "/a.js"}, {"name": "a", "kind": "asset", "path": "/a"}], "upstream"),
    ([{"name": "e", "kind": "event", "path": "/e"}], "script route"),
    ([{"name": "s", "kind": "script", "path": "a.js"}], "absolute"),
    ([{"name": "s", "kind": "script", "path": "/a.js"}, {"name": "e", "kind": "event", "path": "/a.js"}], "path"),
    ([{"name": "s", "kind": "script", "path": "/a.js", "request_rewrite": {"a": "b"}}], "request_rewrite"),
    ([{"name": "S!", "kind": "script", "path": "/a.js"}], "name"),
    ([{"name": "s", "kind": "script", "path": "/a.js", "colour": "red"}], "unknown key"),
])
def test_bad_route_tables_are_refused_clearly(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env={"EDGEPROXY_ROUTES_ROUTE": json.dumps(entries)})


def test_without_a_table_the_two_routes_of_old_are_served() -> None:
    table = route_table(SHOP, RoutesSettings())
    assert sorted((r.name, r.kind, r.path) for r in table.routes) == [("api", "event", "/api/v1/m"),
                                                                       ("script", "script", "/js/app.js")]


def test_randomized_paths_keep_the_old_derivations_and_derive_new_routes_per_name() -> None:
    old = RoutesSettings(randomize=True, randomize_secret=SECRET)
    new = RoutesSettings(randomize=True, randomize_secret=SECRET, route=TABLE)
    # The values the snippets customers already pasted carry (computed with the code
    # from before the route table existed).
    before = site_routes("a.example.com", RoutesSettings(randomize=True, randomize_secret="x" * 16))
    assert (before.script_path, before.api_path) == ("/7coratuq/xzmjyvb5.js", "/23sj3onq/evbd77ts")
    shop_old, shop_new = route_table(SHOP, old), route_table(SHOP, new)
    assert shop_new.path_of("script") == shop_old.path_of("script")
    assert shop_new.path_of("api") == shop_old.path_of("api")
    paths = {r.name: r.path for r in shop_new.routes}
    assert len(set(paths.values())) == len(TABLE)
    assert paths["addon"].endswith(".js") and not paths["pixel"].endswith(".js")
    other = {r.name: r.path for r in route_table("other.example.test", new).routes}
    assert all(other[name] != paths[name] for name in paths)


# -- event routes: GET beacons ------------------------------------------------------------


def test_a_get_beacon_is_forwarded_as_a_get_with_its_raw_query() -> None:
    up = Upstream()
    proxy = edge(up)
    query = b"type=pageview&hostname=www.shop.example&path=%2Fcart%3Fa%3D1&ref=a|b"

    async def main() -> Any:
        return await call(proxy.https_app, method="GET", path="/api/v1/m/p.gif", query=query,
                          headers=[("cookie", "sid=secret"), ("user-agent", "Mozilla/5.0 test"),
                                   ("origin", "https://www.shop.example")])

    reply = run(proxy, main())
    assert (reply.status, reply.header("content-type"), reply.body) == (200, "image/gif", b"GIF89a-relay")
    [(request, body)] = up.seen(RELAY)
    assert request.method == "GET" and body == b""
    assert request.url.raw_path == b"/ingest/p.gif?" + query  # byte for byte
    assert request.headers["x-forwarded-host"] == SHOP
    assert request.headers["x-forwarded-for"] == "198.51.100.7"
    assert len(request.headers["idempotency-key"]) == 32
    assert "cookie" not in request.headers
    assert reply.header("access-control-allow-origin") == "https://www.shop.example"


def test_request_rewrites_restore_the_names_the_relay_expects() -> None:
    up = Upstream()
    proxy = edge(up)
    reply = run(proxy, call(proxy.https_app, method="GET", path="/px/i.gif", query=b"t=pv&u=%2F"))
    assert reply.status == 200
    [(request, _)] = up.seen(RELAY)
    assert request.url.raw_path == b"/ingest/i.gif?type=pageview&u=%2F"


def test_script_placeholders_name_any_routes_path_and_every_script_route_is_served() -> None:
    up = Upstream()
    proxy = edge(up)

    async def main() -> tuple[Any, Any]:
        return (await call(proxy.https_app, path="/js/app.js"), await call(proxy.https_app, path="/js/addon.js"))

    main_script, addon = run(proxy, main())
    assert main_script.body == f'var api="https://{SHOP}/api/v1/m/collect";'.encode()
    assert addon.body == f'var px="https://{SHOP}/px";'.encode()


@pytest.mark.parametrize("path, expected", [
    ("/api/v1/m/p.gif", (200, "image/gif")),
    ("/api/v1/m/e", (204, None)),
])
def test_a_spooled_get_is_acknowledged_for_what_it_is(path: str, expected: tuple[int, str | None]) -> None:
    request = ForwardRequest(path + "?a=1", (), b"", SHOP, method="GET")
    ack = acknowledgement(request)
    assert (ack.status, dict(ack.headers).get(b"content-type", b"").decode() or None) == expected
    assert dict(ack.headers)[b"cache-control"] == b"no-store"
    assert acknowledgement(ForwardRequest("/e", (), b"{}", SHOP)).status == 202


def test_relay_down_get_beacons_are_spooled_acknowledged_and_replayed_as_gets(tmp_path: Path) -> None:
    up = Upstream()
    up.relay_down = True
    conf = settings()
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    relay = HttpRelay(conf.upstream.relay, conf.upstream, transport=httpx.MockTransport(up))
    proxy = edge(up, conf, relay=relay, events=SpoolingRelay(relay, spool, None))

    async def main() -> list[Any]:
        return [await call(proxy.https_app, method="GET", path="/api/v1/m/p.gif", query=b"n=%d" % i)
                for i in range(3)] + [await call(proxy.https_app, method="GET", path="/api/v1/m/e", query=b"n=9")]

    replies = asyncio.run(main())
    assert [(r.status, r.header("content-type")) for r in replies] == [(200, "image/gif")] * 3 + [(204, None)]
    assert replies[0].body.startswith(b"GIF89a") and len(replies[0].body) == 43
    assert [(e.method, e.target) for e in spool.entries()] == [
        ("GET", "/p.gif?n=0"), ("GET", "/p.gif?n=1"), ("GET", "/p.gif?n=2"), ("GET", "/e?n=9")]
    up.relay_down = False
    up.requests.clear()
    replayer = Replayer(spool, relay, conf.spool)

    async def drain() -> Any:
        try:
            return await replayer.drain_once()
        finally:
            await proxy.aclose()

    assert asyncio.run(drain()).delivered == 4
    sent = [(r.method, r.url.raw_path) for r, _ in up.seen(RELAY)]
    assert sorted(sent) == sorted([("GET", b"/ingest/p.gif?n=%d" % i) for i in range(3)] + [("GET", b"/ingest/e?n=9")])
    assert spool.entries() == []
    spool.close()


def test_a_spool_file_from_before_get_beacons_opens_with_every_entry_a_post(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("""CREATE TABLE spool (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL, domain TEXT NOT NULL, target TEXT NOT NULL,
        headers_json TEXT NOT NULL, body BLOB NOT NULL, client TEXT,
        received_at REAL NOT NULL, size INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)""")
    conn.execute("INSERT INTO spool (idempotency_key, domain, target, headers_json, body, client, received_at, size) "
                 "VALUES ('k', 'a.example.com', '/e', '[]', x'7b7d', NULL, 1.0, 10)")
    conn.commit()
    conn.close()
    spool = Spool(str(path), max_bytes=1 << 20)
    [entry] = spool.entries()
    assert (entry.method, entry.target, entry.body) == ("POST", "/e", b"{}")
    spool.close()


# -- nothing refused silently ---------------------------------------------------------------


class Kept:
    def __init__(self) -> None:
        self.calls: list[tuple[ForwardRequest, int, str]] = []

    def __call__(self, request: ForwardRequest, status: int, reason: str) -> None:
        self.calls.append((request, status, reason))


def test_every_refusal_on_an_event_route_is_kept_with_its_reason_and_counted() -> None:
    up = Upstream()
    kept = Kept()
    proxy = edge(up, settings(max_target=200, rate_per_ip=1, rate_burst=1), record_refusal=kept)

    async def main() -> list[int]:
        statuses = []
        statuses.append((await call(proxy.https_app, method="GET", path="/api/v1/m/p.gif",
                                    query=b"x=" + b"a" * 300)).status)
        statuses.append((await call(proxy.https_app, method="POST", path="/api/v1/m/e",
                                    headers=[("content-length", "5000")], body=b"")).status)
        statuses.append((await call(proxy.https_app, method="POST", path="/api/v1/m/e", query=b"a=\x7f",
                                    body=b'{"bad":1}')).status)
        statuses.append((await call(proxy.https_app, method="POST", path="/api/v1/m/e", body=b'{"first":1}')).status)
        statuses.append((await call(proxy.https_app, method="POST", path="/api/v1/m/e", body=b'{"second":1}')).status)
        return statuses

    assert run(proxy, main()) == [414, 413, 400, 202, 429]
    assert [(status, reason) for _, status, reason in kept.calls] == [
        (414, "target_too_long"), (413, "body_too_large"), (400, "malformed_target"), (429, "rate_limited")]
    too_long, too_large, malformed, limited = (r for r, _, _ in kept.calls)
    assert too_long.body == b"" and too_long.method == "GET" and too_long.target.startswith("/p.gif?x=aaa")
    assert too_large.body == b"" and (b"content-length", b"5000") not in too_large.headers  # relay view
    assert malformed.body == b'{"bad":1}'
    assert limited.body == b'{"second":1}' and limited.target == "/e"
    assert dict(limited.headers)[b"x-forwarded-host"] == SHOP.encode()
    assert {k: v for k, v in proxy.stats.items() if k.startswith("event_refused_")} == {
        "event_refused_target_too_long": 1, "event_refused_body_too_large": 1,
        "event_refused_malformed_target": 1, "event_refused_rate_limited": 1}
    assert len(up.seen(RELAY)) == 1  # only the call that was not refused


def test_refusals_are_capped_per_domain_and_hour_and_the_rest_counted(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    now = [3600.0 * 100]
    log = RefusalLog(spool, 2, clock=lambda: now[0])
    for i in range(4):
        log.record(ForwardRequest(f"/e?{i}", (), b"x", SHOP), 429, "rate_limited")
    log.record(ForwardRequest("/e", (), b"x", "other.example.test"), 429, "rate_limited")
    now[0] += 3600  # a new hour: the cap starts again
    log.record(ForwardRequest("/e?late", (), b"x", SHOP), 429, "rate_limited")
    spool.close()  # finishes queued writes
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    kept = [(r.entry.domain, r.entry.target) for _, r in spool.take_refusals(100)]
    assert kept == [(SHOP, "/e?0"), (SHOP, "/e?1"), ("other.example.test", "/e"), (SHOP, "/e?late")]
    assert log.stats == Counter({"refusal_kept": 4, "refusal_dropped": 2})
    spool.close()


def test_refusals_move_to_the_failed_log_and_replay_by_status(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    storage = open_storage(f"sqlite://{tmp_path}/edge.db")
    log = RefusalLog(spool, 100)
    headers = ((b"content-type", b"text/plain"), (b"idempotency-key", b"k1"))
    log.record(ForwardRequest("/p.gif?t=1", headers, b"", SHOP, idempotency_key="k1", method="GET"), 429,
               "rate_limited")
    log.record(ForwardRequest("/e", headers, b"", SHOP, idempotency_key="k2"), 413, "body_too_large")
    spool.close()
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    now = datetime.now(timezone.utc)
    moved = asyncio.run(move_refusals(spool, storage, "full", lambda: now))
    assert moved == 2 and spool.take_refusals(10) == []

    class Relay:
        def __init__(self) -> None:
            self.sent: list[ForwardRequest] = []

        async def send(self, request: ForwardRequest) -> ForwardResult:
            self.sent.append(request)
            return ForwardResult(200, (), b"")

        async def aclose(self) -> None:
            return None

    relay = Relay()
    limited = asyncio.run(replay_failed(storage, relay, ReplayFilters(status=429)))
    assert (limited.selected, limited.delivered) == (1, 1)
    assert [(r.method, r.target, r.idempotency_key) for r in relay.sent] == [("GET", "/p.gif?t=1", "k1")]
    # A 413 kept no body: it is listed, never resent.
    too_large = asyncio.run(replay_failed(storage, relay, ReplayFilters(status=413)))
    assert (too_large.selected, too_large.delivered, too_large.failed) == (1, 0, 1)
    assert too_large.failures == Counter({"body not kept": 1}) and len(relay.sent) == 1
    spool.close()
    storage.close()


def test_a_crowd_behind_one_address_is_not_refused_by_default(tmp_path: Path) -> None:
    """100 events as fast as one client can, from one address, relay down: all acknowledged."""
    up = Upstream()
    up.relay_down = True
    conf = Settings(upstream=settings().upstream, routes=RoutesSettings())
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=conf.spool.max_bytes)
    relay = HttpRelay(conf.upstream.relay, conf.upstream, transport=httpx.MockTransport(up))
    proxy = edge(up, conf, relay=relay, events=SpoolingRelay(relay, spool, None))

    async def main() -> list[int]:
        return [r.status for r in await asyncio.gather(*(
            call(proxy.https_app, method="POST" if i % 2 else "GET", path="/api/v1/m/e", query=b"i=%d" % i,
                 body=b"{}") for i in range(100)))]

    assert run(proxy, main()) == [204 if i % 2 == 0 else 202 for i in range(100)]
    assert len(spool.entries(limit=200)) == 100
    spool.close()


# -- passthrough and asset routes ----------------------------------------------------------


def test_passthrough_answers_live_and_never_spools(tmp_path: Path) -> None:
    up = Upstream()
    conf = settings()
    spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
    relay = HttpRelay(conf.upstream.relay, conf.upstream, transport=httpx.MockTransport(up))
    proxy = edge(up, conf, relay=relay, events=SpoolingRelay(relay, spool, None))

    async def main() -> list[Any]:
        ok = await call(proxy.https_app, path="/flags/site.json", query=b"v=2", headers=[("cookie", "s=1")])
        up.config_mode = "timeout"
        slow = await call(proxy.https_app, path="/flags/site.json")
        up.config_mode = "connect"
        down = await call(proxy.https_app, method="POST", path="/flags/site.json", body=b"{}")
        return [ok, slow, down]

    ok, slow, down = run(proxy, main())
    assert (ok.status, ok.body, ok.header("set-cookie"), ok.header("strict-transport-security")) == (
        200, b'{"flag":true}', None, None)
    request, _ = up.seen(CONFIG_HOST)[0]
    assert request.url.raw_path == b"/v1/site.json?v=2" and "cookie" not in request.headers
    assert (slow.status, json.loads(slow.body)["error"]["code"]) == (504, "upstream_timeout")
    assert (down.status, json.loads(down.body)["error"]["code"]) == (502, "upstream_unavailable")
    assert spool.entries() == []
    spool.close()


def test_assets_are_cached_with_etags_an_allowlist_and_a_size_limit() -> None:
    up = Upstream()
    proxy = edge(up)

    async def main() -> list[Any]:
        first = await call(proxy.https_app, path="/static/logo.svg")
        again = await call(proxy.https_app, path="/static/logo.svg",
                           headers=[("if-none-match", first.header("etag") or "")])
        big = await call(proxy.https_app, path="/static/big.bin")
        missing = await call(proxy.https_app, path="/static/none.png")
        climbing = await call(proxy.https_app, path="/static/../x", raw_path=b"/static/%2e%2e/x")
        post = await call(proxy.https_app, method="POST", path="/static/logo.svg")
        return [first, again, big, missing, climbing, post]

    first, again, big, missing, climbing, post = run(proxy, main())
    assert (first.status, first.body, first.header("content-type")) == (200, b"<svg/>", "image/svg+xml")
    assert first.header("set-cookie") is None and first.header("access-control-allow-origin") is None
    assert first.header("strict-transport-security") is None
    assert again.status == 304 and again.body == b""
    assert len([r for r, _ in up.seen(ASSETS) if r.url.path.endswith("logo.svg")]) == 1  # cached
    assert (big.status, missing.status, climbing.status, post.status) == (502, 404, 404, 405)


def test_unknown_paths_and_hosts_never_reach_an_upstream() -> None:
    up = Upstream()
    proxy = edge(up)

    async def main() -> list[int]:
        return [
            (await call(proxy.https_app, path="/flagsX/a")).status,
            (await call(proxy.https_app, path="/js/app.js/x")).status,
            (await call(proxy.https_app, path="/elsewhere")).status,
            (await call(proxy.https_app, path="/flags/a", host="evil.example", sni="evil.example")).status,
        ]

    assert run(proxy, main()) == [404, 404, 404, 421]
    assert up.requests == []


# -- probes that check what the operator configured ------------------------------------------


def probe_script_step(conf: Settings, body: bytes) -> tuple[bool, str]:
    from edgeproxy.control.monitor import Prober

    prober = Prober.from_settings(conf)
    step = prober._script_step(SHOP, httpx.Response(200, content=body,
                                                     headers={"content-type": "application/javascript"}))
    return step.ok, step.detail


def test_the_script_probe_checks_every_configured_rewrite_for_this_host() -> None:
    conf = Settings(upstream=UpstreamSettings(relay=f"https://{RELAY}", rewrite={"__SELF__": "https://{host}/me"}),
                    routes=RoutesSettings())
    good = f'var a="https://{SHOP}/api/v1/m/c"; var s="https://{SHOP}/me";'.encode()
    assert probe_script_step(conf, good) == (True, "200 rewritten (2 rules)")
    left = probe_script_step(conf, f'var a="https://{RELAY}/c"; var s="https://{SHOP}/me";'.encode())
    assert not left[0] and f"'https://{RELAY}' is still in the script" in left[1]
    missing = probe_script_step(conf, f'var a="https://{SHOP}/api/v1/m/c";'.encode())
    assert not missing[0] and f"no 'https://{SHOP}/me'" in missing[1]
    # A vendor script that needs no rewrite (it never names the relay, nothing configured) passes.
    plain = Settings(upstream=UpstreamSettings(relay=f"https://{RELAY}"), routes=RoutesSettings())
    assert probe_script_step(plain, b"var x = location.host;") == (True, "200, nothing to rewrite")


def test_the_image_recipe_round_trips_its_renamed_pixel(tmp_path: Path) -> None:
    """docs/recipes.md, image pixel: the browser sees neutral names, the relay its own."""
    from test_adblock import recipe_settings

    conf = recipe_settings(tmp_path)[0]
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "scripts.vendor.example":
            return httpx.Response(200, content=b'new Image().src="https://queue.vendor.example/simple.gif?type="+t;')
        return httpx.Response(200, content=b"GIF89a", headers={"content-type": "image/gif"})

    async def no_challenge(_t: str) -> None:
        return None

    proxy = EdgeProxy(conf, resolve=SITES.get, challenge=no_challenge, transport=httpx.MockTransport(upstream))

    async def main() -> tuple[Any, Any]:
        script = await call(proxy.https_app, path="/assets/site.js")
        pixel = await call(proxy.https_app, path="/api/v1/m/media.gif", query=b"kind=pageview&hostname=h&path=%2F")
        return script, pixel

    script, pixel = run(proxy, main())
    assert script.body == f'new Image().src="https://{SHOP}/api/v1/m/media.gif?kind="+t;'.encode()
    assert pixel.status == 200
    assert (seen[-1].method, seen[-1].url.raw_path) == ("GET", b"/simple.gif?type=pageview&hostname=h&path=%2F")


def test_metrics_label_requests_by_route_name_and_count_refusals_by_reason() -> None:
    from prometheus_client import CollectorRegistry

    from edgeproxy.metrics import Metrics, StatsCounter, _route

    routes = RoutesSettings(route=TABLE)
    assert [_route(p, routes, SHOP) for p in ("/js/addon.js", "/px/i.gif", "/flags/x", "/static/a.png",
                                              "/.well-known/acme-challenge/t", "/nope")] == [
        "addon", "pixel", "flags", "static", "challenge", "other"]
    assert _route("/js/app.js", RoutesSettings(randomize=True, randomize_secret=SECRET), "caf\u00e9.test") == "other"
    registry = CollectorRegistry()
    stats = StatsCounter(Metrics(registry))
    stats["event_refused_rate_limited"] += 2
    stats["event_refused_target_too_long"] += 1
    assert registry.get_sample_value("edgeproxy_event_refusals_total", {"reason": "rate_limited"}) == 2
    assert registry.get_sample_value("edgeproxy_event_refusals_total", {"reason": "target_too_long"}) == 1


def test_the_replay_command_sends_refusals_kept_in_the_spool_file(tmp_path: Path) -> None:
    """`edgeproxy replay --status 429` finds what the edge refused (moved from the spool
    file first) and resends it with its method to a real relay."""
    import subprocess
    import sys

    from edgeproxy.devtools.upstreams import RecordingRelay

    with RecordingRelay() as relay:
        config = tmp_path / "edge.toml"
        config.write_text(f'[storage]\nurl = "sqlite://{tmp_path}/edge.db"\n'
                          f'[upstream]\nrelay = "{relay.url}/ingest"\nclient = "httpx"\n')
        spool = Spool(str(tmp_path / "spool.db"), max_bytes=1 << 20)
        log = RefusalLog(spool, 100)
        log.record(ForwardRequest("/p.gif?t=1", ((b"idempotency-key", b"k429"),), b"", SHOP,
                                  idempotency_key="k429", method="GET"), 429, "rate_limited")
        spool.close()

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "edgeproxy", "replay", "--config", str(config), *args],
                                  capture_output=True, text=True, timeout=60)

        dry = cli("--status", "429", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["selected"] == 1
        sent = cli("--status", "429", "--json")
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["delivered"] == 1
        [seen] = relay.snapshot()
        assert (seen.method, seen.path, seen.headers.get("idempotency-key")) == ("GET", "/ingest/p.gif?t=1", "k429")


def test_a_route_carries_no_cached_hash_into_another_process() -> None:
    """`serve` spawns workers with pickled settings; a str hash from this process would be wrong there."""
    import pickle

    route = TABLE[1]
    assert hash(route) == hash(route)  # computed once, then cached on the object
    copy = pickle.loads(pickle.dumps(route))
    assert copy == route and "_hash" not in vars(copy)
