"""Issuance and renewal: one pass over due domains, and the loop that runs it.

Owns: deciding which domains need an order now, the per-name lock around an
order, recording success (certificate saved, domain active, next renewal time)
and failure (error kept on the domain, exponential backoff), and the loop inside
``serve``. New registrations and renewals go through the same function.
Must not import: ``proxy``, ``hypercorn``, ``acme`` (the CA is behind ``Issuer``).

The pure parts (``backoff``, ``renewal_time``, ``is_due``) take ``now`` as an
argument (house rule 2) so they are tested without waiting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .certstore import CertStore
from .errors import DomainNotFound, IssuanceError, RetryClass, StorageError
from .storage.base import DomainRecord, Storage

__all__ = [
    "Issuer",
    "IssuedPair",
    "LeaseKeeper",
    "PassResult",
    "RenewalService",
    "backoff",
    "renewal_time",
    "is_due",
]

log = logging.getLogger("edgeproxy.renew")

# Failed attempts back off 1 min, 10 min, 100 min, then once a day (issue #4).
_BACKOFF_STEPS = (dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100))
_BACKOFF_CAP = dt.timedelta(days=1)


class IssuedPair(Protocol):
    @property
    def key_pem(self) -> bytes: ...

    @property
    def chain_pem(self) -> bytes: ...


class Issuer(Protocol):
    """The seam around the CA: ``acme_client.AcmeIssuer`` in production, a fake in unit tests."""

    def issue(self, hostname: str) -> IssuedPair:
        """Blocking. Returns a key and chain for ``hostname`` or raises ``IssuanceError``."""
        ...


def backoff(attempts: int) -> dt.timedelta:
    """Delay before retry number ``attempts`` (1-based)."""
    if attempts <= 0:
        return dt.timedelta(0)
    if attempts <= len(_BACKOFF_STEPS):
        return _BACKOFF_STEPS[attempts - 1]
    return _BACKOFF_CAP


def renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When to renew without ARI: with 1/3 of the lifetime left, or 1/2 for
    lifetimes under 10 days (short-lived certificates leave less room to retry)."""
    lifetime = not_after - not_before
    fraction = 0.5 if lifetime < dt.timedelta(days=10) else 1 / 3
    return not_after - lifetime * fraction


def is_due(record: DomainRecord, now: dt.datetime) -> bool:
    """A domain needs an order when its next attempt time has come (moved domains never)."""
    return record.status != "moved" and record.next_attempt_at is not None and record.next_attempt_at <= now


class LeaseKeeper:
    """Extends a held lease every ``ttl/3`` seconds until ``stop()`` (a daemon thread).

    The lease TTL can then be short (a crashed node blocks a name for at most
    ``storage.lock_ttl``) while an order that takes longer than the TTL keeps
    its lease. A failed extension is logged, never fatal: the order goes on,
    and the worst case is a second node ordering the same name once.
    """

    def __init__(self, storage: Storage, name: str, owner: str, ttl: float,
                 clock: Callable[[], dt.datetime]) -> None:
        self.storage, self.name, self.owner, self.ttl, self.clock = storage, name, owner, ttl, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.storage.try_lock(self.name, self.owner, self.ttl, self.clock()):
                    log.error("lease %s was taken over by another node while this one still holds it", self.name)
            except StorageError as exc:
                log.warning("cannot extend lease %s (%s); retrying in %.1fs", self.name, exc, self.ttl / 3)


