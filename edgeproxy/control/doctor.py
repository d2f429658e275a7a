"""``edgeproxy doctor``: is this configuration ready to serve, and will ad blockers leave it alone?

Owns: the pre-flight checks an operator runs after editing the config and
before (re)starting the service, and the list of trigger words that filter
lists key on.
Must not import: ``acme``, ``hypercorn``, storage backends (the store is opened
through ``keys.open_store``, exactly as ``serve`` opens it).

Each check yields :class:`Finding` rows; an ``error`` means the edge cannot work
as configured (exit 1), a ``warning`` means it works but something will hurt
later (exit 0, or 1 with ``--strict``). The name checks are pure functions;
the listener, token, storage and network checks touch the machine, and the
network ones (ACME directory, vendor script and relay) can be turned off with
``--offline``.

Why the name checks exist: EasyPrivacy and its kin block by words in the path
or hostname (``/stats.*/event``, ``://analytics.*/collect``, ``/api/collect|``)
and by the vendor's own domain (``||plausible.io^$third-party``); uBlock Origin
on Firefox also re-checks a request under its CNAME target (CNAME uncloaking).
``tests/test_adblock.py`` runs the real list over the defaults.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from ..config import LETSENCRYPT_STAGING, Settings, parse_hostport
from .domains import normalize_hostname, registered_domain
from ..errors import ConfigError, EdgeproxyError, InvalidHostname
from .keys import open_store
from ..rules.routes import configured_routes
from ..storage import sqlite_path_from_url
from .tokens import TokenStore

__all__ = [
    "Finding",
    "Level",
    "SHORT_TRIGGERS",
    "TRIGGER_WORDS",
    "check_acme",
    "check_listeners",
    "check_ipv6",
    "check_names",
    "check_routes",
    "query_triggers_in",
    "PIXEL_NAMES",
    "QUERY_TRIGGERS",
    "pixel_name_in",
    "check_storage",
    "check_token_file",
    "check_tls",
    "check_upstream",
    "exit_code",
    "format_findings",
    "run_doctor",
    "trigger_words_in",
]

Level = Literal["error", "warning", "ok"]

# Matched anywhere inside a path segment or DNS label ("googleanalytics", "tracker").
TRIGGER_WORDS: tuple[str, ...] = (
    "analytic", "stats", "statistic", "track", "collect", "event", "pixel", "beacon",
    "telemetry", "metric", "pageview", "counter", "measure", "tracing",
)
# Too short to match inside words ("static", "white"): matched as a whole segment/label.
SHORT_TRIGGERS: tuple[str, ...] = ("ga", "gtm", "pv", "px", "hit", "tag", "log")

# RFC 2606 / RFC 6761 names: fine in examples, never what customers should CNAME to.
_PLACEHOLDER_DOMAINS = ("example.com", "example.net", "example.org")
_PLACEHOLDER_TLDS = ("example", "invalid", "test", "localhost")


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # the setting or resource concerned, e.g. "routes.api_path"
    message: str


Bind = Callable[[str, int], None]


# -- names (pure) -------------------------------------------------------------------------


def trigger_words_in(name: str, extra: Iterable[str] = ()) -> list[str]:
    """The trigger words found in a path or hostname, in order of first appearance."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    found: list[str] = []
    long_words = [*TRIGGER_WORDS, *(w.lower() for w in extra if len(w) > 3)]
    for token in tokens:
        for word in long_words:
            if word in token and word not in found:
                found.append(word)
        if token in SHORT_TRIGGERS and token not in found:
            found.append(token)
    return found


def _vendor_domains(settings: Settings) -> dict[str, str]:
    """Registrable domain of each upstream URL (keyed by setting name)."""
    out: dict[str, str] = {}
    for key in ("script", "relay"):
        host = urlsplit(getattr(settings.upstream, key)).hostname or ""
        try:
            out[f"upstream.{key}"] = registered_domain(host, extra_suffixes=settings.domains.extra_suffixes)
        except InvalidHostname:
            # Unknown TLD (".invalid", a lab name): the last two labels are the best guess.
            if host:
                out[f"upstream.{key}"] = ".".join(host.split(".")[-2:])
    return out


