"""Issuer fallback at the ``Issuer`` seam: which CA an order asks and when it moves on.

Pebble never answers ``rateLimited`` or ``caa`` and cannot be made to spend a
rate budget, so these cases run with fake CAs behind the seam (the real CAs'
outage, CAA and renewal cases are in tests/test_issuers_pebble.py). Everything
else is real: a SQLite store, the certificate store, the renewal service and its
ledger. The clock is a test clock, so rests and Retry-After need no waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.control.acme_client import classify_problem
from edgeproxy.edge.certstore import CertStore
from edgeproxy.errors import IssuanceError, RetryClass
from edgeproxy.control.issuers import (
    CAUSE_CAA, CAUSE_OUTAGE, CAUSE_RATE_LIMITED, OUTAGE_REST, STICKY_RENEWAL, CaIssuer, fallback_cause,
    order_issuers,
)
from edgeproxy.control.renew import CERT_NAMES, FAILED_VALIDATION, ORDER, RenewalService, RenewPolicy
from edgeproxy.storage.base import AriState
from edgeproxy.storage.sqlite import SqliteStorage

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
A, B, C = "https://ca-a.test/dir", "https://ca-b.test/dir", "https://ca-c.test/dir"
P = "urn:ietf:params:acme:error:"


def _rate_limited(retry_after: float | None = 3600) -> IssuanceError:
    return classify_problem(P + "rateLimited", "too many certificates", 429, retry_after, hostname="x")


def _caa() -> IssuanceError:
    return classify_problem(P + "caa", "CAA record forbids issuance", 403, hostname="x")


def _unreachable() -> IssuanceError:
    return IssuanceError("Cannot reach the ACME server", code="acme_unreachable", retry=RetryClass.TRANSIENT)


def _unauthorized() -> IssuanceError:
    return classify_problem(P + "unauthorized", "404 from the challenge URL", None, hostname="x")


@dataclass
class _Pair:
    key_pem: bytes
    chain_pem: bytes


def _pair(host: str, ca_name: str, now: dt.datetime) -> _Pair:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return _Pair(key_pem, leaf.public_bytes(serialization.Encoding.PEM))


@dataclass
class FakeCA:
    """A CA behind the seam: answers with the next scripted error, else a certificate."""

    name: str
    clock: Any
    errors: list[IssuanceError] = field(default_factory=list)
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    ari_asked: list[str] = field(default_factory=list)

    def issue(self, hostname: str, replaces: str | None = None) -> _Pair:
        self.calls.append((hostname, replaces))
        if self.errors:
            raise self.errors.pop(0)
        return _pair(hostname, self.name, self.clock())

    def renewal_info(self, hostname: str, chain_pem: bytes) -> AriState:
        self.ari_asked.append(hostname)
        now = self.clock()
        return AriState(hostname, "", "", None, now + dt.timedelta(hours=12), now)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class World:
    storage: SqliteStorage
    clock: Clock
    cas: dict[str, FakeCA]
    service: RenewalService

    def add(self, hostname: str) -> None:
        self.storage.add_domain(hostname, "issuing", self.clock())
        self.storage.update_domain(hostname, self.clock(), status="issuing", next_attempt_at=self.clock())

    def run(self, *names: str, force: bool = False) -> Any:
        return asyncio.run(self.service.run_pass(list(names), force=force, refresh=False))

    def cert(self, hostname: str) -> Any:
        cert = self.storage.get_certificate(hostname)
        assert cert is not None
        return cert


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    storage = SqliteStorage(str(tmp_path / "edge.db"))
    clock = Clock()
    cas = {d: FakeCA(d, clock) for d in (A, B, C)}
    issuers = [CaIssuer(d, (f"{d.split('/')[2]}",), cas[d]) for d in (A, B, C)]
    service = RenewalService(storage, CertStore(storage), issuers, clock=clock,
                             policy=RenewPolicy(extra_suffixes=("test",), duplicate_certs=2))
    try:
        yield World(storage, clock, cas, service)
    finally:
        storage.close()


# -- the pure rules ---------------------------------------------------------------------------


def test_fallback_cause_switches_on_outage_rate_limit_and_caa_only() -> None:
    assert fallback_cause(_rate_limited()) == CAUSE_RATE_LIMITED
    assert fallback_cause(classify_problem("", "slow down", 429)) == CAUSE_RATE_LIMITED  # no type, HTTP 429
    assert fallback_cause(_caa()) == CAUSE_CAA
    assert fallback_cause(_unreachable()) == CAUSE_OUTAGE
    assert fallback_cause(classify_problem(P + "serverInternal", "oops", 500)) == CAUSE_OUTAGE
    assert fallback_cause(classify_problem("", "<html>bad gateway", 502)) == CAUSE_OUTAGE
    assert fallback_cause(IssuanceError("slow", code="acme_timeout")) == CAUSE_OUTAGE
    # The customer's side fails at every CA: never a reason to move on.
    for kind in ("connection", "dns", "unauthorized", "incorrectResponse", "rejectedIdentifier", "malformed"):
        assert fallback_cause(classify_problem(P + kind, "no", 403)) is None, kind


def test_order_issuers_by_caa_then_current_first_then_down_last() -> None:
    cas = [CaIssuer(d, (d.split("/")[2],), object()) for d in (A, B, C)]  # type: ignore[arg-type]

    def names(found: list[CaIssuer]) -> list[str]:
        return [ca.directory for ca in found]

    allowed, forbidden = order_issuers(cas, ())
    assert names(allowed) == [A, B, C] and forbidden == []  # no CAA: every CA, configured order
    allowed, forbidden = order_issuers(cas, ((0, "issue", "ca-c.test"), (0, "issue", "ca-b.test")))
    assert names(allowed) == [B, C] and names(forbidden) == [A]
    assert names(order_issuers(cas, (), current=C)[0]) == [C, A, B]  # renewal: its CA first
    assert names(order_issuers(cas, (), down=frozenset({A}))[0]) == [B, C, A]  # tried last, not dropped
    assert names(order_issuers(cas, (), current=A, down=frozenset({A}))[0]) == [B, C, A]


# -- the renewal service walking the CAs ------------------------------------------------------


def test_rate_limited_moves_the_order_on_and_its_retry_after_is_honoured(world: World) -> None:
    world.add("shop.example.test")
    world.cas[A].errors = [_rate_limited(retry_after=3600)]
    world.cas[B].errors = [_unreachable()]
    result = world.run("shop.example.test")
    # A rate-limited, B down, C issued: one order, three CAs, each asked once.
    assert result.issued == ["shop.example.test"]
    assert [len(world.cas[d].calls) for d in (A, B, C)] == [1, 1, 1]
    cert = world.cert("shop.example.test")
    assert cert.acme_directory == C
    assert f"{A}: rate_limited (acme_rate_limited)" in cert.fallback_reason
    assert f"{B}: outage (acme_unreachable)" in cert.fallback_reason
    # A new name at A within the hour: A's limit was for that name only.
    world.add("other.example.test")
    world.run("other.example.test")
    assert world.cert("other.example.test").acme_directory == A and world.cert("other.example.test").fallback_reason == ""
    # The rate-limited name, 10 minutes later, with C failing: A is not asked before its Retry-After.
    world.clock.now += dt.timedelta(minutes=10)
    world.cas[C].errors = [_unreachable()]
    world.run("shop.example.test", force=True)
    assert [h for h, _ in world.cas[A].calls].count("shop.example.test") == 1
    assert world.cert("shop.example.test").acme_directory == B  # C down (asked first: its CA), then B


def test_caa_problem_moves_the_order_to_the_next_ca(world: World) -> None:
    world.add("caa.example.test")
    world.cas[A].errors = [_caa()]
    world.run("caa.example.test")
    cert = world.cert("caa.example.test")
    assert cert.acme_directory == B and cert.fallback_reason.startswith(f"{A}: caa (acme_caa)")
    view = world.service.storage.get_domain("caa.example.test")
    assert view is not None and view.status == "active" and view.error_code is None


def test_validation_failure_does_not_move_the_order(world: World) -> None:
    world.add("wrong.example.test")
    world.cas[A].errors = [_unauthorized()]
    result = world.run("wrong.example.test")
    assert result.failed["wrong.example.test"].code == "acme_unauthorized"
    assert world.cas[B].calls == [] and world.cas[C].calls == []  # it would fail everywhere
    record = world.storage.get_domain("wrong.example.test")
    assert record is not None and record.status == "failing" and record.error_code == "acme_unauthorized"
    assert world.storage.get_certificate("wrong.example.test") is None
    # Counted against A's failed-validation budget only.
    since = world.clock() - dt.timedelta(hours=1)
    assert len(world.storage.events_since(FAILED_VALIDATION, f"wrong.example.test {A}", since)) == 1
    assert world.storage.events_since(FAILED_VALIDATION, f"wrong.example.test {B}", since) == []


def test_a_ca_that_had_an_outage_is_asked_last_for_a_while(world: World) -> None:
    world.add("one.example.test")
    world.cas[A].errors = [_unreachable()]
    world.run("one.example.test")
    assert world.cert("one.example.test").acme_directory == B
    world.add("two.example.test")
    world.run("two.example.test")  # within OUTAGE_REST: B first, A never asked
    assert world.cert("two.example.test").acme_directory == B and len(world.cas[A].calls) == 1
    world.clock.now += OUTAGE_REST + dt.timedelta(seconds=1)
    world.add("three.example.test")
    world.run("three.example.test")  # the rest is over: A first again
    assert world.cert("three.example.test").acme_directory == A and len(world.cas[A].calls) == 2


def test_rate_budgets_are_kept_per_ca(world: World) -> None:
    # duplicate_certs=2: two certificates for one name per 7 days at each CA.
    world.add("dup.example.test")
    for _ in range(2):
        world.run("dup.example.test", force=True)
    assert [world.cert("dup.example.test").acme_directory, len(world.cas[A].calls)] == [A, 2]
    world.run("dup.example.test", force=True)  # A's budget is spent: B, and nothing sent to A
    cert = world.cert("dup.example.test")
    assert cert.acme_directory == B and len(world.cas[A].calls) == 2
    assert "rate budget reached: 2 duplicate certificates for dup.example.test per 7 days from " + A \
        in cert.fallback_reason
    since = world.clock() - dt.timedelta(days=7)
    assert len(world.storage.events_since(CERT_NAMES, f"dup.example.test {A}", since)) == 2
    assert len(world.storage.events_since(CERT_NAMES, f"dup.example.test {B}", since)) == 1
    assert len(world.storage.events_since(ORDER, A, since)) == 2 and len(world.storage.events_since(ORDER, B, since)) == 1


def test_ledger_entries_from_before_per_ca_budgets_count_against_every_ca(world: World) -> None:
    world.add("old.example.test")
    for _ in range(2):  # what the one-CA edgeproxy recorded: the bare name
        world.storage.record_event(CERT_NAMES, "old.example.test", world.clock() - dt.timedelta(days=1))
    result = world.run("old.example.test")
    assert all(ca.calls == [] for ca in world.cas.values())
    record = world.storage.get_domain("old.example.test")
    assert record is not None and record.error_code == "rate_budget" and "old.example.test" in result.waiting
    assert record.next_attempt_at == world.clock() + dt.timedelta(days=6)


def test_renewal_stays_with_the_ca_of_the_current_certificate(world: World) -> None:
    """The chosen behaviour: once a domain moved to a fallback CA, its renewals stay
    there while that CA issues (its ARI window and ``replaces`` are that CA's); new
    names go to the first CA again."""
    world.add("moved.example.test")
    world.cas[A].errors = [_unreachable()]
    world.run("moved.example.test")
    first = world.cert("moved.example.test")
    assert first.acme_directory == B
    world.clock.now += OUTAGE_REST + dt.timedelta(minutes=1)  # A is back and rested
    world.run("moved.example.test", force=True)
    renewed = world.cert("moved.example.test")
    assert renewed.serial != first.serial and renewed.acme_directory == B
    assert renewed.fallback_reason == first.fallback_reason  # still on B for the same reason
    assert [h for h, _ in world.cas[A].calls] == ["moved.example.test"]  # only the first order
    assert world.cas[B].ari_asked == ["moved.example.test"] and world.cas[A].ari_asked == []  # ARI from its CA
    world.add("new.example.test")
    world.run("new.example.test")
    assert world.cert("new.example.test").acme_directory == A
    # When its CA fails, the renewal falls back in configured order (to the first CA).
    world.cas[B].errors = [_unreachable()]
    world.run("moved.example.test", force=True)
    back = world.cert("moved.example.test")
    assert back.acme_directory == A and back.fallback_reason == ""


def test_a_sticky_renewal_without_a_recorded_reason_says_it_stayed(world: World) -> None:
    world.add("legacy.example.test")
    world.cas[A].errors = [_caa()]
    world.run("legacy.example.test")
    cert = world.cert("legacy.example.test")
    world.storage.save_certificate(dataclasses.replace(cert, fallback_reason=""))
    world.run("legacy.example.test", force=True)
    assert world.cert("legacy.example.test").fallback_reason == STICKY_RENEWAL


def test_every_ca_failing_records_each_reason_and_the_earliest_retry_after(world: World) -> None:
    world.add("busy.example.test")
    for d, after in ((A, 7200), (B, 600), (C, 3600)):
        world.cas[d].errors = [_rate_limited(retry_after=after)]
    result = world.run("busy.example.test")
    error = result.failed["busy.example.test"]
    assert error.code == "acme_rate_limited" and error.retry_after == 600
    assert all(d in str(error) for d in (A, B, C))
    record = world.storage.get_domain("busy.example.test")
    assert record is not None and record.status == "failing"
    assert record.next_attempt_at == world.clock() + dt.timedelta(seconds=600)
    # At B's Retry-After only B may be asked (A and C still rest for this name).
    world.clock.now += dt.timedelta(seconds=600)
    world.run("busy.example.test")
    assert world.cert("busy.example.test").acme_directory == B
    assert [len(world.cas[d].calls) for d in (A, B, C)] == [1, 2, 1]


def test_one_ca_keeps_the_one_ca_behaviour(tmp_path: Path) -> None:
    """A bare issuer (the [acme] shorthand): a rate limit is the order's error as before."""
    storage = SqliteStorage(str(tmp_path / "one.db"))
    try:
        clock = Clock()
        ca = FakeCA(A, clock, errors=[_rate_limited(retry_after=120)])
        service = RenewalService(storage, CertStore(storage), ca, clock=clock,
                                 policy=RenewPolicy(account=A, extra_suffixes=("test",)))
        storage.add_domain("solo.example.test", "issuing", T0)
        storage.update_domain("solo.example.test", T0, status="issuing", next_attempt_at=T0)
        result = asyncio.run(service.run_pass(["solo.example.test"], refresh=False))
        error = result.failed["solo.example.test"]
        assert error.code == "acme_rate_limited" and "other CAs" not in str(error)
        record = storage.get_domain("solo.example.test")
        assert record is not None and record.next_attempt_at == T0 + dt.timedelta(seconds=120)
        asyncio.run(service.run_pass(["solo.example.test"], force=True, refresh=False))
        cert = storage.get_certificate("solo.example.test")
        assert cert is not None and cert.acme_directory == A and cert.fallback_reason == ""
    finally:
        storage.close()
