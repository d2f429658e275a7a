"""Storage protocol and records shared by every backend.

Owns: the ``Storage`` contract (what each method promises about concurrency,
not-found and idempotency) and the plain records that cross it.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or any backend.

Contract common to every method:
- Methods are blocking and thread-safe; async callers run them with
  ``asyncio.to_thread`` (house rule 4: SQLite never runs on the event loop).
- Several processes (hypercorn workers, the CLI, cron) may use one store at once.
- Times are timezone-aware UTC ``datetime`` values; ``now`` is always passed in.
- Backend exceptions never escape: a broken store raises ``StorageError`` or
  ``StorageUnavailable`` from ``edgeproxy.errors``.
- Hostnames are already normalized (``domains.normalize_hostname``).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

__all__ = [
    "AccountRecord",
    "CertificateRecord",
    "ChallengeRecord",
    "DomainRecord",
    "StatusEvent",
    "AriState",
    "FailedRequestRecord",
    "Refusal",
    "SpoolEntry",
    "SpoolStats",
    "SpoolStore",
    "Storage",
    "DomainStore",
    "CertificateStore",
    "ChallengeStore",
    "AccountStore",
    "ChangeFeed",
    "LeaseStore",
    "IssuanceLedger",
    "FailedRequestLog",
    "MonitorLedger",
    "FiringAlert",
    "ProbeRecord",
    "DOMAIN_STATUSES",
    "CertificateVisitor",
    "leaf_der_of",
    "Delivery",
    "DELIVERY_STATES",
    "EventOutbox",
    "OutboxEvent",
]

# pending_dns: waiting for the customer's DNS record; issuing: an order is due or
# running; active: a valid certificate is served; renewing: active, renewal due;
# failing: issuance/renewal failed, retrying with backoff; moved: DNS no longer
# points at the edge (keep serving the valid certificate, stop renewing).
DOMAIN_STATUSES = ("pending_dns", "issuing", "active", "renewing", "failing", "moved")


@dataclass(frozen=True, slots=True)  # slots: list_domains builds 100,000 of them at scale
class DomainRecord:
    hostname: str
    status: str
    created_at: datetime
    updated_at: datetime
    error_code: str | None = None
    error_message: str | None = None
    next_attempt_at: datetime | None = None  # when the scheduler should next try an order
    attempts: int = 0  # consecutive failed attempts (reset on success)


@dataclass(frozen=True)
class CertificateRecord:
    """A private key and the full chain that goes with it: always saved as one unit."""

    hostname: str
    key_pem: bytes
    chain_pem: bytes  # leaf first, then intermediates
    not_before: datetime
    not_after: datetime
    serial: str  # hex, lowercase
    issuer: str  # RFC 4514 string of the leaf's issuer
    created_at: datetime
    # The configured ACME CA (its directory URL) that issued it; "" when unknown
    # (saved before edgeproxy recorded it, or imported).
    acme_directory: str = ""
    # Why it does not come from the first CA the domain's CAA allows ("" when it
    # does): the order that moved the domain to this CA (``issuers.FallbackNote``).
    fallback_reason: str = ""


#: ``visit(hostname, key_pem, chain_pem, leaf_der, not_after, serial)``: what a
#: backend's bulk ``scan_certificates`` calls per certificate (not part of the
#: ``Storage`` protocol; the certstore's start-up path). ``leaf_der`` is
#: the leaf as DER, stored next to the chain at save time; None for rows saved
#: before it existed (or by an older edgeproxy), whose reader decodes the PEM.
CertificateVisitor = Callable[[str, bytes, bytes, bytes | None, datetime, str], None]

_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_END_CERT = b"-----END CERTIFICATE-----"


def leaf_der_of(chain_pem: bytes) -> bytes | None:
    """The first certificate of a PEM chain as DER, or None when the chain does
    not start with a PEM certificate block that decodes.

    Backends store this next to the chain when they save it, so that loading
    100,000 certificates at start-up does not base64-decode 100,000 leaves
    (~2 us each). The certstore decodes rows without it the same way.
    """
    chain = chain_pem.lstrip()
    end = chain.find(_END_CERT)
    if not chain.startswith(_BEGIN_CERT) or end < 0:
        return None
    try:
        return binascii.a2b_base64(chain[len(_BEGIN_CERT):end])
    except binascii.Error:
        return None


@dataclass(frozen=True)
class ChallengeRecord:
    token: str
    key_authorization: str
    hostname: str
    expires_at: datetime


@dataclass(frozen=True)
class AccountRecord:
    directory_url: str
    key_pem: bytes
    registration_json: str  # acme RegistrationResource as JSON ("" before registration)


# -- records (status history, ARI state) ----------------------------------------


@dataclass(frozen=True)
class StatusEvent:
    """One entry of a domain's status history."""

    hostname: str
    at: datetime
    status: str
    error_code: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class AriState:
    """ACME Renewal Information (RFC 9773) for one certificate.

    ``cert_id`` is the RFC 9773 section 4.1 identifier (``base64url(AKI).base64url(serial)``)
    that a renewal order sends as ``replaces``; ``renew_at`` a time inside the
    CA's suggested window (None when the CA offers no ARI); ``next_poll`` when to
    ask again (the CA's Retry-After, at most 12 hours away)."""

    hostname: str
    serial: str
    cert_id: str
    renew_at: datetime | None
    next_poll: datetime
    checked_at: datetime
