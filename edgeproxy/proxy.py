"""The public ASGI app: host gate, ACME challenge answers, the vendor script, the API forward.

Owns: everything a browser or the CA sees on the public listeners.

- ``http_app`` (port 80): HTTP-01 answers (RFC 8555 section 8.3) for registered
  hosts, a 308 to HTTPS for registered hosts with a live certificate, 404 for
  everything else.
- ``https_app`` (port 443): the Host must equal the SNI and name an active site,
  else 421 Misdirected Request (RFC 9110 section 15.5.20). Then the rewritten
  vendor script at ``routes.script_path`` and the forward of
  ``routes.api_path`` (and below) to ``upstream.relay``.

The invariant this module exists for (the outage that started the product):
an unknown or mismatched Host/SNI never reaches an upstream. The gate runs
before any routing; no code path after a refusal touches the httpx client.

The proxy sees two functions (``resolve``: an in-memory dict lookup; and
``challenge``: the HTTP-01 token lookup) and one httpx transport, nothing
else. It holds no per-user state (house rule 5): the shared clients (httpx;
and, with ``upstream.client = "aiohttp"`` and no injected transport, one
aiohttp session for the relay POST, issue 8) refuse every cookie, ignore the
environment, follow no redirects and have explicit timeouts.

Must not import: ``acme``/``josepy`` or the storage backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import http.cookiejar
import ipaddress
import logging
import re
import ssl
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, unquote_to_bytes

import brotli
import httpx

if TYPE_CHECKING:  # imported on first use (start-up time, issue 8)
    import aiohttp

from .addresses import normalize_ip
from .config import Settings, UpstreamSettings
from .errors import ConfigError
from .routes import SiteRoutes, site_routes
from .ratelimit import TokenBuckets

__all__ = [
    "ChallengeLookup",
    "EdgeProxy",
    "ForwardRequest",
    "ForwardResult",
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
# What the browser gets back from the relay: an allowlist. The relay answers for a
# different site; its cookies, HSTS or CORS policy must not land on the customer's domain.
_RESPONSE_KEEP: Final = frozenset({b"content-type", b"cache-control", b"retry-after"})


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


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
    named = _connection_tokens(headers)
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


def relay_response_headers(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The relay's response headers the browser may see (allowlist; never Set-Cookie or hop-by-hop)."""
    named = _connection_tokens(headers)
    return tuple(
        (lname, value)
        for lname, value in ((n.lower(), v) for n, v in headers)
        if lname in _RESPONSE_KEEP and lname not in named
    )


_QVALUE_RE: Final = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")


def _coding_qvalues(values: Iterable[bytes]) -> dict[bytes, float]:
    """``Accept-Encoding`` (all its field lines) as coding -> highest qvalue (RFC 9110 section 12.5.3).

    ``x-gzip`` counts as ``gzip``; a malformed qvalue counts as 0 ("not acceptable")."""
    found: dict[bytes, float] = {}
    for value in values:
        for item in value.split(b","):
            coding, _, params = item.partition(b";")
            coding = coding.strip().lower()
            if not coding:
                continue
            q = 1.0
            for param in params.split(b";") if params else ():
                key, _, raw = param.partition(b"=")
                if key.strip().lower() == b"q":
                    raw = raw.strip()
                    q = float(raw) if _QVALUE_RE.match(raw) else 0.0
            if coding == b"x-gzip":
                coding = b"gzip"
            found[coding] = max(found.get(coding, q), q)
    return found


def _acceptable(qvalues: Mapping[bytes, float], coding: bytes) -> float:
    """The qvalue of ``coding``: its own, else the wildcard's, else 0 (no field: identity only)."""
    if coding in qvalues:
        return qvalues[coding]
    return qvalues.get(b"*", 0.0)


def accepts_gzip(values: Iterable[bytes]) -> bool:
    """True when ``Accept-Encoding`` (all its field lines) admits gzip (RFC 9110 section 12.5.3).

    ``gzip``/``x-gzip`` with q > 0, or ``*`` with q > 0 when gzip is not listed.
    ``q=0`` means "not acceptable"; a malformed qvalue counts as 0. No field: identity.
    """
    return _acceptable(_coding_qvalues(values), b"gzip") > 0


