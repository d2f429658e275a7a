"""Registry service: registration limits, deny list, the customer-facing view (real SQLite, injected clock)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import asyncio
from typing import Any

import httpx
import pytest

from edgeproxy.control.admin import create_admin_app
from edgeproxy.config import AdminSettings, DomainsSettings, Settings
from edgeproxy.errors import ConfigError, DomainExists, InvalidHostname, LimitReached
from edgeproxy.control.registry import Registry
from edgeproxy.storage.sqlite import SqliteStorage
from edgeproxy.control.tokens import TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now


def make(tmp_path: Path, **domains: object) -> tuple[Registry, Clock]:
    settings = dataclasses.replace(Settings(), domains=DomainsSettings(extra_suffixes=("test",), **domains))  # type: ignore[arg-type]
    clock = Clock()
    return Registry(SqliteStorage(str(tmp_path / "r.db")), settings, clock=clock), clock


def test_deny_list_refuses_the_name_and_everything_below_it(tmp_path: Path) -> None:
    registry, _ = make(tmp_path, deny=("Bank.Example.test",))
    for name in ("bank.example.test", "cdn.bank.example.test"):
        with pytest.raises(InvalidHostname) as info:
            registry.add(name)
        assert info.value.code == "denied"
    assert registry.add("notbank.example.test").hostname == "notbank.example.test"


def test_a_bad_deny_entry_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="domains.deny"):
        make(tmp_path, deny=("not a name",))


def test_domain_cap(tmp_path: Path) -> None:
    registry, _ = make(tmp_path, max_domains=2, registrations_per_hour=0)
    registry.add("a.example.test")
    registry.add("b.example.test")
    with pytest.raises(LimitReached) as info:
        registry.add("c.example.test")
    assert (info.value.code, info.value.retry_after) == ("domain_limit", None)
    registry.remove("a.example.test")
    assert registry.add("c.example.test").hostname == "c.example.test"


def test_hourly_registration_rate_with_retry_after(tmp_path: Path) -> None:
    registry, clock = make(tmp_path, max_domains=0, registrations_per_hour=3)
    for i in range(3):
        registry.add(f"r{i}.example.test")
        clock.now += dt.timedelta(minutes=10)
    # 30 minutes after the first registration: the window still holds three.
    with pytest.raises(LimitReached) as info:
        registry.add("r3.example.test")
    assert info.value.code == "registration_rate"
    assert info.value.retry_after == pytest.approx(30 * 60)
    clock.now += dt.timedelta(minutes=30, seconds=1)
    assert registry.add("r3.example.test").status == "issuing"
    with pytest.raises(DomainExists):
        registry.add("R3.example.test.")


def test_limits_never_list_every_domain_and_the_hour_excludes_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap and the rate come from a count and the last hour's creation
    times, not list_domains; a registration exactly one hour old has left the window."""
    registry, clock = make(tmp_path, max_domains=3, registrations_per_hour=2)

    def refuse() -> None:
        raise AssertionError("_check_limits must not read every domain")

    monkeypatch.setattr(registry.storage, "list_domains", refuse)
    registry.add("a.example.test")
    clock.now += dt.timedelta(minutes=30)
    registry.add("b.example.test")
    clock.now += dt.timedelta(minutes=30) - dt.timedelta(microseconds=1)
    with pytest.raises(LimitReached) as info:
        registry.add("c.example.test")
    assert info.value.code == "registration_rate" and info.value.retry_after == 1.0
    clock.now += dt.timedelta(microseconds=1)  # a.example.test is exactly one hour old
    registry.add("c.example.test")
    clock.now += dt.timedelta(hours=2)
    with pytest.raises(LimitReached) as capped:
        registry.add("d.example.test")
    assert capped.value.code == "domain_limit"


def _post(app: Any, hostname: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
            return await client.post("/v1/domains", json={"hostname": hostname}, headers=headers)

    return asyncio.run(go())


def test_admin_maps_limits_to_403_and_429(tmp_path: Path) -> None:
    registry, _ = make(tmp_path, max_domains=1, registrations_per_hour=0)
    (tmp_path / "t").write_text("admin-token-0123456789")
    app = create_admin_app(registry, TokenStore(AdminSettings(str(tmp_path / "t"), str(tmp_path / "t.json"))))
    auth = {"Authorization": "Bearer admin-token-0123456789"}
    assert _post(app, "a.example.test", auth).status_code == 201
    capped = _post(app, "b.example.test", auth)
    assert capped.status_code == 403 and capped.json()["error"]["code"] == "domain_limit"
    registry2, _ = make(tmp_path / "two", max_domains=0, registrations_per_hour=1)
    app2 = create_admin_app(registry2, TokenStore(AdminSettings(str(tmp_path / "t"), str(tmp_path / "t.json"))))
    assert _post(app2, "a.example.test", auth).status_code == 201
    limited = _post(app2, "b.example.test", auth)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 3000


def test_view_names_the_dns_record_and_snippet(tmp_path: Path) -> None:
    registry, _ = make(tmp_path)
    view = registry.view(registry.add("Cdn.Shop.Example.test"))
    assert view["hostname"] == "cdn.shop.example.test"
    assert view["dns"]["records"] == [{"type": "CNAME", "name": "cdn.shop.example.test", "value": "edge.example.net."}]
    assert view["snippet"] == '<script async src="https://cdn.shop.example.test/js/app.js"></script>'
    assert view["certificate"] is None and view["error"] is None
