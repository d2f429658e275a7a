"""Ad-blocker resistance: the URLs the edge produces pass the real EasyPrivacy list.

The URLs are not written out here: the script URL comes from the snippet the
admin API returns for a sample domain, the API URLs from the vendor script as
the proxy rewrites it for that domain, and the CNAME target from the DNS record
the admin API tells the customer to publish. Every one of them goes through
``../shared/tools/adblock-check`` (Brave's adblock-rust engine, the ``adblock``
package from the test extras) with the list in ``../shared/filterlists/easyprivacy``.
A missing ``../shared`` fails the test: it is how CI clones the repository.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.control.admin import create_admin_app
from edgeproxy.control.tokens import TokenStore
from edgeproxy.config import AdminSettings, Settings, StorageSettings, UpstreamSettings
from edgeproxy.edge.proxy import EdgeProxy, Site
from edgeproxy.control.registry import Registry
from edgeproxy.storage import open_storage

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
CHECKER = SHARED / "tools" / "adblock-check"
LISTS = SHARED / "filterlists" / "easyprivacy"
RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"

PAGE = "https://www.customer-shop.com/"
HOST = "cdn.customer-shop.com"  # same registrable domain as the page: first party
TOKEN = "t" * 32

# A vendor tracker shaped like the ones the probes block at their own hostnames:
# a pageview POST, an events batch and a beacon, all to the vendor's relay.
VENDOR_SCRIPT = b"""/* vendor tracker */
(function () {
  var pv = "https://relay.vendor.invalid/collect";
  var ev = "https://relay.vendor.invalid/events";
  var body = JSON.stringify({ u: location.href });
  navigator.sendBeacon ? navigator.sendBeacon(pv, body) : fetch(pv, { method: "POST", body: body });
  fetch(ev, { method: "POST", body: body, keepalive: true });
})();
"""


def check(requests: list[tuple[str, str, str]]) -> list[tuple[str, str, str, str]]:
    """Run the shared checker; (verdict, type, url, note) per request, in order."""
    if not CHECKER.is_file() or not LISTS.is_dir():
        pytest.fail(f"{CHECKER} and {LISTS} are required (CI clones the repository with ../shared beside it)",
                    pytrace=False)
    stdin = "".join(f"{page} {url} {rtype}\n" for page, url, rtype in requests)
    run = subprocess.run([sys.executable, str(CHECKER), "--lists", str(LISTS)], input=stdin,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode in (0, 1), f"adblock-check failed to run: {run.stderr}"
    rows = []
    for line in run.stdout.splitlines():
        verdict, rtype, url, _page, *note = line.split("\t")
        rows.append((verdict, rtype, url, note[0] if note else ""))
    assert len(rows) == len(requests), run.stdout
    assert (run.returncode == 1) == any(r[0] == "BLOCKED" for r in rows)
    return rows


def edge_settings(tmp_path: Path) -> Settings:
    """The built-in defaults, but for where state lives: what an operator gets out of the box."""
    return Settings(
        storage=StorageSettings(url=f"sqlite://{tmp_path / 'edge.db'}"),
        admin=AdminSettings(token_file=str(tmp_path / "token"), tokens_file=str(tmp_path / "tokens.json")),
        upstream=UpstreamSettings(),  # relay https://relay.vendor.invalid: always rewritten to the edge
    )


def registered_view(settings: Settings) -> dict[str, Any]:
    """What POST /v1/domains answers for the sample domain."""
    Path(settings.admin.token_file).write_text(TOKEN)
    app = create_admin_app(Registry(open_storage(settings.storage.url), settings), TokenStore(settings.admin))

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
            return await client.post("/v1/domains", json={"hostname": HOST},
                                     headers={"Authorization": f"Bearer {TOKEN}"})

    reply = asyncio.run(post())
    assert reply.status_code == 201, reply.text
    view: dict[str, Any] = reply.json()
    return view


def rewritten_script(settings: Settings, script_url: str) -> str:
    """GET the script URL through the public HTTPS app, the vendor origin mocked."""
    parsed = httpx.URL(script_url)

    def upstream(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == settings.upstream.script
        return httpx.Response(200, content=VENDOR_SCRIPT, headers={"content-type": "application/javascript"})

    async def fetch() -> str:
        edge = EdgeProxy(settings, resolve=lambda h: Site(h, True) if h == HOST else None,
                         challenge=_no_challenge, transport=httpx.MockTransport(upstream))
        sent: list[dict[str, Any]] = []
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "https", "path": parsed.path, "raw_path": parsed.raw_path, "query_string": b"",
            "root_path": "", "headers": [(b"host", parsed.host.encode())], "client": ("198.51.100.7", 1),
            "server": ("127.0.0.1", 443), "extensions": {"tls": {"server_name": parsed.host}},
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            await edge.https_app(scope, receive, send)
        finally:
            await edge.aclose()
        assert sent[0]["status"] == 200
        return b"".join(m.get("body", b"") for m in sent[1:]).decode()

    return asyncio.run(fetch())


async def _no_challenge(_token: str) -> tuple[str, str] | None:
    return None


def test_edge_urls_for_a_sample_domain_pass_easyprivacy(tmp_path: Path) -> None:
    settings = edge_settings(tmp_path)
    view = registered_view(settings)
    src = re.fullmatch(r'<script async src="([^"]+)"></script>', view["snippet"])
    assert src, view["snippet"]
    script_url = src.group(1)
    assert script_url == f"https://{HOST}{settings.routes.script_path}"

    body = rewritten_script(settings, script_url)
    api_urls = sorted(set(re.findall(r'"(https://[^"]+)"', body)))
    # Every endpoint the vendor named now points at the customer's hostname.
    assert api_urls == [f"https://{HOST}{settings.routes.api_path}/collect",
                        f"https://{HOST}{settings.routes.api_path}/events"]
    assert "vendor.invalid" not in body

    requests = [(PAGE, script_url, "script")]
    requests += [(PAGE, url, rtype) for url in api_urls for rtype in ("xhr", "fetch", "ping")]
    requests.append((PAGE, f"https://{HOST}{settings.routes.api_path}", "xhr"))
    rows = check(requests)
    assert [r for r in rows if r[0] != "ALLOWED"] == []


def test_cname_target_passes_easyprivacy_after_uncloaking(tmp_path: Path) -> None:
    """uBlock Origin on Firefox re-checks a request with the CNAME target as its host."""
    settings = edge_settings(tmp_path)
    view = registered_view(settings)
    (record,) = view["dns"]["records"]
    assert record["type"] == "CNAME"
    target = record["value"].rstrip(".")
    assert target == settings.dns.cname_target
    # ...and every target the runbook's examples suggest to operators.
    suggested = re.findall(r'cname_target = "([^"]+)"', RUNBOOK.read_text())
    suggested += re.findall(r"EDGEPROXY_DNS_CNAME_TARGET=(\S+)", RUNBOOK.read_text())
    assert suggested, "the runbook suggests no CNAME target"
    paths = [settings.routes.script_path, f"{settings.routes.api_path}/collect", f"{settings.routes.api_path}/events"]
    requests = []
    for name in sorted({target, *suggested}):
        requests += [(PAGE, f"https://{name}{settings.routes.script_path}", "script"), (PAGE, f"https://{name}/", "script")]
        requests += [(PAGE, f"https://{name}{path}", rtype) for path in paths[1:] for rtype in ("xhr", "fetch")]
    rows = check(requests)
    assert [r for r in rows if r[0] != "ALLOWED"] == []

    # sendBeacon to ANY third-party host is blocked by one generic rule, whatever the
    # names: no choice of label fixes it, an A/AAAA record (dns.edge_ips) does (runbook).
    (beacon,) = check([(PAGE, f"https://{target}{paths[1]}", "ping")])
    assert beacon[0] == "BLOCKED" and beacon[3] == "rule: $ping,third-party"


def test_the_checker_blocks_what_it_should() -> None:
    """Guard against a checker that allows everything (no list loaded, wrong engine)."""
    rows = check([(PAGE, "https://www.google-analytics.com/analytics.js", "script"),
                  (PAGE, "https://stats.customer-shop.com/api/event", "xhr"),
                  (PAGE, f"https://{HOST}/api/collect", "xhr")])
    assert [r[0] for r in rows] == ["BLOCKED", "BLOCKED", "BLOCKED"]


# -- every recipe of docs/recipes.md, query strings included ---------------------------------

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
# The request type a browser gives each kind of route's traffic (adblock-check types).
_TYPES = {"script": ("script",), "event": ("image", "ping", "xhr", "fetch"), "passthrough": ("xhr", "fetch"),
          "asset": ("script", "image")}


def recipe_settings(tmp_path: Path) -> list[Settings]:
    from edgeproxy.config import load_settings

    blocks = re.findall(r"```toml\n(.*?)```", RECIPES.read_text(), flags=re.S)
    assert len(blocks) == 4, "docs/recipes.md has a recipe per tracker style"
    loaded = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"recipe{i}.toml"
        path.write_text(block)
        loaded.append(load_settings(path, env={}))  # every recipe is a valid configuration
    return loaded


def recipe_urls(settings: Settings) -> list[tuple[str, str, str]]:
    """(page, url, type) for each route's path and each of its samples."""
    from edgeproxy.rules.routes import configured_routes

    requests = []
    for route in configured_routes(settings.routes):
        assert route.kind == "script" or route.samples, f"recipe route {route.name} names no samples"
        urls = [f"https://{HOST}{route.path}"] + [
            f"https://{HOST}{route.path.rstrip('/')}{s}" if s.startswith("/") else f"https://{HOST}{route.path}{s}"
            for s in route.samples]
        for url in urls:
            types = _TYPES[route.kind]
            if route.kind == "asset":
                types = ("image",) if url.endswith((".png", ".gif", ".svg")) else ("script",)
            requests += [(PAGE, url, rtype) for rtype in types]
    return requests


def test_every_recipe_passes_easyprivacy_with_its_query_strings(tmp_path: Path) -> None:
    requests = [r for settings in recipe_settings(tmp_path) for r in recipe_urls(settings)]
    assert any("?" in url for _, url, _ in requests)
    rows = check(requests)
    assert [r for r in rows if r[0] != "ALLOWED"] == []


def test_the_vendor_names_the_recipes_rename_would_be_blocked() -> None:
    """Why the image recipe renames its pixel: the vendor's own names, on our host, are blocked."""
    rows = check([(PAGE, f"https://{HOST}/api/v1/m/simple.gif?type=pageview&hostname=x", "image"),
                  (PAGE, f"https://{HOST}/api/v1/m/p.gif?u=%2F", "image")])
    assert [(r[0], r[3]) for r in rows] == [("BLOCKED", "rule: ?type=pageview&"), ("BLOCKED", "rule: /p.gif?")]
