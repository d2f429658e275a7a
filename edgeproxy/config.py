"""The one ``Settings`` object: TOML file + ``EDGEPROXY_<SECTION>_<KEY>`` overrides.

Owns: the configuration contract (DESIGN.md section 2), its defaults, parsing and
validation. This is the only module that reads ``os.environ``; everything else
receives a ``Settings`` (or a part of it).
Must not import: anything of ours except ``errors``.

Defaults work on one machine with no config file at all. Every key can be set in
the file or overridden by an environment variable, e.g. ``EDGEPROXY_LISTEN_HTTPS=
127.0.0.1:8443``; list values in the environment are JSON (``["a","b"]``) or
comma-separated; booleans are ``1/0/true/false/yes/no``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, get_type_hints

from .errors import ConfigError

__all__ = [
    "AcmeSettings",
    "IssuerSettings",
    "AdminSettings",
    "DnsSettings",
    "DomainsSettings",
    "EVENT_TYPES",
    "EventEndpointSettings",
    "EventsSettings",
    "ListenSettings",
    "LogSettings",
    "AlertSettings",
    "MonitorSettings",
    "ProxySettings",
    "RenewSettings",
    "ROUTE_KINDS",
    "RouteSettings",
    "RoutesSettings",
    "Settings",
    "SpoolSettings",
    "FailedLogSettings",
    "PrivacySettings",
    "StorageSettings",
    "TlsSettings",
    "UpstreamSettings",
    "acme_issuers",
    "load_settings",
    "parse_hostport",
    "LETSENCRYPT_PRODUCTION",
    "LETSENCRYPT_STAGING",
]

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
_DIRECTORY_SHORTCUTS = {"production": LETSENCRYPT_PRODUCTION, "staging": LETSENCRYPT_STAGING}


@dataclass(frozen=True)
class IssuerSettings:
    """One `[[acme.issuers]]` entry: an ACME CA, tried in list order for each new order
    (README: several certificate authorities)."""

    directory: str = ""  # the CA's ACME directory URL (required); "production"/"staging": Let's Encrypt
    email: str = ""  # contact address for this CA's account (optional)
    ca_bundle: str = ""  # extra CA file to trust for this ACME server
    eab_kid: str = ""  # external account binding key id, for CAs that require one (RFC 8555 section 7.3.4)
    eab_hmac_key_file: str = ""  # file holding the EAB MAC key (base64url, as the CA hands it out)
    profile: str = ""  # optional ACME profile (e.g. "shortlived")
    # CAA issuer names this CA answers to (RFC 8659; required): a domain whose CAA records
    # name none of them is never ordered from this CA.
    caa_identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETSENCRYPT_PRODUCTION
    email: str = ""
    ca_bundle: str = ""  # extra CA file to trust for the ACME server (Pebble in tests)
    profile: str = ""  # optional ACME profile (e.g. "shortlived")
    timeout: float = 90.0  # seconds one order may take end to end
    # Several CAs in order of preference ([[acme.issuers]]); when set, replaces directory,
    # email, ca_bundle and profile above (and dns.caa_identities as their CAA identity).
    issuers: tuple[IssuerSettings, ...] = ()


@dataclass(frozen=True)
class ListenSettings:
    # "[::]" is one dual-stack socket (IPv6 and IPv4); IPv4 only where the host has no IPv6.
    http: str = "[::]:80"
    https: str = "[::]:443"
    admin: str = "127.0.0.1:8081"


@dataclass(frozen=True)
class StorageSettings:
    url: str = "sqlite:///var/lib/edgeproxy/edgeproxy.db"
    # Seal private keys at rest with AES-256-GCM under this master key (keys.py);
    # empty = stored as PEM, protected by file permissions only.
    key_encryption_key_file: str = ""
    previous_key_files: tuple[str, ...] = ()  # old master keys: open only, during `keys rotate`
    # PostgreSQL: create/upgrade the schema on start. Off = a node refuses an
    # outdated schema until an operator runs `edgeproxy migrate`.
    auto_migrate: bool = True
    # Lease on one name's ACME order, renewed every lock_ttl/3 while the order
    # runs: how long a crashed node blocks the others before they take over.
    lock_ttl: float = 120.0


@dataclass(frozen=True)
class UpstreamSettings:
    script: str = "https://cdn.vendor.invalid/latest.js"
    relay: str = "https://relay.vendor.invalid"
    # Literal replacements applied to the script body. Values may use {host},
    # {api_path} and {script_path}; the relay origin is always rewritten to
    # https://{host}{api_path} so that the script talks back to the custom domain.
    rewrite: Mapping[str, str] = field(default_factory=dict)
    # Which headers carry the visitor's IP to the relay: any of "x-forwarded-for",
    # "forwarded" (RFC 7239), "x-real-ip"; empty = the relay never sees it.
    client_ip_headers: tuple[str, ...] = ("x-forwarded-for",)
    script_ttl: float = 300.0  # seconds the in-memory script copy is fresh
    connect_timeout: float = 2.0
    timeout: float = 5.0
    # The relay client: "aiohttp" (the relay POST straight on an aiohttp session;
    # script fetches through httpx on an aiohttp connector) or "httpx" (httpx's own
    # httpcore pool for both). Measured side by side in bench/README.md:
    # httpcore's pool scans every pooled connection, with a readability syscall
    # each, on every request; httpx's layer over aiohttp cost a third of the forward.
    client: str = "aiohttp"
    pool_size: int = 64  # keep-alive connections to the relay per worker


ROUTE_KINDS: Final = ("script", "event", "passthrough", "asset")


@dataclass(frozen=True)
class RouteSettings:
    """One ``[[routes.route]]`` entry: a path on every custom domain and what answers it."""

    name: str = ""  # unique; names the route in {NAME_path} placeholders, metrics and randomize
    kind: str = ""  # script | event | passthrough | asset
    path: str = ""  # script: the exact path; other kinds: a prefix (the path itself and below it)
    # URL: script = the script's URL (default upstream.script); event and passthrough = the
    # base the path below the prefix is appended to (default upstream.relay); asset = the
    # origin base (required).
    upstream: str = ""
    # script: literal replacements in the body, placeholders {host} and {NAME_path}
    # (default upstream.rewrite for the first script route).
    rewrite: Mapping[str, str] = field(default_factory=dict)
    # event and passthrough: literal replacements in the path below the prefix and the
    # query before forwarding (the inverse of script rewrites that renamed them).
    request_rewrite: Mapping[str, str] = field(default_factory=dict)
    max_bytes: int = 1024 * 1024  # asset: largest file served from the origin
    # Beacon URLs below the route's path (e.g. "/p.gif?t=pv&u=1") that `doctor` and the
    # filter-list test check against the blocklists, besides the bare path.
    samples: tuple[str, ...] = ()

    def __hash__(self) -> int:
        # The table keys functools caches (routes.route_table), looked up on every
        # request: computed once (sorting the mappings each time cost ~0.7 us a route).
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.kind, self.path, self.upstream, tuple(sorted(self.rewrite.items())),
                           tuple(sorted(self.request_rewrite.items())), self.max_bytes, self.samples))
            object.__setattr__(self, "_hash", cached)  # frozen: not a field, so eq and repr ignore it
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # str hashes differ per process (PYTHONHASHSEED): `serve` spawns its workers
        # with pickled settings, which must not carry this process's cached hash.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}


@dataclass(frozen=True)
class RoutesSettings:
    script_path: str = "/js/app.js"
    api_path: str = "/api/v1/m"
    # Each domain gets its own paths for every route, derived from randomize_secret
    # (routes.py); the configured paths are then not served at all.
    randomize: bool = False
    randomize_secret: str = ""  # at least 16 characters; the same on every node; never change it
    # The route table ([[routes.route]]). Empty: two routes, "script" (script_path,
    # kind script) and "api" (api_path, kind event); script_path/api_path are then unused.
    route: tuple[RouteSettings, ...] = ()


@dataclass(frozen=True)
class DnsSettings:
    cname_target: str = "edge.example.net"
    edge_ips: tuple[str, ...] = ()
    resolver: str = ""  # host:port; empty = system resolver
    check: bool = True  # DNS pre-check before ordering
    caa_identities: tuple[str, ...] = ("letsencrypt.org",)  # CAA issuer names our CA answers to (RFC 8659)
    timeout: float = 5.0  # seconds per pre-check lookup


@dataclass(frozen=True)
class DomainsSettings:
    extra_suffixes: tuple[str, ...] = ()  # e.g. ("test",) for tests and the demo
    deny: tuple[str, ...] = ()  # names refused with everything below them, e.g. ("bank.example",)
    max_domains: int = 50_000  # 0 = no limit
    registrations_per_hour: int = 600  # 0 = no limit


@dataclass(frozen=True)
class AdminSettings:
    token_file: str = "/etc/edgeproxy/admin-token"  # bootstrap token, created on first start
    tokens_file: str = "/etc/edgeproxy/admin-tokens.json"  # named tokens, SHA-256 hashes only


@dataclass(frozen=True)
class ProxySettings:
    max_body: int = 64 * 1024  # bytes; larger API bodies get 413
    # Bytes of path + query an event/passthrough/asset call may carry; longer gets 414. Image
    # beacons carry their data in the query; 8 KiB is what common servers take by default.
    max_target: int = 8 * 1024
    trusted_hops: tuple[str, ...] = ()  # peers whose X-Forwarded-For we believe (IPs/CIDRs)
    cert_refresh_interval: float = 1.0  # seconds between change-feed polls in each worker
    # Calls per second per visitor IP and per custom domain on event and passthrough
    # routes, answered 429 locally (never forwarded; kept for `edgeproxy replay`); per
    # worker process; 0 = off. Per IP is generous on purpose: a carrier-grade NAT, an
    # office or a school puts a crowd behind one address, and a page view can send
    # several events at once; the per-domain limit and the spool cap protect the edge.
    rate_per_ip: float = 100.0
    rate_per_domain: float = 2000.0  # API requests per second per custom domain; 0 = off
    rate_burst: float = 2.0  # seconds of rate a quiet key may spend at once
    # Certificates kept ready to serve per worker (LRU): a built SSLContext
    # (~24 KB of RSS, ~0.8 ms) by default, a parsed leaf + key (~7 KB, ~0.04-0.12 ms to
    # parse) on the native path. 100,000 names are never all kept at once.
    tls_context_cache: int = 1024
    # Opt-in accelerator, off by default: serve each name's certificate per connection
    # through the libssl of Python's ssl module via ctypes (edgeproxy/edge/tlsnative.py),
    # which reads CPython's private _ssl object layout, so a mistake there is a crash
    # or memory corruption, not an exception. ~6x cheaper per cache miss than building
    # an SSLContext (100,000 names at random: ~0.9-1.0 of the 1-name handshake rate,
    # vs 0.35-0.62 off; bench/README.md). Self-tested at start-up, off with a warning where
    # the test fails. Off (default): one SSLContext per name through Python's public ssl API.
    tls_native: bool = False
    # The event loop of `serve`: "uvloop" (libuv; faster TLS and socket I/O) when
    # installed, else "asyncio". Measured in bench/README.md.
    event_loop: str = "uvloop"
    # Simple HTTP/1.1 requests on the HTTPS listener (the script, events, beacons) are
    # parsed and answered by edgeproxy/h1fast.py (llhttp via httptools), the same app
    # behind it; HTTP/2 and anything unusual (chunked or large bodies, Upgrade,
    # absolute-form targets, malformed input) stay with hypercorn. false: hypercorn for
    # everything. Measured against Caddy in bench/README.md.
    http1_fast_path: bool = True


@dataclass(frozen=True)
class TlsSettings:
    # Mozilla's server-side TLS guidelines (https://ssl-config.mozilla.org/):
    # "intermediate" (TLS 1.2 + 1.3, ECDHE with AES-GCM/ChaCha20) or "modern" (TLS 1.3 only).
    policy: str = "intermediate"


# -- monitoring: probes, alerts, logs ------------------------------------------
@dataclass(frozen=True)
class MonitorSettings:
    interval: float = 300.0  # seconds from the start of one probe round inside `serve` to the next; 0 = no loop
    spread: float = 0.5  # share of interval a round's probe starts are spread over (>= 50/s); 0 = no pacing
    ca_bundle: str = ""  # CA file the probes trust instead of the system roots (Pebble in tests)
    port: int = 0  # HTTPS port the probes connect to; 0 = the port of listen.https
    connect: str = ""  # IP the probes connect to instead of resolving each name (e.g. this node)
    timeout: float = 10.0  # seconds per probe step
    fail_after: int = 2  # consecutive failed probes before a domain's alert fires (one blip is not an outage)
    cert_warn_days: float = 14.0  # alert when a served certificate has fewer days left
    stuck_after: float = 3600.0  # seconds a domain may stay `failing` before an alert
    relay_4xx_burst: int = 50  # relay 4xx answers within relay_4xx_window that raise an alert; 0 = off
    relay_4xx_window: float = 300.0  # seconds over which relay 4xx answers are counted
    spool_max_depth: int = 10000  # spool alerts (once the spool exists); 0 = off
    spool_max_age: float = 900.0  # seconds; 0 = off


@dataclass(frozen=True)
class AlertSettings:
    resend_interval: float = 3600.0  # seconds before a still-firing alert is sent again
    retries: int = 3  # attempts per sink and alert
    retry_delay: float = 2.0  # seconds before the first retry (doubles)
    timeout: float = 10.0  # seconds per delivery attempt
    webhook_url: str = ""  # generic JSON webhook
    telegram_chat_id: str = ""  # Telegram chat (or channel) id; with telegram_token_file turns the sink on
    telegram_token_file: str = ""  # file holding the bot token (read at each send)
    telegram_api: str = "https://api.telegram.org"  # Bot API base URL
    pagerduty_routing_key_file: str = ""  # file holding the Events API v2 integration key; turns the sink on
    pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"  # Events API v2 endpoint
    smtp_host: str = ""  # mail server; with smtp_to turns e-mail alerts on
    smtp_port: int = 25  # mail server port
    smtp_from: str = ""  # sender address; empty = edgeproxy@<this host>
    smtp_to: tuple[str, ...] = ()  # recipients
    smtp_starttls: bool = False  # upgrade the SMTP connection with STARTTLS (system roots)
    smtp_username: str = ""  # SMTP login; empty = no authentication
    smtp_password_file: str = ""  # file holding the SMTP password


@dataclass(frozen=True)
class LogSettings:
    format: str = "json"  # "json" (one object per line) or "text", for `serve`
    access_log: bool = False  # one line per public request


@dataclass(frozen=True)
class RenewSettings:
    """Renewal loop, lifecycle and rate budgets. Budgets mirror Let's
    Encrypt's published limits; an order a budget refuses never reaches the CA."""

    interval: float = 600.0  # seconds between full renewal passes inside `serve`
    jitter: float = 300.0  # + uniform random 0..jitter seconds (nodes and restarts spread out)
    poll: float = 5.0  # seconds between scans for new registrations and forced retries
    concurrency: int = 4  # orders in flight per process
    moved_retention_days: float = 7.0  # a domain `moved` this long is removed with its key
    orders_per_3h: int = 300  # new orders per account per 3 hours
    certs_per_domain: int = 50  # certificates per registered domain (eTLD+1) per 7 days
    duplicate_certs: int = 5  # certificates per exact name set per 7 days
    failed_validations: int = 5  # failed validations per hostname per hour


