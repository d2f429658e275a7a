"""Pure renewal maths: backoff steps and renewal windows, with ``now`` passed in."""

from __future__ import annotations

import datetime as dt

import pytest

from edgeproxy.renew import backoff, is_due, renewal_time
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
