"""Issuance and renewal: one pass over due domains, and the loop that runs it.

Owns: deciding which domains need work now; the DNS/CAA pre-check before an order
(through ``domains.DnsChecker``); the rate budgets checked before an order; the
per-name lock around an order; the domain lifecycle (``pending_dns -> issuing ->
active -> renewing -> active``, ``failing``, ``moved`` and removal after
``renew.moved_retention_days``) with its status history; recording success
(certificate saved, next renewal time) and failure (error on the domain,
exponential backoff, Retry-After); the loop inside ``serve``. New registrations
and renewals go through the same function, so cron and the loop share one lock.
Must not import: ``proxy``, ``hypercorn``, ``acme`` (the CA is behind ``Issuer``).

The pure parts (``backoff``, ``renewal_time``, ``is_due``, ``retry_delay``,
``budget_wait``) take ``now`` as an argument (house rule 2) so they are tested
without waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from ..edge.certstore import CertStore
from ..config import Settings, acme_issuers
from .domains import DNS_CAA_FORBIDS, DNS_ELSEWHERE, DNS_MISSING, DnsChecker, DnsVerdict, registered_domain
from ..errors import DomainNotFound, InvalidHostname, IssuanceError, RetryClass, StorageError
from .issuers import (
    CAUSE_OUTAGE, CAUSE_RATE_LIMITED, CaIssuer, IssuedPair, Issuer, fallback_cause, fallback_reason,
    order_issuers, rest_until,
)
from .lifecycle import LifecycleEvents
from .lifecycle import status_event_type as lifecycle_type
from ..storage.base import CertificateRecord, DomainRecord, LeaseStore, OutboxEvent, StatusEvent, Storage

__all__ = [
    "Budget",
    "CaIssuer",
    "Issuer",
    "IssuedPair",
    "LeaseKeeper",
    "PassResult",
    "RenewPolicy",
    "RenewalService",
    "backoff",
    "budget_wait",
    "renewal_time",
    "retry_delay",
    "is_due",
]

log = logging.getLogger("edgeproxy.renew")

# Failed attempts back off 1 min, 10 min, 100 min, then once a day.
_BACKOFF_STEPS = (dt.timedelta(minutes=1), dt.timedelta(minutes=10), dt.timedelta(minutes=100))
_BACKOFF_CAP = dt.timedelta(days=1)
# Under 1/20 of its lifetime left a certificate is an emergency: retries at least hourly.
_EMERGENCY_FRACTION = 1 / 20
_EMERGENCY_CAP = dt.timedelta(hours=1)
# A moved domain's DNS is looked at again daily (it may come back before removal).
_MOVED_RECHECK = dt.timedelta(days=1)
_ARI_POLL = dt.timedelta(hours=12)  # RFC 9773 section 4.3: clients poll; we do at least twice a day
_LEDGER_KEEP = dt.timedelta(days=8)  # longest budget window (7 days) plus slack
# What the 5-second poll between full passes picks up: names without a certificate yet.
_NEW_WORK_STATUSES = ("issuing", "pending_dns", "failing")

# Ledger kinds (Storage.record_event); each is one of Let's Encrypt's limits, kept per
# CA: ORDER is keyed by the CA's directory URL, the others by "<name> <directory URL>".
# Entries recorded before the key named the CA (a bare name) count against every CA
# until they leave their window (at most 7 days).
ORDER, CERT_DOMAIN, CERT_NAMES, FAILED_VALIDATION = "order", "cert_domain", "cert_names", "failed_validation"
# A CA left alone after it failed (issuers.rest_until), recorded as a ledger entry
# dated when the rest ends: per "<hostname> <directory>" after a rate limit, per
# directory after an outage. Shared by every process and node like the budgets.
RATE_LIMITED_REST, OUTAGE_REST_UNTIL = "ca_rate_limited", "ca_outage"


# -- pure maths ------------------------------------------------------------------------------


def backoff(attempts: int) -> dt.timedelta:
    """Delay before retry number ``attempts`` (1-based)."""
    if attempts <= 0:
        return dt.timedelta(0)
    if attempts <= len(_BACKOFF_STEPS):
        return _BACKOFF_STEPS[attempts - 1]
    return _BACKOFF_CAP


def retry_delay(attempts: int, cert: tuple[dt.datetime, dt.datetime] | None, now: dt.datetime) -> dt.timedelta:
    """Backoff, shortened to at most an hour once the served certificate
    (``(not_before, not_after)``) has under 1/20 of its lifetime left."""
    delay = backoff(attempts)
    if cert is not None:
        not_before, not_after = cert
        if not_after - now < (not_after - not_before) * _EMERGENCY_FRACTION:
            delay = min(delay, _EMERGENCY_CAP)
    return delay


def renewal_time(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When to renew without ARI: with 1/3 of the lifetime left, or 1/2 for
    lifetimes under 10 days (short-lived certificates leave less room to retry)."""
    lifetime = not_after - not_before
    fraction = 0.5 if lifetime < dt.timedelta(days=10) else 1 / 3
    return not_after - lifetime * fraction


