"""Copy one store into another: ``edgeproxy storage copy --from sqlite:///... --to postgresql://...``.

Owns: moving a single node's state onto the shared store (or back): domains
with their status, errors and schedule, certificates with their keys, ACME
accounts, each domain's status history and ARI state, the failed-request
log, the lifecycle-webhook events not yet delivered (so moving a node does not
lose one: they are appended as pending, in their order, and sent from the target),
and the operator alerts firing (so the target does not page again). Works through the ``Storage`` protocol only, so any backend pair works.
Must not import: ``acme``, ``httpx``, ``hypercorn``, or a backend module.

Private keys are copied as stored: open both stores with ``open_storage`` (not
``keys.open_store``), so sealed blobs move verbatim and the target nodes need the
same master key; unsealed keys stay unsealed (``keys rotate`` seals them later).
Challenge tokens (minutes-long) and locks (leases of running processes) are
not copied, nor the rate-budget ledger (the protocol cannot list it; it only
counts the last hours or days, and the CA enforces its own limits anyway).

Idempotent: copying again updates every copied record to the source's values
(a domain's history is copied only while the target has none for it; the
failed-request log is keyed by Idempotency-Key); records that exist only in
the target are left alone. A target that already
holds domains or accounts is refused unless ``force`` (so that a typo in
``--to`` does not merge two edges' state by accident).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from edgeproxy.errors import DomainExists, StorageError
from edgeproxy.storage.base import DomainRecord, OutboxEvent, Storage

__all__ = ["CopyResult", "TargetNotEmpty", "copy_store"]


class TargetNotEmpty(StorageError):
    """The target store already holds data and ``force`` was not given."""

    code = "target_not_empty"


@dataclass
class CopyResult:
    domains: int = 0
    certificates: int = 0
    accounts: int = 0
    failed_requests: int = 0
    pending_events: int = 0
    firing_alerts: int = 0

# Pages of the failed-request log copied at a time (bounded memory).
_PAGE = 500
# Undelivered webhook events are few (the deliverer drains them within seconds
# while the receiver is up): read in one go, up to this many.
_ALL = 1_000_000


def _put_domain(dst: Storage, d: DomainRecord) -> None:
    """Create or overwrite ``d`` in ``dst`` keeping its created_at and updated_at."""
    try:
        dst.add_domain(d.hostname, d.status, d.created_at)
    except DomainExists:
        pass  # copied before (or forced onto a non-empty target): overwrite below
    dst.update_domain(
        d.hostname, d.updated_at, status=d.status, error_code=d.error_code,
        error_message=d.error_message, next_attempt_at=d.next_attempt_at, attempts=d.attempts,
    )


def copy_store(
    src: Storage,
    dst: Storage,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _m: None,
) -> CopyResult:
    """Copy domains, certificates (key + chain as one unit) and ACME accounts from
    ``src`` into ``dst``. Raises ``TargetNotEmpty`` unless ``dst`` is empty or ``force``."""
    existing_domains = len(dst.list_domains())
    existing_accounts = len(dst.list_accounts())
    if (existing_domains or existing_accounts) and not force:
        raise TargetNotEmpty(
            f"the target store already holds {existing_domains} domain(s) and {existing_accounts} "
            "ACME account(s); pass --force to copy into it anyway (copied records are "
            "overwritten, the others are kept)"
        )
    result = CopyResult()
    accounts = src.list_accounts()
    for account in accounts:
        dst.save_account(account)
        result.accounts += 1
        progress(f"account {result.accounts}/{len(accounts)} {account.directory_url}")
    domains = src.list_domains()
    for n, domain in enumerate(domains, 1):
        _put_domain(dst, domain)
        result.domains += 1
        cert = src.get_certificate(domain.hostname)
        if cert is not None:
            dst.save_certificate(cert)
            result.certificates += 1
        ari = src.get_ari(domain.hostname)
        if ari is not None:
            dst.save_ari(ari)
        if not dst.status_history(domain.hostname, limit=1):
            # status_history is newest first; append oldest first to keep the order.
            for event in reversed(src.status_history(domain.hostname, limit=1_000_000)):
                dst.add_status_event(event)
        what = "with certificate" if cert is not None else "no certificate"
        progress(f"domain {n}/{len(domains)} {domain.hostname} ({domain.status}, {what})")
    total = src.count_failed_requests(delivered=None)
    after = 0
    while True:
        page = src.find_failed_requests(delivered=None, limit=_PAGE, after_id=after)
        if not page:
            break
        for record in page:
            dst.log_failed_request(replace(record, id=0))
            result.failed_requests += 1
        after = page[-1].id
        progress(f"failed-request log {result.failed_requests}/{total}")
    # Oldest first: the outbox delivers a domain's events in append order.
    pending = list(reversed(src.list_deliveries(state="pending", limit=_ALL)))
    if pending:
        result.pending_events = dst.append_events([
            OutboxEvent(d.event_id, d.endpoint, d.event_type, d.hostname, d.occurred_at, d.payload)
            for d in pending])
        progress(f"webhook events not yet delivered {len(pending)}")
    for alert in src.firing_alerts():
        # resend_after=0: stored as firing whether or not the target knew it.
        if dst.claim_alert(alert, resend_after=0) is not None:
            result.firing_alerts += 1
    return result