def content_coding(values: Iterable[bytes], *, br: bool = True) -> bytes:
    """The coding to send the script in: ``b"br"``, ``b"gzip"`` or ``b""`` (identity).

    The acceptable coding with the highest qvalue; on a tie Brotli, then gzip (the
    script is ~13 % smaller in Brotli at quality 11 than in gzip -9, measured on
    100 KB of source). ``br=False`` while the Brotli copy is not ready yet.
    """
    qvalues = _coding_qvalues(values)
    best, best_q = b"", 0.0
    for coding in ((b"br", b"gzip") if br else (b"gzip",)):
        q = _acceptable(qvalues, coding)
        if q > best_q:
            best, best_q = coding, q
    return best


def etag_matches(values: Iterable[bytes], etag: bytes) -> bool:
    """``If-None-Match`` against our strong ETag, weak comparison (RFC 9110 section 13.1.2)."""
    want = etag[2:] if etag.startswith(b"W/") else etag
    for value in values:
        for item in value.split(b","):
            tag = item.strip()
            if tag == b"*":
                return True
            if tag.startswith(b"W/"):
                tag = tag[2:]
            if tag == want:
                return True
    return False


# ---------------------------------------------------------------------------------------
# The forward seam: ``spool.SpoolingForwarder`` wraps ``EdgeProxy.forward`` (installed as ``deliver``).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardRequest:
    """One API call, ready for the relay (headers already filtered and X-Forwarded-* set).

    ``target`` is appended to ``upstream.relay``: the path below ``routes.api_path``
    (raw, percent-encoded, empty or starting with "/") plus ``?query`` if any.
    """

    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    host: str  # the custom domain it came in on
    # Issue 3: generated at ingress, sent as ``Idempotency-Key`` (already in ``headers``)
    # and reused by every replay so the relay can drop duplicates.
    idempotency_key: str = ""
    client: str | None = None  # the peer address, for the failed-request log
    received_at: float = 0.0  # time.time() at ingress


@dataclass(frozen=True)
class ForwardResult:
    """What the relay answered, or a 502 the edge made itself.

    ``error`` is None when the relay answered (any status); otherwise a short code
    (``timeout``, ``connect``, ``protocol``, ``too_large``, ...) saying why the
    call did not complete: the request may not have been delivered and is safe
    for a spool to retry.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    error: str | None = None


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
_API_METHODS: Final = _canned(405, b"method not allowed\n", [(b"allow", b"POST, OPTIONS")])
_RELAY_FAILED_BODY: Final = b"relay unavailable\n"
_RELAY_FAILED_HEADERS: Final = ((b"content-type", b"text/plain; charset=utf-8"),)

_CHALLENGE_PREFIX: Final = "/.well-known/acme-challenge/"
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,256}\Z")  # base64url alphabet (RFC 8555 section 8.3)
# What a raw path / query may carry to the relay: visible ASCII (browsers send some
# characters such as "|" or "{" unencoded in queries; httpx encodes them for the relay).
_PATH_RE: Final = re.compile(rb"[!-\"$-\x3e@-~]*\Z")  # no "#", no "?"
_QUERY_RE: Final = re.compile(rb"[!-\"$-~]*\Z")  # no "#"

_SCRIPT_TYPE: Final = b"application/javascript; charset=utf-8"
_SCRIPT_CACHE_SIZE: Final = 2048  # per-host rewritten variants kept per worker (LRU)
_SCRIPT_MAX_BYTES: Final = 8 * 1024 * 1024  # an origin answer bigger than this is a failure
_RELAY_MAX_BYTES: Final = 1024 * 1024
_DRAIN_BYTES: Final = 256 * 1024  # extra bytes of a refused streamed body read before the 413
_DRAIN_SECONDS: Final = 1.0
_RETRY_NO_COPY: Final = 1.0  # seconds: with nothing to serve, retry the origin soon
_RETRY_WITH_COPY: Final = 10.0  # seconds: with a last good copy, do not hammer a failing origin


class _NeverCookies(http.cookiejar.DefaultCookiePolicy):
    """A cookie policy that accepts nothing: the shared client serves every user (house rule 5)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def _no_cookie_jar() -> http.cookiejar.CookieJar:
    return http.cookiejar.CookieJar(policy=_NeverCookies())


