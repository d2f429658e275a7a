"""What the edge serves from its own memory: vendor scripts and static assets.

Owns:
- :class:`ScriptSource`: one ``script`` route's vendor script, fetched from its
  origin (single flight, conditional refresh, stale-while-revalidate and
  stale-if-error), rewritten per host, compressed once per host and version.
- :class:`AssetCache`: one ``asset`` route's immutable files, fetched once per
  path and kept in memory (bounded), with ETag/304.
- :func:`accepts_gzip`, :func:`etag_matches`: the negotiation rules both use.

Both answer only with an allowlist of headers they build themselves: nothing of
the origin's Set-Cookie, HSTS or CORS ever lands on a customer's domain.

Must not import: anything of ours but ``config`` and ``routes``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import brotli
import httpx

from ..config import RouteSettings, UpstreamSettings
from ..rules.routes import RouteTable, placeholder_values

__all__ = ["AssetCache", "Asset", "Encoded", "Rewriter", "ScriptSource", "Variant", "accepts_gzip",
           "content_coding", "etag_matches", "script_rules"]

log = logging.getLogger("edgeproxy.proxy")

HeaderList = list[tuple[bytes, bytes]]

_SCRIPT_TYPE: Final = b"application/javascript; charset=utf-8"
_SCRIPT_CACHE_SIZE: Final = 2048  # per-host rewritten variants kept per worker and script (LRU)
_SCRIPT_MAX_BYTES: Final = 8 * 1024 * 1024  # an origin answer bigger than this is a failure
_RETRY_NO_COPY: Final = 1.0  # seconds: with nothing to serve, retry the origin soon
_RETRY_WITH_COPY: Final = 10.0  # seconds: with a last good copy, do not hammer a failing origin
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


@dataclass(frozen=True)
class _Origin:
    """The one in-memory copy of a vendor script, as the origin served it."""

    body: bytes
    etag: str | None  # the origin's validator, for conditional refreshes


@dataclass(frozen=True)
class Encoded:
    """One content coding of a script variant: the body and the response fields."""

    body: bytes
    etag: bytes
    headers: HeaderList
    not_modified: HeaderList


@dataclass
class Variant:
    """A script rewritten for one host, with everything a response needs precomputed.

    ``coded`` holds identity (``b""``) and gzip from the start, and Brotli
    (``b"br"``) from the first request that prefers it: quality 11 takes ~170 ms
    for 100 KB of script (measured; gzip -9 ~9 ms), too long for the event loop,
    so it runs once per variant in a thread that every such request awaits."""

    origin: _Origin
    digest: str
    common: HeaderList
    coded: dict[bytes, Encoded]
    br: asyncio.Future[bytes] | None = None


def _encoded(body: bytes, digest: str, coding: bytes, common: HeaderList) -> Encoded:
    # Strong validators differ per content coding (RFC 9110 section 8.8.3).
    etag = f'"{digest}-{coding.decode()}"'.encode() if coding else f'"{digest}"'.encode()
    fields = [(b"etag", etag)] + ([(b"content-encoding", coding)] if coding else [])
    return Encoded(
        body=body,
        etag=etag,
        headers=common + fields + [(b"content-length", str(len(body)).encode())],
        # RFC 9110 section 15.4.5: a 304 carries the fields a 200 would have had, minus content.
        not_modified=common[1:] + [(b"etag", etag)],
    )


def _brotli(body: bytes) -> bytes:
    return bytes(brotli.compress(body, quality=11, mode=brotli.MODE_TEXT))


class Rewriter:
    """Literal replacements in one pass (a replacement never rewrites another's output).

    ``rules`` map a search string to its replacement; ``{host}`` and ``{<name>_path}``
    (every route's path for the host, ``routes.randomize`` included; ``{script_path}``
    and ``{api_path}`` for the first script and event route) are resolved per host,
    once per host and script version.
    """

    def __init__(self, rules: Mapping[str, str]) -> None:
        self.rules: dict[bytes, bytes] = {key.encode(): value.encode() for key, value in rules.items() if key}
        keys = sorted(self.rules, key=len, reverse=True)  # longest match first
        self._pattern = re.compile(b"|".join(re.escape(k) for k in keys)) if keys else None

    def resolved(self, host: str, table: RouteTable) -> dict[bytes, bytes]:
        """Each rule's replacement with the placeholders filled in for ``host``."""
        values = placeholder_values(host, table)
        out: dict[bytes, bytes] = {}
        for key, value in self.rules.items():
            for name, replacement in values.items():
                value = value.replace(b"{" + name.encode("ascii") + b"}", replacement.encode("ascii"))
            out[key] = value
        return out

    def apply(self, body: bytes, host: str, table: RouteTable) -> bytes:
        if self._pattern is None:
            return body
        values = self.resolved(host, table)
        return self._pattern.sub(lambda m: values[m.group(0)], body)


def script_rules(entry: RouteSettings, upstream: UpstreamSettings, *, first: bool) -> dict[str, str]:
    """The rewrite rules of one script route: its own ``rewrite`` (the first script
    route falls back to ``upstream.rewrite``), plus, always, the relay origin ->
    ``https://{host}{api_path}``: the script must talk back to the custom domain."""
    rules = dict(entry.rewrite or (upstream.rewrite if first else {}))
    relay_origin = upstream.relay.rstrip("/")
    if relay_origin:
        rules[relay_origin] = "https://{host}{api_path}"
    return rules


class ScriptSource:
    """One ``script`` route's vendor script, per worker, used from one event loop.

    ``current()`` never waits on the origin once a copy exists (stale-while-
    revalidate; the last good copy stays in service while the origin fails);
    the first request waits for the one fetch in flight. ``variant(host, table)``
    is the copy rewritten for ``host``, built once per host and origin version.
    """

    def __init__(self, url: str, rewriter: Rewriter, *, ttl: float, http: Callable[[], httpx.AsyncClient],
                 clock: Callable[[], float], stats: Counter[str]) -> None:
        self.url = url
        self.rewriter = rewriter
        self._ttl = ttl
        self._http = http
        self._clock = clock
        self.stats = stats
        self._cache_control = f"public, max-age={max(0, int(ttl))}".encode()
        self._origin: _Origin | None = None
        self._next_fetch_at = float("-inf")
        self._fetch_task: asyncio.Task[bool] | None = None
        self.variants: OrderedDict[str, Variant] = OrderedDict()

    def start_fetch(self) -> asyncio.Task[bool]:
        """The fetch in flight, or a new one: single-flight across all requests."""
        task = self._fetch_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._fetch_task = task
        return task

    @property
    def fetched(self) -> bool:
        return self._origin is not None

    async def cancel(self) -> None:
        task, self._fetch_task = self._fetch_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _fetch(self) -> bool:
        """One origin fetch. Never raises: on failure the last good copy stays in service."""
        previous = self._origin
        request_headers: dict[str, str] = {}
        if previous is not None and previous.etag:
            request_headers["if-none-match"] = previous.etag
        reason: str
        try:
            async with self._http().stream("GET", self.url, headers=request_headers) as response:
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
                            self.variants.clear()  # every variant was built from the old copy
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
            log.warning("script origin %s failed (%s); serving the last good copy", self.url, reason)
        else:
            log.error("script origin %s failed (%s); no copy to serve yet", self.url, reason)
        return False

    async def current(self) -> _Origin | None:
        origin = self._origin
        if origin is not None:
            # Stale-while-revalidate: a stale copy is served at once while one
            # background fetch refreshes it, so no request waits on the origin
            # once a copy exists.
            if self._clock() >= self._next_fetch_at:
                self.start_fetch()
            return origin
        task = self._fetch_task
        if (task is None or task.done()) and self._clock() < self._next_fetch_at:
            return None  # the origin failed moments ago and there is nothing to serve
        # First copy: every concurrent request waits for the same fetch. shield():
        # one client going away must not cancel the fetch the others wait for.
        await asyncio.shield(self.start_fetch())
        return self._origin

    def variant(self, host: str, origin: _Origin, table: RouteTable) -> Variant:
        variant = self.variants.get(host)
        if variant is not None and variant.origin is origin:
            self.variants.move_to_end(host)
            return variant
        body = self.rewriter.apply(origin.body, host, table)
        digest = hashlib.sha256(body).hexdigest()[:32]
        common = [
            (b"content-type", _SCRIPT_TYPE),
            (b"cache-control", self._cache_control),
            (b"vary", b"accept-encoding"),
            (b"x-content-type-options", b"nosniff"),
        ]
        variant = Variant(origin=origin, digest=digest, common=common, coded={
            b"": _encoded(body, digest, b"", common),
            b"gzip": _encoded(gzip.compress(body, compresslevel=9, mtime=0), digest, b"gzip", common),
        })
        self.variants[host] = variant
        self.variants.move_to_end(host)
        while len(self.variants) > _SCRIPT_CACHE_SIZE:
            self.variants.popitem(last=False)
        return variant

    @staticmethod
    async def brotli_ready(variant: Variant) -> bool:
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


# -- assets ------------------------------------------------------------------------------

# An asset answer keeps one origin header, its Content-Type (when it is a plain visible
# ASCII value), and nothing that could set state or policy on the customer's domain.
_ASSET_TYPES_SAFE: Final = re.compile(rb"[\x21-\x7e][\x20-\x7e]{0,127}\Z")
_ASSET_CACHE_BYTES: Final = 32 * 1024 * 1024  # per asset route and worker (LRU)
_ASSET_CACHE_CONTROL: Final = b"public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    """One cached file: its bytes and the headers of a 200 and a 304."""

    body: bytes
    etag: bytes
    headers: HeaderList
    not_modified: HeaderList


class AssetCache:
    """One ``asset`` route's files, fetched from ``base`` + path once and kept (LRU, bounded).

    The route serves immutable, versioned files (``/static/app.3f2a.js``): a cached
    copy never expires; a file that fails or is larger than ``max_bytes`` is not
    cached (the next request tries again). ``get`` returns the asset, or the
    status to answer (404 when the origin has no such file, 502 otherwise).
    """

    def __init__(self, base: str, *, max_bytes: int, http: Callable[[], httpx.AsyncClient],
                 stats: Counter[str]) -> None:
        self.base = base.rstrip("/")
        self.max_bytes = max_bytes
        self._http = http
        self.stats = stats
        self._files: OrderedDict[str, Asset] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, asyncio.Task[Asset | int]] = {}

    async def get(self, target: str) -> Asset | int:
        asset = self._files.get(target)
        if asset is not None:
            self._files.move_to_end(target)
            self.stats["asset_cache_hit"] += 1
            return asset
        task = self._inflight.get(target)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(target))
            self._inflight[target] = task
            task.add_done_callback(lambda _t: self._inflight.pop(target, None))
        return await asyncio.shield(task)

    async def _fetch(self, target: str) -> Asset | int:
        url = self.base + target
        try:
            async with self._http().stream("GET", url) as response:
                if response.status_code in (404, 410):
                    self.stats["asset_not_found"] += 1
                    return 404
                if response.status_code != 200:
                    self.stats["asset_origin_error"] += 1
                    log.warning("asset origin %s answered %d", url, response.status_code)
                    return 502
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    self.stats["asset_too_large"] += 1
                    return 502
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        self.stats["asset_too_large"] += 1
                        log.warning("asset %s is larger than %d bytes; not served", url, self.max_bytes)
                        return 502
                    chunks.append(chunk)
                # The origin's own bytes for the one header kept (the rest are ours).
                kind = next((v for n, v in response.headers.raw if n.lower() == b"content-type"),
                            b"application/octet-stream")
        except httpx.HTTPError as exc:
            self.stats["asset_origin_error"] += 1
            log.warning("asset origin %s failed: %s: %s", url, type(exc).__name__, exc)
            return 502
        if not _ASSET_TYPES_SAFE.match(kind):
            kind = b"application/octet-stream"
        body = b"".join(chunks)
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'.encode()
        common = [(b"cache-control", _ASSET_CACHE_CONTROL), (b"x-content-type-options", b"nosniff"),
                  (b"etag", etag)]
        asset = Asset(body, etag, [(b"content-type", kind), (b"content-length", str(len(body)).encode())] + common,
                      common)
        self._files[target] = asset
        self._bytes += len(body)
        while self._bytes > _ASSET_CACHE_BYTES and len(self._files) > 1:
            _, old = self._files.popitem(last=False)
            self._bytes -= len(old.body)
        self.stats["asset_fetched"] += 1
        return asset
