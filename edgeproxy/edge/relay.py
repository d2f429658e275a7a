"""The relay seam: one request out to an upstream, one answer back.

Owns: :class:`ForwardRequest` / :class:`ForwardResult` (what crosses the seam),
the :class:`Relay` protocol, and :class:`HttpRelay`, the one implementation
that talks to a real upstream (the vendor's queue relay for ``event`` routes,
any live upstream for ``passthrough`` routes).

Data flows one way: the proxy builds a ``ForwardRequest`` and calls
``relay.send``. For ``event`` routes that relay is ``spool.SpoolingRelay``, a
decorator around an ``HttpRelay``; the proxy never calls the spool and the
spool never calls the proxy.

The client policy (house rule 5): no cookie jar, nothing from the environment
(``trust_env=False``), no redirects (a 3xx comes back as is), explicit
timeouts, a bounded keep-alive pool, TLS verified against httpx's default CAs,
answers over 1 MiB refused.

Must not import: anything of ours but ``config``.
"""

from __future__ import annotations

import http.cookiejar
import re
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import httpx

if TYPE_CHECKING:  # imported on first use (start-up time)
    import aiohttp
    import yarl

from ..config import UpstreamSettings

__all__ = [
    "ForwardRequest",
    "ForwardResult",
    "HttpRelay",
    "Observe",
    "Relay",
    "connection_tokens",
    "new_http_client",
    "relay_response_headers",
    "upstream_ssl_context",
]

log = logging.getLogger("edgeproxy.relay")

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ForwardRequest:
    """One call, ready for an upstream (headers already filtered and X-Forwarded-* set).

    ``target`` is appended to the upstream's base URL: the path below the route's
    prefix (raw, percent-encoded, empty or starting with "/") plus ``?query`` if
    any, after the route's request rewrites. ``method`` is sent as is (an image
    beacon is a GET with its query, ``sendBeacon`` a POST).
    """

    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    host: str  # the custom domain it came in on
    # Generated at ingress, sent as ``Idempotency-Key`` (already in ``headers``)
    # and reused by every replay so the relay can drop duplicates.
    idempotency_key: str = ""
    client: str | None = None  # the peer address, for the failed-request log
    received_at: float = 0.0  # time.time() at ingress
    method: str = "POST"


@dataclass(frozen=True)
class ForwardResult:
    """What the upstream answered, or a 502 the edge made itself.

    ``error`` is None when the upstream answered (any status); otherwise a short
    code (``timeout``, ``connect``, ``protocol``, ``too_large``, ...) saying why
    the call did not complete: the request may not have been delivered and is
    safe for a spool to retry.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    error: str | None = None


class Relay(Protocol):
    """Sends one request upstream.

    Contract: ``send`` never raises for upstream trouble (no answer comes back as
    a ``ForwardResult`` with ``error`` set); it is safe to call concurrently from
    one event loop; it is not idempotent (each call may reach the upstream).
    ``aclose`` releases connections and may be called more than once.
    """

    async def send(self, request: ForwardRequest) -> ForwardResult: ...

    async def aclose(self) -> None: ...


Observe = Callable[[int, float, str | None], None]
"""``observe(status, seconds, error)`` after each upstream call: metrics only, no I/O."""


# ---------------------------------------------------------------------------------------
# Pure header policy for answers.
# ---------------------------------------------------------------------------------------

# What the browser may see of an upstream answer: never Set-Cookie, HSTS, CORS or
# hop-by-hop fields (the edge sets its own CORS answer).
_RESPONSE_KEEP: Final = frozenset({b"content-type", b"cache-control", b"retry-after"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Field names listed in ``Connection`` (RFC 9110 section 7.6.1): hop-by-hop too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def relay_response_headers(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The upstream's response headers the browser may see (allowlist; never Set-Cookie or hop-by-hop)."""
    kept = [(lname, value) for lname, value in ((n.lower(), v) for n, v in headers) if lname in _RESPONSE_KEEP]
    if not kept:
        return ()
    named = connection_tokens(headers)
    return tuple(kept) if not named else tuple(h for h in kept if h[0] not in named)


# ---------------------------------------------------------------------------------------
# Clients.
# ---------------------------------------------------------------------------------------

_MAX_ANSWER: Final = 1024 * 1024
_FAILED_BODY: Final = b"relay unavailable\n"
_FAILED_HEADERS: Final = ((b"content-type", b"text/plain; charset=utf-8"),)
_BODYLESS: Final = frozenset({"GET", "HEAD"})
_NO_CONTENT_TYPE: Final = ("Content-Type",)
_URL_CACHE: Final = 256  # parsed relay targets kept per client (see _AiohttpClient._url)
_ABSOLUTE: Final = ("https://", "http://")
# URLs httpx sends unchanged: unreserved and sub-delimiter characters, ":@/?" and valid
# percent-escapes (RFC 3986 section 2); anything else takes httpx's own quoting.
# Possessive (Python 3.11): no backtracking state per character; 3.4 -> 1.8 us for
# a 120-character beacon URL (bench/relay_client_cost.py's, timeit side by side).
_VERBATIM: Final = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]++|%[0-9A-Fa-f]{2})*+\Z")


