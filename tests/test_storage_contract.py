"""The one contract suite every ``Storage`` backend passes.

The first part is parametrized over ``BACKENDS`` and talks to a store only
through ``open_storage(url)`` and the ``Storage`` protocol, so a backend joins by
adding one line to ``BACKENDS``: SQLite (a file per test) and PostgreSQL (a fresh
schema per test on the machine's server; see ``pg_base_url`` in conftest, which
fails the run loudly when PostgreSQL is unreachable). The second part checks
what only the SQLite backend promises (file modes, WAL, secure delete, error
mapping, URL parsing); the third what only PostgreSQL promises (migrations,
unreachable server, notifications).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.errors import (
    ConfigError,
    DomainExists,
    DomainNotFound,
    StorageError,
    StorageUnavailable,
)
from edgeproxy.storage.base import FiringAlert, ProbeRecord
from edgeproxy.storage import (
    AccountRecord,
    CertificateRecord,
    ChallengeRecord,
    Storage,
    open_storage,
    sqlite_path_from_url,
)
from pgharness import temp_schema
from edgeproxy.storage.base import OutboxEvent
from edgeproxy.storage.sqlite import SqliteStorage

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
UTC_PLUS_2 = timezone(timedelta(hours=2))

# Spawn, like hypercorn's workers: children share nothing with the test process.
SPAWN = multiprocessing.get_context("spawn")


@contextmanager
def _sqlite_url(tmp_path: Path, _pg_base: str) -> Iterator[str]:
    # tmp_path is absolute, so this reads sqlite:///tmp/.../edgeproxy.db
    yield f"sqlite://{tmp_path}/state/edgeproxy.db"


# One line per backend: name -> context giving a fresh, empty store's URL
# (PostgreSQL: a new schema, dropped afterwards).
BACKENDS: dict[str, Callable[[Path, str], AbstractContextManager[str]]] = {
    "sqlite": _sqlite_url,
    "postgresql": lambda _tmp, pg_base: temp_schema(pg_base),
}


@pytest.fixture(params=sorted(BACKENDS))
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    pg_base = request.getfixturevalue("pg_base_url") if request.param == "postgresql" else ""
    with BACKENDS[request.param](tmp_path, pg_base) as fresh:
        yield fresh


@pytest.fixture
def store(url: str) -> Iterator[Storage]:
    s = open_storage(url)
    try:
        yield s
    finally:
        s.close()


def cert(hostname: str, n: int = 1, *, pad: int = 0) -> CertificateRecord:
    """A certificate whose key and chain carry the same marker ``n``."""
    return CertificateRecord(
        hostname=hostname,
        key_pem=f"KEY-{n:08d}-".encode() + b"k" * pad,
        chain_pem=f"CHAIN-{n:08d}-".encode() + b"c" * pad,
        not_before=NOW + timedelta(seconds=n),
        not_after=NOW + timedelta(days=90, seconds=n),
        serial=f"{n:x}",
        issuer="CN=Test CA,O=edgeproxy tests",
        created_at=NOW + timedelta(seconds=n, microseconds=7),
    )


def assert_consistent_pair(c: CertificateRecord) -> int:
    key_n = int(re.match(rb"KEY-(\d{8})-", c.key_pem).group(1))  # type: ignore[union-attr]
    chain_n = int(re.match(rb"CHAIN-(\d{8})-", c.chain_pem).group(1))  # type: ignore[union-attr]
    assert key_n == chain_n == int(c.serial, 16)
    assert c.not_before == NOW + timedelta(seconds=key_n)
    return key_n


# =====================================================================================
# Part 1: the contract, for every backend
# =====================================================================================

# -- domains ------------------------------------------------------------------------


def test_add_then_get_domain(store: Storage) -> None:
    rec = store.add_domain("cdn.shop.example", "pending_dns", NOW)
    assert rec.hostname == "cdn.shop.example"
    assert rec.status == "pending_dns"
    assert rec.created_at == rec.updated_at == NOW
    assert (rec.error_code, rec.error_message, rec.next_attempt_at, rec.attempts) == (
        None,
        None,
        None,
        0,
    )
    assert store.get_domain("cdn.shop.example") == rec
    assert store.get_domain("other.example") is None


def test_add_existing_raises_domain_exists_and_keeps_the_record(store: Storage) -> None:
    first = store.add_domain("a.example", "pending_dns", NOW)
    with pytest.raises(DomainExists) as info:
        store.add_domain("a.example", "issuing", NOW + timedelta(hours=1))
    assert info.value.code == "domain_exists"
    assert "a.example" in str(info.value)
    assert store.get_domain("a.example") == first


def test_list_domains_is_ordered_by_hostname(store: Storage) -> None:
    assert store.list_domains() == []
    for name in ["m.example", "a.example", "z.example", "b.example"]:
        store.add_domain(name, "pending_dns", NOW)
    assert [d.hostname for d in store.list_domains()] == [
        "a.example",
        "b.example",
        "m.example",
        "z.example",
    ]


def test_domain_statuses_and_counts_follow_the_records(store: Storage) -> None:
    """The monitor and /metrics read two columns, not whole records; the
    answers must be what ``list_domains`` says, in its order."""
    assert store.domain_statuses() == []
    assert store.count_domains_by_status() == {}
    for name in ["m.example", "a.example", "z.example", "b.example", "xn--bcher-kva.example", "a-b.example"]:
        store.add_domain(name, "pending_dns", NOW)
    store.update_domain("m.example", NOW, status="failing", error_code="dns", error_message="no CNAME")
    store.update_domain("z.example", NOW, status="active")
    store.update_domain("b.example", NOW, status="active")
    store.remove_domain("a.example")
    assert store.domain_statuses() == [(d.hostname, d.status) for d in store.list_domains()] == [
        ("a-b.example", "pending_dns"),
        ("b.example", "active"),
        ("m.example", "failing"),
        ("xn--bcher-kva.example", "pending_dns"),
        ("z.example", "active"),
    ]
    assert store.count_domains_by_status() == {"active": 2, "failing": 1, "pending_dns": 2}
    assert sum(store.count_domains_by_status().values()) == store.count_domains()


def test_update_domain_replaces_mutable_fields(store: Storage) -> None:
    store.add_domain("a.example", "pending_dns", NOW)
    later = NOW + timedelta(minutes=5)
    retry = NOW + timedelta(minutes=30, microseconds=1)
    rec = store.update_domain(
        "a.example",
        later,
        status="failing",
        error_code="acme_dns",
        error_message="no CNAME to edge.example.net",
        next_attempt_at=retry,
        attempts=3,
    )
    assert rec.created_at == NOW and rec.updated_at == later
    assert (rec.status, rec.error_code, rec.error_message, rec.next_attempt_at, rec.attempts) == (
        "failing",
        "acme_dns",
        "no CNAME to edge.example.net",
        retry,
        3,
    )
    assert store.get_domain("a.example") == rec
    # Replace, not merge: omitted fields go back to their defaults.
    cleared = store.update_domain("a.example", later, status="active")
    assert (cleared.error_code, cleared.error_message, cleared.next_attempt_at, cleared.attempts) == (
        None,
        None,
        None,
        0,
    )
    assert store.get_domain("a.example") == cleared


def test_update_missing_domain_raises_domain_not_found(store: Storage) -> None:
    with pytest.raises(DomainNotFound) as info:
        store.update_domain("ghost.example", NOW, status="active")
    assert info.value.code == "domain_not_found"
    assert store.get_domain("ghost.example") is None


def test_remove_domain(store: Storage) -> None:
    store.add_domain("a.example", "pending_dns", NOW)
    store.add_domain("b.example", "pending_dns", NOW)
    assert store.remove_domain("a.example") is True
    assert store.get_domain("a.example") is None
    assert [d.hostname for d in store.list_domains()] == ["b.example"]
    assert store.remove_domain("a.example") is False
    # Can be registered again, from scratch.
    again = store.add_domain("a.example", "pending_dns", NOW + timedelta(days=1))
    assert again.created_at == NOW + timedelta(days=1)


def test_remove_absent_domain_changes_nothing(store: Storage) -> None:
    store.add_domain("a.example", "pending_dns", NOW)
    store.put_challenge(ChallengeRecord("tok-ghost", "tok-ghost.thumb", "ghost.example", NOW))
    seq, _ = store.changes_since(0)
    assert store.remove_domain("ghost.example") is False
    assert store.changes_since(seq) == (seq, [])
    assert store.get_challenge("tok-ghost") is not None


def test_times_round_trip_exactly_as_utc(store: Storage) -> None:
    # A non-UTC aware time is the same instant; it comes back as UTC.
    local = datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC_PLUS_2)
    rec = store.add_domain("a.example", "pending_dns", local)
    got = store.get_domain("a.example")
    assert got is not None
    for value in (rec.created_at, got.created_at, got.updated_at):
        assert value == local
        assert value.utcoffset() == timedelta(0)
        assert value.microsecond == 999999
    early = datetime(1999, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc)
    got2 = store.update_domain("a.example", early, status="issuing", next_attempt_at=early)
    assert got2.updated_at == early and got2.next_attempt_at == early
    assert store.get_domain("a.example") == got2


def test_list_order_is_byte_order_whatever_the_locale(store: Storage) -> None:
    names = ["a.example", "a-b.example", "ab.example", "a0.example", "xn--bcher-kva.example", "b.example"]
    for name in names:
        store.add_domain(name, "pending_dns", NOW)
    assert [d.hostname for d in store.list_domains()] == sorted(names)
    assert store.changes_since(0)[1] == sorted(names)


# -- due domains, count, recent registrations -------------------------------


def _due_fixture(store: Storage) -> None:
    """Six domains around NOW: due ones at, before and a microsecond after NOW, one never."""
    plan = [
        ("at-now.example", "issuing", NOW),
        ("early.example", "active", NOW - timedelta(days=2)),
        ("late.example", "pending_dns", NOW + timedelta(microseconds=1)),
        ("never.example", "active", None),
        ("b-tie.example", "failing", NOW - timedelta(hours=1)),
        ("a-tie.example", "moved", NOW - timedelta(hours=1)),
    ]
    for name, status, next_at in plan:
        store.add_domain(name, "issuing", NOW - timedelta(days=3))
        store.update_domain(name, NOW - timedelta(days=3), status=status, next_attempt_at=next_at)


def test_due_domains_boundary_order_and_never(store: Storage) -> None:
    assert store.due_domains(NOW) == []
    _due_fixture(store)
    due = store.due_domains(NOW)
    # Most overdue first, ties by hostname; == now is due; None and later are not.
    assert [d.hostname for d in due] == ["early.example", "a-tie.example", "b-tie.example", "at-now.example"]
    assert due == [store.get_domain(d.hostname) for d in due]  # whole records
    assert [d.hostname for d in store.due_domains(NOW + timedelta(microseconds=1))][-1] == "late.example"
    assert store.due_domains(NOW - timedelta(days=3)) == []
    assert "never.example" not in {d.hostname for d in store.due_domains(datetime.max.replace(tzinfo=timezone.utc))}
    # The same instant in another zone gives the same answer.
    assert store.due_domains(NOW.astimezone(UTC_PLUS_2)) == due


def test_due_domains_status_filter_and_limit(store: Storage) -> None:
    _due_fixture(store)
    new_work = store.due_domains(NOW, statuses=("issuing", "pending_dns", "failing"))
    assert [d.hostname for d in new_work] == ["b-tie.example", "at-now.example"]
    assert [d.hostname for d in store.due_domains(NOW, statuses=["moved"])] == ["a-tie.example"]
    assert store.due_domains(NOW, statuses=()) == []
    assert store.due_domains(NOW, statuses=["renewing"]) == []
    assert [d.hostname for d in store.due_domains(NOW, limit=2)] == ["early.example", "a-tie.example"]
    assert [d.hostname for d in store.due_domains(NOW, statuses=["failing", "issuing"], limit=1)] == ["b-tie.example"]
    assert store.due_domains(NOW, limit=0) == []
    assert len(store.due_domains(NOW, limit=100)) == 4
    # A domain that becomes active without a next attempt leaves the due set.
    store.update_domain("early.example", NOW, status="active")
    assert "early.example" not in {d.hostname for d in store.due_domains(NOW)}


def test_count_domains_and_creation_times_window(store: Storage) -> None:
    assert store.count_domains() == 0
    assert store.domain_created_times_since(NOW - timedelta(days=365)) == []
    offsets = [timedelta(hours=-2), timedelta(minutes=-59), timedelta(hours=-1), timedelta(0),
               timedelta(minutes=-30, microseconds=-1)]
    for n, offset in enumerate(offsets):
        store.add_domain(f"d{n}.example", "issuing", NOW + offset)
    store.update_domain("d0.example", NOW, status="active")  # updated_at does not count
    assert store.count_domains() == len(offsets)
    hour_ago = NOW - timedelta(hours=1)
    # At or after ``since`` (the boundary included), oldest first, as UTC.
    assert store.domain_created_times_since(hour_ago) == [
        hour_ago, NOW - timedelta(minutes=59), NOW - timedelta(minutes=30, microseconds=1), NOW]
    assert store.domain_created_times_since(hour_ago + timedelta(microseconds=1)) == [
        NOW - timedelta(minutes=59), NOW - timedelta(minutes=30, microseconds=1), NOW]
    assert all(t.utcoffset() == timedelta(0) for t in store.domain_created_times_since(hour_ago))
    assert store.domain_created_times_since(NOW.astimezone(UTC_PLUS_2)) == [NOW]
    assert store.domain_created_times_since(NOW + timedelta(microseconds=1)) == []
    store.remove_domain("d3.example")
    assert store.count_domains() == len(offsets) - 1
    assert NOW not in store.domain_created_times_since(hour_ago)


# -- certificates ----------------------------------------------------------------------


def test_certificate_round_trip_and_replace(store: Storage) -> None:
    store.add_domain("a.example", "issuing", NOW)
    store.add_domain("b.example", "issuing", NOW)
    assert store.get_certificate("a.example") is None
    first = cert("a.example", 1, pad=3000)
    store.save_certificate(first)
    assert store.get_certificate("a.example") == first
    second = replace(cert("a.example", 2), issuer="CN=Other CA")
    store.save_certificate(second)
    assert store.get_certificate("a.example") == second
    assert store.get_certificate("b.example") is None


def test_save_certificate_without_domain_raises_domain_not_found(store: Storage) -> None:
    with pytest.raises(DomainNotFound):
        store.save_certificate(cert("never.example"))
    assert store.get_certificate("never.example") is None
    store.add_domain("gone.example", "issuing", NOW)
    store.remove_domain("gone.example")
    with pytest.raises(DomainNotFound):
        store.save_certificate(cert("gone.example"))
    assert store.get_certificate("gone.example") is None


def test_remove_deletes_certificate_key_and_challenges(store: Storage) -> None:
    for name in ("a.example", "b.example"):
        store.add_domain(name, "active", NOW)
        store.save_certificate(cert(name))
        store.put_challenge(ChallengeRecord(f"tok-{name}", f"tok-{name}.thumb", name, NOW))
    assert store.remove_domain("a.example") is True
    assert store.get_certificate("a.example") is None
    assert store.get_challenge("tok-a.example") is None
    # Re-registering does not resurrect the old key.
    store.add_domain("a.example", "pending_dns", NOW)
    assert store.get_certificate("a.example") is None
    # The neighbour is untouched.
    assert store.get_certificate("b.example") == cert("b.example")
    assert store.get_challenge("tok-b.example") is not None


def test_bulk_certificate_scan_matches_point_reads(store: Storage) -> None:
    # scan_certificates is not in the protocol, but every backend has it (the
    # certstore's start-up path).
    for name in ("a.example", "b.example", "c.example"):
        store.add_domain(name, "active", NOW)
    store.save_certificate(cert("a.example", 1, pad=500))
    store.save_certificate(cert("b.example", 2))
    many = [f"filler{i}.example" for i in range(600)]
    for names in (["a.example", "b.example", "c.example", "nope.example"], many + ["a.example", "b.example"]):
        seen: dict[str, tuple[bytes, bytes, bytes | None, datetime, str]] = {}
        registered = getattr(store, "scan_certificates")(
            names, lambda h, k, c, der, na, s: seen.__setitem__(h, (k, c, der, na, s)))
        assert registered == {n for n in names if store.get_domain(n) is not None}
        assert set(seen) == {"a.example", "b.example"}
        for host, (key, chain, der, not_after, serial) in seen.items():
            record = store.get_certificate(host)
            assert record is not None and (key, chain, not_after, serial) == (
                record.key_pem, record.chain_pem, record.not_after, record.serial)
            assert der is None  # these chains are not PEM: nothing to store as DER
    assert getattr(store, "scan_certificates")([], lambda *a: None) == set()


def _pem_chain(hostname: str, serial: int) -> tuple[bytes, bytes]:
    """(chain PEM of a self-signed leaf + a second certificate, the leaf's DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    certs = []
    for name in (hostname, "intermediate.test"):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certs.append(x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(key.public_key()).serial_number(serial)
                     .not_valid_before(NOW).not_valid_after(NOW + timedelta(days=90))
                     .sign(key, hashes.SHA256()))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return pem, certs[0].public_bytes(serialization.Encoding.DER)


def _scan_leaf_der(store: Storage, hostname: str) -> bytes | None:
    seen: dict[str, bytes | None] = {}
    getattr(store, "scan_certificates")([hostname], lambda h, k, c, der, na, s: seen.__setitem__(h, der))
    return seen[hostname]


def _raw_write(url: str, statement: str, params: tuple[Any, ...]) -> None:
    """Run one write on the store's database behind the backend's back ("?" placeholders)."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path_from_url(url))
        try:
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()
    else:
        with _raw(url) as pg:
            pg.execute(statement.replace("?", "%s"), params)


def test_save_stores_the_leaf_as_der_for_the_bulk_scan(store: Storage) -> None:
    # Start-up reads the leaf as DER instead of decoding 100,000 PEM leaves.
    store.add_domain("a.example", "active", NOW)
    chain, der = _pem_chain("a.example", 1)
    store.save_certificate(replace(cert("a.example"), chain_pem=chain))
    assert _scan_leaf_der(store, "a.example") == der
    renewed, renewed_der = _pem_chain("a.example", 2)
    store.save_certificate(replace(cert("a.example", 2), chain_pem=renewed))
    assert _scan_leaf_der(store, "a.example") == renewed_der != der
    record = store.get_certificate("a.example")
    assert record is not None and record.chain_pem == renewed  # the record itself is unchanged


def test_a_chain_upserted_without_the_der_clears_the_stale_der(url: str, store: Storage) -> None:
    """An older edgeproxy (before the 100,000-domain scale work) still writes to the same store (a
    downgrade, a node not yet upgraded): its upsert changes the chain and leaves
    leaf_der alone. The old DER must not survive next to the new chain."""
    store.add_domain("a.example", "active", NOW)
    chain, der = _pem_chain("a.example", 1)
    store.save_certificate(replace(cert("a.example"), chain_pem=chain))
    renewed, _ = _pem_chain("a.example", 2)
    # The upsert of the release before the 100,000-domain scale work, verbatim.
    _raw_write(url, "INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, "
               "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (hostname) DO UPDATE SET key_pem = excluded.key_pem, "
               "chain_pem = excluded.chain_pem, not_before = excluded.not_before, "
               "not_after = excluded.not_after, serial = excluded.serial, "
               "issuer = excluded.issuer, created_at = excluded.created_at",
               ("a.example", b"KEY-00000002-", renewed, "2025-03-01T12:00:02.000000Z",
                "2025-05-30T12:00:02.000000Z", "2", "CN=x", "2025-03-01T12:00:02.000000Z"))
    assert _scan_leaf_der(store, "a.example") is None  # the reader decodes the new chain instead
    # A write that does not change the chain keeps the DER (nothing is stale).
    store.save_certificate(replace(cert("a.example"), chain_pem=chain))
    _raw_write(url, "UPDATE certificates SET serial = ? WHERE hostname = ?", ("1", "a.example"))
    _raw_write(url, "UPDATE certificates SET chain_pem = chain_pem WHERE hostname = ?", ("a.example",))
    assert _scan_leaf_der(store, "a.example") == der


def test_certificate_records_the_acme_ca_that_issued_it_and_why(store: Storage) -> None:
    """Issuer fallback: the configured CA (its directory URL) and the reason it was not
    the first one travel with the certificate, replaced with it, "" when not given."""
    store.add_domain("a.example", "active", NOW)
    first = replace(cert("a.example", 1), acme_directory="https://ca-two.test/dir",
                    fallback_reason="https://ca-one.test/dir: outage (acme_unreachable): down")
    store.save_certificate(first)
    assert store.get_certificate("a.example") == first
    renewed = replace(cert("a.example", 2), acme_directory="https://ca-one.test/dir")
    store.save_certificate(renewed)
    got = store.get_certificate("a.example")
    assert got == renewed and got is not None and got.fallback_reason == ""
    store.save_certificate(cert("a.example", 3))  # imported, or a CA we do not know
    got = store.get_certificate("a.example")
    assert got is not None and (got.acme_directory, got.fallback_reason) == ("", "")


def test_a_chain_upserted_by_an_older_edgeproxy_is_not_credited_to_the_previous_ca(
        url: str, store: Storage) -> None:
    """A node still on the release before issuer fallback renews a certificate: its
    upsert leaves the CA columns alone, and they must not describe the new chain."""
    store.add_domain("a.example", "active", NOW)
    chain, _der = _pem_chain("a.example", 1)
    store.save_certificate(replace(cert("a.example"), chain_pem=chain, acme_directory="https://ca-two.test/dir",
                                   fallback_reason="https://ca-one.test/dir: caa (acme_caa): no"))
    renewed, der = _pem_chain("a.example", 2)
    # The upsert of the release before issuer fallback, verbatim.
    _raw_write(url, "INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, "
               "created_at, leaf_der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (hostname) DO UPDATE SET key_pem = excluded.key_pem, "
               "chain_pem = excluded.chain_pem, not_before = excluded.not_before, "
               "not_after = excluded.not_after, serial = excluded.serial, "
               "issuer = excluded.issuer, created_at = excluded.created_at, "
               "leaf_der = excluded.leaf_der",
               ("a.example", b"KEY-00000002-", renewed, "2025-03-01T12:00:02.000000Z",
                "2025-05-30T12:00:02.000000Z", "2", "CN=x", "2025-03-01T12:00:02.000000Z", der))
    got = store.get_certificate("a.example")
    assert got is not None and got.chain_pem == renewed and got.serial == "2"
    assert (got.acme_directory, got.fallback_reason) == ("", "")


# -- challenges ------------------------------------------------------------------------


def test_challenges_put_get_overwrite_delete(store: Storage) -> None:
    assert store.get_challenge("tok") is None
    ch = ChallengeRecord("tok", "tok.thumbprint", "a.example", NOW + timedelta(minutes=10))
    store.put_challenge(ch)
    store.put_challenge(ch)  # idempotent
    assert store.get_challenge("tok") == ch
    newer = ChallengeRecord("tok", "tok.other", "b.example", NOW + timedelta(minutes=20))
    store.put_challenge(newer)
    assert store.get_challenge("tok") == newer
    store.put_challenge(ChallengeRecord("tok2", "tok2.t", "a.example", NOW))
    store.delete_challenge("tok")
    assert store.get_challenge("tok") is None
    store.delete_challenge("tok")  # idempotent
    store.delete_challenge("never-published")
    assert store.get_challenge("tok2") is not None


# -- accounts --------------------------------------------------------------------------


def test_accounts_insert_or_replace_per_directory(store: Storage) -> None:
    le = "https://acme-v02.api.letsencrypt.org/directory"
    pebble = "https://127.0.0.1:14000/dir"
    assert store.get_account(le) is None
    acct = AccountRecord(le, b"-----BEGIN EC PRIVATE KEY-----\nabc\n", "")
    store.save_account(acct)
    assert store.get_account(le) == acct
    registered = replace(acct, registration_json='{"uri": "https://acme/acct/1"}')
    store.save_account(registered)
    assert store.get_account(le) == registered
    assert store.get_account(pebble) is None
    other = AccountRecord(pebble, b"other key", "{}")
    store.save_account(other)
    assert store.get_account(pebble) == other
    assert store.get_account(le) == registered
    assert store.list_accounts() == [other, registered]  # ordered by directory URL


# -- change feed -----------------------------------------------------------------------


def test_change_feed_order_and_monotonic_seq(store: Storage) -> None:
    seq0, hosts = store.changes_since(0)
    assert hosts == []
    store.add_domain("a.example", "pending_dns", NOW)
    seq1, hosts = store.changes_since(seq0)
    assert seq1 > seq0 and hosts == ["a.example"]
    store.add_domain("b.example", "pending_dns", NOW)
    store.add_domain("c.example", "pending_dns", NOW)
    seq2, hosts = store.changes_since(seq1)
    assert seq2 > seq1 and hosts == ["b.example", "c.example"]
    store.update_domain("a.example", NOW, status="issuing")
    seq3, hosts = store.changes_since(seq2)
    assert seq3 > seq2 and hosts == ["a.example"]
    store.save_certificate(cert("b.example"))
    seq4, hosts = store.changes_since(seq3)
    assert seq4 > seq3 and hosts == ["b.example"]
    assert store.changes_since(seq4) == (seq4, [])
    # Everything since seq1, in commit order (duplicates allowed by the contract).
    _, hosts = store.changes_since(seq1)
    assert [h for i, h in enumerate(hosts) if h not in hosts[i + 1 :]] == [
        "c.example",
        "a.example",
        "b.example",
    ]


def test_change_feed_reports_removals_and_ignores_non_domain_writes(store: Storage) -> None:
    store.add_domain("a.example", "active", NOW)
    store.save_certificate(cert("a.example"))
    seq, _ = store.changes_since(0)
    store.put_challenge(ChallengeRecord("t", "t.k", "a.example", NOW))
    store.save_account(AccountRecord("https://acme/dir", b"k", ""))
    assert store.try_lock("renewal", "me", 30, NOW)
    assert store.changes_since(seq) == (seq, [])
    store.remove_domain("a.example")
    newest, hosts = store.changes_since(seq)
    assert newest > seq and hosts == ["a.example"]


def test_changes_since_zero_lists_every_registered_hostname(store: Storage) -> None:
    for name in ("c.example", "a.example", "b.example"):
        store.add_domain(name, "pending_dns", NOW)
    store.save_certificate(cert("a.example"))
    store.remove_domain("c.example")
    newest, hosts = store.changes_since(0)
    assert {"a.example", "b.example"} <= set(hosts)
    assert store.changes_since(newest) == (newest, [])
    # A reader starting from this answer converges on later changes.
    store.add_domain("d.example", "pending_dns", NOW)
    later, hosts = store.changes_since(newest)
    assert later > newest and hosts == ["d.example"]


# -- locks -----------------------------------------------------------------------------


def test_lock_is_exclusive_extendable_and_taken_over_when_expired(store: Storage) -> None:
    assert store.try_lock("renewal", "A", 60, NOW) is True
    assert store.try_lock("renewal", "B", 60, NOW + timedelta(seconds=1)) is False
    assert store.try_lock("other-lock", "B", 60, NOW) is True  # names are independent
    # A extends its own lease: B is still refused after the original expiry.
    assert store.try_lock("renewal", "A", 60, NOW + timedelta(seconds=50)) is True
    assert store.try_lock("renewal", "B", 60, NOW + timedelta(seconds=70)) is False
    # After the extended lease (50 + 60 s) ran out, B takes over a crashed A.
    assert store.try_lock("renewal", "B", 0.5, NOW + timedelta(seconds=111)) is True
    assert store.try_lock("renewal", "A", 60, NOW + timedelta(seconds=111.2)) is False
    # Fractional ttl: B's 0.5 s lease is gone 0.6 s later.
    assert store.try_lock("renewal", "A", 60, NOW + timedelta(seconds=111.6)) is True


def test_unlock_only_by_owner(store: Storage) -> None:
    store.unlock("renewal", "nobody")  # absent lock: no-op
    assert store.try_lock("renewal", "A", 60, NOW)
    store.unlock("renewal", "B")  # not the owner: no-op
    assert store.try_lock("renewal", "B", 60, NOW) is False
    store.unlock("renewal", "A")
    assert store.try_lock("renewal", "B", 60, NOW) is True
    store.unlock("renewal", "B")
    store.unlock("renewal", "B")  # idempotent


def test_prune_and_a_reader_that_fell_behind(store: Storage) -> None:
    # prune_changes is not in the protocol, but every backend has it.
    sq: Any = store
    for name in ("a.example", "b.example", "c.example"):  # seq 1..3
        sq.add_domain(name, "pending_dns", NOW)
    sq.update_domain("c.example", NOW, status="issuing")  # 4
    sq.remove_domain("b.example")  # 5
    sq.add_domain("d.example", "pending_dns", NOW)  # 6
    assert sq.changes_since(1) == (6, ["b.example", "c.example", "c.example", "b.example", "d.example"])
    assert sq.prune_changes(keep_last=2) == 4
    assert sq.prune_changes(keep_last=2) == 0
    # Still answered incrementally from the retained rows.
    assert sq.changes_since(4) == (6, ["b.example", "d.example"])
    assert sq.changes_since(5) == (6, ["d.example"])
    assert sq.changes_since(6) == (6, [])
    # Fell behind the prune: all registered, then retained removals.
    full = (6, ["a.example", "c.example", "d.example", "b.example"])
    assert sq.changes_since(1) == full
    assert sq.changes_since(0) == full
    assert sq.changes_since(-5) == full
    assert sq.changes_since(99) == full  # a seq from another (replaced) database
    # Prune everything: seqs are never reused.
    sq.prune_changes(keep_last=0)
    assert sq.changes_since(6) == (6, [])
    sq.add_domain("e.example", "pending_dns", NOW)
    assert sq.changes_since(6) == (7, ["e.example"])
    with pytest.raises(ValueError):
        sq.prune_changes(-1)


# -- monitor state (alerts firing, last probes) ----------------------------------------


def _firing(key: str, at: datetime, summary: str = "down") -> FiringAlert:
    return FiringAlert(key, "probe_failing", "critical", summary, '{"hostname": "a.example"}', at, at)


def test_alert_claims_trigger_once_resend_after_interval_and_release_once(store: Storage) -> None:
    assert store.claim_alert(_firing("probe:a.example", NOW), resend_after=600) == "trigger"
    # The same alert again, too soon (a second node, a restart): nobody sends.
    assert store.claim_alert(_firing("probe:a.example", NOW + timedelta(seconds=599)), resend_after=600) is None
    later = NOW + timedelta(seconds=600)
    assert store.claim_alert(replace(_firing("probe:a.example", later, "still down"), since=later),
                             resend_after=600) == "resend"
    [firing] = store.firing_alerts()
    assert (firing.summary, firing.since, firing.last_sent) == ("still down", NOW, later)  # since kept
    assert store.release_alert("probe:a.example") == firing
    assert store.release_alert("probe:a.example") is None  # resolved once
    assert store.firing_alerts() == []


def test_concurrent_claims_of_one_alert_page_exactly_once(store: Storage) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: store.claim_alert(_firing("spool:age", NOW), resend_after=60),
                                range(16)))
    assert answers.count("trigger") == 1 and answers.count(None) == 15


def test_probe_results_are_kept_per_domain_and_go_with_it(store: Storage) -> None:
    store.add_domain("a.example", "active", NOW)
    store.add_domain("b.example", "active", NOW)
    store.save_probes([ProbeRecord("a.example", NOW, False, '{"ok": false}', 2),
                       ProbeRecord("b.example", NOW, True, '{"ok": true}', 0),
                       ProbeRecord("gone.example", NOW, True, "{}", 0)])  # removed meanwhile: not kept
    assert store.get_probe("a.example") == ProbeRecord("a.example", NOW, False, '{"ok": false}', 2)
    assert store.get_probe("gone.example") is None
    assert store.probe_failures() == {"a.example": 2}
    store.save_probes([ProbeRecord("a.example", NOW + timedelta(minutes=5), True, '{"ok": true}', 0)])
    assert store.probe_failures() == {}
    assert store.get_probe("a.example").checked_at == NOW + timedelta(minutes=5)  # type: ignore[union-attr]
    store.remove_domain("a.example")
    assert store.get_probe("a.example") is None
    assert store.get_probe("b.example") is not None


# -- persistence and concurrency -------------------------------------------------------


def test_data_survives_close_and_reopen(url: str) -> None:
    s = open_storage(url)
    s.add_domain("a.example", "active", NOW)
    s.save_certificate(cert("a.example", 5))
    seq, _ = s.changes_since(0)
    s.close()
    s2 = open_storage(url)
    try:
        assert s2.get_certificate("a.example") == cert("a.example", 5)
        assert s2.changes_since(seq) == (seq, [])
    finally:
        s2.close()


def test_threads_share_one_store(store: Storage) -> None:
    def work(i: int) -> bool:
        for j in range(10):
            store.add_domain(f"t{i}-{j}.example", "pending_dns", NOW)
            store.changes_since(0)
            assert store.get_domain(f"t{i}-{j}.example") is not None
        return store.try_lock("renewal", f"thread-{i}", 60, NOW)

    with ThreadPoolExecutor(max_workers=8) as pool:
        won = list(pool.map(work, range(8)))
    assert won.count(True) == 1
    assert len(store.list_domains()) == 80
    assert len(set(store.changes_since(0)[1])) == 80


def _race_worker(url: str, index: int, per_worker: int, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)  # everybody opens (and maybe creates) the store at once
        s = open_storage(url)
        try:
            for j in range(per_worker):
                s.add_domain(f"w{index}-{j}.example", "pending_dns", NOW)
            barrier.wait(timeout=60)  # everybody races for the lock at once
            won = s.try_lock("renewal", f"worker-{index}", 60, NOW)
            results.put((index, won, None))
        finally:
            s.close()
    except BaseException as exc:  # report, so the parent fails with the reason
        barrier.abort()  # and the others stop waiting for this one
        results.put((index, None, repr(exc)))


def test_processes_add_concurrently_and_exactly_one_wins_the_lock(url: str) -> None:
    workers, per_worker = 4, 10
    barrier = SPAWN.Barrier(workers)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_race_worker, args=(url, i, per_worker, barrier, results))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert [err for _, _, err in outcomes if err] == []
    assert sorted(won for _, won, _ in outcomes).count(True) == 1
    s = open_storage(url)
    try:
        names = {d.hostname for d in s.list_domains()}
        expected = {f"w{i}-{j}.example" for i in range(workers) for j in range(per_worker)}
        assert names == expected
        assert set(s.changes_since(0)[1]) == expected
        winner = next(i for i, won, _ in outcomes if won)
        assert s.try_lock("renewal", "outsider", 60, NOW) is False
        assert s.try_lock("renewal", f"worker-{winner}", 60, NOW) is True
    finally:
        s.close()


def _crash_worker(url: str, hostname: str, started: Any) -> None:
    s = open_storage(url)
    n = 0
    while True:  # until SIGKILL
        n += 1
        s.save_certificate(cert(hostname, n, pad=6000))
        if n == 20:
            started.set()


def test_sigkill_during_saves_leaves_a_consistent_pair(url: str) -> None:
    s = open_storage(url)
    s.add_domain("crash.example", "issuing", NOW)
    s.close()
    started = SPAWN.Event()
    proc = SPAWN.Process(target=_crash_worker, args=(url, "crash.example", started))
    proc.start()
    assert proc.pid is not None
    try:
        assert started.wait(timeout=60), "the writer never got going"
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    s = open_storage(url)
    try:
        c = s.get_certificate("crash.example")
        assert c is not None
        assert assert_consistent_pair(c) >= 20
        # The store still takes writes after the crash.
        s.save_certificate(cert("crash.example", 1))
        assert s.get_certificate("crash.example") == cert("crash.example", 1)
    finally:
        s.close()
    if url.startswith("sqlite:"):
        raw = sqlite3.connect(sqlite_path_from_url(url))
        try:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            raw.close()


# -- lifecycle-webhook outbox (EventOutbox) ------------------------------------------------


def _event(hostname: str, n: int, endpoint: str = "https://app.example/hook", *, at: datetime = NOW,
           event_id: str | None = None) -> OutboxEvent:
    return OutboxEvent(event_id or f"evt_{hostname}_{n}", endpoint, "domain.active", hostname, at,
                       f'{{"n":{n},"hostname":"{hostname}"}}')


def test_outbox_rows_are_written_with_each_state_change(store: Storage) -> None:
    store.add_domain("a.example.com", "issuing", NOW, events=[_event("a.example.com", 1)])
    store.update_domain("a.example.com", NOW, status="active", events=[_event("a.example.com", 2)])
    store.save_certificate(cert("a.example.com"), events=[_event("a.example.com", 3)])
    assert store.remove_domain("a.example.com", events=[_event("a.example.com", 4)])
    rows = store.list_deliveries()
    assert [r.event_id for r in rows] == [f"evt_a.example.com_{n}" for n in (4, 3, 2, 1)]  # newest first
    first = rows[-1]
    assert (first.state, first.attempts, first.next_attempt_at, first.horizon_from) == ("pending", 0, NOW, NOW)
    assert first.payload == '{"n":1,"hostname":"a.example.com"}' and first.occurred_at == NOW
    assert store.count_deliveries_by_state() == {"pending": 4}


def test_a_refused_state_change_writes_no_event(store: Storage) -> None:
    store.add_domain("a.example.com", "issuing", NOW)
    with pytest.raises(DomainExists):
        store.add_domain("a.example.com", "issuing", NOW, events=[_event("a.example.com", 1)])
    with pytest.raises(DomainNotFound):
        store.update_domain("b.example.com", NOW, status="active", events=[_event("b.example.com", 2)])
    with pytest.raises(DomainNotFound):
        store.save_certificate(cert("b.example.com"), events=[_event("b.example.com", 3)])
    assert not store.remove_domain("b.example.com", events=[_event("b.example.com", 4)])
    assert store.list_deliveries() == []


def test_append_is_idempotent_per_event_and_endpoint(store: Storage) -> None:
    assert store.append_events([_event("a.example.com", 1), _event("a.example.com", 1, "https://other/")]) == 2
    assert store.append_events([_event("a.example.com", 1)]) == 0
    assert store.append_events([]) == 0
    assert len(store.list_deliveries()) == 2


def test_claims_hand_out_one_head_of_line_per_endpoint_and_domain(store: Storage) -> None:
    store.append_events([_event("a.example.com", n) for n in (1, 2, 3)] + [_event("b.example.com", 1)]
                        + [_event("a.example.com", 9, "https://other/")])
    heads = store.claim_deliveries("me", NOW, 60, 10)
    assert [h.event_id for h in heads] == ["evt_a.example.com_1", "evt_b.example.com_1", "evt_a.example.com_9"]
    # Claimed rows are not handed out again, and nothing behind them is either.
    assert store.claim_deliveries("me", NOW, 60, 10) == []
    a1 = heads[0]
    assert store.record_attempt(a1.seq, "me", NOW, state="delivered", next_attempt_at=NOW, error=None, status=200)
    assert [h.event_id for h in store.claim_deliveries("me", NOW, 60, 10)] == ["evt_a.example.com_2"]


def test_a_retried_head_holds_its_domain_back_and_a_dead_one_does_not(store: Storage) -> None:
    store.append_events([_event("a.example.com", n) for n in (1, 2)])
    (a1,) = store.claim_deliveries("me", NOW, 60, 10)
    later = NOW + timedelta(minutes=5)
    assert store.record_attempt(a1.seq, "me", NOW, state="pending", next_attempt_at=later, error="HTTP 503: down",
                                status=503)
    assert store.claim_deliveries("me", NOW + timedelta(minutes=1), 60, 10) == []  # a1 not due; a2 waits
    (again,) = store.claim_deliveries("me", later, 60, 10)
    assert (again.event_id, again.attempts, again.last_status, again.last_error) == (
        "evt_a.example.com_1", 1, 503, "HTTP 503: down")
    assert store.record_attempt(again.seq, "me", later, state="dead", next_attempt_at=later, error="gone",
                                status=None)
    assert [d.event_id for d in store.claim_deliveries("me", later, 60, 10)] == ["evt_a.example.com_2"]
    assert store.count_deliveries_by_state() == {"pending": 1, "dead": 1}
    assert [d.event_id for d in store.list_deliveries(state="dead")] == ["evt_a.example.com_1"]


def test_a_claim_is_a_lease(store: Storage) -> None:
    store.append_events([_event("a.example.com", 1)])
    (mine,) = store.claim_deliveries("node-a", NOW, 30, 10)
    assert store.claim_deliveries("node-b", NOW + timedelta(seconds=29), 30, 10) == []
    # node-a crashed: once its lease runs out, node-b gets the row, and node-a's late answer no longer counts.
    (theirs,) = store.claim_deliveries("node-b", NOW + timedelta(seconds=30), 30, 10)
    assert theirs.seq == mine.seq
    assert not store.record_attempt(mine.seq, "node-a", NOW, state="delivered", next_attempt_at=NOW, error=None,
                                    status=200)
    assert store.record_attempt(theirs.seq, "node-b", NOW, state="delivered", next_attempt_at=NOW, error=None,
                                status=204)
    (done,) = store.list_deliveries()
    assert (done.state, done.attempts, done.delivered_at, done.last_status) == ("delivered", 1, NOW, 204)


def test_concurrent_claimers_never_share_a_row(url: str) -> None:
    with open_storage(url) as setup:
        setup.append_events([_event(f"h{n}.example.com", 1) for n in range(60)])
    stores = [open_storage(url) for _ in range(4)]
    try:
        def claim_all(i: int) -> list[int]:
            got: list[int] = []
            while True:
                batch = stores[i].claim_deliveries(f"owner-{i}", NOW, 60, 3)
                if not batch:
                    return got
                got.extend(d.seq for d in batch)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(claim_all, range(4)))
    finally:
        for s in stores:
            s.close()
    claimed = [seq for r in results for seq in r]
    assert len(claimed) == 60 and len(set(claimed)) == 60


def test_redeliver_makes_an_event_due_again_with_a_fresh_horizon(store: Storage) -> None:
    store.append_events([_event("a.example.com", 1), _event("a.example.com", 1, "https://other/")])
    for d in store.claim_deliveries("me", NOW, 60, 10):
        store.record_attempt(d.seq, "me", NOW, state="delivered" if d.endpoint == "https://other/" else "dead",
                             next_attempt_at=NOW, error=None, status=200)
    later = NOW + timedelta(days=1)
    assert store.redeliver_event("evt_a.example.com_1", later) == 2
    assert store.redeliver_event("evt_unknown", later) == 0
    rows = store.list_deliveries(event_id="evt_a.example.com_1")
    assert {(r.state, r.next_attempt_at, r.horizon_from) for r in rows} == {("pending", later, later)}
    assert len(store.claim_deliveries("me", later, 60, 10)) == 2


def test_prune_keeps_pending_rows(store: Storage) -> None:
    store.append_events([_event("a.example.com", 1), _event("b.example.com", 1),
                         _event("c.example.com", 1, at=NOW + timedelta(days=2))])
    for d in store.claim_deliveries("me", NOW + timedelta(days=2), 60, 10):
        if d.hostname != "b.example.com":
            store.record_attempt(d.seq, "me", NOW, state="delivered", next_attempt_at=NOW, error=None, status=200)
    assert store.prune_deliveries(NOW + timedelta(days=1)) == 1  # a: delivered and old; b pending; c recent
    assert sorted(d.hostname for d in store.list_deliveries()) == ["b.example.com", "c.example.com"]
    assert [d.hostname for d in store.list_deliveries(hostname="c.example.com", limit=5)] == ["c.example.com"]


def test_expiring_certificates(store: Storage) -> None:
    for host, n in (("b.example.com", 1), ("a.example.com", 2), ("c.example.com", 3)):
        store.add_domain(host, "active", NOW)
        store.save_certificate(cert(host, n))
    assert store.expiring_certificates(NOW + timedelta(days=90, seconds=3)) == [("a.example.com", "2"),
                                                                               ("b.example.com", "1")]
    assert store.expiring_certificates(NOW) == []


# =====================================================================================
# Part 2: what only the SQLite backend promises
# =====================================================================================


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "edgeproxy.db")


@pytest.fixture
def sq(db_path: str) -> Iterator[SqliteStorage]:
    s = SqliteStorage(db_path)
    try:
        yield s
    finally:
        s.close()


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sqlite_files_are_private_whatever_the_umask(db_path: str) -> None:
    old = os.umask(0o022)
    try:
        s = SqliteStorage(db_path)
        s.add_domain("a.example", "active", NOW)
        s.save_certificate(cert("a.example"))
        # A second thread's connection must not loosen anything either.
        t = threading.Thread(target=lambda: s.get_certificate("a.example"))
        t.start()
        t.join()
        assert _mode(os.path.dirname(db_path)) == 0o700
        for suffix in ("", "-wal", "-shm"):
            assert os.path.exists(db_path + suffix), suffix
            assert _mode(db_path + suffix) == 0o600, suffix
        s.close()
    finally:
        os.umask(old)


def test_sqlite_pragmas_and_schema_version(sq: SqliteStorage, db_path: str) -> None:
    conn = sq._file.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    # Opening again is idempotent: still exactly one version row.
    SqliteStorage(db_path).close()
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_sqlite_adds_leaf_der_to_an_older_file_whose_rows_read_none(db_path: str) -> None:
    """A file written before leaf_der existed gets the column (and the
    trigger) on open; its rows read leaf_der None, new saves fill it."""
    SqliteStorage(db_path).close()
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("DROP TRIGGER certificates_leaf_der_stale")
    raw.execute("ALTER TABLE certificates DROP COLUMN leaf_der")  # now the file of the release before
    raw.execute("INSERT INTO domains (hostname, status, created_at, updated_at) VALUES "
                "('old.example', 'active', '2025-03-01T12:00:00.000000Z', '2025-03-01T12:00:00.000000Z')")
    chain, der = _pem_chain("old.example", 1)
    raw.execute("INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, "
                "created_at) VALUES ('old.example', X'00', ?, '2025-03-01T12:00:00.000000Z', "
                "'2025-05-30T12:00:00.000000Z', '1', 'CN=x', '2025-03-01T12:00:00.000000Z')", (chain,))
    raw.close()
    s = SqliteStorage(db_path)
    try:
        conn = s._file.connection()
        assert "leaf_der" in {row[1] for row in conn.execute("PRAGMA table_info(certificates)")}
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'").fetchone() == (1,)
        assert _scan_leaf_der(s, "old.example") is None
        record = s.get_certificate("old.example")
        assert record is not None and record.chain_pem == chain
        s.save_certificate(record)
        assert _scan_leaf_der(s, "old.example") == der
        SqliteStorage(db_path).close()  # opening again adds nothing twice
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        s.close()


def test_sqlite_adds_the_acme_ca_columns_to_an_older_file(db_path: str) -> None:
    """A file of the release before issuer fallback gets the columns on open (no
    schema_version bump); its certificates read as from an unknown CA."""
    SqliteStorage(db_path).close()
    raw = sqlite3.connect(db_path, isolation_level=None)
    for column in ("acme_directory", "fallback_reason", "acme_serial"):
        raw.execute(f"ALTER TABLE certificates DROP COLUMN {column}")
    raw.execute("INSERT INTO domains (hostname, status, created_at, updated_at) VALUES "
                "('old.example', 'active', '2025-03-01T12:00:00.000000Z', '2025-03-01T12:00:00.000000Z')")
    raw.execute("INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, issuer, "
                "created_at) VALUES ('old.example', X'00', X'01', '2025-03-01T12:00:00.000000Z', "
                "'2025-05-30T12:00:00.000000Z', '1', 'CN=x', '2025-03-01T12:00:00.000000Z')")
    raw.close()
    s = SqliteStorage(db_path)
    try:
        columns = {row[1] for row in s._file.connection().execute("PRAGMA table_info(certificates)")}
        assert {"acme_directory", "fallback_reason", "acme_serial"} <= columns
        record = s.get_certificate("old.example")
        assert record is not None and (record.acme_directory, record.fallback_reason) == ("", "")
        s.save_certificate(replace(record, acme_directory="https://ca.test/dir"))
        again = s.get_certificate("old.example")
        assert again is not None and again.acme_directory == "https://ca.test/dir"
        SqliteStorage(db_path).close()  # opening again adds nothing twice
        assert s._file.connection().execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        s.close()


def test_sqlite_remove_leaves_no_key_bytes_in_the_files(sq: SqliteStorage, db_path: str) -> None:
    secret = os.urandom(24).hex().encode()
    sq.add_domain("a.example", "active", NOW)
    sq.save_certificate(replace(cert("a.example"), key_pem=b"KEY-" + secret * 100))
    sq._file.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    assert secret in Path(db_path).read_bytes()  # the scan below can see it
    assert sq.remove_domain("a.example") is True
    for suffix in ("", "-wal"):
        if os.path.exists(db_path + suffix):
            data = Path(db_path + suffix).read_bytes()
            assert secret not in data, suffix
            assert b"CHAIN-00000001" not in data, suffix


def test_sqlite_prunes_opportunistically(db_path: str) -> None:
    s = SqliteStorage(db_path, keep_changes=3)
    s.PRUNE_EVERY = 4
    try:
        s.add_domain("x.example", "pending_dns", NOW)
        for _ in range(11):
            s.update_domain("x.example", NOW, status="issuing")
        rows = s._file.connection().execute("SELECT seq FROM changes ORDER BY seq").fetchall()
        assert rows == [(10,), (11,), (12,)]
        assert s.changes_since(1) == (12, ["x.example"])
        assert s.changes_since(9) == (12, ["x.example"] * 3)
    finally:
        s.close()


def test_sqlite_busy_writer_maps_to_storage_unavailable(db_path: str) -> None:
    s = SqliteStorage(db_path, busy_timeout=0.05)
    s.add_domain("a.example", "active", NOW)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable) as info:
            s.add_domain("b.example", "pending_dns", NOW)
        assert info.value.code == "storage_unavailable"
        assert "busy" in str(info.value) and db_path in str(info.value)
        with pytest.raises(StorageUnavailable):
            s.try_lock("renewal", "A", 60, NOW)
        # WAL: readers are not blocked by the writer.
        assert s.get_domain("a.example") is not None
        blocker.execute("ROLLBACK")
        s.add_domain("b.example", "pending_dns", NOW)  # the connection is still usable
    finally:
        blocker.close()
        s.close()


def test_sqlite_unopenable_and_broken_files(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(StorageUnavailable, match="cannot be opened"):
        SqliteStorage(str(tmp_path / "a-directory"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="cannot create the storage directory"):
        SqliteStorage(str(tmp_path / "a-file" / "x.db"))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file " * 200)
    with pytest.raises(StorageError) as info:
        SqliteStorage(str(garbage))
    assert not isinstance(info.value, StorageUnavailable)
    assert "not a database" in str(info.value)


def test_sqlite_refuses_a_newer_schema(db_path: str) -> None:
    SqliteStorage(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE schema_version SET version = 2")
    raw.commit()
    raw.close()
    with pytest.raises(StorageError, match="schema version 2"):
        SqliteStorage(db_path)


def test_sqlite_closed_store_raises_and_close_is_idempotent(db_path: str) -> None:
    s = SqliteStorage(db_path)
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.get_domain("a.example")


def test_sqlite_rejects_naive_times_and_unknown_statuses(sq: SqliteStorage) -> None:
    with pytest.raises(ValueError, match="naive"):
        sq.add_domain("a.example", "pending_dns", datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="status"):
        sq.add_domain("a.example", "bogus", NOW)
    assert sq.get_domain("a.example") is None
    sq.add_domain("a.example", "pending_dns", NOW)
    with pytest.raises(ValueError, match="status"):
        sq.update_domain("a.example", NOW, status="bogus")


def _use_inherited(s: SqliteStorage, parent_conn: sqlite3.Connection, results: Any) -> None:
    try:
        s.add_domain("child.example", "pending_dns", NOW)
        # Never the connection opened before fork (sqlite.org/howtocorrupt.html 2.6).
        results.put(s._file.connection() is not parent_conn and s.get_domain("child.example") is not None)
    except BaseException as exc:
        results.put(repr(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sqlite_instance_inherited_through_fork_opens_its_own_connection(
    sq: SqliteStorage,
) -> None:
    fork = multiprocessing.get_context("fork")
    sq.add_domain("parent.example", "pending_dns", NOW)
    results = fork.Queue()
    proc = fork.Process(target=_use_inherited, args=(sq, sq._file.connection(), results))
    proc.start()
    try:
        assert results.get(timeout=30) is True
    finally:
        proc.join(timeout=30)
    assert proc.exitcode == 0
    assert {d.hostname for d in sq.list_domains()} == {"parent.example", "child.example"}


def test_sqlite_thread_connections_are_reaped(sq: SqliteStorage) -> None:
    for _ in range(5):
        t = threading.Thread(target=sq.list_domains)
        t.start()
        t.join()
    sq.list_domains()  # opening nothing new: the main thread's connection exists
    t = threading.Thread(target=sq.list_domains)
    t.start()
    t.join()
    assert len(sq._file._conns) <= 2  # the main thread's, and at most the last dead one


# -- open_storage ----------------------------------------------------------------------


def test_open_storage_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_path_from_url("sqlite:///var/lib/edgeproxy/edgeproxy.db") == (
        "/var/lib/edgeproxy/edgeproxy.db"
    )
    assert sqlite_path_from_url("sqlite:////var/lib/edgeproxy/edgeproxy.db") == (
        "/var/lib/edgeproxy/edgeproxy.db"
    )
    assert sqlite_path_from_url("SQLite:state/x.db") == "state/x.db"
    s = open_storage(f"sqlite://{tmp_path}/abs.db")
    assert isinstance(s, SqliteStorage) and s.path == f"{tmp_path}/abs.db"
    s.close()
    monkeypatch.chdir(tmp_path)
    s = open_storage("sqlite:rel/r.db")
    assert isinstance(s, SqliteStorage) and s.path == f"{tmp_path}/rel/r.db"
    s.close()
    assert (tmp_path / "rel" / "r.db").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "edgeproxy.db",
        "sqlite:",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite::memory:",
        "sqlite:///tmp/x.db?mode=ro",
        "mysql://user:s3cret@db/edgeproxy",
    ],
)
def test_open_storage_rejects_bad_urls(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_storage(bad)
    assert info.value.code == "config"
    assert "s3cret" not in str(info.value)


def test_sqlite_storage_satisfies_the_protocol(sq: SqliteStorage) -> None:
    s: Storage = sq  # checked by mypy too, through open_storage's return type
    for name in dir(Storage):
        if not name.startswith("_"):
            assert callable(getattr(s, name)), name



def test_sqlite_adds_the_due_indexes_to_an_existing_file_and_uses_them(db_path: str) -> None:
    """A file written before the indexes existed gets them on open (no
    schema_version bump: older edgeproxy versions still open it), and the due and
    recent-registration queries are index range scans, not table scans."""
    SqliteStorage(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("DROP INDEX domains_next_attempt")
    raw.execute("DROP INDEX domains_created")
    raw.execute("INSERT INTO domains (hostname, status, created_at, updated_at, next_attempt_at) "
                "VALUES ('old.example', 'issuing', '2025-01-01T00:00:00.000000Z', "
                "'2025-01-01T00:00:00.000000Z', '2025-01-01T00:00:00.000000Z')")
    raw.commit()
    raw.close()
    s = SqliteStorage(db_path)
    try:
        assert [d.hostname for d in s.due_domains(NOW)] == ["old.example"]
        conn = sqlite3.connect(db_path)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"domains_next_attempt", "domains_created"} <= indexes
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        due_plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM domains WHERE next_attempt_at <= ? AND status IN (?, ?) "
            "ORDER BY next_attempt_at, hostname LIMIT 10", ("x", "issuing", "failing")))
        assert "INDEX domains_next_attempt (next_attempt_at<?)" in due_plan and "TEMP B-TREE" not in due_plan
        created_plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT created_at FROM domains WHERE created_at >= ? ORDER BY created_at", ("x",)))
        assert "domains_created" in created_plan
        conn.close()
    finally:
        s.close()


# == budget ledger and status history (every backend) ==========================


def test_budget_events_count_by_kind_key_and_window(store: Storage) -> None:
    for minutes in (0, 10, 70):
        store.record_event("failed_validation", "a.example.test", NOW + timedelta(minutes=minutes))
    store.record_event("failed_validation", "b.example.test", NOW)
    store.record_event("order", "a.example.test", NOW)
    since = NOW + timedelta(minutes=5)
    assert store.events_since("failed_validation", "a.example.test", since) == [
        NOW + timedelta(minutes=10), NOW + timedelta(minutes=70)]
    assert store.events_since("failed_validation", "a.example.test", NOW)[0] == NOW  # inclusive bound
    assert store.events_since("order", "nobody", NOW) == []
    assert store.prune_events(NOW + timedelta(minutes=10)) == 3  # the three at NOW
    assert store.events_since("failed_validation", "a.example.test", NOW) == [
        NOW + timedelta(minutes=10), NOW + timedelta(minutes=70)]


def test_status_history_newest_first_and_removed_with_the_domain(store: Storage) -> None:
    from edgeproxy.storage.base import StatusEvent

    store.add_domain("h.example.test", "issuing", NOW)
    store.add_status_event(StatusEvent("h.example.test", NOW, "pending_dns", "dns_missing", "add a CNAME"))
    store.add_status_event(StatusEvent("h.example.test", NOW + timedelta(seconds=1), "active"))
    history = store.status_history("h.example.test")
    assert [e.status for e in history] == ["active", "pending_dns"]
    assert history[1] == StatusEvent("h.example.test", NOW, "pending_dns", "dns_missing", "add a CNAME")
    assert len(store.status_history("h.example.test", limit=1)) == 1
    assert store.status_history("other.example.test") == []
    store.remove_domain("h.example.test")
    assert store.status_history("h.example.test") == []


def test_ari_state_round_trip_replace_and_removed_with_the_domain(store: Storage) -> None:
    from edgeproxy.storage.base import AriState

    store.add_domain("ari.example.test", "active", NOW)
    assert store.get_ari("ari.example.test") is None
    state = AriState("ari.example.test", "0a1b", "aki.serial", None, NOW + timedelta(hours=6), NOW)
    store.save_ari(state)
    assert store.get_ari("ari.example.test") == state
    newer = replace(state, renew_at=NOW + timedelta(days=30))
    store.save_ari(newer)
    assert store.get_ari("ari.example.test") == newer
    store.remove_domain("ari.example.test")
    assert store.get_ari("ari.example.test") is None



# =====================================================================================
# -- failed-request log (every backend)
# =====================================================================================

from edgeproxy.storage import FailedRequestRecord  # noqa: E402


def failed(key: str, *, domain: str = "a.example.com", status: int = 401, received: datetime = NOW,
           logged: datetime | None = None) -> FailedRequestRecord:
    return FailedRequestRecord(
        idempotency_key=key, domain=domain, method="POST", target="/collect?v=1",
        headers=((b"content-type", b"application/json"), (b"idempotency-key", key.encode()),
                 (b"x-odd", bytes(range(128, 140)))),
        body=b'{"e":"' + key.encode() + b'"}\x00\xff', client="203.0.113.9", status=status, origin="relay",
        received_at=received, logged_at=logged or received,
    )


def test_failed_log_round_trip_filters_and_order(store: Storage) -> None:
    ids = [store.log_failed_request(failed(f"k{i}", domain="a.example.com" if i % 2 else "b.example.com",
                                            status=401 if i < 3 else 403, received=NOW + timedelta(minutes=i)))
           for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    everything = store.find_failed_requests()
    assert [r.idempotency_key for r in everything] == ["k0", "k1", "k2", "k3", "k4"]
    first = everything[0]
    assert first == replace(failed("k0", domain="b.example.com"), id=ids[0])  # bytes headers/body exact
    assert [r.idempotency_key for r in store.find_failed_requests(domain="a.example.com")] == ["k1", "k3"]
    assert [r.idempotency_key for r in store.find_failed_requests(status=403)] == ["k3", "k4"]
    window = store.find_failed_requests(since=NOW + timedelta(minutes=1), until=NOW + timedelta(minutes=3))
    assert [r.idempotency_key for r in window] == ["k1", "k2"]
    assert [r.idempotency_key for r in store.find_failed_requests(limit=2, after_id=ids[1])] == ["k2", "k3"]
    assert store.count_failed_requests() == 5
    assert store.count_failed_requests(domain="a.example.com", status=401) == 1
    assert store.count_failed_requests(since=NOW + timedelta(minutes=1), until=NOW + timedelta(minutes=3)) == 2
    store.mark_failed_delivered([ids[0]], NOW)
    assert (store.count_failed_requests(), store.count_failed_requests(delivered=True),
            store.count_failed_requests(delivered=None)) == (4, 1, 5)


def test_failed_log_is_idempotent_per_key_and_marks_delivered_once(store: Storage) -> None:
    first = store.log_failed_request(failed("k1"))
    again = store.log_failed_request(failed("k1", status=500, logged=NOW + timedelta(hours=1)))
    assert first == again
    (record,) = store.find_failed_requests(delivered=None)
    assert record.status == 500 and record.logged_at == NOW + timedelta(hours=1)
    other = store.log_failed_request(failed("k2"))
    assert store.mark_failed_delivered([first], NOW) == 1
    assert store.mark_failed_delivered([first, other], NOW + timedelta(seconds=1)) == 1  # first already done
    assert store.find_failed_requests() == []  # default: undelivered only
    delivered = store.find_failed_requests(delivered=True)
    assert [(r.idempotency_key, r.delivered_at) for r in delivered] == [
        ("k1", NOW), ("k2", NOW + timedelta(seconds=1))]
    assert store.mark_failed_delivered([], NOW) == 0


def test_failed_log_pruned_after_retention_with_the_clock_passed_in(store: Storage) -> None:
    from edgeproxy.edge.spool import prune_failed_log

    store.log_failed_request(failed("old", logged=NOW - timedelta(days=90, seconds=1)))
    store.log_failed_request(failed("edge", logged=NOW - timedelta(days=90)))
    store.log_failed_request(failed("new", logged=NOW - timedelta(days=89)))
    assert prune_failed_log(store, NOW, 90) == 1
    assert [r.idempotency_key for r in store.find_failed_requests(delivered=None)] == ["edge", "new"]
    # 90 days after the newest: everything is gone.
    assert prune_failed_log(store, NOW + timedelta(days=90, seconds=1), 90) == 2
    assert store.find_failed_requests(delivered=None) == []


# =====================================================================================
# =====================================================================================


# =====================================================================================
# Part 3: what only the PostgreSQL backend promises
# =====================================================================================


def _raw(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True)


def test_postgres_migrate_is_versioned_idempotent_and_concurrent(pg_url: str) -> None:
    from edgeproxy.storage import migrate_storage
    from edgeproxy.storage.postgres import SCHEMA_VERSION, PostgresStorage

    # Six nodes starting at once on an empty schema: every one opens, one migrates.
    with ThreadPoolExecutor(max_workers=6) as pool:
        stores = list(pool.map(lambda _i: open_storage(pg_url), range(6)))
    befores = sorted(s.last_migration[0] for s in stores if isinstance(s, PostgresStorage))
    assert befores == [0] + [SCHEMA_VERSION] * 5
    for s in stores:
        s.close()
    assert migrate_storage(pg_url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    with _raw(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_postgres_auto_migrate_off_refuses_an_old_or_newer_schema(pg_url: str) -> None:
    from edgeproxy.storage import migrate_storage
    from edgeproxy.storage.postgres import SCHEMA_VERSION

    with pytest.raises(StorageError, match="run `edgeproxy migrate`"):
        open_storage(pg_url, auto_migrate=False)
    with _raw(pg_url) as conn:  # refused without creating anything
        assert conn.execute("SELECT to_regclass('domains')").fetchone() == (None,)
    assert migrate_storage(pg_url) == (0, SCHEMA_VERSION)
    s = open_storage(pg_url, auto_migrate=False)
    s.add_domain("a.example", "active", NOW)
    s.close()
    with _raw(pg_url) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    for auto in (True, False):
        with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
            open_storage(pg_url, auto_migrate=auto)


def test_postgres_unreachable_server_is_storage_unavailable_without_the_password() -> None:
    from edgeproxy.devtools.edgeproc import free_port

    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        open_storage(f"postgresql://edge:s3cret@127.0.0.1:{free_port()}/edgeproxy")
    assert time.monotonic() - started < 15
    assert info.value.code == "storage_unavailable"
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)
    with pytest.raises(StorageError) as bad:
        open_storage("postgresql://edge:s3cret@host/db?not_a_libpq_option=1")
    assert "s3cret" not in str(bad.value)


def test_postgres_driver_errors_never_escape(pg_url: str) -> None:
    s = open_storage(pg_url)
    try:
        s.add_domain("a.example", "active", NOW)
        with _raw(pg_url) as conn:
            conn.execute("DROP TABLE certificates")
        with pytest.raises(StorageError) as info:
            s.get_certificate("a.example")
        assert not isinstance(info.value, StorageUnavailable)
        assert "certificates" in str(info.value)
        # The pool is fine afterwards: other tables still answer.
        assert s.get_domain("a.example") is not None
    finally:
        s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.get_domain("a.example")


def test_postgres_feed_never_misses_concurrent_commits(pg_url: str) -> None:
    """Seqs follow commit order: a reader that follows the feed incrementally
    while eight writers commit sees every change exactly once (a plain sequence
    would let a reader skip a seq that commits after a larger one)."""
    writers, per_writer = 8, 25
    s = open_storage(pg_url)
    try:
        for i in range(writers):
            s.add_domain(f"w{i}.example", "pending_dns", NOW)
        seq, _ = s.changes_since(0)
        seen: list[str] = []
        done = threading.Event()

        def write(i: int) -> None:
            for _ in range(per_writer):
                s.update_domain(f"w{i}.example", NOW, status="issuing")

        def read() -> None:
            nonlocal seq
            while True:
                finished = done.is_set()
                newest, hosts = s.changes_since(seq)
                assert newest >= seq
                seen.extend(hosts)
                seq = newest
                if finished:
                    return

        reader = threading.Thread(target=read)
        reader.start()
        with ThreadPoolExecutor(max_workers=writers) as pool:
            list(pool.map(write, range(writers)))
        done.set()
        reader.join(timeout=60)
        assert sorted(seen) == sorted(f"w{i}.example" for i in range(writers) for _ in range(per_writer))
    finally:
        s.close()


def test_postgres_prunes_opportunistically(pg_url: str) -> None:
    from edgeproxy.storage.postgres import PostgresStorage

    s = PostgresStorage(pg_url, keep_changes=3)
    s.PRUNE_EVERY = 4
    try:
        s.add_domain("x.example", "pending_dns", NOW)
        for _ in range(11):
            s.update_domain("x.example", NOW, status="issuing")
        with _raw(pg_url) as conn:
            assert conn.execute("SELECT seq FROM changes ORDER BY seq").fetchall() == [(10,), (11,), (12,)]
        assert s.changes_since(1) == (12, ["x.example"])
        assert s.changes_since(9) == (12, ["x.example"] * 3)
    finally:
        s.close()


def test_postgres_notification_wakes_a_waiting_node(pg_url: str) -> None:
    from edgeproxy.storage.postgres import PostgresStorage

    waiter, writer = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        started = time.monotonic()
        assert waiter.wait_for_change(0.2) is False  # nothing happened: the timeout
        assert 0.15 <= time.monotonic() - started < 2
        woke: list[tuple[bool, float]] = []
        t = threading.Thread(target=lambda: woke.append((waiter.wait_for_change(10), time.monotonic())))
        t.start()
        time.sleep(0.3)  # the waiter is listening
        committed = time.monotonic()
        writer.add_domain("a.example", "pending_dns", NOW)
        t.join(timeout=15)
        assert woke and woke[0][0] is True and woke[0][1] - committed < 2
        # Writes that are not domain changes notify nobody.
        writer.put_challenge(ChallengeRecord("t", "t.k", "a.example", NOW))
        assert waiter.wait_for_change(0.3) is False
    finally:
        waiter.close()
        writer.close()


def test_postgres_notifications_stay_within_their_schema(pg_base_url: str, pg_url: str) -> None:
    """NOTIFY is database-wide: a deployment (or test run) in another schema of
    the same database must not wake ours, and ours still wakes."""
    from edgeproxy.storage.postgres import PostgresStorage

    with temp_schema(pg_base_url) as other_url:
        waiter, ours, theirs = PostgresStorage(pg_url), PostgresStorage(pg_url), PostgresStorage(other_url)
        try:
            assert waiter.wait_for_change(0.1) is False  # listening from here on
            theirs.add_domain("b.example", "pending_dns", NOW)
            assert waiter.wait_for_change(0.5) is False
            ours.add_domain("a.example", "pending_dns", NOW)
            assert waiter.wait_for_change(5) is True
        finally:
            waiter.close()
            ours.close()
            theirs.close()


def test_postgres_survives_a_server_outage(private_pg: Any) -> None:
    """The same instance raises StorageUnavailable promptly while the server is
    down and works again once it is back, without being reopened."""
    from edgeproxy.storage.postgres import PostgresStorage

    with temp_schema(private_pg.url) as url:
        s = PostgresStorage(url, pool_timeout=2.0)
        try:
            s.add_domain("a.example", "active", NOW)
            assert s.wait_for_change(0.05) in (True, False)  # the LISTEN connection exists
            private_pg.stop()
            try:
                for call in (lambda: s.get_domain("a.example"), lambda: s.changes_since(0),
                             lambda: s.try_lock("l", "me", 5, NOW), lambda: s.wait_for_change(0.5)):
                    started = time.monotonic()
                    with pytest.raises(StorageUnavailable):
                        call()
                    assert time.monotonic() - started < 8
            finally:
                private_pg.start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert s.get_domain("a.example") is not None
                    break
                except StorageUnavailable:
                    assert time.monotonic() < deadline, "did not recover after the server came back"
                    time.sleep(0.2)
            recovered_in = deadline - time.monotonic()
            assert recovered_in > 0
            s.add_domain("b.example", "pending_dns", NOW)
            assert s.wait_for_change(0.05) in (True, False)  # LISTEN reconnects too
            assert [d.hostname for d in s.list_domains()] == ["a.example", "b.example"]
        finally:
            s.close()


def _use_inherited_pg(s: Any, results: Any) -> None:
    try:
        s.add_domain("child.example", "pending_dns", NOW)
        results.put(s.get_domain("child.example") is not None)
    except BaseException as exc:
        results.put(repr(exc))


def test_postgres_instance_inherited_through_fork_opens_its_own_pool(pg_url: str) -> None:
    fork = multiprocessing.get_context("fork")
    s = open_storage(pg_url)
    try:
        s.add_domain("parent.example", "pending_dns", NOW)
        results = fork.Queue()
        proc = fork.Process(target=_use_inherited_pg, args=(s, results))
        proc.start()
        try:
            assert results.get(timeout=30) is True
        finally:
            proc.join(timeout=30)
        assert proc.exitcode == 0
        # The parent's pool is untouched by the child.
        assert {d.hostname for d in s.list_domains()} == {"parent.example", "child.example"}
    finally:
        s.close()


def test_postgres_upgrades_a_version_1_database_in_place(pg_url: str) -> None:
    """A store created by the first release (schema 1) is upgraded on open,
    its data kept, and the failed-log and ledger tables work afterwards."""
    from edgeproxy.storage.base import StatusEvent
    from edgeproxy.storage.postgres import MIGRATIONS, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 2
    with _raw(pg_url) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for statement in dict(MIGRATIONS)[1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            conn.execute("INSERT INTO domains (hostname, status, created_at, updated_at) VALUES (%s, %s, %s, %s)",
                         ("old.example", "active", NOW, NOW))
    with pytest.raises(StorageError, match="schema version 1, this edgeproxy needs"):
        open_storage(pg_url, auto_migrate=False)
    s = open_storage(pg_url)
    try:
        assert getattr(s, "last_migration") == (1, SCHEMA_VERSION)
        assert s.get_domain("old.example") is not None
        s.add_status_event(StatusEvent("old.example", NOW, "active"))
        assert [e.status for e in s.status_history("old.example")] == ["active"]
    finally:
        s.close()


def test_postgres_migration_3_adds_the_due_indexes_to_a_version_2_database(pg_url: str) -> None:
    """A store at schema 2 gets the due/created indexes on open, data kept."""
    from edgeproxy.storage.postgres import MIGRATIONS, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 3
    with _raw(pg_url) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for version in (1, 2):
                for statement in dict(MIGRATIONS)[version]:
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (2)")
            conn.execute("INSERT INTO domains (hostname, status, created_at, updated_at, next_attempt_at) "
                         "VALUES (%s, %s, %s, %s, %s)", ("old.example", "issuing", NOW, NOW, NOW))
    with pytest.raises(StorageError, match="schema version 2, this edgeproxy needs"):
        open_storage(pg_url, auto_migrate=False)
    s = open_storage(pg_url)
    try:
        assert getattr(s, "last_migration") == (2, SCHEMA_VERSION)
        assert [d.hostname for d in s.due_domains(NOW)] == ["old.example"]
        assert s.domain_created_times_since(NOW) == [NOW]
        with _raw(pg_url) as conn:
            names = {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'domains'")}
        assert {"domains_next_attempt", "domains_created"} <= names
    finally:
        s.close()


def test_postgres_migration_4_adds_leaf_der_to_a_version_3_database(pg_url: str) -> None:
    """A store at schema 3 gets leaf_der (and its trigger) on open; old
    rows read None (the certstore decodes their PEM), new saves fill it."""
    from edgeproxy.storage.postgres import MIGRATIONS, SCHEMA_VERSION

    assert SCHEMA_VERSION >= 4
    chain, der = _pem_chain("old.example", 1)
    with _raw(pg_url) as conn:
        with conn.transaction():
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for version in (1, 2, 3):
                for statement in dict(MIGRATIONS)[version]:
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (3)")
            conn.execute("INSERT INTO domains (hostname, status, created_at, updated_at) VALUES (%s, %s, %s, %s)",
                         ("old.example", "active", NOW, NOW))
            conn.execute("INSERT INTO certificates (hostname, key_pem, chain_pem, not_before, not_after, serial, "
                         "issuer, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                         ("old.example", b"KEY", chain, NOW, NOW + timedelta(days=90), "1", "CN=x", NOW))
    with pytest.raises(StorageError, match="schema version 3, this edgeproxy needs"):
        open_storage(pg_url, auto_migrate=False)
    s = open_storage(pg_url)
    try:
        assert getattr(s, "last_migration") == (3, SCHEMA_VERSION)
        assert _scan_leaf_der(s, "old.example") is None
        record = s.get_certificate("old.example")
        assert record is not None and record.chain_pem == chain
        s.save_certificate(record)
        assert _scan_leaf_der(s, "old.example") == der
    finally:
        s.close()


def test_every_backend_implements_the_whole_protocol(store: Storage) -> None:
    for name in dir(Storage):
        if not name.startswith("_"):
            assert callable(getattr(store, name)), name


def test_a_domain_can_be_added_due_in_the_same_write(store: Storage) -> None:
    """Registration stores the domain already due: no second write a crash could lose."""
    record = store.add_domain("due.example", "issuing", NOW, next_attempt_at=NOW)
    assert record.next_attempt_at == NOW
    assert [d.hostname for d in store.due_domains(NOW)] == ["due.example"]
    assert store.add_domain("later.example", "pending_dns", NOW).next_attempt_at is None
