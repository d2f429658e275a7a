"""The public ASGI apps: host gate, ACME challenge answers, then the route table.

Owns: everything a browser or the CA sees on the public listeners.

- ``http_app`` (port 80): HTTP-01 answers (RFC 8555 section 8.3) for registered
  hosts, a 308 to HTTPS for registered hosts with a live certificate, 404 for
  everything else.
- ``https_app`` (port 443): the Host must equal the SNI and name an active site,
  else 421 Misdirected Request (RFC 9110 section 15.5.20). Then the route table
  (``routes.py``): ``script`` routes serve the vendor script rewritten for the
  host (``scripts.py``), ``event`` routes send calls (GET beacons with their
  query, POSTs) to the ``events`` relay, ``passthrough`` routes read live from
  their upstream, ``asset`` routes serve cached static files. No match: 404.

The invariant this module exists for (the outage that started the product):
an unknown or mismatched Host/SNI never reaches an upstream. The gate runs
before any routing; no code path after a refusal touches a client.

Nothing refused silently: every call an ``event`` route refuses itself (400,
404, 413, 414, 429) is counted by reason and handed to ``record_refusal``.

The proxy sees ``resolve`` (an in-memory dict lookup), ``challenge`` (the
HTTP-01 token lookup), the route table and relays, nothing else. It holds no
per-user state (house rule 5): see ``relay.py`` for the client policy.

Must not import: ``acme``/``josepy``, the storage backends, ``spool``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote_to_bytes

import httpx

from ..rules.addresses import normalize_ip
from ..config import Settings
from ..errors import ConfigError
from ..rules.ratelimit import TokenBuckets
from .relay import (ForwardRequest, ForwardResult, HttpRelay, Observe, Relay, connection_tokens,
                    new_http_client, relay_response_headers)
from ..rules.routes import Route, RouteTable, configured_routes, route_table
from .scripts import (AssetCache, Rewriter, ScriptSource, accepts_gzip, content_coding, etag_matches,
                      script_rules)

__all__ = [
    "ChallengeLookup",
    "EdgeProxy",
    "ForwardRequest",
    "ForwardResult",
    "RecordRefusal",
    "Resolve",
    "Site",
    "TrustedHops",
    "accepts_gzip",
    "content_coding",
    "etag_matches",
    "forward_headers",
    "forwarded_for",
    "host_from_headers",
    "normalize_host",
    "parse_trusted_hops",
    "relay_response_headers",
    "tls_server_name",
]

log = logging.getLogger("edgeproxy.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]
TrustedHops = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Site:
    """One registered hostname as the proxy sees it."""

    hostname: str
    active: bool  # has a valid certificate; only active sites are served on HTTPS / redirected on HTTP


Resolve = Callable[[str], Site | None]
"""Registered site for a hostname, or None. An in-memory dict lookup: no I/O, never blocks.
The argument is already lowercased, without port and without trailing dot."""

ChallengeLookup = Callable[[str], Awaitable[tuple[str, str] | None]]
"""HTTP-01 token -> (hostname, key authorization), or None when the token is unknown."""


# ---------------------------------------------------------------------------------------
# Pure functions (sans-IO, house rule 2): the host gate and the header policy.
# ---------------------------------------------------------------------------------------

# LDH hostnames only (RFC 1123 section 2.1; IDNs arrive as A-labels). Anything else:
# userinfo, brackets/IPv6 literals, spaces, underscores, empty labels cannot be a
# registered name, so the gate calls it unknown before the registry is even asked.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


def normalize_host(value: bytes) -> str | None:
    """The hostname a ``Host``/``:authority`` value names, or None when malformed.

    Lowercase, ``:port`` removed (a port must be 1-5 ASCII digits, <= 65535), ONE
    trailing dot removed (the absolute form of the same name). Userinfo, IPv6
    literals, spaces, non-ASCII and empty values are malformed: the caller treats
    them as unknown hosts.
    """
    if not value or len(value) > 262:  # 253 for the name + ":" + port + "."
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    name, sep, port = text.rpartition(":")
    if sep:
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            return None
    else:
        name = text
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not _HOSTNAME_RE.match(name):
        return None
    return name


def host_from_headers(headers: Headers) -> str | None:
    """The normalized request host, or None when absent, duplicated or malformed.

    HTTP/1.1 carries ``Host``; HTTP/2 carries ``:authority``, which ASGI servers
    (hypercorn) hand over as a single ``host`` header. Should a server pass the
    pseudo-header through as well, both must agree (RFC 9113 section 8.3.1).
    More than one ``Host`` field is a bad request (RFC 9112 section 3.2): unknown.
    """
    host: bytes | None = None
    authority: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            if host is not None:
                return None
            host = value
        elif lname == b":authority":
            if authority is not None:
                return None
            authority = value
    if host is None:
        host = authority
    elif authority is not None and normalize_host(authority) != normalize_host(host):
        return None
    return None if host is None else normalize_host(host)


def tls_server_name(scope: Scope) -> str | None:
    """The SNI the client sent on this connection, or None (no TLS, or no SNI).

    ``server.py`` puts it in ``scope["extensions"]["tls"]["server_name"]`` per
    connection (recorded by the certstore's SNI callback, already lowercased).
    """
    extensions = scope.get("extensions")
    if not isinstance(extensions, Mapping):
        return None
    tls = extensions.get("tls")
    if not isinstance(tls, Mapping):
        return None
    name = tls.get("server_name")
    return name if isinstance(name, str) and name else None


def parse_trusted_hops(values: Iterable[str]) -> TrustedHops:
    """``proxy.trusted_hops`` (IPs or CIDRs) as networks; ConfigError names a bad entry."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"proxy.trusted_hops: {value!r} is not an IP address or CIDR") from exc
    return tuple(networks)


def _peer_is_trusted(peer: str, trusted: TrustedHops) -> bool:
    if not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(address in network for network in trusted)


def forwarded_for(inbound: Sequence[bytes], peer: str | None, trusted: TrustedHops) -> bytes | None:
    """The ``X-Forwarded-For`` value to send upstream.

    A client can write anything into X-Forwarded-For, so an inbound value is
    ignored unless the peer itself is a configured hop (house rule 5); then the
    peer is appended to the chain it reported. None when the peer is unknown
    (e.g. a unix socket) and nothing is trusted.
    """
    if peer is None:
        return None
    if inbound and _peer_is_trusted(peer, trusted):
        chain = b", ".join(part for part in (v.strip() for v in inbound) if part)
        if chain:
            return chain + b", " + peer.encode("ascii", "replace")
    return peer.encode("ascii", "replace")


def visitor_ip(inbound: Sequence[bytes], peer: str | None, trusted: TrustedHops) -> str | None:
    """The visitor's address: the peer, or, when the peer is a trusted hop, the
    right-most address in its X-Forwarded-For that is not itself trusted."""
    if peer is None or not inbound or not _peer_is_trusted(peer, trusted):
        return peer
    chain = [normalize_ip(part.strip().decode("ascii", "replace"))
             for v in inbound for part in v.split(b",") if part.strip()]
    for address in reversed(chain):
        if not _peer_is_trusted(address, trusted):
            return address
    return chain[0] if chain else peer


def _forwarded_node(address: str) -> bytes:
    # RFC 7239 section 6: IPv6 addresses are bracketed and the value quoted.
    return (f'"[{address}]"' if ":" in address else address).encode("ascii", "replace")


# RFC 9110 section 7.6.1: hop-by-hop fields end at this hop.
_HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
# Never sent to the relay: the client's identity with the customer's site (cookies,
# credentials), fields the edge sets itself, and fields the client could use to
# impersonate a hop (forwarding headers from an untrusted peer).
_REQUEST_DROP: Final = _HOP_BY_HOP | frozenset({
    b"host", b"cookie", b"cookie2", b"authorization", b"proxy-authorization",
    b"content-length", b"expect", b"accept-encoding",
    b"forwarded", b"x-real-ip", b"x-client-ip",
})

def forward_headers(headers: Headers, *, peer: str | None, trusted: TrustedHops, host: str,
                    client_ip: frozenset[str] = frozenset({"x-forwarded-for"})) -> list[tuple[bytes, bytes]]:
    """The request headers the relay receives for one API call.

    Drops hop-by-hop fields and any field named in ``Connection``, ``Host``,
    ``Cookie``, ``Authorization`` and every client-supplied forwarding header;
    adds ``X-Forwarded-Host`` (the custom host), ``X-Forwarded-Proto: https``
    and, as ``client_ip`` (``upstream.client_ip_headers``) says, the visitor's
    address as ``X-Forwarded-For`` (see :func:`forwarded_for`), ``Forwarded``
    (RFC 7239) and/or ``X-Real-IP``: some vendors need it, others must never see it.
    """
    named = connection_tokens(headers)
    inbound_xff: list[bytes] = []
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-forwarded-for":
            inbound_xff.append(value)
        elif (lname in _REQUEST_DROP or lname in named or lname.startswith(b"x-forwarded-")
              or lname.startswith(b":")):
            continue
        else:
            out.append((lname, value))
    if "x-forwarded-for" in client_ip:
        xff = forwarded_for(inbound_xff, peer, trusted)
        if xff is not None:
            out.append((b"x-forwarded-for", xff))
    visitor = visitor_ip(inbound_xff, peer, trusted) if client_ip - {"x-forwarded-for"} else None
    if visitor is not None and "forwarded" in client_ip:
        out.append((b"forwarded", b"for=" + _forwarded_node(visitor) + b";host=" + host.encode("ascii") + b";proto=https"))
    if visitor is not None and "x-real-ip" in client_ip:
        out.append((b"x-real-ip", visitor.encode("ascii", "replace")))
    out.append((b"x-forwarded-host", host.encode("ascii")))
    out.append((b"x-forwarded-proto", b"https"))
    return out


# ---------------------------------------------------------------------------------------
# Canned answers, built once (the hot path allocates nothing for them).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Canned:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _canned(status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> _Canned:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    return _Canned(status, headers + list(extra), body)


_NOT_FOUND: Final = _canned(404, b"not found\n")
_MISDIRECTED: Final = _canned(421, b"misdirected request\n", [(b"cache-control", b"no-store")])
_BAD_REQUEST: Final = _canned(400, b"bad request\n")
_TOO_LARGE: Final = _canned(413, b"request body too large\n")
_TOO_MANY: Final = _canned(429, b"too many requests\n", [(b"retry-after", b"1")])
_SCRIPT_UNAVAILABLE: Final = _canned(502, b"script unavailable\n", [(b"cache-control", b"no-store")])
_STORAGE_UNAVAILABLE: Final = _canned(503, b"try again later\n", [(b"retry-after", b"5")])
_SCRIPT_METHODS: Final = _canned(405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
_EVENT_METHODS: Final = _canned(405, b"method not allowed\n", [(b"allow", b"GET, HEAD, POST, OPTIONS")])
_PASSTHROUGH_METHODS: Final = _EVENT_METHODS
_URI_TOO_LONG: Final = _canned(414, b"request target too long\n")
_NO_CONTENT: Final = _Canned(204, [(b"content-length", b"0"), (b"cache-control", b"no-store")], b"")
_ORIGIN_FAILED: Final = _canned(502, b"origin unavailable\n", [(b"cache-control", b"no-store")])


def _error_json(status: int, code: str, message: str) -> _Canned:
    """The error shape of the edge's JSON answers (the spool's 503 has it too)."""
    body = ('{"error":{"code":"%s","message":"%s"}}\n' % (code, message)).encode()
    return _Canned(status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")], body)


_UPSTREAM_FAILED: Final = _error_json(502, "upstream_unavailable", "the upstream did not answer; retry later")
_UPSTREAM_TIMEOUT: Final = _error_json(504, "upstream_timeout", "the upstream did not answer in time; retry later")

_CHALLENGE_PREFIX: Final = "/.well-known/acme-challenge/"
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,256}\Z")  # base64url alphabet (RFC 8555 section 8.3)
# What a raw path / query may carry to the relay: visible ASCII (browsers send some
# characters such as "|" or "{" unencoded in queries; httpx encodes them for the relay).
_PATH_RE: Final = re.compile(rb"[!-\"$-\x3e@-~]*\Z")  # no "#", no "?"
_QUERY_RE: Final = re.compile(rb"[!-\"$-~]*\Z")  # no "#"

_DRAIN_BYTES: Final = 256 * 1024  # extra bytes of a refused streamed body read before the 413
_DRAIN_SECONDS: Final = 1.0


class _ClientGone(Exception):
    """The client disconnected while we were reading its body."""


async def _reply(send: Send, canned: _Canned, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = canned.headers + list(extra) if extra else canned.headers
    await send({"type": "http.response.start", "status": canned.status, "headers": headers})
    await send({"type": "http.response.body", "body": canned.body})


def _header_values(headers: Headers, wanted: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == wanted]


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw
    return quote(str(scope.get("path", "")), safe="/:@!$&'()*+,;=-._~").encode("ascii")


def _client_addr(scope: Scope) -> str | None:
    client = scope.get("client")
    if client and isinstance(client[0], str):
        return normalize_ip(client[0])  # ::ffff:a.b.c.d from a dual-stack socket (addresses.py)
    return None


def _dot_segments(raw: bytes) -> bool:
    """True when a path carries "." or ".." segments, encoded or not (a relay must
    never be steered above its base path)."""
    decoded = unquote_to_bytes(raw).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))


class _TargetRewrite:
    """A route's ``request_rewrite``: literal replacements in the target, longest search
    string first, in one pass (a replacement is never rewritten again)."""

    def __init__(self, rules: Mapping[str, str]) -> None:
        self._table = {k.encode(): v.encode() for k, v in rules.items() if k}
        keys = sorted(self._table, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(k) for k in keys)) if keys else None

    def __call__(self, target: bytes) -> bytes:
        if self._pattern is None:
            return target
        return self._pattern.sub(lambda m: self._table[m.group(0)], target)


