"""``routes.randomize``: each domain gets its own script and API paths, in the snippet, the proxy and the script."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import httpx
import pytest
from test_adblock import PAGE, check
from test_proxy import OTHER, SHOP, SITES, Upstreams, call, make_settings

from edgeproxy.config import RoutesSettings, Settings, load_settings
from edgeproxy.control.doctor import trigger_words_in
from edgeproxy.errors import ConfigError
from edgeproxy.metrics import _route
from edgeproxy.control.monitor import Prober
from edgeproxy.edge.proxy import EdgeProxy
from edgeproxy.control.registry import html_snippet
from edgeproxy.rules.routes import SiteRoutes, site_routes

SECRET = "s3cret-for-tests-0123456789"
RANDOM = RoutesSettings(randomize=True, randomize_secret=SECRET)


def test_fixed_routes_by_default() -> None:
    assert site_routes("a.example.com", RoutesSettings()) == SiteRoutes("/js/app.js", "/api/v1/m")
    assert site_routes("a.example.com", RoutesSettings(api_path="/x/")).api_path == "/x"


def test_randomized_routes_are_per_host_stable_and_keyed() -> None:
    hosts = [f"cdn{n}.shop{n % 7}.example.com" for n in range(300)]
    routes = [site_routes(h, RANDOM) for h in hosts]
    assert routes == [site_routes(h, RoutesSettings(randomize=True, randomize_secret=SECRET)) for h in hosts]
    assert len({r.script_path for r in routes}) == len(hosts)
    assert len({r.api_path for r in routes}) == len(hosts)
    other_key = RoutesSettings(randomize=True, randomize_secret=SECRET + "x")
    assert all(site_routes(h, other_key) != r for h, r in zip(hosts, routes))
    for r in routes:
        assert re.fullmatch(r"/[a-z2-7]{8}/[a-z2-7]{8}\.js", r.script_path)
        assert re.fullmatch(r"/[a-z2-7]{8}/[a-z2-7]{8}", r.api_path)
        assert not r.script_path.startswith(r.api_prefix) and not r.api_path.startswith(r.script_path)
        assert trigger_words_in(r.script_path) == [] and trigger_words_in(r.api_path) == []


def test_randomize_needs_a_secret(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[routes]\nrandomize = true\n")
    with pytest.raises(ConfigError, match="randomize_secret"):
        load_settings(tmp_path / "c.toml", env={})
    ok = load_settings(tmp_path / "c.toml", env={"EDGEPROXY_ROUTES_RANDOMIZE_SECRET": SECRET})
    assert ok.routes == RANDOM


def test_snippet_names_the_domains_own_script_path() -> None:
    settings = Settings(routes=RANDOM)
    assert html_snippet(SHOP, settings) == (
        f'<script async src="https://{SHOP}{site_routes(SHOP, RANDOM).script_path}"></script>')


def test_proxy_serves_each_domain_on_its_own_paths() -> None:
    settings = dataclasses.replace(make_settings(), routes=RANDOM)
    up = Upstreams()

    async def no_challenge(_token: str) -> tuple[str, str] | None:
        return None

    edge = EdgeProxy(settings, resolve=SITES.get, challenge=no_challenge, transport=httpx.MockTransport(up))
    shop, other = site_routes(SHOP, RANDOM), site_routes(OTHER, RANDOM)

    async def scenario() -> None:
        try:
            script = await call(edge.https_app, path=shop.script_path)
            assert script.status == 200
            text = script.body.decode()
            # The vendor's relay URLs and the script's own URL now name this domain's paths.
            assert f'"https://{SHOP}{shop.api_path}/collect"' in text
            assert f'"https://{SHOP}{shop.script_path}"' in text
            assert "/api/v1/m" not in text
            # Another domain's paths, and the fixed defaults, are not routes on this host.
            for path in (other.script_path, "/js/app.js", settings.routes.script_path):
                assert (await call(edge.https_app, path=path)).status == 404
            assert (await call(edge.https_app, host=OTHER, sni=OTHER, path=other.script_path)).status == 200
            assert (await call(edge.https_app, method="POST", path=other.api_path, body=b"{}")).status == 404
            assert (await call(edge.https_app, method="POST", path="/api/v1/m/collect", body=b"{}")).status == 404
            assert up.relay_requests() == []
            posted = await call(edge.https_app, method="POST", path=f"{shop.api_path}/collect", body=b'{"n":1}')
            assert posted.status == 202
            (relayed,) = up.relay_requests()
            assert relayed.url.path == "/ingest/collect"  # the rest of the path, under upstream.relay
        finally:
            await edge.aclose()

    asyncio.run(scenario())


def test_randomized_urls_pass_easyprivacy() -> None:
    requests: list[tuple[str, str, str]] = []
    for n in range(40):
        host = f"cdn.customer-shop{n}.com"
        paths = site_routes(host, RANDOM)
        page = PAGE.replace("customer-shop", f"customer-shop{n}")
        requests.append((page, f"https://{host}{paths.script_path}", "script"))
        requests += [(page, f"https://{host}{paths.api_path}/collect", t) for t in ("xhr", "fetch", "ping")]
    rows = check(requests)
    assert [r for r in rows if r[0] != "ALLOWED"] == []


def test_probes_and_metrics_follow_the_domains_paths() -> None:
    """The acceptance probes ask for each domain's own paths; metrics label them script/api."""
    settings = Settings(routes=RANDOM)
    shop = site_routes(SHOP, RANDOM)
    assert Prober.from_settings(settings).paths(SHOP) == shop
    assert Prober.from_settings(Settings()).paths(SHOP) == SiteRoutes("/js/app.js", "/api/v1/m")
    assert _route(shop.script_path, RANDOM, f"{SHOP.upper()}:443") == "script"
    assert _route(f"{shop.api_path}/collect", RANDOM, SHOP) == "api"
    assert _route(shop.script_path, RANDOM, OTHER) == "other"
    assert _route("/js/app.js", RoutesSettings(), "") == "script"