# -- lifecycle webhooks ------------------------------------------------------------------
EVENT_TYPES: Final = (
    "domain.registered", "domain.active", "domain.failing", "domain.moved", "domain.removed",
    "certificate.issued", "certificate.renewed", "certificate.expiring",
)


@dataclass(frozen=True)
class EventEndpointSettings:
    """One ``[[events.endpoints]]`` entry: where lifecycle events are sent, signed."""

    url: str = ""  # the http(s) URL the vendor's app receives events on (POST, JSON)
    # File holding the Standard Webhooks secret ("whsec_" + base64 of 24-64 random bytes).
    secret_file: str = ""
    types: tuple[str, ...] = ()  # event types this endpoint receives; empty = all


@dataclass(frozen=True)
class EventsSettings:
    """Lifecycle webhooks: a durable outbox in storage, delivered at least once,
    signed per the Standard Webhooks spec, retried with exponential backoff."""

    # The endpoints ([[events.endpoints]]); none: no event is recorded at all.
    endpoints: tuple[EventEndpointSettings, ...] = ()
    timeout: float = 10.0  # seconds per delivery attempt
    backoff_base: float = 5.0  # seconds before the first retry; doubled per failed attempt
    backoff_cap: float = 3600.0  # longest wait (s) between two attempts
    horizon: float = 259200.0  # seconds (3 days) of retries before an event is dead-lettered (and alerted)
    poll_interval: float = 1.0  # seconds between outbox scans when idle
    retention_days: float = 30.0  # delivered and dead-lettered events kept this long (events list), then pruned
    expiring_check_interval: float = 3600.0  # seconds between scans for certificates crossing monitor.cert_warn_days