RecordRefusal = Callable[[ForwardRequest, int, str], None]
"""``record(request, status, reason)``: keep a request the edge refused on an ``event``
route (``spool.RefusalLog.record``). ``request.body`` is empty where the body was not
kept (413, 414). Must not block: called on the event loop."""


def _ignore_refusal(request: ForwardRequest, status: int, reason: str) -> None:
    return None


class _Refused(Exception):
    """A call a route refuses: the answer, the reason, and what was read of it by then
    (``target`` None when the target itself was refused)."""

    def __init__(self, canned: _Canned, reason: str) -> None:
        super().__init__(reason)
        self.canned = canned
        self.reason = reason
        self.target: bytes | None = None
        self.body = b""


class EdgeProxy:
    """The two public ASGI apps (port 80 and port 443).

    Collaborators come in at construction (the composition root is ``server.py``):
    ``resolve`` (an in-memory lookup; must not block), ``challenge`` (may do I/O;
    awaited only for the port-80 challenge path), ``events`` (the :class:`Relay`
    that ``event`` routes send to: the spool around the relay client in ``serve``;
    a plain :class:`HttpRelay` to ``upstream.relay`` when not given),
    ``record_refusal`` (where refused event calls are kept). ``passthrough`` routes
    always use ``relay``, the plain client (built from ``upstream`` when not given):
    a live read is never spooled. ``transport`` replaces
    the network for the clients the proxy builds itself (tests).

    Concurrency: one instance per worker process, used from its event loop only.
    ``stats`` counts outcomes (``metrics.StatsCounter`` exports them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        resolve: Resolve,
        challenge: ChallengeLookup,
        relay: HttpRelay | None = None,
        events: Relay | None = None,
        record_refusal: RecordRefusal | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        stats: Counter[str] | None = None,
        observe_relay: Observe | None = None,
    ) -> None:
        self.settings = settings
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self._resolve = resolve
        self._challenge = challenge
        self._transport = transport
        self._clock = clock
        self._trusted = parse_trusted_hops(settings.proxy.trusted_hops)
        self._max_body = settings.proxy.max_body
        self._max_target = settings.proxy.max_target
        self._client_ip = frozenset(settings.upstream.client_ip_headers)
        proxy = settings.proxy
        self._per_ip = TokenBuckets(proxy.rate_per_ip, proxy.rate_per_ip * proxy.rate_burst)
        self._per_domain = TokenBuckets(proxy.rate_per_domain, proxy.rate_per_domain * proxy.rate_burst)
        upstream, routes = settings.upstream, settings.routes
        self._routes = routes
        # One table for every host unless routes.randomize: then routes.route_table per host (cached).
        self._fixed_table = None if routes.randomize else route_table("", routes)
        self._client: httpx.AsyncClient | None = None
        # The plain relay: passthrough routes, and event routes when no spool is given.
        self.relay = relay or HttpRelay(upstream.relay, upstream, transport=transport, stats=self.stats,
                                        observe=observe_relay)
        self._events: Relay = events if events is not None else self.relay
        self._record_refusal = record_refusal or _ignore_refusal
        relay_origin = upstream.relay.rstrip("/")
        self._scripts: dict[str, ScriptSource] = {}
        self._assets: dict[str, AssetCache] = {}
        self._request_rewrites: dict[str, _TargetRewrite] = {}
        self._upstreams: dict[str, str] = {}  # route name -> absolute base for non-default upstreams
        first_script = True
        for entry in configured_routes(routes):
            if entry.kind == "script":
                rules = script_rules(entry, upstream, first=first_script)
                self._scripts[entry.name] = ScriptSource(
                    entry.upstream or upstream.script, Rewriter(rules), ttl=upstream.script_ttl,
                    http=self._http, clock=clock, stats=self.stats)
                first_script = False
            elif entry.kind == "asset":
                self._assets[entry.name] = AssetCache(entry.upstream, max_bytes=entry.max_bytes,
                                                      http=self._http, stats=self.stats)
            else:
                self._request_rewrites[entry.name] = _TargetRewrite(entry.request_rewrite)
                base = entry.upstream.rstrip("/")
                if entry.kind == "passthrough" or (base and base != relay_origin):
                    self._upstreams[entry.name] = base or relay_origin
        self._lifespans = 0

    # -- lifecycle ---------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        """The shared client for script and asset fetches."""
        if self._client is None:
            self._client = new_http_client(self.settings.upstream, self._transport)
        return self._client

    async def startup(self) -> None:
        """Create the shared client and start fetching every script in the background.

        Idempotent. Never fails because an origin is down: the first script request
        joins the fetch in flight, or retries it.
        """
        self._http()
        for source in self._scripts.values():
            if not source.fetched:
                source.start_fetch()

    async def refresh_script(self) -> bool:
        """Fetch every script now (or join the fetches in flight); True if every origin gave a good copy."""
        results = await asyncio.gather(*(asyncio.shield(s.start_fetch()) for s in self._scripts.values()))
        return all(results)

    async def aclose(self) -> None:
        """Stop fetches in flight and close the clients (idempotent; a later call opens them again)."""
        for source in self._scripts.values():
            await source.cancel()
        client, self._client = self._client, None
        try:
            if client is not None:
                await client.aclose()
        finally:
            await self.relay.aclose()
            if self._events is not self.relay:
                await self._events.aclose()

    async def forward(self, request: ForwardRequest) -> ForwardResult:
        """Send ``request`` through the plain relay (no spool): replay and tests."""
        return await self.relay.send(request)
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        # Both apps may receive lifespan events for the same instance: the client
        # lives until the last of them shuts down.
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # report, do not crash the server loop
                    log.exception("proxy startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._lifespans += 1
                await send({"type": "lifespan.startup.complete"})
            elif kind == "lifespan.shutdown":
                self._lifespans = max(0, self._lifespans - 1)
                if self._lifespans == 0:
                    await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _other_scope(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})

    # -- logging refusals --------------------------------------------------------------
    def _refuse(self, counter: str, scope: Scope, sni: str | None) -> None:
        self.stats[counter] += 1
        raw_hosts = [v for n, v in scope.get("headers", ()) if n.lower() in (b"host", b":authority")]
        host = b",".join(raw_hosts).decode("latin-1")[:300]
        log.info("refused %s host=%r sni=%r path=%r client=%s", counter, host, sni,
                 str(scope.get("path", ""))[:300], _client_addr(scope))

    # -- port 80 -----------------------------------------------------------------------
    async def http_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Port 80: HTTP-01 answers, 308 to HTTPS for active hosts, 404 otherwise."""
        if scope["type"] != "http":
            await self._other_scope(scope, receive, send)
            return
        host = host_from_headers(scope["headers"])
        path: str = scope["path"]
        if host is not None and scope["method"] == "GET" and path.startswith(_CHALLENGE_PREFIX):
            # Answered before the registered-host gate, by token: the token names
            # its hostname, and the answer requires Host == that name. Any worker
            # or node must answer the CA even before its in-memory host map has
            # caught up with a registration made a moment ago (the CA validates
            # within milliseconds); a gate here would protect nothing, since any
            # registered name reaches the same lookup. Nothing is forwarded.
            await self._answer_challenge(send, host, path[len(_CHALLENGE_PREFIX):])
            return
        site = self._resolve(host) if host is not None else None
        if host is None or site is None:
            self._refuse("http_unknown_host", scope, None)
            await _reply(send, _NOT_FOUND)
            return
        raw = _raw_path(scope)
        if not site.active or not raw.startswith(b"/"):
            self.stats["http_not_found"] += 1
            await _reply(send, _NOT_FOUND)
            return
        location = b"https://" + host.encode("ascii") + raw
        query: bytes = scope.get("query_string", b"")
        if query:
            location += b"?" + query
        self.stats["http_redirect"] += 1
        await send({"type": "http.response.start", "status": 308,
                    "headers": [(b"location", location), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _answer_challenge(self, send: Send, host: str, token: str) -> None:
        if not _TOKEN_RE.match(token):
            self.stats["challenge_bad_token"] += 1
            await _reply(send, _NOT_FOUND)
            return
        try:
            found = await self._challenge(token)
        except Exception:  # storage trouble: the CA retries a 5xx, we log the cause
            log.exception("challenge lookup failed for host %s", host)
            self.stats["challenge_error"] += 1
            await _reply(send, _STORAGE_UNAVAILABLE)
            return
        # A token answers only for the name it was issued for (RFC 8555 section 8.3):
        # another registered host must not be able to serve it.
        if found is None or found[0].lower() != host:
            self.stats["challenge_not_found"] += 1
            await _reply(send, _NOT_FOUND)
            return
        body = found[1].encode("ascii")
        self.stats["challenge_answered"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]})
        await send({"type": "http.response.body", "body": body})

    # -- port 443 ----------------------------------------------------------------------
    async def https_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Port 443: 421 unless Host == SNI names an active site; then the route table."""
        if scope["type"] != "http":
            await self._other_scope(scope, receive, send)
            return
        headers = scope["headers"]
        host = host_from_headers(headers)
        sni = tls_server_name(scope)
        site = self._resolve(host) if host is not None and host == sni else None
        if site is None or not site.active:
            self._refuse("https_misdirected", scope, sni)
            await _reply(send, _MISDIRECTED)
            return
        assert host is not None
        table = self._fixed_table or route_table(host, self._routes)
        route = table.match(scope["path"])
        if route is None:
            self.stats["https_not_found"] += 1
            await _reply(send, _NOT_FOUND)
            return
        kind = route.kind
        if kind == "script":
            await self._script(scope, send, host, route, table)
        elif kind == "event":
            await self._event(scope, receive, send, host, route)
        elif kind == "passthrough":
            await self._passthrough(scope, receive, send, host, route)
        else:
            await self._asset(scope, send, route)

    # -- script routes -------------------------------------------------------------------
    async def _script(self, scope: Scope, send: Send, host: str, route: Route, table: RouteTable) -> None:
        method: str = scope["method"]
        if method != "GET" and method != "HEAD":
            await _reply(send, _SCRIPT_METHODS)
            return
        source = self._scripts[route.name]
        origin = await source.current()
        if origin is None:
            self.stats["script_unavailable"] += 1
            await _reply(send, _SCRIPT_UNAVAILABLE)
            return
        variant = source.variant(host, origin, table)
        accept: list[bytes] = []
        inm: list[bytes] = []
        for name, value in scope["headers"]:
            lname = name.lower()
            if lname == b"accept-encoding":
                accept.append(value)
            elif lname == b"if-none-match":
                inm.append(value)
        coding = content_coding(accept)
        if coding == b"br" and coding not in variant.coded and not await source.brotli_ready(variant):
            coding = content_coding(accept, br=False)
        encoded = variant.coded[coding]
        if inm and etag_matches(inm, encoded.etag):
            self.stats["script_not_modified"] += 1
            await send({"type": "http.response.start", "status": 304, "headers": encoded.not_modified})
            await send({"type": "http.response.body", "body": b""})
            return
        self.stats["script_served"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": encoded.headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else encoded.body})

    # -- asset routes --------------------------------------------------------------------
    async def _asset(self, scope: Scope, send: Send, route: Route) -> None:
        method: str = scope["method"]
        if method != "GET" and method != "HEAD":
            await _reply(send, _SCRIPT_METHODS)
            return
        try:
            target = self._target(scope, route)
        except _Refused as refused:
            await _reply(send, refused.canned)
            return
        found = await self._assets[route.name].get(target.decode("ascii"))
        if isinstance(found, int):
            await _reply(send, _NOT_FOUND if found == 404 else _ORIGIN_FAILED)
            return
        inm = _header_values(scope["headers"], b"if-none-match")
        if inm and etag_matches(inm, found.etag):
            self.stats["asset_not_modified"] += 1
            await send({"type": "http.response.start", "status": 304, "headers": found.not_modified})
            await send({"type": "http.response.body", "body": b""})
            return
        self.stats["asset_served"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": found.headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else found.body})

    # -- event and passthrough routes ---------------------------------------------------
    def _target(self, scope: Scope, route: Route) -> bytes:
        """The request target below ``route``'s prefix (raw path + ``?query``), checked:
        the decoded path matched the route; the raw one is what goes upstream, so it
        must match too and must not climb out of the upstream's base path."""
        raw = _raw_path(scope)
        prefix = route.path.encode("ascii")
        rest = raw[len(prefix):]
        query: bytes = scope.get("query_string", b"")
        if not raw.startswith(prefix) or (rest and not rest.startswith(b"/")) or _dot_segments(rest):
            raise _Refused(_NOT_FOUND, "bad_path")
        if len(raw) + len(query) > self._max_target:
            raise _Refused(_URI_TOO_LONG, "target_too_long")
        if not _PATH_RE.match(rest) or not _QUERY_RE.match(query):
            raise _Refused(_BAD_REQUEST, "malformed_target")
        return rest + b"?" + query if query else rest

    def _declared_length(self, headers: Headers) -> None:
        lengths = _header_values(headers, b"content-length")
        if lengths:
            if len(lengths) != 1 or not lengths[0].strip().isdigit():
                raise _Refused(_BAD_REQUEST, "bad_content_length")
            if int(lengths[0]) > self._max_body:  # refuse before reading a byte
                raise _Refused(_TOO_LARGE, "body_too_large")

    def _request(self, scope: Scope, host: str, route: Route, target: bytes, body: bytes) -> ForwardRequest:
        """The call as the upstream receives it (header policy, a new Idempotency-Key)."""
        rewrite = self._request_rewrites.get(route.name)
        text = (rewrite(target) if rewrite is not None else target).decode("ascii")
        base = self._upstreams.get(route.name)
        if base is not None:
            text = base + text  # an absolute target: HttpRelay sends it there (and the spool keeps it)
        # One key per accepted call; a client-sent key is not trusted (it could make the
        # relay drop someone else's event as a duplicate).
        key = uuid.uuid4().hex
        peer = _client_addr(scope)
        out = [h for h in forward_headers(scope["headers"], peer=peer, trusted=self._trusted, host=host,
                                          client_ip=self._client_ip)
               if h[0] != b"idempotency-key"]
        out.append((b"idempotency-key", key.encode("ascii")))
        return ForwardRequest(target=text, headers=tuple(out), body=body, host=host, idempotency_key=key,
                              client=peer, received_at=time.time(), method=scope["method"])

    def _refused_event(self, scope: Scope, host: str, route: Route, target: bytes | None,
                       body: bytes, status: int, reason: str) -> None:
        """Count, log and keep one refused event call (nothing refused silently)."""
        self.stats[f"event_refused_{reason}"] += 1
        if target is None:  # no usable target: keep the raw line as it came
            raw = _raw_path(scope)
            query = scope.get("query_string", b"")
            target = (raw + b"?" + query if query else raw)[len(route.path):]
        # Kept as text: a raw target that failed the checks may hold any byte.
        request = self._request(scope, host, route, target.decode("latin-1").encode("ascii", "backslashreplace"),
                                body)
        self._record_refusal(request, status, reason)

    async def _event(self, scope: Scope, receive: Receive, send: Send, host: str, route: Route) -> None:
        headers: Headers = scope["headers"]
        method: str = scope["method"]
        if method == "OPTIONS":
            await self._preflight(send, headers)
            return
        if method == "HEAD":  # a link checker or prefetch: nothing to forward
            await _reply(send, _NO_CONTENT, self._cors(headers))
            return
        if method != "GET" and method != "POST":
            await _reply(send, _EVENT_METHODS)
            return
        try:
            admitted = await self._admit(scope, receive, host, route)
        except _Refused as refused:
            if refused.reason == "rate_limited":
                self.stats["api_rate_limited"] += 1
            elif refused.reason == "body_too_large":
                self.stats["api_too_large"] += 1
            keep = refused.canned.status in (400, 429)  # 413/414/404: the body is not kept
            self._refused_event(scope, host, route, refused.target, refused.body if keep else b"",
                                refused.canned.status, refused.reason)
            await _reply(send, refused.canned, self._cors(headers))
            return
        if admitted is None:
            return
        target, body = admitted
        result = await self._events.send(self._request(scope, host, route, target, body))
        await self._answer(send, headers, result)

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send, host: str, route: Route) -> None:
        headers: Headers = scope["headers"]
        method: str = scope["method"]
        if method == "OPTIONS":
            await self._preflight(send, headers)
            return
        if method not in ("GET", "HEAD", "POST"):
            await _reply(send, _PASSTHROUGH_METHODS)
            return
        try:
            admitted = await self._admit(scope, receive, host, route)
        except _Refused as refused:
            self.stats[f"passthrough_refused_{refused.reason}"] += 1
            await _reply(send, refused.canned, self._cors(headers))
            return
        if admitted is None:
            return
        target, body = admitted
        result = await self.relay.send(self._request(scope, host, route, target, body))
        if result.error is not None:
            # The upstream gave no answer: a read the browser needs now is not spooled.
            self.stats["passthrough_failed"] += 1
            canned = _UPSTREAM_TIMEOUT if result.error == "timeout" else _UPSTREAM_FAILED
            await _reply(send, canned, self._cors(headers))
            return
        self.stats["passthrough_answered"] += 1
        await self._answer(send, headers, result)

    async def _admit(self, scope: Scope, receive: Receive, host: str, route: Route) -> tuple[bytes, bytes] | None:
        """The checked target and the body of an event or passthrough call, or None when
        the client went away; raises :class:`_Refused` (with what was read by then).

        The body is read before the target is checked, so a 400 keeps the whole
        request; a declared length over ``proxy.max_body`` is refused before a byte
        is read."""
        headers: Headers = scope["headers"]
        self._declared_length(headers)
        try:
            body = await self._read_body(receive)
        except _ClientGone:
            return None
        if body is None:
            raise _Refused(_TOO_LARGE, "body_too_large")
        try:
            target = self._target(scope, route)
        except _Refused as refused:
            refused.body = body
            raise
        if not self._within_rate(scope, headers, host):
            limited = _Refused(_TOO_MANY, "rate_limited")
            limited.target, limited.body = target, body
            raise limited
        return target, body

    async def _answer(self, send: Send, headers: Headers, result: ForwardResult) -> None:
        out = list(result.headers)
        out.append((b"content-length", str(len(result.body)).encode()))
        out.extend(self._cors(headers))
        await send({"type": "http.response.start", "status": result.status, "headers": out})
        await send({"type": "http.response.body", "body": result.body})

    def _within_rate(self, scope: Scope, headers: Headers, host: str) -> bool:
        """Per-visitor, then per-domain token buckets (a refused visitor spends no domain budget)."""
        if not (self._per_ip.enabled or self._per_domain.enabled):
            return True
        now = self._clock()
        visitor = visitor_ip(_header_values(headers, b"x-forwarded-for"), _client_addr(scope), self._trusted)
        return self._per_ip.allow(visitor or "", now) and self._per_domain.allow(host, now)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request body, read as it arrives; None as soon as it exceeds ``proxy.max_body``."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                if message.get("more_body", False):
                    await self._drain(receive)
                return None
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    async def _drain(receive: Receive) -> None:
        """Read and drop a little more of a refused streamed body before answering 413.

        Closing an HTTP/1.1 connection with unread input makes the kernel send RST,
        which can destroy the 413 on its way to the client (the "lingering close"
        problem). Bounded in bytes and time: past that, the client gets the reset.
        """
        drained = 0
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                while drained <= _DRAIN_BYTES:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    drained += len(message.get("body", b""))
        except TimeoutError:
            return

    @staticmethod
    def _cors(headers: Headers) -> list[tuple[bytes, bytes]]:
        # The script runs on the customer's pages and posts cross-origin to the custom
        # domain. No credentials are ever allowed, so echoing the Origin exposes nothing.
        origins = _header_values(headers, b"origin")
        if len(origins) != 1:
            return []
        return [(b"access-control-allow-origin", origins[0]), (b"vary", b"origin")]

    async def _preflight(self, send: Send, headers: Headers) -> None:
        self.stats["api_preflight"] += 1
        out = [
            (b"access-control-allow-methods", b"GET, POST"),
            (b"access-control-allow-headers", b"Content-Type"),
            (b"access-control-max-age", b"86400"),
            (b"allow", b"GET, HEAD, POST, OPTIONS"),
            (b"content-length", b"0"),
        ]
        out.extend(self._cors(headers))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