def _upstream_ssl_context() -> ssl.SSLContext:
    """What upstream TLS is verified against: httpx's default (certifi's CAs, host
    name checked), never ``SSL_CERT_FILE`` & co. from the environment (house rule 5).
    Both aiohttp paths use it (tests patch it to trust a throwaway CA)."""
    return httpx.create_ssl_context(trust_env=False)


def _aiohttp_transport(pool: int) -> httpx.AsyncBaseTransport:
    """httpx's API on an aiohttp connection pool (issue 8: ~7x the forwarded
    req/s of httpcore's pool on 2 cores; numbers in bench/README.md). Used for
    the script origin; the relay POST goes through :class:`_RelayClient`.

    The same guarantees as the default transport (house rule 5): the session
    keeps no cookies (``DummyCookieJar``) and ignores the environment
    (``trust_env=False``); the transport itself never follows redirects and
    never decompresses (httpx does, as before); httpx's timeouts are passed
    per request (connect, read, pool). The session is created on first use,
    inside the running loop, as aiohttp requires.
    """
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    verify = _upstream_ssl_context()

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=pool, keepalive_timeout=30.0, ssl=verify)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    return AiohttpTransport(client=session, trust_env=False)


# The User-Agent httpx sends when the call carries none (a browser always sends one):
# the relay's view of a call does not depend on upstream.client (issue 8).
_DEFAULT_USER_AGENT: Final = f"python-httpx/{httpx.__version__}"
# What aiohttp decodes itself: a body whose FIRST Content-Encoding field is exactly one
# of these (aiohttp.http_parser; br/zstd fail the read when their library is missing).
_AIOHTTP_DECODES: Final = frozenset({"gzip", "deflate", "br", "zstd"})


def _codings_left(values: Sequence[str], raw: Headers) -> tuple[tuple[bytes, bytes], ...] | None:
    """The Content-Encoding the browser must be given with a relay body aiohttp has read.

    ``values``: the response's Content-Encoding field values as aiohttp parsed them;
    ``raw``: its raw header list. ``()`` when the body is now plain (no coding, only
    ``identity``, or the single coding aiohttp removed), so the field is dropped with
    the body decoded, as httpx does. The relay's own fields when aiohttp left the
    body untouched (a coding it does not know, or several listed in one field): a
    coded body never loses its label (RFC 9110 section 8.4). None when aiohttp
    removed one coding of several: no label fits the bytes left, the caller fails.
    """
    codings = [c for c in (t.strip().lower() for v in values for t in v.split(",")) if c and c != "identity"]
    if not codings:
        return ()
    first = values[0]
    if first.isascii() and first.lower() in _AIOHTTP_DECODES:  # the test aiohttp's parser makes
        return () if len(codings) == 1 else None
    return tuple((b"content-encoding", v) for n, v in raw if n.lower() == b"content-encoding")