# -- failed-request log record ---------------------------------------------
@dataclass(frozen=True)
class FailedRequestRecord:
    """One API call the relay refused (or the edge could not accept), with
    everything needed to send it again (``edgeproxy replay``).

    ``headers`` are the headers sent to the relay, ``Idempotency-Key`` included;
    ``client`` is already reduced per ``privacy.ip_retention``. ``id`` is 0 before
    the record is stored.
    """

    idempotency_key: str
    domain: str
    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: str | None
    status: int  # what the relay (or the edge) answered
    origin: str  # "relay" or "edge": who refused it
    received_at: datetime
    logged_at: datetime
    delivered_at: datetime | None = None
    id: int = 0




# -- monitor state: what is firing, each domain's last probe -----------------------


@dataclass(frozen=True)
class FiringAlert:
    """An operator alert that is firing, as every node of the edge sees it.

    ``details_json`` is the alert's details as JSON text; ``since`` when it
    started firing; ``last_sent`` when a trigger for it last went to the sinks.
    """

    key: str
    kind: str
    severity: str
    summary: str
    details_json: str
    since: datetime
    last_sent: datetime


@dataclass(frozen=True)
class ProbeRecord:
    """A domain's last acceptance probe: ``result_json`` is ``ProbeResult.to_json()``
    as text; ``consecutive_failures`` counts failed rounds up to this one (0 when ok)."""

    hostname: str
    checked_at: datetime
    ok: bool
    result_json: str
    consecutive_failures: int


# -- lifecycle webhooks: the durable outbox -------------------------------------

#: pending: waiting for (or in) delivery; delivered: the receiver answered 2xx;
#: dead: retried until the horizon, given up (``redeliver`` makes it pending again).
DELIVERY_STATES = ("pending", "delivered", "dead")


@dataclass(frozen=True)
class OutboxEvent:
    """One lifecycle event for one endpoint, as appended to the outbox.

    ``event_id`` is the Standard Webhooks ``webhook-id``: the same for every
    endpoint and every attempt (receivers deduplicate on it). ``payload`` is the
    JSON body exactly as it will be signed and sent."""

    event_id: str
    endpoint: str  # the endpoint's URL
    event_type: str
    hostname: str
    occurred_at: datetime
    payload: str


@dataclass(frozen=True)
class Delivery:
    """An outbox row: one event for one endpoint and where its delivery stands."""

    seq: int  # append order; per (endpoint, hostname) the delivery order
    event_id: str
    endpoint: str
    event_type: str
    hostname: str
    occurred_at: datetime
    payload: str
    state: str  # one of DELIVERY_STATES
    attempts: int
    next_attempt_at: datetime
    horizon_from: datetime  # retries stop (dead letter) a horizon after this; reset by redeliver
    last_error: str | None = None
    last_status: int | None = None  # the receiver's last HTTP status (None: no answer)
    delivered_at: datetime | None = None