class _NeverCookies(http.cookiejar.DefaultCookiePolicy):
    """A cookie policy that accepts nothing: the shared client serves every user (house rule 5)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def upstream_ssl_context() -> ssl.SSLContext:
    """What upstream TLS is verified against: httpx's default (certifi's CAs, host
    name checked), never ``SSL_CERT_FILE`` & co. from the environment (house rule 5).
    Every client here uses it (tests patch it to trust a throwaway CA)."""
    return httpx.create_ssl_context(trust_env=False)


def _aiohttp_transport(pool: int) -> httpx.AsyncBaseTransport:
    """httpx's API on an aiohttp connection pool (~7x the forwarded
    req/s of httpcore's pool on 2 cores; numbers in bench/README.md). Used for
    script and asset fetches; relay calls go through :class:`_AiohttpClient`.

    The same guarantees as the default transport (house rule 5): the session
    keeps no cookies (``DummyCookieJar``) and ignores the environment
    (``trust_env=False``); the transport itself never follows redirects and
    never decompresses (httpx does, as before); httpx's timeouts are passed
    per request (connect, read, pool). The session is created on first use,
    inside the running loop, as aiohttp requires.
    """
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    verify = upstream_ssl_context()

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=pool, keepalive_timeout=30.0, ssl=verify)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    return AiohttpTransport(client=session, trust_env=False)


def new_http_client(upstream: UpstreamSettings, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """The shared httpx client of house rule 5 (``transport`` injected by tests)."""
    pool = upstream.pool_size
    if transport is None and upstream.client == "aiohttp":
        transport = _aiohttp_transport(pool)
    return httpx.AsyncClient(
        transport=transport,
        trust_env=False,  # no proxy/cert settings from the environment (house rule 5)
        follow_redirects=False,
        timeout=httpx.Timeout(upstream.timeout, connect=upstream.connect_timeout),
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=30.0),
        cookies=http.cookiejar.CookieJar(policy=_NeverCookies()),  # never one user's cookie to another
    )


# The User-Agent httpx sends when the call carries none (a browser always sends one):
# the relay's view of a call does not depend on upstream.client.
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


class _AiohttpClient:
    """Relay calls straight on one shared ``aiohttp.ClientSession``.

    Why: with ``upstream.client = "aiohttp"`` the call went httpx -> httpx-aiohttp ->
    aiohttp, and py-spy put the httpx layer at ~9 % of the edge's CPU under a POST
    load (bench/README.md). The policy of the httpx client it stands in for (house
    rule 5): no cookie jar (``DummyCookieJar``: nothing stored, nothing sent),
    ``trust_env=False``, no redirects (a 3xx comes back as is), TLS verified
    against :func:`upstream_ssl_context`, the same timeouts (socket connect =
    ``upstream.connect_timeout``; pool wait + connect, and each read =
    ``upstream.timeout``; no total), a keep-alive pool of ``upstream.pool_size``.
    The relay sees what httpx sent: the call's headers, ``Accept: */*``, the
    ``Accept-Encoding`` of what the client decodes, ``Connection: keep-alive``,
    httpx's User-Agent when the call has none, no Content-Type of the client's own;
    the same request target, byte for byte (``encoded=True``; httpx sends what the
    routes admit unchanged too).

    Concurrency: used from one event loop only; the session is created on first
    use, inside the running loop, as aiohttp requires.
    """

    def __init__(self, upstream: UpstreamSettings) -> None:
        self._pool = upstream.pool_size
        self._timeout = upstream.timeout
        self._connect_timeout = upstream.connect_timeout
        self._session: aiohttp.ClientSession | None = None
        # The parsed target per URL string: an event route's POST target repeats on
        # every call (a beacon's query does not, and just misses). Bounded: emptied
        # when full, so a flood of distinct beacon targets costs nothing but misses.
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._pool, keepalive_timeout=30.0, ssl=upstream_ssl_context())
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_connect=self._connect_timeout,
                                        sock_read=self._timeout)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # one user's relay cookie never reaches the next (rule 5)
            trust_env=False,  # no proxy or netrc from the environment
            timeout=timeout,
            # What every call carries, once per session instead of once per call (aiohttp
            # copies these first; a call's own User-Agent replaces the default).
            headers=(("Connection", "keep-alive"), ("User-Agent", _DEFAULT_USER_AGENT)),
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
        # Connection and the default User-Agent come from the session (_open).
        try:
            return [(name.decode("latin-1").lower(), value.decode("utf-8")) for name, value in headers]
        except UnicodeDecodeError:
            pass
        out = []
        for name, value in headers:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = value.decode("latin-1")
            out.append((name.decode("latin-1").lower(), text))
        return out

    def _url(self, url: str) -> yarl.URL:
        """``url`` as httpx would send it, then verbatim (see :meth:`call`); cached per string."""
        import yarl

        target = self._urls.get(url)
        if target is not None:
            return target
        # The target as httpx would send it (the relay's view must not depend on
        # upstream.client), and then verbatim: yarl's own requoting would decode a
        # query's %2F into "/" and change what an image beacon carries. A URL of
        # characters httpx never requotes goes as it is (0.8 us instead of the
        # 18 us of httpx's parser, measured per call).
        if _VERBATIM.match(url):
            target = yarl.URL(url, encoded=True)
        else:
            parsed = httpx.URL(url)
            path, _, query = parsed.raw_path.decode("ascii").partition("?")
            target = yarl.URL.build(scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=path,
                                    query_string=query, encoded=True)
        if len(self._urls) >= _URL_CACHE:
            self._urls.clear()
        self._urls[url] = target
        return target

    async def call(self, method: str, url: str, headers: Headers, body: bytes) -> ForwardResult | str:
        """The upstream's answer (any status), or why there is none: ``timeout``,
        ``connect``, ``invalid_url``, ``too_large`` (more than 1 MiB, decoded),
        ``content_encoding`` or aiohttp's exception name. Never raises for upstream trouble."""
        import aiohttp  # loaded by _open: a sys.modules lookup

        session = self._session if self._session is not None else self._open()
        data = None if method in _BODYLESS and not body else body
        try:
            target = self._url(url)
            wire = self._wire_headers(headers)
            # httpx sends no Content-Type of its own; aiohttp gives a body without one
            # application/octet-stream unless told to skip it. Told per call, only then:
            # a skip list makes aiohttp copy the call's headers (session-wide, every call).
            skip = _NO_CONTENT_TYPE if data is not None and all(n != "content-type" for n, _ in wire) else None
            async with session.request(method, target, data=data, headers=wire, skip_auto_headers=skip,
                                       allow_redirects=False) as response:
                content = response.content
                chunks: list[bytes] = []
                size = 0
                # Decoded, as it arrives; a small answer is usually all there (and its
                # end seen) already, so at_eof() spares the await that would return b"".
                while not content.at_eof():
                    chunk = await content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > _MAX_ANSWER:
                        response.close()  # unread bytes: the connection is not pooled again
                        return "too_large"
                    chunks.append(chunk)
                out = relay_response_headers(response.raw_headers)
                if size and "Content-Encoding" in response.headers:
                    left = _codings_left(response.headers.getall("Content-Encoding"), response.raw_headers)
                    if left is None:
                        return "content_encoding"
                    out += left
                return ForwardResult(response.status, out, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except TimeoutError:  # aiohttp's ServerTimeoutError (connect, read) is one
            return "timeout"
        except aiohttp.ClientConnectorError:  # refused, DNS, TLS handshake or verification
            return "connect"
        except (httpx.InvalidURL, aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError, ValueError):  # yarl: bad port
            return "invalid_url"
        except aiohttp.ClientError as exc:
            return type(exc).__name__


async def _call_httpx(client: httpx.AsyncClient, method: str, url: str, request: ForwardRequest) -> ForwardResult | str:
    """One call through the shared httpx client: its answer, or an error code."""
    content = None if method in _BODYLESS and not request.body else request.body
    try:
        async with client.stream(method, url, content=content, headers=list(request.headers)) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _MAX_ANSWER:
                    break
                chunks.append(chunk)
            if size <= _MAX_ANSWER:
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


class HttpRelay:
    """:class:`Relay` to one upstream base URL (``upstream.relay`` or a route's upstream).

    With ``upstream.client = "aiohttp"`` and no injected ``transport`` calls go
    straight on aiohttp; otherwise through an httpx client (``transport`` lets
    tests mock the upstream). ``stats`` counts ``api_forwarded`` / ``api_relay_error``;
    ``observe`` sees every call's status, duration and error.
    """

    def __init__(self, base_url: str, upstream: UpstreamSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 stats: Counter[str] | None = None, observe: Observe | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._upstream = upstream
        self._transport = transport
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self._observe = observe
        self._aiohttp = _AiohttpClient(upstream) if transport is None and upstream.client == "aiohttp" else None
        self._httpx: httpx.AsyncClient | None = None

    async def send(self, request: ForwardRequest) -> ForwardResult:
        started = time.perf_counter()
        # A route with its own upstream sends an absolute target (kept as is by the spool).
        url = request.target if request.target.startswith(_ABSOLUTE) else self.base_url + request.target
        if self._aiohttp is not None:
            outcome = await self._aiohttp.call(request.method, url, request.headers, request.body)
        else:
            if self._httpx is None:
                self._httpx = new_http_client(self._upstream, self._transport)
            outcome = await _call_httpx(self._httpx, request.method, url, request)
        if isinstance(outcome, ForwardResult):
            self.stats["api_forwarded"] += 1
            result = outcome
        else:
            self.stats["api_relay_error"] += 1
            log.warning("relay %s failed for host %s: %s", self.base_url, request.host, outcome)
            result = ForwardResult(502, _FAILED_HEADERS, _FAILED_BODY, error=outcome)
        if self._observe is not None:
            self._observe(result.status, time.perf_counter() - started, result.error)
        return result

    async def aclose(self) -> None:
        client, self._httpx = self._httpx, None
        try:
            if client is not None:
                await client.aclose()
        finally:
            if self._aiohttp is not None:
                await self._aiohttp.aclose()