# Query fragments that generic EasyPrivacy rules block on every domain (``?type=pageview&``,
# ``&t=pageview&``, ``?event=pageview&`` ...): a beacon whose query carries one is blocked
# in the browser whatever its host and path. Matched case-insensitively, without the
# surrounding ``?``/``&`` (a warning errs on the side of caution).
QUERY_TRIGGERS: tuple[str, ...] = (
    "type=pageview", "t=pageview", "event=pageview", "hittype=pageview", "ev=pageview",
    "event_name=page_view", "action=event", "action=impression", "event=impressions",
    "logtype=impression", "logtype=trackevent", "pageviews=", "action=track_visitor", "type=page&event=",
)
# A beacon URL below each kind of route, checked when the route names no samples.
_DEFAULT_SAMPLES: dict[str, tuple[str, ...]] = {
    "script": (), "event": ("/e?u=%2Fhome&r=",), "passthrough": ("/config.json?v=1",), "asset": ("/app.js",),
}


# File names EasyPrivacy blocks as "/NAME.gif?" on every domain (about 150 rules; these
# are the ones the trigger words above do not already catch), and any 1-3 character name.
PIXEL_NAMES: frozenset[str] = frozenset({
    "blank", "spacer", "clear", "dot", "null", "img", "imp", "impr", "view", "visit", "visitor", "pix",
    "pxl", "pxf", "1x1", "1px", "2x2", "ping", "count", "activity", "audience", "batch", "cookie", "sync",
    "seed", "rum", "utm", "urchin", "page-view", "pagedot", "pagetag", "postview", "openpixel", "snowman",
})


def pixel_name_in(path: str) -> str | None:
    """The pixel file name (``p.gif``) a filter list blocks when a query follows, or None."""
    name = path.rsplit("/", 1)[-1].lower()
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("gif", "png"):
        return None
    return name if len(stem) <= 3 or stem in PIXEL_NAMES else None


def query_triggers_in(query: str) -> list[str]:
    """The blocked query fragments (:data:`QUERY_TRIGGERS`) found in ``query``."""
    lowered = query.lower()
    return [t for t in QUERY_TRIGGERS if t in lowered]


def check_routes(settings: Settings, brands: Iterable[str] = ()) -> list[Finding]:
    """Each route's path, and sample beacon URLs below it with their query strings
    (``samples`` per route, or one per kind), against the trigger words and the
    query fragments filter lists block. With the default table the findings are
    named ``routes.script_path`` / ``routes.api_path``, else ``routes.route NAME``."""
    findings: list[Finding] = []
    default_table = not settings.routes.route
    for route in configured_routes(settings.routes):
        check = {"script": "routes.script_path", "api": "routes.api_path"}.get(route.name, "") if default_table \
            else f"routes.route {route.name}"
        words = trigger_words_in(route.path, brands)
        if words:
            findings.append(Finding("warning", check, (
                f"{route.path!r} contains {', '.join(words)}: filter lists block paths with such words; "
                "choose a neutral name such as /assets/site.js or /api/v1/m")))
        else:
            findings.append(Finding("ok", check, f"{route.path!r} has no trigger words"))
        for sample in route.samples or _DEFAULT_SAMPLES[route.kind]:
            url = route.path.rstrip("/") + sample if sample.startswith("/") else route.path + sample
            path, _, query = url.partition("?")
            pixel = pixel_name_in(path) if "?" in url else None
            blocked = [*trigger_words_in(path, brands), *query_triggers_in(query), *([pixel] if pixel else [])]
            if blocked:
                hint = (" (a route's request_rewrite can give the relay the names it expects while the "
                        "browser sends neutral ones)" if route.kind == "event" and query_triggers_in(query) else "")
                findings.append(Finding("warning", f"{check} sample", (
                    f"{url!r} contains {', '.join(blocked)}: filter lists block such beacons{hint}")))
            else:
                findings.append(Finding("ok", f"{check} sample", f"{url!r} has no trigger words"))
    return findings