class EventOutbox(Protocol):
    """The lifecycle-webhook outbox. Contract:

    - Appending: ``events`` given to ``add_domain``/``update_domain``/
      ``remove_domain``/``save_certificate`` are appended in the same
      transaction as the change (a crash never keeps one without the other);
      ``append_events`` appends on its own. Appending is idempotent per
      ``(event_id, endpoint)``: a second append of the pair changes nothing (that is
      how ``certificate.expiring`` fires once per certificate). A new row is
      ``pending``, due at once, ``horizon_from = occurred_at``.
    - Order: ``claim_deliveries`` only ever hands out the oldest pending row
      (lowest ``seq``) of each ``(endpoint, hostname)``, so a domain's events reach
      an endpoint in append order; a delivered or dead row no longer holds back the
      ones after it.
    - One deliverer per row: a claim is a lease (``claimed_by`` until
      ``now + lease_seconds``); concurrent claimers (threads, processes, nodes on
      one PostgreSQL) never get the same row while the lease runs. A crashed
      deliverer's rows are claimable again once the lease expires, so delivery is
      at least once.
    - ``record_attempt`` only counts when ``owner`` still holds the claim; it
      releases the claim. Times are tz-aware UTC; ``now`` is passed in.
    """

    def append_events(self, events: Sequence[OutboxEvent]) -> int:
        """Append outside any state change; returns how many rows were new."""
        ...

    def claim_deliveries(self, owner: str, now: datetime, lease_seconds: float, limit: int) -> list[Delivery]:
        """Claim up to ``limit`` due heads of line (pending, ``next_attempt_at <= now``,
        unclaimed or lease expired), ordered by seq."""
        ...

    def record_attempt(self, seq: int, owner: str, now: datetime, *, state: str, next_attempt_at: datetime,
                       error: str | None, status: int | None) -> bool:
        """Count one attempt of row ``seq``: its new ``state``, when to try next,
        the error and HTTP status (None, None on success), ``delivered_at = now`` when
        delivered; releases the claim. False (nothing changed) when ``owner`` no
        longer holds it."""
        ...

    def list_deliveries(self, *, state: str | None = None, event_id: str | None = None,
                        hostname: str | None = None, limit: int = 100) -> list[Delivery]:
        """Rows matching the filters given, newest (highest seq) first."""
        ...

    def redeliver_event(self, event_id: str, now: datetime) -> int:
        """Make every row of ``event_id`` pending and due at ``now`` with a fresh
        horizon (``horizon_from = now``); returns how many rows (0: unknown id)."""
        ...

    def count_deliveries_by_state(self) -> dict[str, int]:
        """state -> how many rows; absent states have none."""
        ...

    def prune_deliveries(self, before: datetime) -> int:
        """Delete delivered and dead rows that occurred before ``before``; returns how many."""
        ...

    def expiring_certificates(self, before: datetime) -> list[tuple[str, str]]:
        """``(hostname, serial)`` of the stored certificates with ``not_after < before``, by hostname."""
        ...


# -- role protocols: what each part of edgeproxy needs from the store -------------------
# A consumer types its parameter with the smallest role it uses (the spool's
# replayer needs a FailedRequestLog, not a Storage); ``Storage`` is all of them,
# what both backends implement and tests/test_storage_contract.py checks.


