"""Issuer fallback against two real CAs: two Pebbles, the second requiring external
account binding (EAB), and a real DNS server (pebble-challtestsrv) for CNAME and CAA.

The edge's side is built as ``serve`` builds it: ``[[acme.issuers]]`` in a config
file, ``load_settings``, ``Services`` (one ``AcmeIssuer`` per CA, accounts stored
per directory URL), ``RenewalService.from_settings`` (the DNS/CAA pre-check over
every CA's identities), and the domain JSON of ``GET /v1/domains/{hostname}``.
HTTP-01 is answered from the edge's store by a small responder, as the proxy does.
The only liberty is the clock: a test clock, so the rest after an outage passes
without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgeproxy.config import Settings, acme_issuers, load_settings
from conftest import Clock
from edgeproxy.devtools.upstreams import Http01Responder
from edgeproxy.devtools.pebble import ChallTestSrv, Pebble
from edgeproxy.control.issuers import OUTAGE_REST
from edgeproxy.node import Services
from edgeproxy.control.registry import domain_view
from edgeproxy.control.renew import RenewalService

EDGE = "edge.example.net"
UTC = dt.timezone.utc
EAB_KID = "edge-kid-1"
EAB_KEY = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


@dataclass
class CAs:
    one: Pebble
    two: Pebble  # requires EAB
    dns: ChallTestSrv
    responder: Http01Responder


@pytest.fixture(scope="module")
def cas(pebble_factory_module: Any) -> Iterator[CAs]:
    with ChallTestSrv(default_ipv4="", default_ipv6="") as dns:
        dns.add_a(EDGE, ["127.0.0.1"])
        responder = Http01Responder()
        try:
            one = pebble_factory_module(responder.port, nonce_reject=0, authz_reuse=0, dns_server=dns.dns_address)
            two = pebble_factory_module(responder.port, nonce_reject=0, authz_reuse=0, dns_server=dns.dns_address,
                                        eab_keys={EAB_KID: EAB_KEY})
            yield CAs(one, two, dns, responder)
        finally:
            responder.close()


@dataclass
class Edge:
    settings: Settings
    services: Services
    service: RenewalService
    clock: Clock
    cas: CAs

    def add(self, hostname: str) -> None:
        self.cas.dns.set_cname(hostname, EDGE)
        self.services.registry.add(hostname)

    def run(self, *names: str, force: bool = False) -> Any:
        return asyncio.run(self.service.run_pass(list(names), force=force, refresh=False))

    def view(self, hostname: str) -> dict[str, Any]:
        record = self.services.storage.get_domain(hostname)
        assert record is not None
        return domain_view(record, self.services.storage.get_certificate(hostname), self.settings)


def _config(tmp: Path, cas: CAs) -> Path:
    key_file = tmp / "eab.key"
    key_file.write_text(EAB_KEY + "\n")
    key_file.chmod(0o600)
    path = tmp / "edgeproxy.toml"
    path.write_text(f"""
[acme]
timeout = 30.0

[[acme.issuers]]
directory = "{cas.one.directory_url}"
ca_bundle = "{cas.one.ca_bundle_path}"
caa_identities = ["ca-one.test"]

[[acme.issuers]]
directory = "{cas.two.directory_url}"
ca_bundle = "{cas.two.ca_bundle_path}"
email = "ops@example.org"
eab_kid = "{EAB_KID}"
eab_hmac_key_file = "{key_file}"
caa_identities = ["ca-two.test"]

[storage]
url = "sqlite://{tmp}/edge.db"

[dns]
cname_target = "{EDGE}"
resolver = "{cas.dns.dns_address}"
timeout = 2.0

