"""Lifecycle webhooks: delivering the outbox, signed, at least once; and the event log.

Owns: signing per the Standard Webhooks spec (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``, through the ``standardwebhooks`` library, signed again at
every attempt because receivers reject old timestamps); one delivery attempt and
what its outcome does to the outbox row (delivered, retried with exponential
backoff, dead-lettered past ``events.horizon`` with an operator alert); the loop
inside ``serve`` (claims due rows, scans for certificates crossing
``monitor.cert_warn_days``, prunes old rows); and :class:`EventLog`, the
functions behind ``GET /v1/events``, ``POST /v1/events/{id}/redeliver`` and
``edgeproxy events list|redeliver``.
Must not import: storage backends, ``acme``, ``hypercorn``.

Delivery is at least once: a row is claimed with a lease before it is sent and
marked after the receiver's answer, so a crash in between (``kill -9``) leaves it
pending and it is sent again once the lease expires. Receivers deduplicate on
``webhook-id`` (the event id, the same at every attempt). Per endpoint and
domain, events go out in the order they were written (``EventOutbox``).
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from standardwebhooks import Webhook

from ..config import EventsSettings
from ..errors import ConfigError, EdgeproxyError, EventNotFound, StorageError
from .lifecycle import LifecycleEvents, next_attempt
from .monitor import Alert
from ..storage.base import DELIVERY_STATES, Delivery, Storage

__all__ = ["Attempt", "EventLog", "WebhookDeliverer", "dead_letter_alert", "delivery_json", "load_secret", "sign"]

log = logging.getLogger("edgeproxy.webhooks")

#: Keep the answer's first bytes in ``last_error`` (enough to say why, never a whole page).
_ERROR_BODY = 200


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def load_secret(path: str, url: str) -> Webhook:
    """The signer for one endpoint, from its ``secret_file`` (``whsec_`` + base64)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"events.endpoints {url}: cannot read secret_file {path}: {exc.strerror or exc}") from exc
    try:
        return Webhook(text)
    except Exception as exc:  # the library raises binascii.Error, EmptyWebhookSecretError, ...
        raise ConfigError(f"events.endpoints {url}: secret_file {path} does not hold a Standard Webhooks "
                          f"secret (whsec_ followed by base64): {type(exc).__name__}") from exc


def sign(signer: Webhook, event_id: str, payload: str, now: dt.datetime) -> dict[str, str]:
    """The headers of one attempt (Standard Webhooks: id, Unix timestamp, ``v1,<base64 HMAC>``)."""
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(event_id, now, payload),
    }


def delivery_json(d: Delivery) -> dict[str, Any]:
    """One outbox row as the admin API and ``events list --json`` show it."""
    return {
        "seq": d.seq, "id": d.event_id, "type": d.event_type, "hostname": d.hostname, "endpoint": d.endpoint,
        "occurred_at": _iso(d.occurred_at), "state": d.state, "attempts": d.attempts,
        "next_attempt_at": _iso(d.next_attempt_at) if d.state == "pending" else None,
        "last_status": d.last_status, "last_error": d.last_error, "delivered_at": _iso(d.delivered_at),
    }


@dataclass(frozen=True)
class Attempt:
    """What one attempt did: ``state`` is the row's new state."""

    delivery: Delivery
    state: str
    status: int | None
    error: str | None


