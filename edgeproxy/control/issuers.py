"""Several ACME CAs: the ``Issuer`` seam, which CA an order asks first, and when it moves on.

Owns: the ``Issuer`` protocol (one CA: ``acme_client.AcmeIssuer`` in production, a
fake in unit tests), ``CaIssuer`` (an issuer with the directory URL that names it
and the CAA identities it answers to), and the pure rules of issuer fallback
(house rule 2, ``now`` passed in):

- ``order_issuers``: the CAs the domain's CAA records allow, in configured order,
  the CA of the current certificate first (RFC 9773: its renewal window and the
  ``replaces`` field only mean something to the CA that issued it).
- ``fallback_cause``: whether an order's failure moves it to the next CA. A CA
  outage (no connection, a timeout, HTTP 5xx, ``serverInternal``), a rate limit
  (``rateLimited`` or HTTP 429) and ``caa`` do; anything else, validation
  failures above all (``connection``, ``dns``, ``unauthorized``,
  ``incorrectResponse``: the customer's side), would fail at every CA and only
  burn their budgets, so it does not.
- ``fallback_reason``: the sentence saved with a certificate that says why it
  does not come from the first configured CA.

The loop that walks the CAs for one order, with the rate budgets and the ledger,
is ``renew.RenewalService`` (it owns budgets and the domain lifecycle).
Must not import: ``acme``, ``josepy``, ``hypercorn``, ``renew``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .domains import caa_allows
from ..errors import IssuanceError, RetryClass
from ..storage.base import AriState, CertificateRecord

__all__ = [
    "CAUSE_CAA",
    "CAUSE_OUTAGE",
    "CAUSE_RATE_LIMITED",
    "CaIssuer",
    "IssuedPair",
    "Issuer",
    "OUTAGE_REST",
    "STICKY_RENEWAL",
    "fallback_cause",
    "fallback_reason",
    "order_issuers",
    "rest_until",
]

CAUSE_OUTAGE = "outage"
CAUSE_RATE_LIMITED = "rate_limited"
CAUSE_CAA = "caa"

# Our codes for "the CA did not answer usefully" (acme_client._transport_error,
# _timeout_error, and classify_problem's serverInternal / HTTP 5xx rule).
_OUTAGE_CODES = frozenset({"acme_unreachable", "acme_timeout", "acme_server"})

#: After an outage a CA is asked last (not skipped) for this long: every order of
#: a pass would otherwise first wait for the down CA (up to the 30 s request
#: timeout each) before falling back.
OUTAGE_REST = dt.timedelta(minutes=5)

#: ``fallback_reason`` of a renewal that stayed with the CA of the certificate it
#: replaces when that CA is not the first one configured (and nothing older says why).
STICKY_RENEWAL = "renewals stay with the CA of the certificate they replace"


class IssuedPair(Protocol):
    @property
    def key_pem(self) -> bytes: ...

    @property
    def chain_pem(self) -> bytes: ...


class Issuer(Protocol):
    """The seam around one CA: ``acme_client.AcmeIssuer`` in production, a fake in unit tests."""

    def issue(self, hostname: str, replaces: str | None = None) -> IssuedPair:
        """Blocking. Returns a key and chain for ``hostname`` or raises ``IssuanceError``.
        ``replaces``: the ARI identifier of the certificate being renewed (RFC 9773 section 5)."""
        ...

    def renewal_info(self, hostname: str, chain_pem: bytes) -> AriState:
        """Blocking. The CA's renewal window for the leaf of ``chain_pem`` (RFC 9773),
        ``renew_at=None`` when it offers no ARI; raises ``IssuanceError``."""
        ...


@dataclass(frozen=True)
class CaIssuer:
    """One configured CA: ``directory`` (its ACME directory URL) names it in storage
    (accounts, ``CertificateRecord.acme_directory``, the rate-budget ledger);
    ``caa_identities`` are the CAA issuer names it answers to (RFC 8659)."""

    directory: str
    caa_identities: tuple[str, ...]
    issuer: Issuer


def order_issuers(
    issuers: Sequence[CaIssuer], caa: Sequence[tuple[int, str, str]], current: str = "",
    down: frozenset[str] = frozenset(),
) -> tuple[list[CaIssuer], list[CaIssuer]]:
    """``(allowed, forbidden)``: the CAs the relevant CAA RRset ``caa`` lets issue
    (``domains.caa_allows``; an empty set allows every CA), in the order to try them,
    and the ones it forbids. Pure.

    The order is the configured one, except that ``current`` (the directory of the
    certificate being renewed) comes first and CAs in ``down`` (a recent outage)
    come last; a CA is never dropped for being down, only tried later.
    """
    allowed = [ca for ca in issuers if caa_allows(caa, ca.caa_identities)]
    forbidden = [ca for ca in issuers if ca not in allowed]
    allowed.sort(key=lambda ca: (ca.directory in down, ca.directory != current))  # stable
    return allowed, forbidden


def fallback_cause(error: IssuanceError) -> str | None:
    """Why ``error`` moves an order to the next CA (``CAUSE_*``), or None when it does
    not (the same order would fail at every CA). Pure."""
    short = (error.acme_type or "").rsplit(":", 1)[-1]
    if short == "caa":
        return CAUSE_CAA
    if error.retry is RetryClass.RATE_LIMITED:
        return CAUSE_RATE_LIMITED
    if error.code in _OUTAGE_CODES:
        return CAUSE_OUTAGE
    return None


def rest_until(cause: str, error: IssuanceError, now: dt.datetime) -> dt.datetime | None:
    """How long the CA is left alone after ``error`` (None: not at all). Pure.

    A rate limit: until its Retry-After (RFC 8555 section 6.6), for that hostname
    only (the CA still issues for others); without one, the domain's own backoff
    decides. An outage: ``OUTAGE_REST``, for every hostname (the CA is then tried
    last). ``caa``: never (it is the domain's CAA, checked again on every order)."""
    if cause == CAUSE_RATE_LIMITED and error.retry_after is not None:
        return now + dt.timedelta(seconds=error.retry_after)
    if cause == CAUSE_OUTAGE:
        return now + OUTAGE_REST
    return None


def fallback_reason(
    issuers: Sequence[CaIssuer], used: str, notes: Mapping[str, str], previous: CertificateRecord | None,
) -> str:
    """What a certificate from the CA ``used`` records about why it is not from the
    first configured CA ("" when it is). Pure.

    ``notes`` says, per directory, why this order did not get the certificate from
    that CA (skipped or failed). A renewal that stayed with its CA without trying
    the earlier ones keeps the reason of the certificate it replaces (the domain
    is still on that CA for that reason), else says it stayed (``STICKY_RENEWAL``).
    """
    directories = [ca.directory for ca in issuers]
    if used not in directories:
        return ""
    earlier = directories[: directories.index(used)]
    if not earlier:
        return ""
    parts = [f"{directory}: {notes[directory]}" for directory in earlier if directory in notes]
    if parts:
        return "; ".join(parts)
    if previous is not None and previous.acme_directory == used and previous.fallback_reason:
        return previous.fallback_reason
    return STICKY_RENEWAL