[domains]
extra_suffixes = ["test"]
""")
    return path


@pytest.fixture
def edge(cas: CAs, tmp_path: Path) -> Iterator[Edge]:
    settings = load_settings(_config(tmp_path, cas), env={})
    services = Services(settings)
    cas.responder.lookup = services.storage.get_challenge
    clock = Clock()
    service = RenewalService.from_settings(services.storage, services.certstore, services.issuers, settings,
                                           clock=clock)
    try:
        yield Edge(settings, services, service, clock, cas)
    finally:
        asyncio.run(services.aclose())


def _issued_by(pebble: Pebble, chain_pem: bytes) -> bool:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    return leaf.issuer == x509.load_pem_x509_certificate(pebble.intermediate_pem()).subject


def test_config_names_two_cas_the_second_with_eab(edge: Edge) -> None:
    one, two = acme_issuers(edge.settings)
    assert (one.directory, two.directory) == (edge.cas.one.directory_url, edge.cas.two.directory_url)
    assert two.eab_kid == EAB_KID and [ca.directory for ca in edge.services.issuers] == [one.directory, two.directory]


def test_first_ca_down_then_back(edge: Edge) -> None:
    cas = edge.cas
    # Both up: the first CA issues.
    edge.add("first.fallback.test")
    assert edge.run("first.fallback.test").issued == ["first.fallback.test"]
    view = edge.view("first.fallback.test")["certificate"]
    assert view["acme_directory"] == cas.one.directory_url and view["fallback_reason"] is None
    # The first CA stops: the certificate comes from the second (an EAB-bound account).
    cas.one.halt()
    try:
        edge.add("down.fallback.test")
        result = edge.run("down.fallback.test")
        assert result.issued == ["down.fallback.test"], result.failed
        cert = edge.services.storage.get_certificate("down.fallback.test")
        assert cert is not None and _issued_by(cas.two, cert.chain_pem)
        view = edge.view("down.fallback.test")
        assert view["status"] == "active" and view["error"] is None
        assert view["certificate"]["acme_directory"] == cas.two.directory_url
        reason = view["certificate"]["fallback_reason"]
        assert reason.startswith(f"{cas.one.directory_url}: outage (acme_unreachable)"), reason
        account = edge.services.storage.get_account(cas.two.directory_url)
        assert account is not None and account.registration_json  # created once, stored
    finally:
        cas.one.resume()
    # The first CA is back (a restarted Pebble: it forgot our account) and rested.
    edge.clock.offset = OUTAGE_REST + dt.timedelta(seconds=5)
    one_log = len(cas.one.log_text())
    # Renewals stay with the current certificate's CA (the chosen behaviour)...
    assert edge.run("down.fallback.test", force=True).issued == ["down.fallback.test"]
    renewed = edge.services.storage.get_certificate("down.fallback.test")
    assert renewed is not None and renewed.serial != cert.serial and _issued_by(cas.two, renewed.chain_pem)
    assert renewed.acme_directory == cas.two.directory_url and renewed.fallback_reason == reason
    assert cas.one.log_text()[one_log:] == ""  # the first CA was not asked at all
    # ...new names go to the first CA again, and so do its own certificates' renewals.
    edge.add("new.fallback.test")
    edge.run("new.fallback.test")
    fresh = edge.services.storage.get_certificate("new.fallback.test")
    assert fresh is not None and _issued_by(cas.one, fresh.chain_pem) and fresh.fallback_reason == ""
    assert edge.run("first.fallback.test", force=True).issued == ["first.fallback.test"]
    again = edge.services.storage.get_certificate("first.fallback.test")
    assert again is not None and _issued_by(cas.one, again.chain_pem)


def test_caa_allowing_only_the_second_ca_never_touches_the_first(edge: Edge) -> None:
    cas = edge.cas
    name = "caa.fallback.test"
    cas.dns.add_caa("fallback.test", [("issue", "ca-two.test")])
    try:
        one_log = len(cas.one.log_text())
        edge.add(name)
        assert edge.run(name).issued == [name]
        cert = edge.services.storage.get_certificate(name)
        assert cert is not None and _issued_by(cas.two, cert.chain_pem)
        assert cert.fallback_reason == f"{cas.one.directory_url}: the CAA records of {name} do not name ca-one.test"
        assert cas.one.log_text()[one_log:] == ""  # no request reached the first CA
    finally:
        cas.dns.clear_caa("fallback.test")


def test_caa_allowing_no_configured_ca_waits_before_any_order(edge: Edge) -> None:
    cas = edge.cas
    name = "shop.nobody.test"
    cas.dns.add_caa("nobody.test", [("issue", "some-other-ca.example")])  # the name itself is a CNAME
    try:
        logs = len(cas.one.log_text()), len(cas.two.log_text())
        edge.add(name)
        result = edge.run(name)
        assert name in result.waiting
        view = edge.view(name)
        assert view["status"] == "pending_dns" and view["error"]["code"] == "caa_forbids"
        assert (len(cas.one.log_text()), len(cas.two.log_text())) == logs
    finally:
        cas.dns.clear_caa("nobody.test")


def test_a_ca_requiring_eab_refuses_an_account_without_it_with_a_clear_error(cas: CAs, tmp_path: Path) -> None:
    from edgeproxy.control.acme_client import AcmeIssuer
    from edgeproxy.errors import IssuanceError
    from edgeproxy.storage.sqlite import SqliteStorage

    storage = SqliteStorage(str(tmp_path / "no-eab.db"))
    try:
        storage.add_domain("noeab.fallback.test", "issuing", dt.datetime.now(UTC))
        plain = AcmeIssuer(storage=storage, directory_url=cas.two.directory_url, ca_bundle=str(cas.two.ca_bundle_path),
                           timeout=10)
        with pytest.raises(IssuanceError) as info:
            plain.issue("noeab.fallback.test")
        assert info.value.code == "acme_account" and "eab_kid" in str(info.value)
        bad_key = tmp_path / "bad.key"
        bad_key.write_bytes(b"\xff\xfe not base64")
        other = SqliteStorage(str(tmp_path / "bad-eab.db"))
        wrong = AcmeIssuer(storage=other, directory_url=cas.two.directory_url,
                           ca_bundle=str(cas.two.ca_bundle_path), timeout=10, eab_kid=EAB_KID,
                           eab_hmac_key_file=str(bad_key))
        with pytest.raises(IssuanceError) as info:
            wrong.issue("noeab.fallback.test")
        assert info.value.code == "acme_account" and "eab_hmac_key_file" in str(info.value)
        other.close()
    finally:
        storage.close()