# -- spool, failed-request log, privacy ---------------------------------
@dataclass(frozen=True)
class SpoolSettings:
    # Node-local SQLite file (never the shared store: it must work when that is down).
    # Empty: "spool.db" next to a sqlite storage.url, else /var/lib/edgeproxy/spool.db.
    path: str = ""
    max_bytes: int = 1024 * 1024 * 1024  # cap on spooled request bytes; full -> 503
    dead_letter_days: float = 7.0  # undeliverable this long -> dead-letter table + alert
    replay_rate: float = 2000.0  # requests/s the replayer may send (protects a recovering relay)
    replay_window: int = 4  # requests in flight per domain while draining (httpcore's pool gets slower with more)
    backoff_base: float = 0.5  # seconds; doubled per failure, full jitter
    backoff_cap: float = 60.0  # longest wait (s) between replay attempts while the relay is down
    poll_interval: float = 0.5  # seconds between replayer passes when idle


@dataclass(frozen=True)
class FailedLogSettings:
    retention_days: float = 90.0  # days a refused request is kept for `edgeproxy replay`, then pruned
    # Requests an event route refuses itself (400, 413, 414, 429, 503) kept per domain, clock
    # hour and worker; more are counted (refusal_dropped), not kept: a flood cannot fill the disk.
    refusals_per_domain_hour: int = 10000