def is_due(record: DomainRecord, now: dt.datetime) -> bool:
    """The domain needs work now: an order, a DNS re-check (``pending_dns``), or,
    for ``moved``, a DNS re-check that never orders unless DNS points back.
    ``Storage.due_domains`` is the same predicate in SQL: keep the two in step."""
    return record.next_attempt_at is not None and record.next_attempt_at <= now


def budget_wait(events: Sequence[dt.datetime], limit: int, window: dt.timedelta, now: dt.datetime) -> dt.datetime | None:
    """None if one more event fits ``limit`` per sliding ``window``; else the time
    when enough old events have left the window. ``limit <= 0`` is unlimited."""
    if limit <= 0:
        return None
    inside = sorted(e for e in events if e > now - window)
    if len(inside) < limit:
        return None
    return inside[len(inside) - limit] + window


@dataclass(frozen=True)
class Budget:
    kind: str
    limit: int
    window: dt.timedelta
    label: str


@dataclass(frozen=True)
class RenewPolicy:
    """What the pass needs beyond storage and the CA; ``from_settings`` in production."""

    account: str = ""  # ledger key for per-account orders (the ACME directory URL)
    orders_per_3h: int = 300
    certs_per_domain: int = 50
    duplicate_certs: int = 5
    failed_validations: int = 5
    moved_retention: dt.timedelta = dt.timedelta(days=7)
    extra_suffixes: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> RenewPolicy:
        r = settings.renew
        return cls(
            account=settings.acme.directory, orders_per_3h=r.orders_per_3h, certs_per_domain=r.certs_per_domain,
            duplicate_certs=r.duplicate_certs, failed_validations=r.failed_validations,
            moved_retention=dt.timedelta(days=r.moved_retention_days),
            extra_suffixes=tuple(settings.domains.extra_suffixes),
        )


