"""The domain registry service: the one set of functions the admin API and the CLI call.

Owns: registering, showing, listing and removing customer domains, and the
customer-facing view of a domain (status, error, certificate, the DNS record to
add, the HTML snippet to paste).
Must not import: ``acme``, ``httpx``, ``hypercorn``, storage backends.

Hostname rules live in ``domains.py``; this module applies them with the
edge's configuration (extra suffixes, the edge's own zone) and talks to storage.
"""

from __future__ import annotations

import builtins
import datetime as dt
from collections.abc import Callable
from typing import Any

from ..config import Settings
from .domains import normalize_hostname, registered_domain, validate_hostname
from ..errors import ConfigError, DomainExists, DomainNotFound, InvalidHostname, LimitReached
from .lifecycle import LifecycleEvents
from ..rules.routes import site_routes
from ..storage.base import CertificateRecord, DomainRecord, OutboxEvent, StatusEvent, Storage

__all__ = ["Registry", "admit_hostname", "utcnow"]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def own_zones(settings: Settings) -> tuple[str, ...]:
    """The edge's own names (the CNAME target and its registered domain), never a customer's."""
    target = settings.dns.cname_target.rstrip(".").lower()
    zones = {target}
    try:
        zones.add(registered_domain(target, extra_suffixes=settings.domains.extra_suffixes))
    except InvalidHostname:
        pass  # a target that is itself odd (e.g. "localhost") only protects itself
    # Customers may never register the edge's own names: a CNAME loop at best,
    # a certificate for our infrastructure issued on a customer's say-so at worst.
    return tuple(sorted(zones))


def deny_list(settings: Settings) -> tuple[str, ...]:
    try:
        return tuple(normalize_hostname(entry) for entry in settings.domains.deny)
    except InvalidHostname as exc:
        raise ConfigError(f"domains.deny: {exc}") from exc


def _refuse_denied(hostname: str, deny: tuple[str, ...]) -> None:
    for entry in deny:
        if hostname == entry or hostname.endswith("." + entry):
            raise InvalidHostname(f"{hostname!r} is on this edge's deny list ({entry}); it cannot be registered",
                                  code="denied")


def admit_hostname(raw_hostname: str, settings: Settings) -> str:
    """The normalized name if this edge's configuration admits it, else InvalidHostname.

    The checks of :meth:`Registry.add` that need no storage (hostname rules with
    ``domains.extra_suffixes``, the edge's own zones, ``domains.deny``): the CLI
    runs them before it opens the store, so a refused name creates no database.
    """
    hostname = validate_hostname(
        raw_hostname, extra_suffixes=settings.domains.extra_suffixes, own_zones=own_zones(settings),
    )
    _refuse_denied(hostname, deny_list(settings))
    return hostname