def check_names(settings: Settings) -> list[Finding]:
    """Route paths and the CNAME target: trigger words, vendor names, placeholders."""
    findings: list[Finding] = []
    vendors = _vendor_domains(settings)
    # The vendor's brand ("plausible", "simpleanalyticscdn") is a trigger word too.
    brands = sorted({domain.split(".")[0] for domain in vendors.values()})
    findings += check_routes(settings, brands)

    target = settings.dns.cname_target.rstrip(".")
    if not target:
        level: Level = "warning" if settings.dns.edge_ips else "error"
        findings.append(Finding(level, "dns.cname_target", "empty: customers are told no CNAME"
                                + (" (only dns.edge_ips)" if settings.dns.edge_ips else " and no dns.edge_ips")))
        return findings
    try:
        target = normalize_hostname(target)
    except InvalidHostname as exc:
        findings.append(Finding("error", "dns.cname_target", f"{target!r} is not a hostname: {exc}"))
        return findings
    words = trigger_words_in(target, brands)
    if words:
        findings.append(Finding("warning", "dns.cname_target", (
            f"{target!r} contains {', '.join(words)}: uBlock Origin uncloaks CNAMEs and blocks such "
            "hostnames; choose a neutral label such as edge.<your domain>")))
    for key, vendor in vendors.items():
        if target == vendor or target.endswith("." + vendor):
            findings.append(Finding("warning", "dns.cname_target", (
                f"{target!r} is under the vendor's domain {vendor} ({key}): lists block it by domain "
                "(||vendor^$third-party) once the CNAME is uncloaked; use a domain of your own")))
    placeholder = any(target == d or target.endswith("." + d) for d in _PLACEHOLDER_DOMAINS)
    if placeholder or target.rsplit(".", 1)[-1] in _PLACEHOLDER_TLDS:
        findings.append(Finding("warning", "dns.cname_target",
                                f"{target!r} is a reserved example name: set the edge's real hostname"))
    if not any(f.check == "dns.cname_target" for f in findings):
        findings.append(Finding("ok", "dns.cname_target", f"{target!r} is neutral"))
    return findings


# -- the machine ---------------------------------------------------------------------------


def _try_bind(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def _ipv6_listening(settings: Settings) -> bool:
    """Whether listen.http and listen.https take IPv6 connections on this host
    ("[::]" falls back to IPv4 where the host has no IPv6: server.bind_socket)."""
    for value in (settings.listen.http, settings.listen.https):
        try:
            host, _port = parse_hostport(value, what="listen")
            address = ipaddress.ip_address(host)
        except (ConfigError, ValueError):
            return False
        if address.version != 6:
            return False
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


AaaaLookup = Callable[[str], "list[str] | None"]


def _aaaa(settings: Settings) -> AaaaLookup:
    def lookup(name: str) -> list[str] | None:
        import dns.exception
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=not settings.dns.resolver)
        if settings.dns.resolver:
            host, _, port = settings.dns.resolver.rpartition(":")
            resolver.nameservers, resolver.port = [host.strip("[]")], int(port)
        resolver.lifetime = resolver.timeout = settings.dns.timeout
        try:
            answer = resolver.resolve(name, "AAAA", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError):
            return None
        return [str(r.address) for rrset in answer.response.answer for r in rrset if hasattr(r, "address")]

    return lookup