class LeaseKeeper:
    """Extends a held lease every ``ttl/3`` seconds until ``stop()`` (a daemon thread).

    The lease TTL can then be short (a crashed node blocks a name for at most
    ``storage.lock_ttl``) while an order that takes longer than the TTL keeps
    its lease. A failed extension is logged, never fatal: the order goes on,
    and the worst case is a second node ordering the same name once.
    """

    def __init__(self, storage: LeaseStore, name: str, owner: str, ttl: float,
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
    waiting: dict[str, str] = field(default_factory=dict)  # pending DNS or a rate budget: "code: message"
    moved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    orders_in_flight_peak: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(when: dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


class _Waiting(Exception):
    """Internal: the domain waits (DNS or budget); the record already says why."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome


class RenewalService:
    """Runs orders for due domains with bounded concurrency and one lock per name."""

    def __init__(
        self,
        storage: Storage,
        certstore: CertStore,
        issuer: Issuer | Sequence[CaIssuer],
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
        concurrency: int = 4,
        lock_ttl: float = 300.0,
        policy: RenewPolicy | None = None,
        dns: DnsChecker | None = None,
        events: LifecycleEvents | None = None,
    ) -> None:
        self.storage = storage
        # Lifecycle webhooks (domain.active/failing/moved/removed, certificate.issued/renewed),
        # written in the same transaction as the change that emits them.
        self.events = events
        self.certstore = certstore
        self.clock = clock
        self.concurrency = concurrency
        self.lock_ttl = lock_ttl
        self.policy = policy or RenewPolicy()
        self.dns = dns
        # The CAs in order of preference (``[[acme.issuers]]``); one bare issuer is
        # the one-CA setup, named by ``policy.account`` and answering to the DNS
        # pre-check's CAA identities.
        if isinstance(issuer, (list, tuple)):
            if not issuer:
                raise ValueError("RenewalService needs at least one issuer")
            self.issuers: tuple[CaIssuer, ...] = tuple(issuer)
        else:
            self.issuers = (CaIssuer(self.policy.account, dns.ca_identities if dns else (), cast(Issuer, issuer)),)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._in_flight = 0
        self._in_flight_peak = 0
        self._count_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, storage: Storage, certstore: CertStore, issuer: Issuer | Sequence[CaIssuer], settings: Settings,
        *, clock: Callable[[], dt.datetime] = _utcnow, events: LifecycleEvents | None = None,
    ) -> RenewalService:
        dns = None
        if settings.dns.check:
            # A name is refused before any order only when its CAA allows none of the CAs.
            identities = tuple(dict.fromkeys(c for ca in acme_issuers(settings) for c in ca.caa_identities))
            dns = DnsChecker(
                cname_target=settings.dns.cname_target, edge_ips=settings.dns.edge_ips,
                resolver=settings.dns.resolver, ca_identities=identities,
                timeout=settings.dns.timeout,
            )
        return cls(storage, certstore, issuer, clock=clock, concurrency=settings.renew.concurrency,
                   lock_ttl=settings.storage.lock_ttl, policy=RenewPolicy.from_settings(settings), dns=dns,
                   events=events)

    def due(self, now: dt.datetime) -> list[DomainRecord]:
        """The domains ``is_due`` at ``now``, ordered by hostname (as they always were:
        the order of a pass and of ``renew --dry-run``). An indexed query,
        not a filter over ``list_domains`` (0.75 s of CPU at 100,000 domains)."""
        return sorted(self.storage.due_domains(now), key=lambda d: d.hostname)

    # -- state changes (with history) ---------------------------------------------------
    def _set(
        self, record: DomainRecord, now: dt.datetime, *, status: str, error_code: str | None = None,
        error_message: str | None = None, next_attempt_at: dt.datetime | None = None, attempts: int = 0,
    ) -> DomainRecord:
        events: list[OutboxEvent] = []
        if self.events is not None and status != record.status:
            # The record exactly as the update leaves it (every mutable field is replaced).
            after = DomainRecord(record.hostname, status, record.created_at, now, error_code, error_message,
                                 next_attempt_at, attempts)
            if lifecycle_type(record.status, status) is not None:
                events = self.events.status_change(record.status, after,
                                                   self.storage.get_certificate(record.hostname), now)
        updated = self.storage.update_domain(
            record.hostname, now, status=status, error_code=error_code, error_message=error_message,
            next_attempt_at=next_attempt_at, attempts=attempts, events=events,
        )
        if (status, error_code) != (record.status, record.error_code):
            self.storage.add_status_event(StatusEvent(record.hostname, now, status, error_code, error_message))
        return updated

    # -- one name -----------------------------------------------------------------------
    def process(self, hostname: str, force: bool = False) -> str:
        """Do what one name needs now (blocking).

        Returns "issued", "skipped", "waiting" (DNS or budget; the record says
        why), "moved" or "removed"; raises ``IssuanceError`` after recording it.
        The lock is taken around the expensive work only, the record is read
        again after taking it (another process may have just finished: a cron
        run and the loop never order one name twice), and released in ``finally``
        (house rule 1).
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
            cert = self.storage.get_certificate(hostname)
            try:
                if record.status == "moved":
                    record = self._recheck_moved(record, cert)  # raises _Waiting unless an order is due
                replaces = self._ari_gate(record, cert, force) if cert is not None else None
                caa = self._precheck(record, cert)
                return self._order(record, cert, replaces, caa)
            except _Waiting as waiting:
                return waiting.outcome
        except DomainNotFound:
            return "skipped"  # removed while we were ordering; storage refused the save
        finally:
            keeper.stop()
            self.storage.unlock(lock, self.owner)

    def _recheck_moved(self, record: DomainRecord, cert: CertificateRecord | None) -> DomainRecord:
        """A moved domain: back to work if DNS points at the edge again, removed
        (with its key) after ``moved_retention``, else looked at again daily."""
        now = self.clock()
        verdict = self.dns.check(record.hostname) if self.dns else DnsVerdict(True, "dns_ok", "")
        if verdict.ok:
            log.info("%s points at the edge again", record.hostname)
            if cert is not None and renewal_time(cert.not_before, cert.not_after) > now:
                self._set(record, now, status="active",
                          next_attempt_at=renewal_time(cert.not_before, cert.not_after))
                raise _Waiting("skipped", "back to active")
            return self._set(record, now, status="renewing" if cert else "issuing", next_attempt_at=now)
        since = next((e.at for e in self.storage.status_history(record.hostname) if e.status == "moved"),
                     record.updated_at)
        remove_at = since + self.policy.moved_retention
        if now >= remove_at and verdict.definitive:
            gone = self.events.build("domain.removed", record, cert, now) if self.events is not None else []
            self.storage.remove_domain(record.hostname, events=gone)
            log.warning("%s was moved away for %s: removed with its key and certificate",
                        record.hostname, self.policy.moved_retention)
            raise _Waiting("removed", "removed")
        self._set(record, now, status="moved", error_code=record.error_code, error_message=record.error_message,
                  next_attempt_at=min(now + _MOVED_RECHECK, remove_at), attempts=record.attempts)
        raise _Waiting("moved", "still moved")

    def _ari_gate(self, record: DomainRecord, cert: CertificateRecord, force: bool) -> str | None:
        """Is the served certificate due for renewal? ARI first (RFC 9773), the
        backstop (``renewal_time``) when the CA offers none, and an emergency
        renewal under 1/20 of the lifetime left whatever ARI says. Returns the
        ``replaces`` identifier (None without ARI) or raises ``_Waiting`` with the
        next check stored on the domain."""
        now = self.clock()
        state = self.storage.get_ari(record.hostname)
        ca = self._issuer_of(cert)
        if ca is None:
            state = None  # its CA is no longer configured: nobody to ask, the backstop decides
        elif state is None or state.serial != cert.serial or state.next_poll <= now:
            try:
                state = ca.issuer.renewal_info(record.hostname, cert.chain_pem)
                self.storage.save_ari(state)
            except IssuanceError as exc:
                log.warning("ARI for %s unavailable (%s); using the backstop", record.hostname, exc)
                state = None
        backstop = renewal_time(cert.not_before, cert.not_after)
        lifetime = cert.not_after - cert.not_before
        emergency = cert.not_after - now < lifetime * _EMERGENCY_FRACTION
        ari = state is not None and state.renew_at is not None
        renew_at = state.renew_at if state is not None and state.renew_at is not None else backstop
        if force or emergency or renew_at <= now:
            return state.cert_id if ari and state is not None and state.cert_id else None
        next_check = renew_at if state is None else min(renew_at, state.next_poll)
        self._set(record, now, status=record.status, error_code=record.error_code,
                  error_message=record.error_message, next_attempt_at=next_check, attempts=record.attempts)
        raise _Waiting("skipped", "not due yet")

    def _issuer_of(self, cert: CertificateRecord) -> CaIssuer | None:
        """The configured CA that issued ``cert``: the first one for a certificate saved
        before edgeproxy recorded its CA (there was only one then); None when its CA
        is no longer configured."""
        if not cert.acme_directory:
            return self.issuers[0]
        return next((ca for ca in self.issuers if ca.directory == cert.acme_directory), None)

    def _precheck(self, record: DomainRecord, cert: CertificateRecord | None) -> tuple[tuple[int, str, str], ...]:
        """DNS/CAA before any order: a name that does not point at us would only
        burn the CA's failed-validation budget. Returns the relevant CAA RRset
        (which CAs the order may ask)."""
        if self.dns is None:
            return ()
        verdict = self.dns.check(record.hostname)
        if verdict.ok:
            return verdict.caa
        now = self.clock()
        if cert is not None and verdict.definitive and verdict.code in (DNS_MISSING, DNS_ELSEWHERE):
            # The customer took the name away: keep serving the valid certificate,
            # stop renewing; removed after moved_retention unless DNS comes back.
            self._set(record, now, status="moved", error_code="dns_moved",
                      error_message=f"{verdict.message}; renewals stopped, the current certificate is still "
                                    f"served until it expires; removed after {self.policy.moved_retention.days} days",
                      next_attempt_at=min(now + _MOVED_RECHECK, now + self.policy.moved_retention))
            log.warning("%s moved away: %s", record.hostname, verdict.message)
            raise _Waiting("moved", verdict.message)
        attempts = record.attempts + 1
        bounds = (cert.not_before, cert.not_after) if cert else None
        self._set(record, now, status="pending_dns" if cert is None else record.status,
                  error_code=verdict.code, error_message=verdict.message,
                  next_attempt_at=now + retry_delay(attempts, bounds, now), attempts=attempts)
        raise _Waiting("waiting", f"{verdict.code}: {verdict.message}")

    def _budgets(self, hostname: str, ca: CaIssuer) -> list[tuple[Budget, str, str]]:
        """``(budget, key, legacy key)`` of one CA: the legacy key is the one used
        before budgets were kept per CA ("" when the key did not change)."""
        try:
            domain = registered_domain(hostname, extra_suffixes=self.policy.extra_suffixes)
        except InvalidHostname:
            domain = hostname
        p, d = self.policy, ca.directory
        return [
            (Budget(ORDER, p.orders_per_3h, dt.timedelta(hours=3), f"new orders per account per 3 hours at {d}"),
             d, ""),
            (Budget(CERT_DOMAIN, p.certs_per_domain, dt.timedelta(days=7),
                    f"certificates for {domain} per 7 days from {d}"), f"{domain} {d}", domain),
            (Budget(CERT_NAMES, p.duplicate_certs, dt.timedelta(days=7),
                    f"duplicate certificates for {hostname} per 7 days from {d}"), f"{hostname} {d}", hostname),
            (Budget(FAILED_VALIDATION, p.failed_validations, dt.timedelta(hours=1),
                    f"failed validations for {hostname} per hour at {d}"), f"{hostname} {d}", hostname),
        ]

    def _budget_wait(self, hostname: str, ca: CaIssuer, exempt: bool) -> tuple[dt.datetime, str] | None:
        """When one more order from ``ca`` fits its budgets again and why, or None if
        it fits now. ``exempt``: an ARI-claimed renewal (``replaces``), which counts
        against failed validations only."""
        now = self.clock()
        for budget, key, legacy in self._budgets(hostname, ca):
            if exempt and budget.kind != FAILED_VALIDATION:
                continue
            events = self.storage.events_since(budget.kind, key, now - budget.window)
            if legacy:
                events += self.storage.events_since(budget.kind, legacy, now - budget.window)
            until = budget_wait(events, budget.limit, budget.window, now)
            if until is not None:
                return until, (f"rate budget reached: {budget.limit} {budget.label}; the next attempt is at "
                               f"{_iso(until)} (nothing was sent to the CA)")
        return None

    def _rest(self, hostname: str, ca: CaIssuer) -> tuple[dt.datetime, str] | None:
        """Until when ``ca`` must not be asked for ``hostname`` (its Retry-After), or None."""
        # A rest dated ``until`` is over at ``until`` (the ledger's "since" is inclusive).
        after = self.clock() + dt.timedelta(microseconds=1)
        ends = self.storage.events_since(RATE_LIMITED_REST, f"{hostname} {ca.directory}", after)
        if not ends:
            return None
        until = max(ends)
        return until, f"rate-limited {hostname} until {_iso(until)} (its Retry-After)"

    def _down(self) -> frozenset[str]:
        """Directories of the CAs that had an outage within ``issuers.OUTAGE_REST``: asked last."""
        after = self.clock() + dt.timedelta(microseconds=1)
        return frozenset(ca.directory for ca in self.issuers
                         if len(self.issuers) > 1 and self.storage.events_since(OUTAGE_REST_UNTIL, ca.directory, after))

    def _order(self, record: DomainRecord, cert: CertificateRecord | None, replaces: str | None,
               caa: tuple[tuple[int, str, str], ...]) -> str:
        """One order, walking the CAs: the first one the domain's CAA allows (the
        current certificate's CA first), the next one after an outage, a rate limit
        or ``caa`` (``issuers.fallback_cause``), never after anything else. A CA
        whose budget is spent or that rate-limited this name is skipped. Raises
        ``_Waiting`` when every CA was skipped, ``IssuanceError`` (recorded) when
        none issued."""
        hostname = record.hostname
        renewing = cert is not None
        current = self._issuer_of(cert) if cert is not None else None
        candidates, forbidden = order_issuers(self.issuers, caa, current.directory if current else "", self._down())
        notes: dict[str, str] = {
            ca.directory: f"the CAA records of {hostname} do not name {' or '.join(ca.caa_identities) or 'it'}"
            for ca in forbidden}
        waits: list[tuple[dt.datetime, str, str]] = []  # (until, error code, message)
        failures: list[IssuanceError] = []
        started = False
        for ca in candidates:
            ca_replaces = replaces if current is not None and ca.directory == current.directory else None
            rest = self._rest(hostname, ca)
            budget = self._budget_wait(hostname, ca, exempt=ca_replaces is not None)
            skip = rest or budget
            if skip is not None:
                until, message = skip
                waits.append((until, "acme_rate_limited" if rest else "rate_budget", message))
                notes[ca.directory] = message
                continue
            if not started:
                record = self._set(
                    record, self.clock(), status="renewing" if renewing else "issuing",
                    error_code=record.error_code, error_message=record.error_message,
                    next_attempt_at=record.next_attempt_at, attempts=record.attempts,
                )
                started = True
            self.storage.record_event(ORDER, ca.directory, self.clock())
            try:
                pair = ca.issuer.issue(hostname, replaces=ca_replaces) if ca_replaces else ca.issuer.issue(hostname)
            except IssuanceError as exc:
                if exc.retry is RetryClass.CUSTOMER:
                    self.storage.record_event(FAILED_VALIDATION, f"{hostname} {ca.directory}", self.clock())
                cause = fallback_cause(exc) if len(self.issuers) > 1 else None
                if cause is None:
                    error = self._with_notes(exc, notes)
                    self._record_failure(record, cert, error, renewing)
                    if error is exc:
                        raise
                    raise error from exc
                self._rest_after(hostname, ca, cause, exc)
                notes[ca.directory] = f"{cause} ({exc.code}): {exc}"
                failures.append(exc)
                log.warning("order for %s at %s failed (%s: %s); trying the next CA", hostname, ca.directory,
                            cause, exc.code)
                continue
            return self._issued(record, cert, ca, pair, notes, renewing)
        if failures:
            error = self._every_ca_failed(failures, notes)
            self._record_failure(record, cert, error, renewing)
            raise error
        self._wait_for_ca(record, cert, waits, notes)
        raise AssertionError("unreachable")  # pragma: no cover

    def _issued(self, record: DomainRecord, cert: CertificateRecord | None, ca: CaIssuer, pair: IssuedPair,
                notes: dict[str, str], renewing: bool) -> str:
        hostname = record.hostname
        reason = fallback_reason(self.issuers, ca.directory, notes, cert)
        saved = self.certstore.save(hostname, pair.key_pem, pair.chain_pem, self.clock(),
                                    acme_directory=ca.directory, fallback_reason=reason,
                                    events=self._certificate_events(record, renewing))
        now = self.clock()
        for budget, key, _legacy in self._budgets(hostname, ca):
            if budget.kind in (CERT_DOMAIN, CERT_NAMES):
                self.storage.record_event(budget.kind, key, now)
        # The next look is the backstop, or sooner to ask the CA's ARI (at least twice a day).
        next_at = min(renewal_time(saved.not_before, saved.not_after), now + _ARI_POLL)
        self._set(record, now, status="active", next_attempt_at=next_at)
        log.info("certificate for %s issued by %s, serial %s, valid until %s%s", hostname, ca.directory,
                 saved.serial, saved.not_after, f" ({reason})" if reason else "")
        return "issued"

    def _certificate_events(
        self, record: DomainRecord, renewing: bool
    ) -> Callable[[CertificateRecord], Sequence[OutboxEvent]] | None:
        """``certificate.issued`` (first certificate) or ``certificate.renewed``, built
        from the certificate as saved."""
        events = self.events
        if events is None:
            return None
        kind = "certificate.renewed" if renewing else "certificate.issued"
        return lambda saved: events.build(kind, record, saved, saved.created_at)

    def _rest_after(self, hostname: str, ca: CaIssuer, cause: str, exc: IssuanceError) -> None:
        until = rest_until(cause, exc, self.clock())
        if until is None:
            return
        if cause == CAUSE_RATE_LIMITED:
            self.storage.record_event(RATE_LIMITED_REST, f"{hostname} {ca.directory}", until)
        elif cause == CAUSE_OUTAGE:
            self.storage.record_event(OUTAGE_REST_UNTIL, ca.directory, until)

    @staticmethod
    def _with_notes(exc: IssuanceError, notes: dict[str, str]) -> IssuanceError:
        """``exc`` as is, or, when other CAs were skipped or failed first, with why."""
        if not notes:
            return exc
        others = "; ".join(f"{d}: {n}" for d, n in notes.items())
        return IssuanceError(f"{exc} (other CAs: {others})", code=exc.code, retry=exc.retry,
                             retry_after=exc.retry_after, acme_type=exc.acme_type)

    @staticmethod
    def _every_ca_failed(failures: list[IssuanceError], notes: dict[str, str]) -> IssuanceError:
        """One error for an order no CA could serve: the last CA's code and class, every
        CA's reason, and the CAs' Retry-After when each of them sent one (the earliest)."""
        last = failures[-1]
        retry_afters = [f.retry_after for f in failures if f.retry_after is not None]
        retry_after = min(retry_afters) if len(retry_afters) == len(failures) else None
        if len(notes) == 1:
            return last
        others = "; ".join(f"{d}: {n}" for d, n in notes.items())
        return IssuanceError(f"No CA issued the certificate: {others}", code=last.code, retry=last.retry,
                             retry_after=retry_after, acme_type=last.acme_type)

    def _wait_for_ca(self, record: DomainRecord, cert: CertificateRecord | None,
                     waits: list[tuple[dt.datetime, str, str]], notes: dict[str, str]) -> None:
        """Every CA was skipped (budget spent, rate-limited, or forbidden by CAA): the
        domain waits, nothing was sent to a CA. Raises ``_Waiting``."""
        now = self.clock()
        if waits:
            until, code, _message = min(waits)
            message = waits[0][2] if len(notes) == 1 else "; ".join(f"{d}: {n}" for d, n in notes.items())
        else:  # every CA forbidden by CAA (the pre-check passes on any CA's identity)
            until, code = now + retry_delay(record.attempts + 1, None, now), DNS_CAA_FORBIDS
            message = "; ".join(f"{d}: {n}" for d, n in notes.items())
        self._set(record, now, status=record.status if record.status != "pending_dns" else "issuing",
                  error_code=code, error_message=message, next_attempt_at=until, attempts=record.attempts)
        log.warning("%s: %s", record.hostname, message)
        raise _Waiting("waiting", f"{code}: {message}")

    def _record_failure(
        self, record: DomainRecord, cert: CertificateRecord | None, exc: IssuanceError, renewing: bool
    ) -> None:
        now = self.clock()
        attempts = record.attempts + 1
        if exc.retry_after is not None:
            # RFC 8555 section 6.6 / RFC 9110 section 10.2.3: the CA said when.
            next_at: dt.datetime | None = now + dt.timedelta(seconds=exc.retry_after)
        elif exc.retry is RetryClass.NEVER:
            next_at = None  # only an operator's retry starts it again
        else:
            next_at = now + retry_delay(attempts, (cert.not_before, cert.not_after) if cert else None, now)
        log.warning("order for %s failed (%s): %s; next attempt %s", record.hostname, exc.code, exc, next_at)
        self._set(
            record, now,
            # A renewal that fails keeps serving the valid certificate it has.
            status="renewing" if renewing else "failing",
            error_code=exc.code, error_message=str(exc),
            next_attempt_at=next_at, attempts=attempts,
        )

    # -- a pass and the loop --------------------------------------------------------------
    async def run_pass(self, hostnames: list[str] | None = None, force: bool = False,
                       refresh: bool = True) -> PassResult:
        """One pass over due domains (or the given ones), at most ``concurrency`` orders at once.

        ``refresh`` loads what the pass issued into this process's SNI map (about
        25 KiB of TLS context per certificate): what ``serve`` needs at once, and
        what a cron ``edgeproxy renew``, which exits after the pass, does not."""
        if hostnames is None:
            hostnames = [d.hostname for d in await asyncio.to_thread(self.due, self.clock())]
        result = PassResult()
        self._in_flight_peak = 0
        loop = asyncio.get_running_loop()
        # Our own pool: asyncio.to_thread's default executor has only cpu_count + 4
        # threads, which would silently cap the orders in flight below ``concurrency``.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.concurrency),
                                                     thread_name_prefix="renew")

        def counted(hostname: str) -> str:
            with self._count_lock:
                self._in_flight += 1
                self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
            try:
                return self.process(hostname, force)
            finally:
                with self._count_lock:
                    self._in_flight -= 1

        async def one(hostname: str) -> None:
            try:
                outcome = await loop.run_in_executor(pool, counted, hostname)
            except IssuanceError as exc:
                result.failed[hostname] = exc
                return
            if outcome == "issued":
                result.issued.append(hostname)
            elif outcome == "waiting":
                record = await asyncio.to_thread(self.storage.get_domain, hostname)
                result.waiting[hostname] = (
                    f"{record.error_code}: {record.error_message}" if record else "waiting")
            elif outcome == "moved":
                result.moved.append(hostname)
            elif outcome == "removed":
                result.removed.append(hostname)
            else:
                result.skipped.append(hostname)

        try:
            await asyncio.gather(*(one(h) for h in hostnames))
        finally:
            pool.shutdown(wait=False)
        result.orders_in_flight_peak = self._in_flight_peak
        if refresh and (result.issued or result.removed):
            await self.certstore.refresh()
        return result

    def _new_work(self) -> list[str]:
        """Due names without a certificate yet (registrations, DNS re-checks, retries):
        picked up within ``poll`` seconds, between full passes."""
        return sorted(d.hostname for d in self.storage.due_domains(self.clock(), statuses=_NEW_WORK_STATUSES))

    async def run_forever(
        self, stop: asyncio.Event, wake: asyncio.Event, interval: float = 600.0, jitter: float = 300.0,
        poll: float = 5.0,
    ) -> None:
        """The loop inside ``serve``: a full pass at start, whenever woken (a
        registration or a retry through the admin API) and every ``interval`` +
        random(0, ``jitter``) seconds; in between, every ``poll`` seconds, new
        work only (so a name added by the CLI in another process starts within
        seconds). Jitter spreads nodes and restarts apart."""
        next_full = time.monotonic()
        while not stop.is_set():
            full = wake.is_set() or time.monotonic() >= next_full
            wake.clear()
            try:
                if full:
                    await self.run_pass()
                    await asyncio.to_thread(self.storage.prune_events, self.clock() - _LEDGER_KEEP)
                    next_full = time.monotonic() + interval + random.uniform(0, max(jitter, 0.0))
                else:
                    names = await asyncio.to_thread(self._new_work)
                    if names:
                        await self.run_pass(names)
            except Exception:  # the loop must outlive a bad pass; the error is on the record
                log.exception("renewal pass failed")
            timeout = max(0.05, min(poll, next_full - time.monotonic()))
            waiter = asyncio.ensure_future(wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
