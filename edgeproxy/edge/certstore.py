"""Certificates: persistence through storage, the in-memory SNI map, serving by SNI.

Owns: turning an issued key + chain into a stored ``CertificateRecord``; the one
factory for server ``ssl.SSLContext`` objects (``tlspolicy``, ALPN h2 + http/1.1);
the self-signed fallback that names no customer; the per-process SNI map that
every worker keeps in step with storage through the change feed.
Must not import: ``acme``, ``httpx``, ``hypercorn``.

Concurrency model: each worker process has one ``CertStore``. ``refresh()``
runs on the event loop and does its blocking work (storage reads, PEM parsing)
in a thread; it publishes results by assigning dict entries, which the TLS
handshake callback reads. The callback never does I/O (house rule 4).

Scale: nothing is built per name ahead of time. A refresh keeps only
the material of each servable name in memory (key + leaf as DER in one
``bytes``, ~1 KB; identical intermediate chains are shared; see ``_Codec``), and
the handshake callback makes it ready on first use, into a bounded LRU
(``proxy.tls_context_cache``). A hit is a dict lookup. A miss is pure CPU from
memory, no I/O and no lock: by default an ``SSLContext`` loaded with
``load_cert_chain`` (Python's public ``ssl`` API only), ~0.8 ms and ~24 KB of RSS; on
the opt-in native path (``proxy.tls_native = true``, ``tlsnative``: ctypes and
CPython's private ``_ssl`` layout) a parse of the leaf and key, ~0.04-0.12 ms and
~7 KB, installed on the connection itself. We chose
that over pausing the handshake (Python's ``ssl`` cannot suspend an SNI
callback) and over serving the fallback certificate on a miss (the first
visitor of a cold name would fail); see bench/README.md for the measurements.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import logging
import os
import re
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import tlsnative, tlspolicy
from ..errors import StorageError, StorageUnavailable
from ..storage.base import CertificateRecord, CertificateVisitor, OutboxEvent, Storage, leaf_der_of

__all__ = [
    "CertMap",
    "CertStore",
    "build_context",
    "certificate_metadata",
    "make_fallback_pair",
    "record_from_pem",
]

log = logging.getLogger("edgeproxy.certstore")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
FALLBACK_NAME = "edgeproxy-fallback.invalid"  # RFC 6761 .invalid: names no customer


def certificate_metadata(chain_pem: bytes) -> tuple[dt.datetime, dt.datetime, str, str]:
    """(not_before, not_after, serial hex, issuer) of the leaf, the first PEM block."""
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return (
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
        format(leaf.serial_number, "x"),
        leaf.issuer.rfc4514_string(),
    )


def record_from_pem(hostname: str, key_pem: bytes, chain_pem: bytes, now: dt.datetime, *,
                    acme_directory: str = "", fallback_reason: str = "") -> CertificateRecord:
    """Build the record that storage saves as one atomic unit."""
    not_before, not_after, serial, issuer = certificate_metadata(chain_pem)
    return CertificateRecord(
        hostname=hostname,
        key_pem=key_pem,
        chain_pem=chain_pem,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        issuer=issuer,
        created_at=now,
        acme_directory=acme_directory,
        fallback_reason=fallback_reason,
    )


def build_context(chain_pem: bytes, key_pem: bytes, policy: str = "intermediate") -> ssl.SSLContext:
    """The one server-context factory: every listener's context, and each host's on the
    context path (the native path sets a host's certificate on the connection instead,
    so its versions, suites and groups are the listener context's: ``policy`` here).

    ``ssl.SSLContext.load_cert_chain`` only reads files. On Linux we hand it an
    anonymous in-memory file (memfd) so that a private key never touches a disk
    path; elsewhere a 0600 temporary file that is removed at once.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tlspolicy.apply(ctx, policy)
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    material = chain_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edgeproxy-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, material)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux development machines
        with tempfile.NamedTemporaryFile(prefix="edgeproxy-", suffix=".pem") as fh:
            os.chmod(fh.name, 0o600)
            fh.write(material)
            fh.flush()
            ctx.load_cert_chain(fh.name)
    return ctx