class DomainStore(Protocol):
    """The registry of custom domains and their issuance state."""

    # ``events`` on the four state changes (add, update, remove, save certificate):
    # lifecycle webhook deliveries appended to the outbox IN THE SAME TRANSACTION as
    # the change (both or neither are committed; see ``EventOutbox``).
    def add_domain(self, hostname: str, status: str, now: datetime,
                   events: Sequence[OutboxEvent] = (), *, next_attempt_at: datetime | None = None) -> DomainRecord:
        """Insert a new domain, due at ``next_attempt_at`` (None: never due until set).
        Raises ``DomainExists`` if it is already registered."""
        ...

    def get_domain(self, hostname: str) -> DomainRecord | None:
        """The domain, or None when it is not registered."""
        ...

    def list_domains(self) -> list[DomainRecord]:
        """All domains, ordered by hostname."""
        ...

    # The renewal loop and the registration limits ask these every few
    # seconds; ``list_domains`` would build every record (100,000 at scale) to
    # keep a handful. Both are answered from an index, whatever the store's size.
    def due_domains(
        self, now: datetime, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[DomainRecord]:
        """Domains with ``next_attempt_at <= now`` (None is never due), with a status
        in ``statuses`` when given (an empty sequence matches nothing), the most
        overdue first (ties by hostname), at most ``limit`` of them when given."""
        ...

    def count_domains(self) -> int:
        """How many domains are registered."""
        ...

    # The monitor reads every domain's status twice a round and /metrics
    # counts them at every scrape; whole records (datetimes, errors) for 100,000
    # domains cost ~60 MB and 0.75 s each time for two columns' worth of answer.
    def domain_statuses(self) -> list[tuple[str, str]]:
        """``(hostname, status)`` of every domain, ordered by hostname (as ``list_domains``)."""
        ...

    def count_domains_by_status(self) -> dict[str, int]:
        """status -> how many domains have it; statuses no domain has are absent."""
        ...

    def domain_created_times_since(self, since: datetime) -> list[datetime]:
        """``created_at`` of the domains registered at or after ``since``, oldest first."""
        ...

    def update_domain(
        self,
        hostname: str,
        now: datetime,
        *,
        status: str,
        error_code: str | None = None,
        error_message: str | None = None,
        next_attempt_at: datetime | None = None,
        attempts: int = 0,
        events: Sequence[OutboxEvent] = (),
    ) -> DomainRecord:
        """Replace the mutable fields. Raises ``DomainNotFound`` if absent."""
        ...

    def remove_domain(self, hostname: str, events: Sequence[OutboxEvent] = ()) -> bool:
        """Delete the domain with its certificate, key and challenges in one
        transaction. Returns False (and changes nothing) if it was not registered."""
        ...


class CertificateStore(Protocol):
    """Key + chain pairs, one per domain (deleted with the domain)."""

    def save_certificate(self, cert: CertificateRecord, events: Sequence[OutboxEvent] = ()) -> None:
        """Store key + chain + metadata atomically (a reader sees the old pair or
        the new pair, never a mix, even after a crash). Replaces any previous one.
        Raises ``DomainNotFound`` if the domain was removed meanwhile."""
        ...

    def get_certificate(self, hostname: str) -> CertificateRecord | None:
        ...


class ChallengeStore(Protocol):
    """HTTP-01 tokens published while an order validates (the :80 listener reads them)."""

    def put_challenge(self, challenge: ChallengeRecord) -> None:
        """Publish a token (idempotent: same token overwrites)."""
        ...

    def get_challenge(self, token: str) -> ChallengeRecord | None:
        ...

    def delete_challenge(self, token: str) -> None:
        """Idempotent."""
        ...


class AccountStore(Protocol):
    """One ACME account per directory URL."""

    def get_account(self, directory_url: str) -> AccountRecord | None:
        ...

    def save_account(self, account: AccountRecord) -> None:
        """Insert or replace the account for ``account.directory_url``."""
        ...

    def list_accounts(self) -> list[AccountRecord]:
        """Every stored account, ordered by directory URL (``storage copy`` moves them all)."""
        ...


class ChangeFeed(Protocol):
    """Which hostnames changed, for every worker's in-memory certificate map."""

    def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """Hostnames whose domain or certificate changed after ``seq``, and the
        newest seq. Workers poll this to refresh their in-memory maps; a
        hostname may appear more than once. ``changes_since(0)`` lists all."""
        ...


class LeaseStore(Protocol):
    """Named leases with an expiry: one renewal loop, one replayer per node set."""

    def try_lock(self, name: str, owner: str, ttl_seconds: float, now: datetime) -> bool:
        """Take or extend a lease. True if ``owner`` now holds ``name`` until
        ``now + ttl``; False if another owner holds an unexpired lease. An
        expired lease (crashed holder) is taken over."""
        ...

    def unlock(self, name: str, owner: str) -> None:
        """Release if held by ``owner``; otherwise do nothing."""
        ...


class IssuanceLedger(Protocol):
    """What issuance remembers besides the certificate: rate budgets, each
    domain's status history, ARI state (RFC 9773)."""

    def record_event(self, kind: str, key: str, at: datetime) -> None:
        """Append one ledger entry (e.g. kind="order", key=<ACME directory>). Not
        idempotent: every call counts once against a budget."""
        ...

    def events_since(self, kind: str, key: str, since: datetime) -> list[datetime]:
        """Times of the ``kind``/``key`` entries at or after ``since``, oldest first."""
        ...

    def prune_events(self, before: datetime) -> int:
        """Delete ledger entries older than ``before``; returns how many."""
        ...

    def add_status_event(self, event: StatusEvent) -> None:
        """Append to a domain's history. Deleted with the domain (``remove_domain``)."""
        ...

    def status_history(self, hostname: str, limit: int = 100) -> list[StatusEvent]:
        """The newest ``limit`` entries for ``hostname``, newest first ([] if none)."""
        ...

    def save_ari(self, state: AriState) -> None:
        """Insert or replace the ARI state of ``state.hostname``. Deleted with the domain."""
        ...

    def get_ari(self, hostname: str) -> AriState | None:
        ...


class FailedRequestLog(Protocol):
    """Requests the relay or the edge refused, kept ``failed_log.retention_days``
    with everything ``edgeproxy replay`` needs to send them again."""

    def log_failed_request(self, record: FailedRequestRecord) -> int:
        """Store a refused request; returns its id. Idempotent per
        ``idempotency_key``: logging the same key again (a replay refused once
        more) updates ``status``/``logged_at`` and keeps the one row."""
        ...

    def find_failed_requests(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        domain: str | None = None,
        status: int | None = None,
        delivered: bool | None = False,
        limit: int = 1000,
        after_id: int = 0,
    ) -> list[FailedRequestRecord]:
        """Records with ``since <= received_at < until`` (either bound optional),
        matching ``domain``/``status`` when given, ``id > after_id``, ordered by id
        (arrival order). ``delivered``: False = not yet delivered, True = delivered,
        None = both."""
        ...

    def count_failed_requests(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        domain: str | None = None,
        status: int | None = None,
        delivered: bool | None = False,
    ) -> int:
        """How many records ``find_failed_requests`` would return without a limit."""
        ...

    def mark_failed_delivered(self, ids: list[int], now: datetime) -> int:
        """Set ``delivered_at = now`` where still unset; returns how many changed."""
        ...

    def prune_failed_requests(self, before: datetime) -> int:
        """Delete records logged before ``before``; returns how many."""
        ...

class MonitorLedger(Protocol):
    """The monitor's memory, shared by restarts and by every node: which operator
    alerts are firing (so a restart or a second node never pages again for one
    already announced) and each domain's last probe (rows go with the domain)."""

    def firing_alerts(self) -> list[FiringAlert]:
        """Every firing alert, ordered by key."""
        ...

    def claim_alert(self, alert: FiringAlert, resend_after: float) -> str | None:
        """Atomically decide who sends a trigger for ``alert.key`` at ``alert.last_sent``.

        ``"trigger"`` when the key was not firing (it is stored, ``since`` =
        ``alert.since``); ``"resend"`` when it was and its last send is at least
        ``resend_after`` seconds before ``alert.last_sent`` (summary, details and
        ``last_sent`` are updated, ``since`` kept); None when another caller sent
        it more recently than that (nothing changes). Of several nodes claiming
        the same key at once, exactly one gets a non-None answer."""
        ...

    def release_alert(self, key: str) -> FiringAlert | None:
        """Stop ``key`` firing; returns what was stored, or None when it was not firing
        (another node resolved it first: only the caller that gets the record sends
        the resolve)."""
        ...

    def save_probes(self, records: Sequence[ProbeRecord]) -> None:
        """Insert or replace the last probe of each record's domain, in one transaction."""
        ...

    def get_probe(self, hostname: str) -> ProbeRecord | None:
        """The domain's last probe, or None (never probed, or removed)."""
        ...

    def probe_failures(self) -> dict[str, int]:
        """hostname -> consecutive failures, for the domains whose last probe failed."""
        ...


class Storage(DomainStore, CertificateStore, ChallengeStore, AccountStore, ChangeFeed, LeaseStore,
              IssuanceLedger, FailedRequestLog, MonitorLedger, EventOutbox, Protocol):
    """Everything edgeproxy persists. One instance per process; thread-safe."""

    def close(self) -> None:
        """Release connections. Idempotent; any later call raises ``StorageError``."""
        ...


# -- the spool file: records and its contract (implemented by storage/spoolfile.py) ---------

@dataclass(frozen=True)
class SpoolEntry:
    """One request waiting for the relay. ``id`` is 0 before it is stored."""

    idempotency_key: str
    domain: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: str | None
    received_at: float  # epoch seconds
    attempts: int = 0
    last_error: str | None = None
    id: int = 0
    method: str = "POST"

    def headers_json(self) -> str:
        return json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers])

    def size(self, headers_json: str) -> int:
        # What the cap counts: payload plus a fixed allowance for the row itself.
        return len(self.body) + len(headers_json) + len(self.target) + len(self.domain) + 128