@dataclass(frozen=True)
class PrivacySettings:
    ip_retention: str = "full"  # full | truncated | none (failed-request log)


@dataclass(frozen=True)
class Settings:
    acme: AcmeSettings = field(default_factory=AcmeSettings)
    listen: ListenSettings = field(default_factory=ListenSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    routes: RoutesSettings = field(default_factory=RoutesSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    domains: DomainsSettings = field(default_factory=DomainsSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    log: LogSettings = field(default_factory=LogSettings)
    renew: RenewSettings = field(default_factory=RenewSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    failed_log: FailedLogSettings = field(default_factory=FailedLogSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    events: EventsSettings = field(default_factory=EventsSettings)


def parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raise :class:`ConfigError` naming ``what``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(f"{what} must be host:port, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Turn a TOML or environment value into the field's declared type."""
    try:
        if annotation == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if annotation == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
                return True
            if isinstance(value, str) and value.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise TypeError
        if annotation == "int":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if annotation == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation.startswith("tuple[str"):
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else [
                    part.strip() for part in text.split(",") if part.strip()
                ]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if annotation.startswith("tuple[") and annotation[len("tuple["):].split(",")[0] in _TABLES:
            # An array of tables ([[section.key]] in TOML; JSON list of objects in the environment).
            cls = _TABLES[annotation[len("tuple["):].split(",")[0]]
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise TypeError
            return tuple(_build_section(cls, f"{where}[{i}]", v, {}, prefix=None) for i, v in enumerate(value))
        if annotation.startswith("Mapping[str, str]"):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected {annotation}, got {value!r}") from exc
    raise ConfigError(f"{where}: unsupported setting type {annotation}")  # pragma: no cover


def _build_section(cls: type[Any], name: str, values: Mapping[str, Any], env: Mapping[str, str],
                   prefix: str | None = "EDGEPROXY") -> Any:
    """``cls`` from one TOML table; ``prefix`` None: no environment overrides (a table
    inside an array is overridden as a whole, by its array's variable)."""
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key, annotation in hints.items():
        env_name = f"{prefix}_{name.upper()}_{key.upper()}"
        if prefix is not None and env_name in env:
            kwargs[key] = _coerce(env[env_name], str(annotation), env_name)
        elif key in values:
            kwargs[key] = _coerce(values[key], str(annotation), f"[{name}] {key}")
    return cls(**kwargs)


_TABLES: Final[dict[str, type[Any]]] = {"RouteSettings": RouteSettings, "IssuerSettings": IssuerSettings,
                                         "EventEndpointSettings": EventEndpointSettings}
_ROUTE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


def _validate_routes(routes: RoutesSettings) -> None:
    names: set[str] = set()
    paths: set[str] = set()
    for i, route in enumerate(routes.route):
        where = f"routes.route[{i}]"
        if not _ROUTE_NAME.match(route.name):
            raise ConfigError(f"{where}: name must be 1-32 of a-z, 0-9, _ starting with a letter, got {route.name!r}")
        if route.name in names:
            raise ConfigError(f"{where}: the name {route.name!r} is used twice")
        names.add(route.name)
        where = f"routes.route {route.name!r}"
        if route.kind not in ROUTE_KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(ROUTE_KINDS)}, got {route.kind!r}")
        path = route.path.rstrip("/") if route.kind != "script" else route.path
        if not route.path.startswith("/") or "?" in route.path or "#" in route.path or not path:
            raise ConfigError(f"{where}: path must be an absolute path without query, got {route.path!r}")
        if path in paths:
            raise ConfigError(f"{where}: another route has the path {route.path!r}")
        paths.add(path)
        if route.kind == "asset" and not route.upstream:
            raise ConfigError(f"{where}: an asset route needs upstream (the origin's base URL)")
        if route.upstream and not route.upstream.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: upstream must be an http(s) URL, got {route.upstream!r}")
        if route.max_bytes <= 0:
            raise ConfigError(f"{where}: max_bytes must be positive")
        if route.request_rewrite and route.kind not in ("event", "passthrough"):
            raise ConfigError(f"{where}: request_rewrite applies to event and passthrough routes only")
        if route.rewrite and route.kind != "script":
            raise ConfigError(f"{where}: rewrite applies to script routes only")
        for sample in route.samples:
            if sample and not sample.startswith(("/", "?")):
                raise ConfigError(f"{where}: samples are URLs below the route's path (start with / or ?), "
                                  f"got {sample!r}")
    if routes.route and not any(r.kind == "script" for r in routes.route):
        raise ConfigError("routes.route: the table needs at least one script route (the snippet loads it)")


def _validate_events(events: EventsSettings) -> None:
    urls: set[str] = set()
    for i, endpoint in enumerate(events.endpoints):
        where = f"events.endpoints[{i}]"
        if not endpoint.url.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: url must be an http(s) URL, got {endpoint.url!r}")
        if endpoint.url in urls:
            raise ConfigError(f"{where}: the url {endpoint.url!r} is listed twice")
        urls.add(endpoint.url)
        if not endpoint.secret_file:
            raise ConfigError(f"{where}: secret_file is required (a file holding the whsec_... signing secret)")
        unknown = [t for t in endpoint.types if t not in EVENT_TYPES]
        if unknown:
            raise ConfigError(f"{where}: unknown event type(s) {', '.join(unknown)}; "
                              f"known: {', '.join(EVENT_TYPES)}")
    if events.timeout <= 0 or events.backoff_base <= 0 or events.backoff_cap < events.backoff_base:
        raise ConfigError("events.timeout and events.backoff_base must be positive, "
                          "events.backoff_cap at least events.backoff_base")
    if events.horizon <= 0 or events.poll_interval <= 0 or events.retention_days <= 0 \
            or events.expiring_check_interval <= 0:
        raise ConfigError("events.horizon, events.poll_interval, events.retention_days and "
                          "events.expiring_check_interval must be positive")


def _validate_issuers(issuers: tuple[IssuerSettings, ...]) -> tuple[IssuerSettings, ...]:
    """Each issuer complete and distinct (accounts are stored per directory URL);
    directory shortcuts expanded."""
    seen: set[str] = set()
    out: list[IssuerSettings] = []
    for i, issuer in enumerate(issuers):
        where = f"acme.issuers[{i}]"
        directory = _DIRECTORY_SHORTCUTS.get(issuer.directory, issuer.directory)
        if not directory.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: directory must be the CA's ACME directory URL, got {issuer.directory!r}")
        if directory in seen:
            raise ConfigError(f"{where}: the directory {directory} is listed twice (one account per CA)")
        seen.add(directory)
        if issuer.ca_bundle and not Path(issuer.ca_bundle).is_file():
            raise ConfigError(f"{where}: ca_bundle: no such file {issuer.ca_bundle!r}")
        if bool(issuer.eab_kid) != bool(issuer.eab_hmac_key_file):
            raise ConfigError(f"{where}: external account binding needs both eab_kid and eab_hmac_key_file")
        if issuer.eab_hmac_key_file and not Path(issuer.eab_hmac_key_file).is_file():
            raise ConfigError(f"{where}: eab_hmac_key_file: no such file {issuer.eab_hmac_key_file!r}")
        if not [c for c in issuer.caa_identities if c.strip()]:
            raise ConfigError(f"{where}: caa_identities must name the CAA issuer name(s) of {directory} "
                              '(RFC 8659), e.g. ["letsencrypt.org"]')
        out.append(dataclasses.replace(issuer, directory=directory))
    return tuple(out)


def acme_issuers(settings: Settings) -> tuple[IssuerSettings, ...]:
    """The CAs to order from, in order of preference: ``[[acme.issuers]]`` when set, else
    the one issuer ``[acme]`` describes, with ``dns.caa_identities`` as its CAA identity."""
    acme = settings.acme
    if acme.issuers:
        return acme.issuers
    return (IssuerSettings(directory=acme.directory, email=acme.email, ca_bundle=acme.ca_bundle,
                           profile=acme.profile, caa_identities=settings.dns.caa_identities),)


def _validate(settings: Settings) -> Settings:
    for what in ("http", "https", "admin"):
        address = getattr(settings.listen, what)
        if what == "admin" and address.startswith("unix:"):
            # A Unix socket: reachable only by local users the file mode admits.
            if not address[len("unix:"):].startswith("/"):
                raise ConfigError(f"listen.admin: unix socket path must be absolute, got {address!r}")
            continue
        parse_hostport(address, what=f"listen.{what}")
    for what in ("script_path", "api_path"):
        path = getattr(settings.routes, what)
        if not path.startswith("/") or "?" in path or "#" in path:
            raise ConfigError(f"routes.{what} must be an absolute path without query, got {path!r}")
    if settings.routes.script_path.rstrip("/") == settings.routes.api_path.rstrip("/"):
        raise ConfigError("routes.script_path and routes.api_path must differ")
    _validate_routes(settings.routes)
    _validate_events(settings.events)
    unknown_ip_headers = set(settings.upstream.client_ip_headers) - {"x-forwarded-for", "forwarded", "x-real-ip"}
    if unknown_ip_headers:
        raise ConfigError(f"upstream.client_ip_headers: unknown {sorted(unknown_ip_headers)}; "
                          'use "x-forwarded-for", "forwarded" and/or "x-real-ip"')
    if settings.storage.lock_ttl <= 0:
        raise ConfigError("storage.lock_ttl must be positive (seconds)")
    if settings.routes.randomize and len(settings.routes.randomize_secret) < 16:
        raise ConfigError("routes.randomize needs routes.randomize_secret of at least 16 characters")
    if settings.proxy.max_body <= 0 or settings.proxy.max_target <= 0:
        raise ConfigError("proxy.max_body and proxy.max_target must be positive")
    if settings.privacy.ip_retention not in ("full", "truncated", "none"):
        raise ConfigError("privacy.ip_retention must be full, truncated or none")
    if settings.spool.max_bytes <= 0 or settings.spool.replay_rate <= 0 or settings.spool.replay_window < 1:
        raise ConfigError("spool.max_bytes, spool.replay_rate and spool.replay_window must be positive")
    if settings.upstream.client not in ("aiohttp", "httpx"):
        raise ConfigError(f"upstream.client must be \"aiohttp\" or \"httpx\", got {settings.upstream.client!r}")
    if settings.upstream.pool_size < 1:
        raise ConfigError("upstream.pool_size must be at least 1")
    if settings.proxy.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"proxy.event_loop must be \"uvloop\" or \"asyncio\", got {settings.proxy.event_loop!r}")
    if settings.tls.policy not in ("intermediate", "modern"):
        raise ConfigError(f"tls.policy must be \"intermediate\" or \"modern\", got {settings.tls.policy!r}")
    if settings.proxy.tls_context_cache < 1:
        raise ConfigError("proxy.tls_context_cache must be at least 1")
    directory = _DIRECTORY_SHORTCUTS.get(settings.acme.directory, settings.acme.directory)
    if directory != settings.acme.directory:
        settings = dataclasses.replace(settings, acme=dataclasses.replace(settings.acme, directory=directory))
    if settings.acme.ca_bundle and not Path(settings.acme.ca_bundle).is_file():
        raise ConfigError(f"acme.ca_bundle: no such file {settings.acme.ca_bundle!r}")
    if settings.acme.issuers:
        settings = dataclasses.replace(settings, acme=dataclasses.replace(
            settings.acme, issuers=_validate_issuers(settings.acme.issuers)))
    if settings.monitor.ca_bundle and not Path(settings.monitor.ca_bundle).is_file():
        raise ConfigError(f"monitor.ca_bundle: no such file {settings.monitor.ca_bundle!r}")
    if settings.log.format not in ("json", "text"):
        raise ConfigError(f"log.format must be 'json' or 'text', got {settings.log.format!r}")
    if settings.monitor.interval < 0 or settings.monitor.timeout <= 0:
        raise ConfigError("monitor.interval must be >= 0 and monitor.timeout > 0")
    if not 0 <= settings.monitor.spread <= 1:
        raise ConfigError(f"monitor.spread must be between 0 and 1, got {settings.monitor.spread!r}")
    return settings


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (optional) and apply environment overrides.

    ``env`` defaults to ``os.environ``; tests pass their own mapping. If ``path``
    is None, ``EDGEPROXY_CONFIG`` names the file if set.
    """
    env = os.environ if env is None else env
    if path is None and env.get("EDGEPROXY_CONFIG"):
        path = env["EDGEPROXY_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    sections = get_type_hints(Settings)
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] must be a table")
        built[name] = _build_section(cls, name, section, env)
    return _validate(Settings(**built))
