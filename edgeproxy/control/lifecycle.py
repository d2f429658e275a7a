"""Lifecycle events: which state change emits which webhook event, and the outbox rows it becomes.

Owns: the event types' rules (a pure function of the old and new status), the
event JSON (the domain's admin-API view plus ``type``, ``id``, ``occurred_at``),
the fan-out to the configured endpoints (one outbox row per endpoint that wants
the type), and the retry schedule of a delivery (exponential backoff up to a
horizon, then dead letter).
Must not import: storage backends, ``httpx``, ``acme``, ``registry`` (the view
function is passed in, so the registry can use this module).

Pure (house rule 2): ``now`` is always passed in; the only state is the
configuration. The callers (``registry``, ``renew``, the webhook deliverer) hand
the rows to the storage method that makes the state change, which writes them in
the same transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..config import EVENT_TYPES, EventEndpointSettings
from ..storage.base import CertificateRecord, DomainRecord, OutboxEvent

__all__ = [
    "EVENT_TYPES",
    "LifecycleEvents",
    "View",
    "delivery_backoff",
    "expiring_event_id",
    "next_attempt",
    "status_event_type",
]

#: ``view(record, cert)``: the JSON of ``GET /v1/domains/{hostname}`` (``registry.domain_view``).
View = Callable[[DomainRecord, CertificateRecord | None], dict[str, Any]]

# Fixed namespace for the deterministic id of certificate.expiring (one event per
# certificate: a second scan computes the same id and the outbox ignores it).
_EXPIRING_NAMESPACE = uuid.UUID("5b0c7f6e-3f1c-4d55-9a4e-8f2d3b1c0a71")


def _new_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def expiring_event_id(hostname: str, serial: str) -> str:
    """The id of ``certificate.expiring`` for one certificate: the same on every node and every scan."""
    return f"evt_{uuid.uuid5(_EXPIRING_NAMESPACE, f'{hostname}/{serial}').hex}"


def status_event_type(old_status: str | None, new_status: str) -> str | None:
    """The event a status change emits, or None.

    - ``domain.active``: the domain starts being served with a valid certificate
      (from ``issuing``, ``pending_dns``, ``failing`` or ``moved``); a renewal
      finishing (``renewing`` -> ``active``) is ``certificate.renewed`` instead.
    - ``domain.failing``: issuance failed (status ``failing``); a failed renewal
      keeps serving and shows as ``renewing`` with an error, and its certificate
      later raises ``certificate.expiring``.
    - ``domain.moved``: DNS no longer points at the edge.
    """
    if old_status == new_status:
        return None
    if new_status == "active":
        return None if old_status in ("active", "renewing") else "domain.active"
    if new_status == "failing":
        return "domain.failing"
    if new_status == "moved":
        return "domain.moved"
    return None


def delivery_backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based): base, 2*base, 4*base, ... at most cap."""
    if attempts <= 0:
        return 0.0
    # min() before the power would overflow: 2**64 seconds is never the answer.
    return min(cap, base * 2.0 ** min(attempts - 1, 64))


def next_attempt(attempts: int, now: dt.datetime, horizon_from: dt.datetime, *, base: float, cap: float,
                 horizon: float) -> dt.datetime | None:
    """When to try again after ``attempts`` failed attempts, or None when that would
    fall beyond ``horizon`` seconds after ``horizon_from`` (dead letter)."""
    at = now + dt.timedelta(seconds=delivery_backoff(attempts, base, cap))
    if at > horizon_from + dt.timedelta(seconds=horizon):
        return None
    return at


class LifecycleEvents:
    """Builds the outbox rows of one event for every endpoint that wants its type.

    ``endpoints``: ``events.endpoints``; with none, every method returns [] and
    nothing is ever written. ``view``: the domain JSON (see :data:`View`).
    """

    def __init__(self, endpoints: Sequence[EventEndpointSettings], view: View,
                 new_id: Callable[[], str] = _new_id) -> None:
        self.endpoints = tuple(endpoints)
        self.view = view
        self.new_id = new_id

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    def wanted(self, event_type: str) -> list[str]:
        """The URLs of the endpoints that receive ``event_type``."""
        return [e.url for e in self.endpoints if not e.types or event_type in e.types]

    def build(self, event_type: str, record: DomainRecord, cert: CertificateRecord | None, now: dt.datetime,
              event_id: str | None = None) -> list[OutboxEvent]:
        """The rows of one event: ``record``/``cert`` are the domain as the change leaves it."""
        assert event_type in EVENT_TYPES, event_type
        urls = self.wanted(event_type)
        if not urls:
            return []
        event_id = event_id or self.new_id()
        body = {"type": event_type, "id": event_id, "occurred_at": _iso(now), **self.view(record, cert)}
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return [OutboxEvent(event_id, url, event_type, record.hostname, now, payload) for url in urls]

    def status_change(self, old_status: str | None, after: DomainRecord, cert: CertificateRecord | None,
                      now: dt.datetime) -> list[OutboxEvent]:
        """The rows a status change emits ([] for most changes)."""
        event_type = status_event_type(old_status, after.status)
        return [] if event_type is None else self.build(event_type, after, cert, now)

    def expiring(self, record: DomainRecord, cert: CertificateRecord, now: dt.datetime) -> list[OutboxEvent]:
        """``certificate.expiring`` for ``cert``, with its per-certificate id."""
        return self.build("certificate.expiring", record, cert, now, expiring_event_id(record.hostname, cert.serial))