class _RelayClient:
    """The relay POST straight on one shared ``aiohttp.ClientSession`` (issue 8).

    Why: with ``upstream.client = "aiohttp"`` the call went httpx -> httpx-aiohttp ->
    aiohttp, and py-spy put the httpx layer at ~9 % of the edge's CPU under a POST
    load (bench/README.md). The policy of the httpx client it stands in for (house
    rule 5): no cookie jar (``DummyCookieJar``: nothing stored, nothing sent),
    ``trust_env=False``, no redirects (a 3xx comes back as is), TLS verified
    against :func:`_upstream_ssl_context`, the same timeouts (socket connect =
    ``upstream.connect_timeout``; pool wait + connect, and each read =
    ``upstream.timeout``; no total), a keep-alive pool of ``upstream.pool_size``.
    The relay sees what httpx sent: the call's headers, ``Accept: */*``, the
    ``Accept-Encoding`` of what the client decodes, ``Connection: keep-alive``,
    httpx's User-Agent when the call has none, no Content-Type of the client's own;
    the same request target (yarl requotes it, as it did under httpx: for what the
    API route admits, httpx's quoting changes nothing yarl would not).

    Concurrency: one instance per EdgeProxy, used from its event loop only; the
    session is created on first use, inside the running loop, as aiohttp requires.
    """

    def __init__(self, upstream: UpstreamSettings) -> None:
        self._pool = upstream.pool_size
        self._timeout = upstream.timeout
        self._connect_timeout = upstream.connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._pool, keepalive_timeout=30.0, ssl=_upstream_ssl_context())
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_connect=self._connect_timeout,
                                        sock_read=self._timeout)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # one user's relay cookie never reaches the next (rule 5)
            trust_env=False,  # no proxy or netrc from the environment
            timeout=timeout,
            # httpx sends no Content-Type of its own (aiohttp would add application/octet-stream).
            skip_auto_headers=("Content-Type",),
        )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @staticmethod
    def _wire_headers(headers: Headers) -> list[tuple[str, str]]:
        # aiohttp writes header values as UTF-8: a UTF-8 value goes out as it came in;
        # any other byte string as httpx sent it (Latin-1 decoded, then UTF-8).
        out = [("Connection", "keep-alive")]
        agent = False
        for name, value in headers:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = value.decode("latin-1")
            lname = name.decode("latin-1").lower()
            agent = agent or lname == "user-agent"
            out.append((lname, text))
        if not agent:
            out.append(("User-Agent", _DEFAULT_USER_AGENT))
        return out

    async def post(self, url: str, headers: Headers, body: bytes) -> ForwardResult | str:
        """The relay's answer (any status), or why there is none: ``timeout``,
        ``connect``, ``invalid_url``, ``too_large`` (more than 1 MiB, decoded),
        ``content_encoding`` or aiohttp's exception name. Never raises for relay trouble."""
        import aiohttp  # loaded by _open: a sys.modules lookup

        session = self._session if self._session is not None else self._open()
        try:
            async with session.request("POST", url, data=body, headers=self._wire_headers(headers),
                                       allow_redirects=False) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():  # decoded, as it arrives
                    size += len(chunk)
                    if size > _RELAY_MAX_BYTES:
                        response.close()  # unread bytes: the connection is not pooled again
                        return "too_large"
                    chunks.append(chunk)
                out = relay_response_headers(response.raw_headers)
                if size and "Content-Encoding" in response.headers:
                    left = _codings_left(response.headers.getall("Content-Encoding"), response.raw_headers)
                    if left is None:
                        return "content_encoding"
                    out += left
                return ForwardResult(response.status, out, b"".join(chunks))
        except TimeoutError:  # aiohttp's ServerTimeoutError (connect, read) is one
            return "timeout"
        except aiohttp.ClientConnectorError:  # refused, DNS, TLS handshake or verification
            return "connect"
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
            return "invalid_url"
        except aiohttp.ClientError as exc:
            return type(exc).__name__


@dataclass(frozen=True)
class _Origin:
    """The one in-memory copy of the vendor script, as the origin served it."""

    body: bytes
    etag: str | None  # the origin's validator, for conditional refreshes


@dataclass(frozen=True)
class _Encoded:
    """One content coding of a script variant: the body and the response fields."""

    body: bytes
    etag: bytes
    headers: list[tuple[bytes, bytes]]
    not_modified: list[tuple[bytes, bytes]]


@dataclass
class _Variant:
    """The script rewritten for one host, with everything a response needs precomputed.

    ``coded`` holds identity (``b""``) and gzip from the start, and Brotli
    (``b"br"``) from the first request that prefers it: quality 11 takes ~170 ms
    for 100 KB of script (measured; gzip -9 ~9 ms), too long for the event loop,
    so it runs once per variant in a thread that every such request awaits."""

    origin: _Origin
    digest: str
    common: list[tuple[bytes, bytes]]
    coded: dict[bytes, _Encoded]
    br: asyncio.Future[bytes] | None = None


def _encoded(body: bytes, digest: str, coding: bytes, common: list[tuple[bytes, bytes]]) -> _Encoded:
    # Strong validators differ per content coding (RFC 9110 section 8.8.3).
    etag = f'"{digest}-{coding.decode()}"'.encode() if coding else f'"{digest}"'.encode()
    fields = [(b"etag", etag)] + ([(b"content-encoding", coding)] if coding else [])
    return _Encoded(
        body=body,
        etag=etag,
        headers=common + fields + [(b"content-length", str(len(body)).encode())],
        # RFC 9110 section 15.4.5: a 304 carries the fields a 200 would have had, minus content.
        not_modified=common[1:] + [(b"etag", etag)],
    )