class Registry:
    """Blocking service functions over a ``Storage`` (call from a thread in async code).

    ``events``: the lifecycle events a registration or a removal emits
    (``domain.registered``, ``domain.removed``), written with the change."""

    def __init__(self, storage: Storage, settings: Settings, clock: Callable[[], dt.datetime] = utcnow,
                 events: LifecycleEvents | None = None) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self.events = events
        self.own_zones = own_zones(settings)
        self.deny = deny_list(settings)

    # -- commands ------------------------------------------------------------------
    def add(self, raw_hostname: str) -> DomainRecord:
        """Validate and register; issuance is due at once. Raises InvalidHostname / DomainExists."""
        hostname = validate_hostname(
            raw_hostname,
            extra_suffixes=self.settings.domains.extra_suffixes,
            own_zones=self.own_zones,
        )
        now = self.clock()
        if self.storage.get_domain(hostname) is not None:  # a duplicate is a 409, whatever the limits say
            raise DomainExists(f"{hostname} is already registered")
        self._check_limits(hostname, now)
        events: builtins.list[OutboxEvent] = []
        if self.events is not None:
            # The record as this call returns it (due now), as GET /v1/domains/{hostname} shows it.
            events = self.events.build("domain.registered", DomainRecord(hostname, "issuing", now, now,
                                                                         next_attempt_at=now), None, now)
        # Due at once, in the same write as the record and its event: a crash right
        # after it cannot leave a domain that no renewal pass ever picks up.
        record = self.storage.add_domain(hostname, "issuing", now, events=events, next_attempt_at=now)
        self.storage.add_status_event(StatusEvent(hostname, now, "issuing", None, "registered"))
        return record

    def _check_limits(self, hostname: str, now: dt.datetime) -> None:
        """Registration abuse: the deny list, the domain cap, the hourly rate."""
        _refuse_denied(hostname, self.deny)
        limits = self.settings.domains
        # A count and the last hour's creation times from indexed queries,
        # never every record (list_domains costs 0.75 s at 100,000 domains).
        if limits.max_domains and self.storage.count_domains() >= limits.max_domains:
            raise LimitReached(f"this edge serves its maximum of {limits.max_domains} domains; "
                               "remove unused ones or raise domains.max_domains", code="domain_limit")
        if not limits.registrations_per_hour:
            return
        hour_ago = now - dt.timedelta(hours=1)
        # The storage window includes its start; ours never did (strictly within the hour).
        recent = [t for t in self.storage.domain_created_times_since(hour_ago) if t > hour_ago]
        if len(recent) >= limits.registrations_per_hour:
            # The oldest registration in the window leaves it first.
            wait = (recent[-limits.registrations_per_hour] + dt.timedelta(hours=1) - now).total_seconds()
            raise LimitReached(f"more than {limits.registrations_per_hour} registrations in the last hour; "
                               f"try again in {int(wait) + 1} s", code="registration_rate", retry_after=max(wait, 1.0))

    def get(self, raw_hostname: str) -> DomainRecord:
        record = self.storage.get_domain(self._lookup_name(raw_hostname))
        if record is None:
            raise DomainNotFound(f"{raw_hostname!r} is not registered on this edge")
        return record

    def list(self) -> list[DomainRecord]:
        return self.storage.list_domains()

    def remove(self, raw_hostname: str) -> None:
        """Delete the domain with its private key, certificate and challenges."""
        hostname = self._lookup_name(raw_hostname)
        events: builtins.list[OutboxEvent] = []
        if self.events is not None and self.events.wanted("domain.removed"):
            # The event carries the domain as it was (read just before; a change in
            # between only makes the payload one change older).
            record = self.storage.get_domain(hostname)
            if record is not None:
                events = self.events.build("domain.removed", record, self.storage.get_certificate(hostname),
                                           self.clock())
        if not self.storage.remove_domain(hostname, events=events):
            raise DomainNotFound(f"{raw_hostname!r} is not registered on this edge")

    def retry(self, raw_hostname: str) -> DomainRecord:
        """Make the next issuance/renewal attempt due now (operator override of backoff)."""
        record = self.get(raw_hostname)
        return self.storage.update_domain(
            record.hostname,
            self.clock(),
            status=record.status,
            error_code=record.error_code,
            error_message=record.error_message,
            next_attempt_at=self.clock(),
            attempts=record.attempts,
        )

    def history(self, raw_hostname: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The domain's status changes, newest first."""
        record = self.get(raw_hostname)
        return [
            {"at": _iso(e.at), "status": e.status, "error_code": e.error_code, "message": e.message}
            for e in self.storage.status_history(record.hostname, limit)
        ]

    # -- the view customers and operators see ------------------------------------------
    def view(self, record: DomainRecord) -> dict[str, Any]:
        cert = self.storage.get_certificate(record.hostname)
        return domain_view(record, cert, self.settings)

    def _lookup_name(self, raw_hostname: str) -> str:
        try:
            return normalize_hostname(raw_hostname)
        except InvalidHostname as exc:
            raise DomainNotFound(f"{raw_hostname!r} is not registered on this edge") from exc


def dns_instructions(hostname: str, settings: Settings) -> dict[str, Any]:
    """The exact record(s) the customer must publish for ``hostname``."""
    target = settings.dns.cname_target.rstrip(".")
    records: list[dict[str, str]] = [{"type": "CNAME", "name": hostname, "value": f"{target}."}]
    alternatives = [
        {"type": "AAAA" if ":" in ip else "A", "name": hostname, "value": ip} for ip in settings.dns.edge_ips
    ]
    return {"records": records, "alternatives": alternatives}


def html_snippet(hostname: str, settings: Settings) -> str:
    return f'<script async src="https://{hostname}{site_routes(hostname, settings.routes).script_path}"></script>'


def domain_view(record: DomainRecord, cert: CertificateRecord | None, settings: Settings) -> dict[str, Any]:
    """JSON-ready description of a domain (the admin API schema)."""
    error = None
    if record.error_code:
        error = {"code": record.error_code, "message": record.error_message or ""}
    certificate = None
    if cert is not None:
        certificate = {
            "not_before": _iso(cert.not_before),
            "not_after": _iso(cert.not_after),
            "issuer": cert.issuer,
            "serial": cert.serial,
            "acme_directory": cert.acme_directory or None,
            "fallback_reason": cert.fallback_reason or None,
        }
    return {
        "hostname": record.hostname,
        "status": record.status,
        "error": error,
        "certificate": certificate,
        "next_attempt_at": _iso(record.next_attempt_at),
        "attempts": record.attempts,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "dns": dns_instructions(record.hostname, settings),
        "snippet": html_snippet(record.hostname, settings),
    }