class EventLog:
    """List deliveries and redeliver an event: what the admin API and the CLI both call (blocking)."""

    def __init__(self, storage: Storage, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.storage = storage
        self.clock = clock

    def list(self, *, state: str | None = None, event_id: str | None = None, hostname: str | None = None,
             limit: int = 100) -> list[dict[str, Any]]:
        """Recent deliveries, newest first."""
        if state is not None and state not in DELIVERY_STATES:
            raise EdgeproxyError(f"unknown delivery state {state!r}; use one of {', '.join(DELIVERY_STATES)}",
                                 code="bad_state")
        rows = self.storage.list_deliveries(state=state, event_id=event_id, hostname=hostname,
                                            limit=max(1, min(limit, 1000)))
        return [delivery_json(d) for d in rows]

    def redeliver(self, event_id: str) -> builtins.list[dict[str, Any]]:
        """Send ``event_id`` again to every endpoint it was for, now, with a fresh horizon."""
        if not self.storage.redeliver_event(event_id, self.clock()):
            raise EventNotFound(f"no event {event_id!r} in the outbox (unknown, or pruned after "
                                "events.retention_days)")
        return [delivery_json(d) for d in self.storage.list_deliveries(event_id=event_id)]


class WebhookDeliverer:
    """Delivers the outbox: claims due rows, sends each signed, records the outcome.

    Runs in each node's primary process (``serve``); several nodes on one
    PostgreSQL share the work, and a row goes to one of them at a time (the
    claim's lease). ``on_dead(attempt)`` is awaited when a row is dead-lettered
    (the operator alert); ``on_attempt(attempt)`` after every attempt (metrics).
    """

    def __init__(
        self,
        storage: Storage,
        settings: EventsSettings,
        *,
        events: LifecycleEvents,
        warn_days: float,
        on_dead: Callable[[Attempt], Awaitable[None]] | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        transport: httpx.AsyncBaseTransport | None = None,
        batch: int = 32,
    ) -> None:
        self.storage = storage
        self.settings = settings
        self.events = events
        self.warn_days = warn_days
        self.on_dead = on_dead
        self.on_attempt = on_attempt
        self.clock = clock
        self.batch = batch
        self._transport = transport
        # Read once: a missing or malformed secret fails `serve` at start, not at the first event.
        self.signers = {e.url: load_secret(e.secret_file, e.url) for e in settings.endpoints}
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # A claim outlives the slowest attempt with room to spare; a crashed
        # deliverer's rows are sent again (by any node) once it runs out.
        self.lease = max(30.0, 3 * settings.timeout)

    # -- one attempt -------------------------------------------------------------------
    async def attempt(self, client: httpx.AsyncClient, d: Delivery) -> Attempt:
        """Send ``d`` once, record the outcome, return it. Never raises for the receiver's faults."""
        signer = self.signers.get(d.endpoint)
        status: int | None = None
        if signer is None:
            error: str | None = f"endpoint {d.endpoint} is no longer in events.endpoints"
        else:
            now = self.clock()
            try:
                response = await client.post(d.endpoint, content=d.payload.encode("utf-8"),
                                             headers=sign(signer, d.event_id, d.payload, now))
                status = response.status_code
                error = None if 200 <= status < 300 else f"HTTP {status}: {response.text[:_ERROR_BODY]}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:_ERROR_BODY + 100]
        now = self.clock()
        if error is None:
            state, next_at = "delivered", now
        else:
            retry_at = None if signer is None else next_attempt(
                d.attempts + 1, now, d.horizon_from, base=self.settings.backoff_base, cap=self.settings.backoff_cap,
                horizon=self.settings.horizon)
            state, next_at = ("pending", retry_at) if retry_at is not None else ("dead", now)
        recorded = await asyncio.to_thread(self.storage.record_attempt, d.seq, self.owner, now, state=state,
                                           next_attempt_at=next_at, error=error, status=status)
        outcome = Attempt(d, state, status, error)
        if not recorded:
            log.warning("event %s to %s: the claim ran out before the answer came; another deliverer sends it again",
                        d.event_id, d.endpoint)
            return outcome
        if self.on_attempt is not None:
            self.on_attempt(outcome)
        if state == "dead":
            log.error("event %s (%s of %s) to %s dead-lettered after %d attempts: %s", d.event_id, d.event_type,
                      d.hostname, d.endpoint, d.attempts + 1, error)
            if self.on_dead is not None:
                await self.on_dead(outcome)
        elif state == "pending":
            log.info("event %s to %s failed (%s); next attempt %s", d.event_id, d.endpoint, error, _iso(next_at))
        return outcome

    async def run_once(self, client: httpx.AsyncClient) -> int:
        """One round: claim what is due and send it (different domains at once). Returns how many were tried."""
        claimed = await asyncio.to_thread(self.storage.claim_deliveries, self.owner, self.clock(), self.lease,
                                          self.batch)
        # One head of line per (endpoint, domain): sending them concurrently keeps each domain's order.
        await asyncio.gather(*(self.attempt(client, d) for d in claimed))
        return len(claimed)

    # -- certificate.expiring -------------------------------------------------------------
    def scan_expiring(self) -> int:
        """Append ``certificate.expiring`` for every certificate with fewer than
        ``monitor.cert_warn_days`` left (once per certificate: its id is derived from
        the serial, and the outbox ignores a second append). Blocking."""
        now = self.clock()
        if not self.events.wanted("certificate.expiring"):
            return 0
        added = 0
        for hostname, _serial in self.storage.expiring_certificates(now + dt.timedelta(days=self.warn_days)):
            record = self.storage.get_domain(hostname)
            cert = self.storage.get_certificate(hostname)
            if record is None or cert is None:
                continue  # removed since
            added += self.storage.append_events(self.events.expiring(record, cert, now))
        return added

    # -- the loop inside `serve` ------------------------------------------------------------
    async def run_forever(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``: at once while rows are due, else every ``poll_interval``."""
        next_scan = 0.0
        async with httpx.AsyncClient(trust_env=False, timeout=self.settings.timeout, follow_redirects=False,
                                     transport=self._transport) as client:
            while not stop.is_set():
                tried = 0
                try:
                    if time.monotonic() >= next_scan:
                        next_scan = time.monotonic() + self.settings.expiring_check_interval
                        await asyncio.to_thread(self.scan_expiring)
                        cutoff = self.clock() - dt.timedelta(days=self.settings.retention_days)
                        await asyncio.to_thread(self.storage.prune_deliveries, cutoff)
                    tried = await self.run_once(client)
                except StorageError as exc:  # the store is down: the rows wait in it
                    log.warning("webhook delivery paused: %s", exc)
                except Exception:  # the loop must outlive a bad round
                    log.exception("webhook delivery round failed")
                if tried:
                    continue
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.settings.poll_interval)
                except TimeoutError:
                    pass


def dead_letter_alert(attempt: Attempt, now: dt.datetime) -> Alert:
    """The operator alert for a dead-lettered delivery (one per row; nothing resolves it)."""
    d = attempt.delivery
    return Alert(
        f"webhook:{d.event_id}:{d.endpoint}", "webhook_dead_letter", "trigger", "warning",
        f"webhook event {d.event_type} for {d.hostname} to {d.endpoint} dead-lettered after "
        f"{d.attempts + 1} attempts: {attempt.error}",
        {"hostname": d.hostname, "event_id": d.event_id, "type": d.event_type, "endpoint": d.endpoint,
         "error": attempt.error, "redeliver": f"edgeproxy events redeliver {d.event_id}"},
        now,
    )