def check_ipv6(settings: Settings, *, network: bool, lookup: AaaaLookup | None = None) -> list[Finding]:
    """Customers' names CNAME to dns.cname_target: if it has an AAAA record, browsers
    and Let's Encrypt (which prefers IPv6) connect over IPv6, so the edge must listen there."""
    listening = _ipv6_listening(settings)
    target = settings.dns.cname_target.rstrip(".")
    if not network or not target:
        return [Finding("ok", "listen.ipv6", "IPv6 listeners" if listening else "IPv4 only")]
    found = (lookup or _aaaa(settings))(target)
    if found is None:
        return [Finding("warning", "listen.ipv6", f"could not look up AAAA of {target} (DNS failed)")]
    if found and not listening:
        return [Finding("warning", "listen.ipv6", (
            f"{target} has AAAA {', '.join(found[:3])} but nothing listens on IPv6 here: visitors and "
            "Let's Encrypt (IPv6 first) fail to connect; listen on [::] or drop the AAAA record"))]
    return [Finding("ok", "listen.ipv6", f"{target} has {'AAAA ' + found[0] if found else 'no AAAA'}; "
                    + ("IPv6 listeners" if listening else "IPv4 only"))]


def _unix_socket_findings(path: Path) -> list[Finding]:
    """The admin API on a Unix socket: serve creates it (0600) and reclaims a stale one."""
    if not path.parent.is_dir():
        return [Finding("error", "listen.admin", f"{path.parent} does not exist: serve cannot create {path.name}")]
    if not os.access(path.parent, os.W_OK):
        return [Finding("error", "listen.admin", f"{path.parent} is not writable: serve cannot create {path.name}")]
    return [Finding("ok", "listen.admin", f"unix socket {path} can be created (local users only)")]