@dataclass(frozen=True)
class SpoolStats:
    depth: int
    bytes: int
    max_bytes: int
    oldest_received_at: float | None
    oldest_age_seconds: float  # 0 when empty
    dead_letters: int
    domains: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "depth": self.depth, "bytes": self.bytes, "max_bytes": self.max_bytes,
            "oldest_received_at": None if self.oldest_received_at is None else
            datetime.fromtimestamp(self.oldest_received_at, timezone.utc).isoformat(),
            "oldest_age_seconds": round(self.oldest_age_seconds, 3),
            "dead_letters": self.dead_letters, "domains": self.domains,
        }


@dataclass(frozen=True)
class Refusal:
    """A request the edge refused itself, as kept in the spool file."""

    entry: SpoolEntry
    status: int
    reason: str


class SpoolStore(Protocol):
    """The node-local spool file: requests waiting for the relay, dead letters, and the
    requests the edge refused itself. One file per node, written by every process of
    the node; never the shared store (it must work while that is down).

    Contract:
    - ``put`` returns the new id once the entry is committed and fsync'd, or raises
      ``SpoolFull`` (the cap, counted in bytes) / ``SpoolUnavailable``: it never
      reports success for an entry that is not on disk. Concurrent puts from any
      process are safe; the cap holds across processes.
    - ``record_refusal`` queues the write and returns at once (nothing waits for it);
      a refusal is kept outside the byte cap.
    - Everything else blocks (call it in a thread). Entries come back in arrival
      order (``id``); ``delete`` and ``delete_refusals`` are idempotent.
    - ``close`` finishes queued writes first; idempotent.
    """

    async def put(self, entry: SpoolEntry) -> int: ...

    def record_refusal(self, refusal: Refusal) -> None: ...

    def take_refusals(self, limit: int) -> list[tuple[int, Refusal]]: ...

    def delete_refusals(self, ids: Sequence[int]) -> None: ...

    def head(self, limit: int, exclude_domains: Sequence[str] = ()) -> list[SpoolEntry]: ...

    def entries(self, limit: int = 100, domain: str | None = None) -> list[SpoolEntry]: ...

    def delete(self, ids: Sequence[int]) -> None: ...

    def record_failure(self, entry_id: int, error: str) -> None: ...

    def dead_letter_older_than(self, cutoff: float, now: float) -> list[SpoolEntry]: ...

    def stats(self, now: float) -> SpoolStats: ...

    def depth_age(self) -> tuple[int, float]: ...

    def close(self) -> None: ...