def _brotli(body: bytes) -> bytes:
    return bytes(brotli.compress(body, quality=11, mode=brotli.MODE_TEXT))


class _Rewriter:
    """Literal replacements in one pass (a replacement never rewrites another's output).

    Rules from ``upstream.rewrite`` plus, always and winning over a rule with the same
    key, the relay origin -> ``https://{host}{api_path}``. ``{host}``, ``{api_path}``
    and ``{script_path}`` are resolved per variant (the paths may differ per host:
    ``routes.randomize``), once per host and script version.
    """

    def __init__(self, upstream: UpstreamSettings) -> None:
        rules = dict(upstream.rewrite)
        relay_origin = upstream.relay.rstrip("/")
        if relay_origin:
            rules[relay_origin] = "https://{host}{api_path}"
        self._rules: dict[bytes, bytes] = {key.encode(): value.encode() for key, value in rules.items() if key}
        keys = sorted(self._rules, key=len, reverse=True)  # longest match first
        self._pattern = re.compile(b"|".join(re.escape(k) for k in keys)) if keys else None

    def apply(self, body: bytes, host: str, paths: SiteRoutes) -> bytes:
        if self._pattern is None:
            return body
        host_b = host.encode("ascii")  # the gate admitted LDH characters only: nothing to escape
        values = {
            key: value.replace(b"{host}", host_b).replace(b"{api_path}", paths.api_path.encode("ascii"))
            .replace(b"{script_path}", paths.script_path.encode("ascii"))
            for key, value in self._rules.items()
        }
        return self._pattern.sub(lambda m: values[m.group(0)], body)


class _ClientGone(Exception):
    """The client disconnected while we were reading its body."""


async def _reply(send: Send, canned: _Canned) -> None:
    await send({"type": "http.response.start", "status": canned.status, "headers": canned.headers})
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