def make_fallback_pair(now: dt.datetime) -> tuple[bytes, bytes]:
    """A throwaway self-signed (chain_pem, key_pem) that names no customer.

    Served to any SNI we do not know (or no SNI at all); browsers reject it, which
    is the point: an unknown name must never get a customer's certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, FALLBACK_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(FALLBACK_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END \1-----\r?\n?")
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_END_CERT = b"-----END CERTIFICATE-----"
_RAW = 0xFFFF  # "label" id of material kept as PEM because it did not parse as plain PEM


def _pem(label: bytes, der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN " + label + b"-----\n" + lines + b"\n-----END " + label + b"-----\n"


class _Codec:
    """Per-host TLS material packed into one ``bytes`` (100,000 names in memory).

    Layout: tail id (2 bytes), key label id (2), key length (4), key DER, leaf DER.
    The tail (the intermediates after the leaf, as PEM) and the key's PEM label are
    interned: every host issued by one CA shares one copy. DER instead of PEM saves
    a quarter; one bytes object instead of a record per host saves the rest. A key
    that is not plain PEM (e.g. with headers) is kept verbatim (label id ``_RAW``).
    The tables only grow, by one entry per distinct CA chain or key type.
    """

    def __init__(self) -> None:
        self._tails: list[bytes] = []
        self._tail_ids: dict[bytes, int] = {}
        self._labels: list[bytes] = []
        self._label_ids: dict[bytes, int] = {}
        self._lock = threading.Lock()  # pack() runs in refresh and renewal threads

    def _intern(self, value: bytes, table: list[bytes], ids: dict[bytes, int]) -> int:
        found = ids.get(value)
        if found is None:
            with self._lock:
                found = ids.get(value)
                if found is None:
                    found = len(table)
                    table.append(value)  # before the id is published: unpack never sees an id without its entry
                    ids[value] = found
        return found

    def _tail_id(self, raw: bytes) -> int:
        """The interned id of the PEM after the leaf. Looked up by its raw bytes
        first (one CA writes them identically in every chain), normalized only on
        a miss; the raw form is then remembered as another key of the same id."""
        found = self._tail_ids.get(raw)
        if found is None:
            tail = raw.strip()
            found = self._intern(tail + b"\n" if tail else b"", self._tails, self._tail_ids)
            with self._lock:
                self._tail_ids.setdefault(raw, found)
        return found

    def pack(self, key_pem: bytes, chain_pem: bytes, leaf_der: bytes | None = None) -> bytes:
        """Raises ValueError when the chain does not start with a PEM certificate.

        ``leaf_der`` is the chain's first certificate as DER when storage has it
        (saved next to the chain since the leaf_der column exists); without it the leaf is decoded
        from the PEM here (~2 us, a quarter of a pack). Start-up packs every name
        (100,000 in well under a second), hence plain ``find`` for the leaf's end
        and the tail interned by its raw bytes.
        """
        chain = chain_pem.lstrip()
        end = chain.find(_END_CERT)
        if not chain.startswith(_BEGIN_CERT) or end < 0:
            raise ValueError("the chain does not start with a PEM certificate")
        if leaf_der is None:
            leaf_der = leaf_der_of(chain)
            if leaf_der is None:
                raise ValueError("the leaf certificate is not valid base64")
        tail_id = self._tail_id(chain[end + len(_END_CERT):])
        key = _PEM_RE.fullmatch(key_pem.strip() + b"\n")
        if key is not None:
            label_id = self._intern(key.group(1), self._labels, self._label_ids)
            key_bytes = binascii.a2b_base64(key.group(2))
        else:
            label_id, key_bytes = _RAW, key_pem
        return (tail_id.to_bytes(2, "big") + label_id.to_bytes(2, "big") + len(key_bytes).to_bytes(4, "big")
                + key_bytes + leaf_der)

    @staticmethod
    def _fields(blob: bytes) -> tuple[int, int, bytes, bytes]:
        """(tail id, key label id, key bytes, leaf DER) of a packed blob."""
        key_len = int.from_bytes(blob[4:8], "big")
        return int.from_bytes(blob[0:2], "big"), int.from_bytes(blob[2:4], "big"), blob[8:8 + key_len], blob[8 + key_len:]

    def unpack(self, blob: bytes) -> tuple[bytes, bytes]:
        """(chain_pem, key_pem) back from ``pack``."""
        tail_id, label_id, key_bytes, leaf_der = self._fields(blob)
        key_pem = key_bytes if label_id == _RAW else _pem(self._labels[label_id], key_bytes)
        return _pem(b"CERTIFICATE", leaf_der) + self._tails[tail_id], key_pem

    def parts(self, blob: bytes) -> tuple[int, bytes, bool, bytes]:
        """(tail id, key, whether the key is PEM, leaf DER): what the native path parses."""
        tail_id, label_id, key_bytes, leaf_der = self._fields(blob)
        return tail_id, key_bytes, label_id == _RAW, leaf_der

    def tail(self, tail_id: int) -> bytes:
        """The intermediates (PEM) that ``tail_id`` stands for."""
        return self._tails[tail_id]


# (hostname, registered, packed material or None, not_after as POSIX seconds)
_Loaded = tuple[str, bool, bytes | None, float]


# What the cache holds per name: a parsed leaf + key (native path) or a built context.
Prepared = tlsnative.Certificate | ssl.SSLContext


@dataclass(frozen=True)
class CertMap:
    """What a refresh loaded: the maps a ``CertStore`` serves from, and the change-feed
    position they reflect. ``serve`` loads one in the parent before forking its workers,
    so that every worker starts from the same pages (copy-on-write: ~1 KB per name,
    shared instead of loaded once per worker); each process's ``CertStore`` then keeps
    its own copy in step with storage from ``seq`` on."""

    hosts: dict[str, bool]
    material: dict[str, bytes]
    expires: dict[str, float]
    codec: _Codec
    seq: int


class CertStore:
    """Per-process view of which names are registered and which have a live certificate.

    ``hosts`` maps every registered hostname to True when it has a certificate that
    is valid now (the proxy serves it) and False otherwise (registered, not yet
    servable: HTTP-01 answers only). ``cache`` is the LRU (at most ``cache_size``)
    of certificates made ready to serve, filled on first use of a name by the SNI
    callback from the in-memory material of that name: one built ``SSLContext`` per
    name (the default, public ``ssl`` API only), or on the opt-in native path
    (``native=True`` and its self-test passed: ``tlsnative``) a parsed leaf + key
    installed on each connection.
    ``expires`` holds each served certificate's not_after (POSIX seconds: a float,
    not a datetime, at 100,000 names).
    """

    def __init__(self, storage: Storage, cache_size: int = 1024, native: bool = False,
                 policy: str = "intermediate", loaded: CertMap | None = None) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        if policy not in tlspolicy.POLICIES:
            raise ValueError(f"unknown TLS policy {policy!r}")
        self.storage = storage
        self.policy = policy
        self.cache_size = cache_size
        self.hosts: dict[str, bool] = {}
        self.cache: OrderedDict[str, Prepared] = OrderedDict()
        self.expires: dict[str, float] = {}
        self._next_expiry = float("inf")  # the earliest value in expires, or later
        self._expiry_lock = threading.Lock()  # _apply also runs in save()'s thread
        self._material: dict[str, bytes] = {}  # packed by self._codec
        self._codec = _Codec()
        self._seq = 0
        if loaded is not None:  # start from a map loaded before (serve: in the parent, before fork)
            self.hosts, self._material, self.expires = loaded.hosts, loaded.material, loaded.expires
            self._codec, self._seq = loaded.codec, loaded.seq
            self._next_expiry = min(self.expires.values(), default=float("inf"))
        self.native = load_native() if native else None
        self._chains: dict[int, tlsnative.Chain] = {}  # native: parsed intermediates per codec tail id
        self.built = 0  # certificates made ready since start (cache misses that found material)
        chain, key = make_fallback_pair(_utcnow())
        self.fallback_context = build_context(chain, key, policy)
        self.fallback_context.sni_callback = self.sni_callback

    # -- the handshake path: a dict lookup; on a miss, a parse or build from memory ------
    def sni_callback(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        """Serve the certificate chosen by SNI (RFC 6066 section 3).

        The name is recorded on the SSLObject so that ``server.py`` can put it in
        the ASGI scope and the proxy can refuse a Host that differs from the SNI.
        Python hands us the A-label; DNS names compare case-insensitively. A name
        we cannot serve keeps the listener's fallback certificate.
        """
        name = server_name.lower() if server_name else None
        ssl_object.edgeproxy_sni = name  # type: ignore[attr-defined]
        if name is None:
            return
        prepared = self.certificate_for(name)
        if prepared is None:
            return
        if isinstance(prepared, ssl.SSLContext):
            ssl_object.context = prepared
            return
        assert self.native is not None  # only the native path caches Certificates
        try:
            self.native.install(ssl_object, prepared)
        except tlsnative.NativeError as exc:  # the handshake then fails: it has no certificate
            log.error("cannot serve the certificate of %s: %s", name, exc)

    def certificate_for(self, name: str) -> Prepared | None:
        """What serves ``name`` (made ready now if it is not cached), or None.

        No I/O and no await: safe inside the handshake callback. Runs on the
        worker's event loop; the only other writer of the maps from a thread is
        ``save()``, whose single-dict-operation updates are atomic under the GIL
        (it may drop an entry between two steps here, hence the KeyErrors).
        """
        cache = self.cache
        prepared = cache.get(name)
        if prepared is not None:
            with contextlib.suppress(KeyError):
                cache.move_to_end(name)
            return prepared
        material = self._material.get(name)
        if material is None:
            return None
        try:
            prepared = self._prepare(material)
        except (ssl.SSLError, OSError, ValueError, IndexError, tlsnative.NativeError) as exc:
            # checked at save(); a failure here must not kill the handshake
            log.error("cannot load the certificate of %s: %s", name, exc)
            return None
        self.built += 1
        cache[name] = prepared
        if len(cache) > self.cache_size:
            with contextlib.suppress(KeyError):
                cache.popitem(last=False)
        return prepared

    def _prepare(self, material: bytes) -> Prepared:
        if self.native is None:
            chain_pem, key_pem = self._codec.unpack(material)
            return build_context(chain_pem, key_pem, self.policy)
        tail_id, key, key_is_pem, leaf_der = self._codec.parts(material)
        chain = self._chains.get(tail_id)
        if chain is None:
            chain = self._chains[tail_id] = self.native.chain(self._codec.tail(tail_id))
        return self.native.certificate(leaf_der, key, key_is_pem, chain)

    def server_context(self) -> ssl.SSLContext:
        """The context a TLS listener starts with: fallback cert + our SNI callback."""
        return self.fallback_context

    # -- keeping in step with storage --------------------------------------------------
    def save(self, hostname: str, key_pem: bytes, chain_pem: bytes, now: dt.datetime, *,
             acme_directory: str = "", fallback_reason: str = "",
             events: Callable[[CertificateRecord], Sequence[OutboxEvent]] | None = None) -> CertificateRecord:
        """Persist a freshly issued pair (blocking), with the ACME CA that issued it and
        why that CA (``CertificateRecord``). Other workers see it on their next refresh.
        ``events(record)``: lifecycle events written in the same transaction as the certificate."""
        record = record_from_pem(hostname, key_pem, chain_pem, now, acme_directory=acme_directory,
                                 fallback_reason=fallback_reason)
        build_context(chain_pem, key_pem)  # refuse a pair that does not load before storing it
        self.storage.save_certificate(record, events=events(record) if events is not None else ())
        # Serve it from this process at once: the renewal loop marks the domain
        # active right after this call, and a client that sees "active" must not
        # get the fallback while we wait for the next change-feed poll. Other
        # workers pick it up from the feed. save() runs in a worker thread; each
        # step is one dict operation (atomic under the GIL), in _apply's order.
        self._apply([(hostname, True, self._codec.pack(key_pem, chain_pem), record.not_after.timestamp())])
        return record

    def _scan(self, hostnames: Sequence[str], visit: CertificateVisitor) -> set[str]:
        """Which of ``hostnames`` are registered; ``visit`` each one's certificate.

        One streaming bulk read when the store offers ``scan_certificates``
        (SQLite does: 100,000 names in one scan instead of 200,000 point queries,
        never all rows in memory at once); otherwise the ``Storage`` protocol's
        per-name reads.
        """
        scan = getattr(self.storage, "scan_certificates", None)
        if scan is not None:
            return set(scan(hostnames, visit))
        registered: set[str] = set()
        for hostname in hostnames:
            if self.storage.get_domain(hostname) is None:
                continue
            registered.add(hostname)
            cert = self.storage.get_certificate(hostname)
            if cert is not None:
                visit(hostname, cert.key_pem, cert.chain_pem, None, cert.not_after, cert.serial)
        return registered

    def _load(self, hostnames: Iterable[str], now: dt.datetime) -> list[_Loaded]:
        """Blocking part of a refresh: read storage, pack the material (runs in a thread).

        Nothing is built here. A pair that cannot load is found when a worker
        first serves it (logged, fallback served); ``save()`` already refuses
        such pairs before they reach storage.
        """
        names = list(dict.fromkeys(hostnames))  # de-duplicate, keep order
        found: dict[str, tuple[bytes, float]] = {}
        pack = self._codec.pack

        def visit(hostname: str, key_pem: bytes, chain_pem: bytes, leaf_der: bytes | None, not_after: dt.datetime,
                  _serial: str) -> None:
            if not_after <= now:
                return
            try:
                found[hostname] = (pack(key_pem, chain_pem, leaf_der), not_after.timestamp())
            except ValueError as exc:
                log.error("cannot load certificate for %s: %s", hostname, exc)

        registered = self._scan(names, visit)
        # These string objects become the keys of every map: one copy per name.
        return [(hostname, False, None, 0.0) if hostname not in registered
                else (hostname, True, *found.pop(hostname, (None, 0.0)))
                for hostname in names]

    def _apply(self, loaded: Sequence[_Loaded]) -> None:
        cache, hosts, materials, expires = self.cache, self.hosts, self._material, self.expires
        for hostname, registered, material, not_after in loaded:
            # Any change invalidates the cached certificate: the next handshake
            # loads the new material (renewal), or finds none (removal, expiry).
            cache.pop(hostname, None)
            if not registered:
                hosts.pop(hostname, None)
                materials.pop(hostname, None)
                expires.pop(hostname, None)
            elif material is None:
                hosts[hostname] = False
                materials.pop(hostname, None)
                expires.pop(hostname, None)
            else:
                # Publish the material before marking the host active, so that a
                # request never sees an active host without its certificate.
                materials[hostname] = material
                expires[hostname] = not_after
                hosts[hostname] = True
                with self._expiry_lock:
                    self._next_expiry = min(self._next_expiry, not_after)

    def snapshot(self) -> CertMap:
        """The maps as loaded so far (shared, not copied), to start another ``CertStore`` from."""
        return CertMap(self.hosts, self._material, self.expires, self._codec, self._seq)

    def refresh_blocking(self, now: dt.datetime | None = None) -> int:
        """Apply storage changes since the last refresh; returns how many names changed."""
        now = now or _utcnow()
        seq, changed = self.storage.changes_since(self._seq)
        if not changed and seq == self._seq:
            return 0
        self._apply(self._load(changed, now))
        self._seq = seq
        return len(set(changed))

    async def refresh(self, now: dt.datetime | None = None) -> int:
        """Like ``refresh_blocking`` but with all blocking work off the event loop."""
        now = now or _utcnow()
        seq, changed = await asyncio.to_thread(self.storage.changes_since, self._seq)
        if not changed and seq == self._seq:
            return 0
        loaded = await asyncio.to_thread(self._load, changed, now)
        self._apply(loaded)
        self._seq = seq
        return len(set(changed))

    def expire(self, now: dt.datetime) -> list[str]:
        """Stop serving certificates whose not_after has passed (no I/O).

        Runs after every refresh (each second): it scans the map only once the
        earliest expiry has come, not 100,000 entries every time."""
        stamp = now.timestamp()
        if stamp < self._next_expiry:
            return []
        with self._expiry_lock:
            self._next_expiry = float("inf")  # recomputed below; _apply lowers it meanwhile
        gone = [h for h, not_after in list(self.expires.items()) if not_after <= stamp]
        self._apply([(h, True, None, 0.0) for h in gone])
        earliest = min(list(self.expires.values()), default=float("inf"))
        with self._expiry_lock:
            self._next_expiry = min(self._next_expiry, earliest)
        return gone

    def expiries(self) -> list[dt.datetime]:
        """not_after of every served certificate (for metrics)."""
        return [dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in list(self.expires.values())]

    @staticmethod
    def trim_memory() -> None:
        """Return the allocator's free memory to the system (glibc only; a no-op
        elsewhere). A bulk refresh at start-up allocates and frees tens of MB of
        scratch objects (rows, PEM copies) around the ~1 KB per name it keeps;
        without this the process keeps them as RSS."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            trim = libc.malloc_trim
        except (OSError, AttributeError):  # not glibc
            return
        trim(0)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Poll the change feed until ``stop`` is set; errors are logged, never fatal.

        With a store that pushes change notifications (PostgreSQL LISTEN/NOTIFY:
        ``wait_for_change``), a change made on another node wakes the poll at
        once; ``interval`` stays the backstop. While the store is unavailable the
        worker keeps serving what it has in memory, says so once, and says when
        the store is back."""
        unavailable = False
        while not stop.is_set():
            try:
                await self.refresh()
                self.expire(_utcnow())
                if unavailable:
                    log.warning("storage is reachable again; certificate refresh resumed")
                    unavailable = False
            except StorageUnavailable as exc:
                if not unavailable:
                    log.error("storage unavailable, serving from memory until it returns: %s", exc)
                    unavailable = True
            except Exception:  # keep serving from memory while storage is unhappy
                log.exception("certificate refresh failed; serving from memory")
            if not unavailable and await self._wait_for_change(interval):
                continue
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    async def _wait_for_change(self, interval: float) -> bool:
        """Block up to ``interval`` on the store's change notifications, if it has
        them; True when the wait happened (notified or timed out)."""
        waiter = getattr(self.storage, "wait_for_change", None)
        if waiter is None:
            return False
        try:
            await asyncio.to_thread(waiter, interval)
        except StorageError as exc:  # the next refresh reports the store's state
            log.debug("change notifications unavailable: %s", exc)
            return False
        return True


def load_native() -> tlsnative.NativeTLS | None:
    """The native TLS path self-tested with this module's context builder, or None (logged)."""
    return tlsnative.load(build_context, make_fallback_pair)
