"""Pure renewal maths: backoff steps and renewal windows, with ``now`` passed in."""

from __future__ import annotations

import datetime as dt

import pytest

from edgeproxy.control.renew import backoff, is_due, renewal_time
from edgeproxy.storage.base import DomainRecord

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(0, dt.timedelta(0)), (1, dt.timedelta(minutes=1)), (2, dt.timedelta(minutes=10)),
     (3, dt.timedelta(minutes=100)), (4, dt.timedelta(days=1)), (50, dt.timedelta(days=1))],
)
def test_backoff_steps_and_cap(attempts: int, delay: dt.timedelta) -> None:
    assert backoff(attempts) == delay


@pytest.mark.parametrize(
    ("days", "renew_after_days"),
    [(90, 60), (45, 30), (6, 3)],  # 1/3 left for 90 and 45 days; 1/2 left under 10 days
)
def test_renewal_time_by_lifetime(days: int, renew_after_days: int) -> None:
    assert renewal_time(T0, T0 + dt.timedelta(days=days)) == T0 + dt.timedelta(days=renew_after_days)


def _record(status: str, next_at: dt.datetime | None) -> DomainRecord:
    return DomainRecord("a.example.test", status, T0, T0, next_attempt_at=next_at)


def test_is_due() -> None:
    assert is_due(_record("issuing", T0), T0)
    assert not is_due(_record("issuing", T0 + dt.timedelta(seconds=1)), T0)
    assert not is_due(_record("active", None), T0)
    # A moved domain is due for a DNS re-check only (RenewalService never orders for it
    # unless DNS points back; see tests/test_renew_lifecycle.py).
    assert is_due(_record("moved", T0), T0)
    assert not is_due(_record("moved", None), T0)


# -- budgets, emergency retries, DNS/CAA verdicts (pure) ---------------------------------

from typing import Any  # noqa: E402

from edgeproxy.control.domains import caa_allows, caa_lookup_names, evaluate_pointing  # noqa: E402
from edgeproxy.control.renew import budget_wait, retry_delay  # noqa: E402


def test_budget_wait_sliding_window() -> None:
    hour = dt.timedelta(hours=1)
    events = [T0 - dt.timedelta(minutes=m) for m in (50, 40, 30, 20, 10)]
    assert budget_wait(events[:4], 5, hour, T0) is None  # four used, a fifth fits
    assert budget_wait(events, 5, hour, T0) == events[0] + hour  # the oldest leaves at T0+10min
    assert budget_wait(events + [T0 - dt.timedelta(minutes=70)], 5, hour, T0) == events[0] + hour  # outside ignored
    assert budget_wait(events, 0, hour, T0) is None  # 0 = unlimited


def test_retry_delay_is_capped_in_an_emergency() -> None:
    ninety = (T0 - dt.timedelta(days=40), T0 + dt.timedelta(days=50))
    assert retry_delay(5, ninety, T0) == dt.timedelta(days=1)
    nearly_expired = (T0 - dt.timedelta(days=86), T0 + dt.timedelta(days=4))  # 4 of 90 days left < 1/20
    assert retry_delay(5, nearly_expired, T0) == dt.timedelta(hours=1)
    assert retry_delay(1, nearly_expired, T0) == dt.timedelta(minutes=1)
    six_day = (T0 - dt.timedelta(days=5, hours=18), T0 + dt.timedelta(hours=6))  # 6 h of 6 days < 1/20
    assert retry_delay(4, six_day, T0) == dt.timedelta(hours=1)


def test_caa_lookup_climbs_to_the_tld() -> None:
    assert caa_lookup_names("cdn.shop.example.com") == ["cdn.shop.example.com", "shop.example.com", "example.com", "com"]


@pytest.mark.parametrize(
    ("records", "allowed"),
    [
        ([], True),
        ([(0, "issue", "letsencrypt.org")], True),
        ([(0, "issue", "LetsEncrypt.org; validationmethods=http-01")], True),
        ([(0, "issue", "pki.goog")], False),
        ([(0, "issue", ";")], False),  # RFC 8659 section 4.2: nobody may issue
        ([(0, "issuewild", "pki.goog")], True),  # issuewild only binds wildcards
        ([(0, "iodef", "mailto:x@example.com")], True),
        ([(128, "tbs", "x")], False),  # unknown critical property
        ([(0, "issue", "pki.goog"), (0, "issue", "letsencrypt.org")], True),
    ],
)
def test_caa_allows(records: list[tuple[int, str, str]], allowed: bool) -> None:
    assert caa_allows(records, ["letsencrypt.org"]) is allowed


def test_evaluate_pointing() -> None:
    def check(chain: list[str], addresses: list[str]) -> Any:
        return evaluate_pointing("a.shop.test", chain, addresses, cname_target="edge.example.net.",
                                 edge_ips=["192.0.2.10"])

    assert check(["x.cdn.test", "edge.example.net"], ["192.0.2.10"]).ok  # CNAME chain through a CDN
    assert check([], ["192.0.2.10"]).ok
    mixed = check([], ["192.0.2.10", "198.51.100.1"])  # one address elsewhere fails validation from there
    assert (mixed.ok, mixed.code) == (False, "dns_elsewhere")
    missing = check([], [])
    assert missing.code == "dns_missing"
    assert "a.shop.test. CNAME edge.example.net. (or A 192.0.2.10)" in missing.message


# -- the due queries, against a real (SQLite) store -----------------------------------

from pathlib import Path  # noqa: E402

from edgeproxy.edge.certstore import CertStore  # noqa: E402
from edgeproxy.control.renew import RenewalService  # noqa: E402
from edgeproxy.storage.sqlite import SqliteStorage  # noqa: E402


class _NoIssuer:
    def issue(self, hostname: str, replaces: str | None = None) -> Any:
        raise AssertionError("due()/_new_work() never order")

    def renewal_info(self, hostname: str, chain_pem: bytes) -> Any:
        raise AssertionError("due()/_new_work() never ask the CA")


def test_due_and_new_work_match_the_old_filter_without_listing_every_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SqliteStorage(str(tmp_path / "due.db"))
    try:
        plan = [("z.example.test", "issuing", T0 - dt.timedelta(days=1)), ("m.example.test", "pending_dns", T0),
                ("a.example.test", "active", T0 - dt.timedelta(hours=1)), ("f.example.test", "failing", T0),
                ("r.example.test", "renewing", T0 + dt.timedelta(seconds=1)), ("n.example.test", "active", None),
                ("v.example.test", "moved", T0 - dt.timedelta(days=2))]
        for name, status, next_at in plan:
            storage.add_domain(name, "issuing", T0 - dt.timedelta(days=3))
            storage.update_domain(name, T0 - dt.timedelta(days=3), status=status, next_attempt_at=next_at)
        # The old implementations, as the oracle (the 100,000-domain scale work replaced them with indexed queries).
        old_due = [d for d in storage.list_domains() if is_due(d, T0)]
        old_new_work = [d.hostname for d in old_due if d.status in ("issuing", "pending_dns", "failing")]
        service = RenewalService(storage, CertStore(storage), _NoIssuer(), clock=lambda: T0)

        def refuse() -> None:
            raise AssertionError("the renewal loop must not read every domain")

        monkeypatch.setattr(storage, "list_domains", refuse)
        assert service.due(T0) == old_due  # same records, same (hostname) order
        assert [d.hostname for d in old_due] == ["a.example.test", "f.example.test", "m.example.test",
                                                  "v.example.test", "z.example.test"]
        assert service._new_work() == old_new_work == ["f.example.test", "m.example.test", "z.example.test"]
    finally:
        storage.close()