@dataclass
class PassResult:
    issued: list[str] = field(default_factory=list)
    failed: dict[str, IssuanceError] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # another process holds the lock, or no longer due

    @property
    def ok(self) -> bool:
        return not self.failed


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class RenewalService:
    """Runs orders for due domains with bounded concurrency and one lock per name."""

    def __init__(
        self,
        storage: Storage,
        certstore: CertStore,
        issuer: Issuer,
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        concurrency: int = 4,
        lock_ttl: float = 300.0,
    ) -> None:
        self.storage = storage
        self.certstore = certstore
        self.issuer = issuer
        self.clock = clock
        self.concurrency = concurrency
        self.lock_ttl = lock_ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def due(self, now: dt.datetime) -> list[DomainRecord]:
        return [d for d in self.storage.list_domains() if is_due(d, now)]

    def process(self, hostname: str, force: bool = False) -> str:
        """Order a certificate for one name if still due (blocking).

        Returns "issued", "skipped" or raises ``IssuanceError`` after recording it.
        The lock is taken around the expensive work only, the record is read
        again after taking it (another process may have just finished), and the
        lock is released in ``finally`` (house rule 1).
        """
        lock = f"order:{hostname}"
        if not self.storage.try_lock(lock, self.owner, self.lock_ttl, self.clock()):
            return "skipped"
        keeper = LeaseKeeper(self.storage, lock, self.owner, self.lock_ttl, self.clock)
        keeper.start()
        try:
            record = self.storage.get_domain(hostname)
            if record is None or not (force or is_due(record, self.clock())):
                return "skipped"
            renewing = record.status in ("active", "renewing")
            self.storage.update_domain(
                hostname, self.clock(), status="renewing" if renewing else "issuing",
                error_code=record.error_code, error_message=record.error_message,
                next_attempt_at=record.next_attempt_at, attempts=record.attempts,
            )
            try:
                pair = self.issuer.issue(hostname)
                saved = self.certstore.save(hostname, pair.key_pem, pair.chain_pem, self.clock())
            except IssuanceError as exc:
                self._record_failure(record, exc, renewing)
                raise
            now = self.clock()
            self.storage.update_domain(
                hostname, now, status="active",
                next_attempt_at=renewal_time(saved.not_before, saved.not_after),
            )
            log.info("certificate for %s issued, serial %s, valid until %s", hostname, saved.serial, saved.not_after)
            return "issued"
        except DomainNotFound:
            return "skipped"  # removed while we were ordering; storage refused the save
        finally:
            keeper.stop()
            self.storage.unlock(lock, self.owner)

    def _record_failure(self, record: DomainRecord, exc: IssuanceError, renewing: bool) -> None:
        now = self.clock()
        attempts = record.attempts + 1
        if exc.retry_after is not None:
            next_at = now + dt.timedelta(seconds=exc.retry_after)
        elif exc.retry is RetryClass.NEVER:
            next_at = None  # only an operator's retry starts it again
        else:
            next_at = now + backoff(attempts)
        log.warning("order for %s failed (%s): %s; next attempt %s", record.hostname, exc.code, exc, next_at)
        self.storage.update_domain(
            record.hostname, now,
            # A renewal that fails keeps serving the valid certificate it has.
            status="renewing" if renewing else "failing",
            error_code=exc.code, error_message=str(exc),
            next_attempt_at=next_at, attempts=attempts,
        )

    async def run_pass(self, hostnames: list[str] | None = None, force: bool = False) -> PassResult:
        """One pass over due domains (or the given ones), at most ``concurrency`` orders at once."""
        if hostnames is None:
            hostnames = [d.hostname for d in await asyncio.to_thread(self.due, self.clock())]
        result = PassResult()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(hostname: str) -> None:
            async with gate:
                try:
                    outcome = await asyncio.to_thread(self.process, hostname, force)
                except IssuanceError as exc:
                    result.failed[hostname] = exc
                    return
                (result.issued if outcome == "issued" else result.skipped).append(hostname)

        await asyncio.gather(*(one(h) for h in hostnames))
        if result.issued:
            await self.certstore.refresh()
        return result

    async def run_forever(self, stop: asyncio.Event, wake: asyncio.Event, interval: float = 5.0) -> None:
        """The loop inside ``serve``: a pass whenever woken (new registration) or every ``interval``."""
        while not stop.is_set():
            wake.clear()
            try:
                await self.run_pass()
            except Exception:  # the loop must outlive a bad pass; the error is on the record
                log.exception("renewal pass failed")
            waiter = asyncio.ensure_future(wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
