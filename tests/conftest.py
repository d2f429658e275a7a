"""Shared pytest fixtures. Each block is owned by one area; append new blocks, keep them delimited."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.pebble import INSTALL_HINT, ChallTestSrv, Pebble, missing_binaries
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin


class Clock:
    """Real time (UTC) plus an offset a test can move forward: renewal windows, rests."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc) + self.offset

# =====================================================================================
# BEGIN Pebble / challtestsrv fixtures (owner: acme_client + devtools/pebble.py)
#
#   challtestsrv           session-scoped running ChallTestSrv (mock DNS; every name
#                          answers A 127.0.0.1, no AAAA). Mocks are shared by the
#                          whole session: a test that adds records must clear them.
#   pebble_factory         function-scoped factory: pebble_factory(http_port, nonce_reject=None,
#                          **Pebble options) -> started Pebble resolving through
#                          challtestsrv; stopped at the end of the test.
#   pebble_factory_module  the same factory, stopped at the end of the module.
#
# Missing binaries FAIL the test (never skip): the suite is meant to run the real CA.
# =====================================================================================


class PebbleFactory(Protocol):
    def __call__(self, http_port: int, nonce_reject: int | None = None, **options: Any) -> Pebble: ...


def _require_pebble_binaries() -> None:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def challtestsrv() -> Iterator[ChallTestSrv]:
    """A running pebble-challtestsrv used as the DNS server of every Pebble in the session."""
    _require_pebble_binaries()
    with ChallTestSrv(default_ipv4="127.0.0.1", default_ipv6="") as server:
        yield server


def _make_pebble_factory(challtestsrv: ChallTestSrv) -> tuple[PebbleFactory, Callable[[], None]]:
    started: list[Pebble] = []

    def factory(http_port: int, nonce_reject: int | None = None, **options: Any) -> Pebble:
        """Start Pebble validating HTTP-01 on ``http_port``; ``nonce_reject=None`` keeps Pebble's 5 %."""
        options.setdefault("dns_server", challtestsrv.dns_address)
        pebble = Pebble(http_port=http_port, nonce_reject=nonce_reject, **options)
        started.append(pebble)
        return pebble.start()

    def stop_all() -> None:
        for pebble in reversed(started):
            pebble.stop()

    return factory, stop_all


@pytest.fixture
def pebble_factory(challtestsrv: ChallTestSrv) -> Iterator[PebbleFactory]:
    """Factory for Pebble instances that are stopped when the test ends."""
    _require_pebble_binaries()
    factory, stop_all = _make_pebble_factory(challtestsrv)
    try:
        yield factory
    finally:
        stop_all()


@pytest.fixture(scope="module")
def pebble_factory_module(challtestsrv: ChallTestSrv) -> Iterator[PebbleFactory]:
    """Factory for Pebble instances shared by a module (e.g. a module-scoped stack)."""
    _require_pebble_binaries()
    factory, stop_all = _make_pebble_factory(challtestsrv)
    try:
        yield factory
    finally:
        stop_all()


# =====================================================================================
# END Pebble / challtestsrv fixtures
# =====================================================================================


# =====================================================================================
# BEGIN edge stack (owner: end-to-end tests)
#
#   stack   module-scoped: one real `edgeproxy serve` process, one Pebble, a local
#           script origin and a recording relay; HOSTS registered through the admin
#           API and issued over real HTTP-01. Clients trust only Pebble's root.
# =====================================================================================

HOSTS = ("shop1.example.test", "shop2.example.test")
VENDOR_RELAY = "https://relay.vendor.invalid"


@dataclass
class Stack:
    edge: EdgeProcess
    origin: ScriptOrigin
    relay: RecordingRelay
    roots: list[bytes]

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.edge.config.https_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.edge.config.http_port}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pebble_factory_module: PebbleFactory) -> Iterator[Stack]:
    yield from edge_stack(tmp_path_factory, pebble_factory_module)


def edge_stack(tmp_path_factory: pytest.TempPathFactory, pebble_factory_module: PebbleFactory,
               proxy: dict[str, Any] | None = None) -> Iterator[Stack]:
    """The stack above; ``proxy``: extra ``[proxy]`` settings (e.g. ``http1_fast_path``)."""
    state = tmp_path_factory.mktemp("edge")
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        config = EdgeConfig(
            state_dir=state,
            acme_directory="", acme_ca_bundle="",
            script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
            extra={"upstream": {"rewrite": {VENDOR_RELAY: "https://{host}{api_path}"}},
                   **({"proxy": proxy} if proxy else {})},
        )
        pebble = pebble_factory_module(config.http_port)
        config.acme_directory = pebble.directory_url
        config.acme_ca_bundle = str(pebble.ca_bundle_path)
        with EdgeProcess(config) as edge:
            with edge.admin() as admin:
                for host in HOSTS:
                    assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
            for host in HOSTS:
                edge.wait_status(host, "active", timeout=60)
            yield Stack(edge, origin, relay, [pebble.root_pem()])

# END edge stack


# =====================================================================================
# BEGIN PostgreSQL (owner: storage/postgres.py)
#
#   pg_base_url   session-scoped URL of the machine's PostgreSQL (EDGEPROXY_TEST_PG_URL,
#                 default postgresql://postgres@127.0.0.1:5432/test). Unreachable = the
#                 run FAILS (never skips): `make test` starts the server first.
#   pg_url        function-scoped: a fresh empty schema on it (search_path in the URL),
#                 dropped at the end of the test.
#   private_pg    session-scoped throwaway cluster (initdb in a temp dir, free port) that
#                 a test may stop and start; a test that stops it must start it again.
# =====================================================================================

import os as _os

from pgharness import (
    DEFAULT_URL as _PG_DEFAULT_URL,
    PgHarnessError,
    PrivateCluster,
    require_server,
    temp_schema,
)


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    url = _os.environ.get("EDGEPROXY_TEST_PG_URL", _PG_DEFAULT_URL)
    try:
        require_server(url)
    except PgHarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    return url


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    with temp_schema(pg_base_url) as url:
        yield url


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivateCluster]:
    try:
        cluster = PrivateCluster().init()
        cluster.start()
    except PgHarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.close()

# END PostgreSQL
