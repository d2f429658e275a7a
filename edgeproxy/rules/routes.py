"""The route table: which path on a custom domain does what (pure, cached).

Owns: the routes every registered host serves, and their paths per host.

- The table comes from ``[[routes.route]]``; with none configured it is today's
  two routes: ``script`` (kind ``script``, exactly ``routes.script_path``) and
  ``api`` (kind ``event``, ``routes.api_path`` and below).
- Kinds: ``script`` (the vendor script, rewritten per host), ``event`` (calls
  forwarded to the relay with the zero-loss guarantees), ``passthrough`` (a live
  read from an upstream, never spooled), ``asset`` (cached static files).
- Matching: a ``script`` route matches its exact path; the others match their
  prefix and anything below it (``prefix/...``). The longest match wins; no
  match is a 404 (the table never widens what reaches an upstream).
- ``routes.randomize``: each domain gets its own path for every route, derived
  from ``HMAC-SHA256(randomize_secret, ...)``, so no filter-list rule written for
  one customer's paths matches another's; nothing is stored, so every worker and
  every node agrees without a lookup. The routes named ``script`` and ``api``
  keep the derivations they had before the table existed (customers' snippets
  stay valid); every other route derives from its name.

Must not import: anything of ours but ``config``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ..config import RouteSettings, RoutesSettings

__all__ = ["Route", "RouteTable", "SiteRoutes", "configured_routes", "placeholder_values", "route_table",
           "site_routes"]

SCRIPT: Final = "script"
EVENT: Final = "event"
PASSTHROUGH: Final = "passthrough"
ASSET: Final = "asset"


@dataclass(frozen=True)
class Route:
    """One route with its path for one host (``path``: exact for scripts, else the
    prefix without a trailing slash). ``settings`` is the configured entry."""

    name: str
    kind: str
    path: str
    settings: RouteSettings
    index: int  # position in the configuration ("the first script route")

    def below(self, path: str) -> bool:
        """True when ``path`` (decoded) is this route's: the exact path for a script,
        else the prefix itself or anything under ``prefix/``."""
        if self.kind == SCRIPT:
            return path == self.path
        return path == self.path or (path.startswith(self.path) and path[len(self.path)] == "/")


@dataclass(frozen=True)
class RouteTable:
    """Every route of one host, longest path first (the first match wins)."""

    routes: tuple[Route, ...]

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.below(path):
                return route
        return None

    def first(self, kind: str) -> Route | None:
        """The first route of ``kind`` in configuration order."""
        return min((r for r in self.routes if r.kind == kind), key=lambda r: r.index, default=None)

    def path_of(self, name: str) -> str | None:
        return next((r.path for r in self.routes if r.name == name), None)


@dataclass(frozen=True)
class SiteRoutes:
    """The first script route's path and the first event route's path (the snippet's
    script and the API the default rewrite points the script at)."""

    script_path: str
    api_path: str  # without a trailing slash

    @property
    def api_prefix(self) -> str:
        return self.api_path + "/"


def configured_routes(routes: RoutesSettings) -> tuple[RouteSettings, ...]:
    """The table as configured, or the two default routes when none is."""
    if routes.route:
        return routes.route
    return (RouteSettings(name="script", kind=SCRIPT, path=routes.script_path),
            RouteSettings(name="api", kind=EVENT, path=routes.api_path.rstrip("/")))


def _label(data: bytes) -> str:
    # base32 lower-case letters and 2-7: no vowels-only words to speak of, no separators.
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _random_path(secret: str, hostname: str, route: RouteSettings) -> str:
    # Two segments, 8 characters (40 bits) each: long enough that no filter rule for a
    # short word ("/ga/", "/px.js") can ever match a segment whole.
    if route.name in ("script", "api"):
        # The derivations from before the route table (both from one digest of the host).
        digest = hmac.new(secret.encode(), hostname.encode("ascii"), hashlib.sha256).digest()
        offset = 0 if route.name == "script" else 10
    else:
        digest = hmac.new(secret.encode(), f"{route.name}\0{hostname}".encode("ascii"), hashlib.sha256).digest()
        offset = 0
    path = f"/{_label(digest[offset:offset + 5])}/{_label(digest[offset + 5:offset + 10])}"
    return path + ".js" if route.kind == SCRIPT else path


@functools.lru_cache(maxsize=65536)
def route_table(hostname: str, routes: RoutesSettings) -> RouteTable:
    """Every route of ``hostname`` (already normalized, lower-case) with its paths."""
    entries = configured_routes(routes)
    built: list[Route] = []
    for index, entry in enumerate(entries):
        if routes.randomize:
            path = _random_path(routes.randomize_secret, hostname, entry)
        else:
            path = entry.path if entry.kind == SCRIPT else entry.path.rstrip("/")
        built.append(Route(entry.name, entry.kind, path, entry, index))
    # Longest path first, so a prefix never shadows a longer route under it.
    return RouteTable(tuple(sorted(built, key=lambda r: (-len(r.path), r.index))))


def site_routes(hostname: str, routes: RoutesSettings) -> SiteRoutes:
    """The first script route's and the first event route's path for ``hostname``."""
    table = route_table(hostname, routes)
    script = table.first(SCRIPT)
    event = table.first(EVENT)
    return SiteRoutes(script.path if script else "", event.path if event else "")


def placeholder_values(host: str, table: RouteTable) -> Mapping[str, str]:
    """What ``{host}`` and each ``{<name>_path}`` stand for in rewrites; ``{script_path}``
    and ``{api_path}`` always name the first script and the first event route."""
    values = {"host": host}
    for route in table.routes:
        values[f"{route.name}_path"] = route.path
    first_script, first_event = table.first(SCRIPT), table.first(EVENT)
    if first_script is not None:
        values.setdefault("script_path", first_script.path)
    if first_event is not None:
        values.setdefault("api_path", first_event.path)
    return values