def check_listeners(settings: Settings, bind: Bind = _try_bind) -> list[Finding]:
    """Each listener parses, is distinct, can be bound; the admin API stays off public addresses."""
    findings: list[Finding] = []
    addresses: dict[str, tuple[str, int]] = {}
    for key in ("http", "https", "admin"):
        value = getattr(settings.listen, key)
        if key == "admin" and value.startswith("unix:"):
            findings += _unix_socket_findings(Path(value[len("unix:"):]))
            continue
        try:
            addresses[key] = parse_hostport(value, what=f"listen.{key}")
        except ConfigError as exc:
            findings.append(Finding("error", f"listen.{key}", str(exc)))
    seen: dict[tuple[str, int], str] = {}
    for key, (host, port) in addresses.items():
        where = f"listen.{key}"
        if port and (host, port) in seen:  # port 0: each bind gets its own ephemeral port
            findings.append(Finding("error", where, f"same address as listen.{seen[host, port]}"))
            continue
        seen[host, port] = key
        try:
            bind(host, port)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                findings.append(Finding("error", where, (
                    f"cannot bind {host}:{port}: permission denied; ports below 1024 need "
                    "CAP_NET_BIND_SERVICE (systemd AmbientCapabilities, docker --cap-add) or root")))
            elif exc.errno == errno.EADDRINUSE:
                findings.append(Finding("warning", where,
                                        f"{host}:{port} is in use (is edgeproxy already running?)"))
            else:
                findings.append(Finding("error", where, f"cannot bind {host}:{port}: {exc.strerror or exc}"))
            continue
        findings.append(Finding("ok", where, f"{host}:{port} can be bound"))
    if "admin" in addresses:
        host = addresses["admin"][0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            findings.append(Finding("warning", "listen.admin", (
                f"{host} is not a loopback address: the admin API is then reachable from the network "
                "(bearer token only); keep it on 127.0.0.1 or firewall it")))
    return findings


def _private_file(where: str, path: Path, *, missing: str) -> tuple[list[Finding], str | None]:
    """Findings for a secret file that must be readable and private; (findings, its text)."""
    if not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK):
            return [Finding("error", where, f"{path} is missing and {parent} is not writable")], None
        return [Finding("warning", where, f"{path} is missing: {missing}")], None
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        return [Finding("error", where, f"cannot read {path}: {exc.strerror or exc}")], None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [Finding("warning", where, f"{path} is readable by group/others "
                        f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600")], text
    return [], text


def check_token_file(settings: Settings) -> list[Finding]:
    """The bootstrap token file and the named-tokens file (``tokens.py``)."""
    findings, token = _private_file("admin.token_file", Path(settings.admin.token_file),
                                    missing="serve creates a random one (0600) on first start")
    if token is not None and len(token.strip()) < 16:
        findings.insert(0, Finding("error", "admin.token_file",
                                   f"the token in {settings.admin.token_file} is shorter than 16 characters"))
    if token is not None and not findings:
        findings.append(Finding("ok", "admin.token_file", f"{settings.admin.token_file} is readable and private"))
    named, text = _private_file("admin.tokens_file", Path(settings.admin.tokens_file),
                                missing="no named tokens yet (`edgeproxy tokens create NAME`)")
    if text is not None and not any(f.level == "error" for f in findings):
        try:
            TokenStore(settings.admin).list()  # reads both files exactly as serve does
        except ConfigError as exc:
            named.insert(0, Finding("error", "admin.tokens_file", str(exc)))
        if not named:
            named.append(Finding("ok", "admin.tokens_file", f"{settings.admin.tokens_file} is readable and private"))
    return findings + named


def check_storage(settings: Settings) -> list[Finding]:
    """Open the store as serve does (master key check included) and read from it; a
    SQLite file that does not exist yet is not created."""
    url = settings.storage.url
    try:
        if url.partition(":")[0].lower() == "sqlite":
            path = Path(sqlite_path_from_url(url))
            if not path.exists():
                parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
                if not os.access(parent, os.W_OK):
                    return [Finding("error", "storage.url", f"{path} does not exist and {parent} is not writable")]
                return [Finding("warning", "storage.url", f"{path} does not exist yet: serve creates it")]
        # Opens a few sealed keys (a wrong master key is an error), and never
        # migrates: an outdated shared schema is a finding, not something to fix here.
        storage = open_store(replace(settings, storage=replace(settings.storage, auto_migrate=False)))
        try:
            storage.get_domain("doctor.invalid")
            count = storage.count_domains()
        finally:
            storage.close()
    except EdgeproxyError as exc:
        return [Finding("error", "storage.url", str(exc))]
    return [Finding("ok", "storage.url", f"readable, {count} domain(s) registered")]


def check_tls(settings: Settings) -> list[Finding]:
    """Whether this machine can serve certificates on the native path (``tlsnative``:
    the same checks and in-memory handshake ``serve`` runs in every worker)."""
    if not settings.proxy.tls_native:
        return [Finding("ok", "proxy.tls_native",
                        "off (default): one SSLContext per name through Python's public ssl API")]
    from ..edge.certstore import load_native

    if load_native() is None:
        return [Finding("warning", "proxy.tls_native",
                        "the opt-in native path failed its checks on this machine (serve logs why): it builds "
                        "one SSLContext per name instead, as with the default (~6x its CPU per cache miss)")]
    return [Finding("ok", "proxy.tls_native",
                    f"on, opt-in accelerator through ctypes and CPython's private _ssl layout "
                    f"({ssl.OPENSSL_VERSION}, self-test passed)")]


# -- configuration of the ACME CA and the vendor, optionally over the network ------------------


def _url_findings(where: str, url: str) -> tuple[list[Finding], bool]:
    """Shape of an https URL; (findings, usable)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return [Finding("error", where, f"{url!r} is not an http(s) URL")], False
    findings: list[Finding] = []
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        findings.append(Finding("warning", where, f"{url!r} is plain HTTP: use https"))
    if parts.hostname.rsplit(".", 1)[-1] == "invalid":
        findings.append(Finding("error", where, f"{url!r} is the placeholder (.invalid never resolves): set it"))
        return findings, False
    return findings, True


def check_acme(settings: Settings, *, network: bool, transport: httpx.BaseTransport | None = None) -> list[Finding]:
    where = "acme.directory"
    directory = settings.acme.directory
    findings, usable = _url_findings(where, directory)
    if directory == LETSENCRYPT_STAGING:
        findings.append(Finding("warning", where, "Let's Encrypt staging: browsers do not trust its certificates"))
    verify: ssl.SSLContext | bool = True
    if settings.acme.ca_bundle:
        try:
            certs = x509.load_pem_x509_certificates(Path(settings.acme.ca_bundle).read_bytes())
        except (OSError, ValueError) as exc:
            findings.append(Finding("error", "acme.ca_bundle", f"{settings.acme.ca_bundle}: no PEM certificates ({exc})"))
            return findings
        findings.append(Finding("ok", "acme.ca_bundle", f"{len(certs)} certificate(s)"))
        verify = ssl.create_default_context(cafile=settings.acme.ca_bundle)
    if not (network and usable):
        return findings
    try:
        with httpx.Client(transport=transport, verify=verify, trust_env=False, timeout=10.0) as client:
            reply = client.get(directory)
        reply.raise_for_status()
        resources = reply.json()
        missing = [k for k in ("newNonce", "newAccount", "newOrder") if k not in resources]
    except (httpx.HTTPError, ValueError) as exc:
        findings.append(Finding("error", where, f"GET {directory} failed: {exc}"))
        return findings
    if missing:
        findings.append(Finding("error", where, f"{directory} is not an ACME directory (no {', '.join(missing)})"))
    else:
        findings.append(Finding("ok", where, f"{directory} answers as an ACME directory"))
    return findings


def check_upstream(settings: Settings, *, network: bool, transport: httpx.BaseTransport | None = None) -> list[Finding]:
    """The vendor script must answer 200; the relay must answer HTTP at all (any status)."""
    findings: list[Finding] = []
    targets: list[tuple[str, str]] = []
    for key in ("script", "relay"):
        url = getattr(settings.upstream, key)
        found, usable = _url_findings(f"upstream.{key}", url)
        findings += found
        if usable:
            targets.append((key, url))
    if not network:
        return findings
    with httpx.Client(transport=transport, trust_env=False, follow_redirects=False,
                      timeout=httpx.Timeout(settings.upstream.timeout, connect=settings.upstream.connect_timeout)) as client:
        for key, url in targets:
            where = f"upstream.{key}"
            try:
                reply = client.get(url)
            except httpx.HTTPError as exc:
                findings.append(Finding("error", where, f"GET {url} failed: {exc or type(exc).__name__}"))
                continue
            if key == "script" and reply.status_code != 200:
                findings.append(Finding("error", where, f"GET {url} answered {reply.status_code}, expected 200"))
            else:
                findings.append(Finding("ok", where, f"GET {url} answered {reply.status_code}"))
    return findings


# -- the whole run ------------------------------------------------------------------------------


def run_doctor(settings: Settings, *, network: bool = True, bind: Bind = _try_bind,
               transport: httpx.BaseTransport | None = None) -> list[Finding]:
    return [
        *check_listeners(settings, bind),
        *check_ipv6(settings, network=network),
        *check_token_file(settings),
        *check_storage(settings),
        *check_tls(settings),
        *check_acme(settings, network=network, transport=transport),
        *check_upstream(settings, network=network, transport=transport),
        *check_names(settings),
    ]


def exit_code(findings: Iterable[Finding], *, strict: bool = False) -> int:
    levels = {f.level for f in findings}
    return 1 if "error" in levels or (strict and "warning" in levels) else 0


def format_findings(findings: Iterable[Finding]) -> str:
    rows = list(findings)
    label = {"error": "ERROR", "warning": "WARN", "ok": "ok"}
    lines = [f"{label[f.level]:<6} {f.check:<20} {f.message}" for f in rows]
    errors = sum(f.level == "error" for f in rows)
    warnings = sum(f.level == "warning" for f in rows)
    lines.append(f"{errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