class EdgeProxy:
    """The two public ASGI apps (port 80 and port 443) around one shared httpx client.

    Concurrency: one instance per worker process, used from its event loop only.
    ``resolve`` must not block; ``challenge`` may do I/O (it is awaited, and only
    for registered hosts). ``stats`` counts outcomes (``metrics.StatsCounter`` exports them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        resolve: Resolve,
        challenge: ChallengeLookup,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.stats: Counter[str] = Counter()
        self._resolve = resolve
        self._challenge = challenge
        self._transport = transport
        self._clock = clock
        self._trusted = parse_trusted_hops(settings.proxy.trusted_hops)
        self._max_body = settings.proxy.max_body
        self._client_ip = frozenset(settings.upstream.client_ip_headers)
        proxy = settings.proxy
        self._per_ip = TokenBuckets(proxy.rate_per_ip, proxy.rate_per_ip * proxy.rate_burst)
        self._per_domain = TokenBuckets(proxy.rate_per_domain, proxy.rate_per_domain * proxy.rate_burst)
        upstream, routes = settings.upstream, settings.routes
        self._script_url = upstream.script
        self._relay_base = upstream.relay.rstrip("/")
        self._ttl = upstream.script_ttl
        self._timeout = httpx.Timeout(upstream.timeout, connect=upstream.connect_timeout)
        self._routes = routes
        # One pair for every host unless routes.randomize: then routes.site_routes per host (cached).
        self._fixed_paths = None if routes.randomize else site_routes("", routes)
        self._rewriter = _Rewriter(upstream)
        self._cache_control = f"public, max-age={max(0, int(self._ttl))}".encode()
        self._client: httpx.AsyncClient | None = None
        # Issue 8: the relay POST skips httpx when nothing was injected and aiohttp is
        # the configured pool; the httpx client still fetches the script.
        self._relay = _RelayClient(upstream) if transport is None and upstream.client == "aiohttp" else None
        self._origin: _Origin | None = None
        self._next_fetch_at = float("-inf")
        self._fetch_task: asyncio.Task[bool] | None = None
        self._variants: OrderedDict[str, _Variant] = OrderedDict()
        self._lifespans = 0
        # (status, seconds, error) after each relay call: metrics only, no I/O (issue 5).
        self.observe_relay: Callable[[int, float, str | None], None] | None = None
        # What an accepted API call goes through: the plain relay forward, or (issue 3)
        # ``spool.SpoolingForwarder.deliver`` installed by ``server.py``.
        self.deliver: Callable[[ForwardRequest], Awaitable[ForwardResult]] = self.forward

    # -- lifecycle ---------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            pool = self.settings.upstream.pool_size
            transport = self._transport
            if transport is None and self.settings.upstream.client == "aiohttp":
                transport = _aiohttp_transport(pool)
            self._client = httpx.AsyncClient(
                transport=transport,
                trust_env=False,  # no proxy/cert settings from the environment (house rule 5)
                follow_redirects=False,
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=30.0),
                cookies=_no_cookie_jar(),  # a shared client must never carry one user's cookie to another
            )
        return self._client

    async def startup(self) -> None:
        """Create the shared client and start fetching the script in the background.

        Idempotent. Never fails because the origin is down: the first script request
        joins the fetch in flight, or retries it.
        """
        self._http()
        if self._origin is None:
            self._start_fetch()

    async def aclose(self) -> None:
        """Stop a fetch in flight and close the clients (idempotent; a later call opens them again)."""
        task, self._fetch_task = self._fetch_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        try:
            if client is not None:
                await client.aclose()
        finally:
            if self._relay is not None:
                await self._relay.aclose()

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
        """Port 443: 421 unless Host == SNI names an active site; then script or API."""
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
        path: str = scope["path"]
        method: str = scope["method"]
        paths = self._fixed_paths or site_routes(host, self._routes)
        if path == paths.script_path:
            if method == "GET" or method == "HEAD":
                await self._serve_script(send, headers, host, head=method == "HEAD")
            else:
                await _reply(send, _SCRIPT_METHODS)
            return
        if path == paths.api_path or path.startswith(paths.api_prefix):
            await self._api(scope, receive, send, host, method, paths.api_path.encode("ascii"))
            return
        self.stats["https_not_found"] += 1
        await _reply(send, _NOT_FOUND)

    # -- the script --------------------------------------------------------------------
    def _start_fetch(self) -> asyncio.Task[bool]:
        """The fetch in flight, or a new one: single-flight across all requests."""
        task = self._fetch_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch_origin())
            self._fetch_task = task
        return task

    async def refresh_script(self) -> bool:
        """Fetch the script now, or join the fetch in flight; True if the origin gave a good copy."""
        return await asyncio.shield(self._start_fetch())

    async def _fetch_origin(self) -> bool:
        """One origin fetch. Never raises: on failure the last good copy stays in service."""
        previous = self._origin
        request_headers: dict[str, str] = {}
        if previous is not None and previous.etag:
            request_headers["if-none-match"] = previous.etag
        reason: str
        try:
            async with self._http().stream("GET", self._script_url, headers=request_headers) as response:
                if response.status_code == 304 and previous is not None:
                    self._next_fetch_at = self._clock() + self._ttl
                    self.stats["script_origin_not_modified"] += 1
                    return True
                if response.status_code != 200:
                    reason = f"status {response.status_code}"
                else:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > _SCRIPT_MAX_BYTES:
                            break
                        chunks.append(chunk)
                    if size > _SCRIPT_MAX_BYTES:
                        reason = f"larger than {_SCRIPT_MAX_BYTES} bytes"
                    else:
                        body = b"".join(chunks)
                        if previous is None or previous.body != body:
                            self._origin = _Origin(body, response.headers.get("etag"))
                            self._variants.clear()  # every variant was built from the old copy
                        self._next_fetch_at = self._clock() + self._ttl
                        self.stats["script_origin_fetched"] += 1
                        return True
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the script unserved forever
            log.exception("script fetch crashed")
            reason = f"{type(exc).__name__}: {exc}"
        self.stats["script_origin_error"] += 1
        retry = _RETRY_WITH_COPY if self._origin is not None else _RETRY_NO_COPY
        self._next_fetch_at = self._clock() + min(self._ttl, retry)
        if self._origin is not None:
            log.warning("script origin %s failed (%s); serving the last good copy", self._script_url, reason)
        else:
            log.error("script origin %s failed (%s); no copy to serve yet", self._script_url, reason)
        return False

    async def _current_script(self) -> _Origin | None:
        origin = self._origin
        if origin is not None:
            # Stale-while-revalidate: a stale copy is served at once while one
            # background fetch refreshes it, so no request waits on the origin
            # once a copy exists.
            if self._clock() >= self._next_fetch_at:
                self._start_fetch()
            return origin
        task = self._fetch_task
        if (task is None or task.done()) and self._clock() < self._next_fetch_at:
            return None  # the origin failed moments ago and there is nothing to serve
        # First copy: every concurrent request waits for the same fetch. shield():
        # one client going away must not cancel the fetch the others wait for.
        await asyncio.shield(self._start_fetch())
        return self._origin

    def _variant(self, host: str, origin: _Origin) -> _Variant:
        variant = self._variants.get(host)
        if variant is not None and variant.origin is origin:
            self._variants.move_to_end(host)
            return variant
        body = self._rewriter.apply(origin.body, host, self._fixed_paths or site_routes(host, self._routes))
        digest = hashlib.sha256(body).hexdigest()[:32]
        common = [
            (b"content-type", _SCRIPT_TYPE),
            (b"cache-control", self._cache_control),
            (b"vary", b"accept-encoding"),
            (b"x-content-type-options", b"nosniff"),
        ]
        variant = _Variant(origin=origin, digest=digest, common=common, coded={
            b"": _encoded(body, digest, b"", common),
            b"gzip": _encoded(gzip.compress(body, compresslevel=9, mtime=0), digest, b"gzip", common),
        })
        self._variants[host] = variant
        self._variants.move_to_end(host)
        while len(self._variants) > _SCRIPT_CACHE_SIZE:
            self._variants.popitem(last=False)
        return variant

    async def _serve_script(self, send: Send, headers: Headers, host: str, *, head: bool) -> None:
        origin = await self._current_script()
        if origin is None:
            self.stats["script_unavailable"] += 1
            await _reply(send, _SCRIPT_UNAVAILABLE)
            return
        variant = self._variant(host, origin)
        accept: list[bytes] = []
        inm: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"accept-encoding":
                accept.append(value)
            elif lname == b"if-none-match":
                inm.append(value)
        coding = content_coding(accept)
        if coding == b"br" and coding not in variant.coded and not await self._brotli_ready(variant):
            coding = content_coding(accept, br=False)
        encoded = variant.coded[coding]
        if inm and etag_matches(inm, encoded.etag):
            self.stats["script_not_modified"] += 1
            await send({"type": "http.response.start", "status": 304, "headers": encoded.not_modified})
            await send({"type": "http.response.body", "body": b""})
            return
        self.stats["script_served"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": encoded.headers})
        await send({"type": "http.response.body", "body": b"" if head else encoded.body})

    @staticmethod
    async def _brotli_ready(variant: _Variant) -> bool:
        """Compress ``variant`` with Brotli once (in a thread); False if that failed."""
        if variant.br is None:
            variant.br = asyncio.get_running_loop().run_in_executor(None, _brotli, variant.coded[b""].body)
        try:
            # shield(): one client going away must not cancel what the others await.
            body = await asyncio.shield(variant.br)
        except Exception as exc:  # brotli.error or MemoryError: serve the next best coding
            log.warning("brotli compression of the script failed: %s", exc)
            return False
        if b"br" not in variant.coded:
            variant.coded[b"br"] = _encoded(body, variant.digest, b"br", variant.common)
        return True

    # -- the API -----------------------------------------------------------------------
    async def _api(self, scope: Scope, receive: Receive, send: Send, host: str, method: str, api_raw: bytes) -> None:
        headers: Headers = scope["headers"]
        if method == "OPTIONS":
            await self._preflight(send, headers)
            return
        if method != "POST":
            await _reply(send, _API_METHODS)
            return
        if not self._within_rate(scope, headers, host):
            self.stats["api_rate_limited"] += 1
            await _reply(send, _TOO_MANY)
            return
        raw = _raw_path(scope)
        rest = raw[len(api_raw):]
        query: bytes = scope.get("query_string", b"")
        # The decoded path matched the route; the raw one is what we forward, so it must
        # match too, and must not climb out of the relay's base path.
        if not raw.startswith(api_raw) or (rest and not rest.startswith(b"/")) or _dot_segments(rest):
            self.stats["https_not_found"] += 1
            await _reply(send, _NOT_FOUND)
            return
        if not _PATH_RE.match(rest) or not _QUERY_RE.match(query):
            await _reply(send, _BAD_REQUEST)
            return
        lengths = _header_values(headers, b"content-length")
        if lengths:
            if len(lengths) != 1 or not lengths[0].strip().isdigit():
                await _reply(send, _BAD_REQUEST)
                return
            if int(lengths[0]) > self._max_body:  # refuse before reading a byte
                self.stats["api_too_large"] += 1
                await _reply(send, _TOO_LARGE)
                return
        try:
            body = await self._read_body(receive)
        except _ClientGone:
            return
        if body is None:
            self.stats["api_too_large"] += 1
            await _reply(send, _TOO_LARGE)
            return
        target = (rest + b"?" + query if query else rest).decode("ascii")
        # Issue 3: one key per accepted call; a client-sent key is not trusted (it could
        # make the relay drop someone else's event as a duplicate).
        key = uuid.uuid4().hex
        out_headers = [h for h in forward_headers(headers, peer=_client_addr(scope), trusted=self._trusted, host=host,
                                                  client_ip=self._client_ip)
                       if h[0] != b"idempotency-key"]
        out_headers.append((b"idempotency-key", key.encode("ascii")))
        request = ForwardRequest(
            target=target,
            headers=tuple(out_headers),
            body=body,
            host=host,
            idempotency_key=key,
            client=_client_addr(scope),
            received_at=time.time(),
        )
        result = await self.deliver(request)
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
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", b"Content-Type"),
            (b"access-control-max-age", b"86400"),
            (b"allow", b"POST, OPTIONS"),
            (b"content-length", b"0"),
        ]
        out.extend(self._cors(headers))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

    async def forward(self, request: ForwardRequest) -> ForwardResult:
        """Send one API call to ``upstream.relay`` + ``request.target`` (POST).

        The seam a durable spool wraps. Never raises for relay trouble: a relay that
        cannot be reached, times out, breaks the protocol or answers with more than
        1 MiB gives a 502 with ``error`` set; any answer the relay did give comes
        back as is (status, allowlisted headers, body). Safe to call concurrently
        (the client pool is shared); not idempotent (each call reaches the relay).
        """
        started = time.perf_counter()
        result = await self._forward(request)
        if self.observe_relay is not None:
            self.observe_relay(result.status, time.perf_counter() - started, result.error)
        return result

    async def _forward(self, request: ForwardRequest) -> ForwardResult:
        url = self._relay_base + request.target
        if self._relay is not None:
            outcome = await self._relay.post(url, request.headers, request.body)
        else:
            outcome = await self._post_httpx(url, request)
        if isinstance(outcome, ForwardResult):
            self.stats["api_forwarded"] += 1
            return outcome
        self.stats["api_relay_error"] += 1
        log.warning("relay %s failed for host %s: %s", self._relay_base, request.host, outcome)
        return ForwardResult(502, _RELAY_FAILED_HEADERS, _RELAY_FAILED_BODY, error=outcome)

    async def _post_httpx(self, url: str, request: ForwardRequest) -> ForwardResult | str:
        """The relay call through the shared httpx client: its answer, or an error code."""
        try:
            async with self._http().stream("POST", url, content=request.body,
                                           headers=list(request.headers)) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > _RELAY_MAX_BYTES:
                        break
                    chunks.append(chunk)
                if size <= _RELAY_MAX_BYTES:
                    return ForwardResult(response.status_code, relay_response_headers(response.headers.raw),
                                         b"".join(chunks))
                return "too_large"
        except httpx.TimeoutException:
            return "timeout"
        except httpx.ConnectError:
            return "connect"
        except httpx.HTTPError as exc:
            return type(exc).__name__
        except httpx.InvalidURL:
            return "invalid_url"
