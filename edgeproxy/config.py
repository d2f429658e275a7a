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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError

__all__ = [
    "AcmeSettings",
    "AdminSettings",
    "DnsSettings",
    "DomainsSettings",
    "ListenSettings",
    "ProxySettings",
    "RoutesSettings",
    "Settings",
    "StorageSettings",
    "UpstreamSettings",
    "load_settings",
    "parse_hostport",
    "LETSENCRYPT_PRODUCTION",
    "LETSENCRYPT_STAGING",
]

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
_DIRECTORY_SHORTCUTS = {"production": LETSENCRYPT_PRODUCTION, "staging": LETSENCRYPT_STAGING}


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETSENCRYPT_PRODUCTION
    email: str = ""
    ca_bundle: str = ""  # extra CA file to trust for the ACME server (Pebble in tests)
    profile: str = ""  # optional ACME profile (e.g. "shortlived")
    timeout: float = 90.0  # seconds one order may take end to end


@dataclass(frozen=True)
class ListenSettings:
    http: str = "0.0.0.0:80"
    https: str = "0.0.0.0:443"
    admin: str = "127.0.0.1:8081"


@dataclass(frozen=True)
class StorageSettings:
    url: str = "sqlite:///var/lib/edgeproxy/edgeproxy.db"
    # Seal private keys at rest with AES-256-GCM under this master key (keys.py);
    # empty = stored as PEM, protected by file permissions only.
    key_encryption_key_file: str = ""
    previous_key_files: tuple[str, ...] = ()  # old master keys: open only, during `keys rotate`


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
    # The relay client's connection pool: "aiohttp" (httpx API on an aiohttp
    # connector) or "httpx" (httpx's own httpcore pool). Measured side by side in
    # bench/README.md (issue 8): httpcore's pool scans every pooled connection,
    # with a readability syscall each, on every request.
    client: str = "aiohttp"
    pool_size: int = 64  # keep-alive connections to the relay per worker


@dataclass(frozen=True)
class RoutesSettings:
    script_path: str = "/js/app.js"
    api_path: str = "/api/v1/m"


@dataclass(frozen=True)
class DnsSettings:
    cname_target: str = "edge.example.net"
    edge_ips: tuple[str, ...] = ()
    resolver: str = ""  # host:port; empty = system resolver
    check: bool = True  # DNS pre-check before ordering


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
    trusted_hops: tuple[str, ...] = ()  # peers whose X-Forwarded-For we believe (IPs/CIDRs)
    cert_refresh_interval: float = 1.0  # seconds between change-feed polls in each worker
    # API requests per second per visitor IP and per custom domain, answered 429
    # locally (never forwarded, never spooled); per worker process; 0 = off.
    rate_per_ip: float = 20.0
    rate_per_domain: float = 2000.0
    rate_burst: float = 2.0  # seconds of rate a quiet key may spend at once
    # TLS contexts kept built per worker (LRU; issue 8). A built context costs
    # ~50 KB of RSS and ~1.5 ms of CPU, so 100,000 names are never all built at once.
    tls_context_cache: int = 1024
    # The event loop of `serve`: "uvloop" (libuv; faster TLS and socket I/O) when
    # installed, else "asyncio". Measured in bench/README.md (issue 8).
    event_loop: str = "uvloop"


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


def _build_section(cls: type[Any], name: str, values: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for key, annotation in hints.items():
        env_name = f"EDGEPROXY_{name.upper()}_{key.upper()}"
        if env_name in env:
            kwargs[key] = _coerce(env[env_name], str(annotation), env_name)
        elif key in values:
            kwargs[key] = _coerce(values[key], str(annotation), f"[{name}] {key}")
    return cls(**kwargs)


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
    unknown_ip_headers = set(settings.upstream.client_ip_headers) - {"x-forwarded-for", "forwarded", "x-real-ip"}
    if unknown_ip_headers:
        raise ConfigError(f"upstream.client_ip_headers: unknown {sorted(unknown_ip_headers)}; "
                          'use "x-forwarded-for", "forwarded" and/or "x-real-ip"')
    if settings.proxy.max_body <= 0:
        raise ConfigError("proxy.max_body must be positive")
    if settings.upstream.client not in ("aiohttp", "httpx"):
        raise ConfigError(f"upstream.client must be \"aiohttp\" or \"httpx\", got {settings.upstream.client!r}")
    if settings.upstream.pool_size < 1:
        raise ConfigError("upstream.pool_size must be at least 1")
    if settings.proxy.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"proxy.event_loop must be \"uvloop\" or \"asyncio\", got {settings.proxy.event_loop!r}")
    if settings.proxy.tls_context_cache < 1:
        raise ConfigError("proxy.tls_context_cache must be at least 1")
    directory = _DIRECTORY_SHORTCUTS.get(settings.acme.directory, settings.acme.directory)
    if directory != settings.acme.directory:
        settings = dataclasses.replace(settings, acme=dataclasses.replace(settings.acme, directory=directory))
    if settings.acme.ca_bundle and not Path(settings.acme.ca_bundle).is_file():
        raise ConfigError(f"acme.ca_bundle: no such file {settings.acme.ca_bundle!r}")
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
