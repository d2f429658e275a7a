"""IPv6 by default (one dual-stack socket, IPv4 fallback), IPv4-mapped
peers normalized before trusted_hops, rate limits, X-Forwarded-For and
privacy.ip_retention see them, and doctor's AAAA-without-IPv6 warning."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path

import httpx
import pytest

from edgeproxy import server
from edgeproxy.rules.addresses import normalize_ip
from edgeproxy.config import load_settings
from edgeproxy.control.doctor import check_ipv6
from edgeproxy.edge.proxy import EdgeProxy, ForwardRequest, ForwardResult
from edgeproxy.edge.spool import reduce_ip
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess, free_port
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from test_proxy import SHOP, SITES, call, make_env, make_settings

from tlshelpers import seed

HOST = "v6.example.test"


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_listen_defaults_are_dual_stack() -> None:
    listen = load_settings(env={}).listen
    assert (listen.http, listen.https) == ("[::]:80", "[::]:443")
    assert listen.admin == "127.0.0.1:8081"  # the admin API stays on loopback


@pytest.mark.parametrize(("given", "expected"), [
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("::FFFF:10.1.2.3", "10.1.2.3"),
    ("203.0.113.9", "203.0.113.9"),
    ("2001:db8::1", "2001:db8::1"),
    ("::1", "::1"),
    ("64:ff9b::203.0.113.9", "64:ff9b::203.0.113.9"),  # NAT64 (RFC 6052): IPv6, not IPv4-mapped
    ("unix-socket", "unix-socket"),
])
def test_normalize_ip(given: str, expected: str) -> None:
    assert normalize_ip(given) == expected


def test_wildcard_binds_one_dual_stack_socket() -> None:
    if not _ipv6_available():
        pytest.fail("this machine has no IPv6 loopback; the dual-stack test needs ::1", pytrace=False)
    sock = server.bind_socket("[::]:0", "listen.https")
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as client:
                client.connect((host, port))  # both families reach the one socket
    finally:
        sock.close()


def test_wildcard_falls_back_to_ipv4_without_ipv6(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server.socket, "socket", no_ipv6)
    with caplog.at_level(logging.WARNING, logger="edgeproxy.server"):
        sock = server.bind_socket("[::]:0", "listen.https")
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0"
        assert any("no IPv6" in r.getMessage() for r in caplog.records)
    finally:
        sock.close()
    with pytest.raises(OSError):  # an explicit IPv6 address does not fall back
        server.bind_socket("[2001:db8::1]:0", "listen.https")


def test_mapped_peer_is_a_trusted_hop_and_forwarded_as_ipv4() -> None:
    env = make_env()  # trusted_hops = 10.0.0.0/8, 2001:db8::1

    async def main() -> None:
        await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                   client=("::ffff:10.9.8.7", 1), headers=[("x-forwarded-for", "::ffff:203.0.113.9")])
        await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                   client=("::ffff:198.51.100.7", 2))
        trusted, plain = env.up.relay_requests()
        assert trusted.headers["x-forwarded-for"] == "::ffff:203.0.113.9, 10.9.8.7"
        assert plain.headers["x-forwarded-for"] == "198.51.100.7"

    env.run(main())


def test_rate_limit_counts_a_mapped_and_a_plain_ipv4_peer_as_one_visitor() -> None:
    env = make_env(rate_per_ip=1.0, rate_per_domain=1000.0, rate_burst=2.0)

    async def main() -> None:
        peers = [("198.51.100.7", 1), ("::ffff:198.51.100.7", 2), ("198.51.100.7", 3)]
        statuses = [(await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                                client=peer)).status for peer in peers]
        assert statuses == [202, 202, 429]
        # Behind a trusted hop reporting the visitor as IPv4-mapped: the same bucket again.
        hop = await call(env.proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                         client=("10.0.0.1", 1), headers=[("x-forwarded-for", "::ffff:198.51.100.7")])
        assert hop.status == 429

    env.run(main())


def test_ip_retention_truncates_a_mapped_address_as_ipv4() -> None:
    assert reduce_ip("::ffff:203.0.113.9", "truncated") == "203.0.113.0"
    assert reduce_ip("::ffff:203.0.113.9", "full") == "::ffff:203.0.113.9"  # full keeps what it was given
    assert reduce_ip("::ffff:203.0.113.9", "none") is None
    assert reduce_ip("2001:db8:1:2::5", "truncated") == "2001:db8:1::"


def test_spooled_and_failed_log_client_is_normalized_ipv4() -> None:
    """What the spool and the failed-request log store (ForwardRequest.client) is the IPv4 form."""
    seen: list[ForwardRequest] = []

    class Capture:
        """The event relay seam: records what the spool would be handed."""

        async def send(self, request: ForwardRequest) -> ForwardResult:
            seen.append(request)
            return ForwardResult(202, (), b"")

        async def aclose(self) -> None:
            return None

    async def no_challenge(_token: str) -> None:
        return None

    proxy = EdgeProxy(make_settings(), resolve=SITES.get, challenge=no_challenge, events=Capture())

    async def main() -> None:
        try:
            await call(proxy.https_app, method="POST", path="/api/v1/m", body=b"{}",
                       client=("::ffff:198.51.100.7", 9))
        finally:
            await proxy.aclose()

    asyncio.run(main())
    assert [r.client for r in seen] == ["198.51.100.7"]


def test_edge_on_dual_stack_socket_sees_ipv4_peers_as_ipv4(tmp_path: Path) -> None:
    if not _ipv6_available():
        pytest.fail("this machine has no IPv6 loopback; the dual-stack test needs ::1", pytrace=False)
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        https = free_port()
        config = EdgeConfig(state_dir=tmp_path, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                            script_url=origin.script_url, relay_url=f"{relay.url}/ingest", https_port=https,
                            extra={"listen": {"https": f"[::]:{https}"}, "renew": {"interval": 3600.0},
                                   "monitor": {"interval": 0.0}})
        seed(config.db_path, HOST)
        with EdgeProcess(config):
            with httpx.Client(verify=False, trust_env=False, timeout=10) as client:
                for target in ("127.0.0.1", "[::1]"):
                    reply = client.post(f"https://{target}:{https}/api/v1/m", content=b"{}",
                                        headers={"Host": HOST, "Content-Type": "application/json"},
                                        extensions={"sni_hostname": HOST})
                    assert reply.status_code == 202, reply.text
        seen = [r.headers["x-forwarded-for"] for r in relay.snapshot()]
        assert seen == ["127.0.0.1", "::1"]  # not ::ffff:127.0.0.1


def test_doctor_warns_about_aaaa_without_ipv6_listener() -> None:
    v4 = load_settings(env={"EDGEPROXY_LISTEN_HTTP": "0.0.0.0:80", "EDGEPROXY_LISTEN_HTTPS": "0.0.0.0:443",
                            "EDGEPROXY_DNS_CNAME_TARGET": "edge.cdn-neutral.net"})
    (finding,) = check_ipv6(v4, network=True, lookup=lambda _name: ["2001:db8::10"])
    assert finding.level == "warning" and "2001:db8::10" in finding.message
    (finding,) = check_ipv6(v4, network=True, lookup=lambda _name: [])
    assert finding.level == "ok"
    (finding,) = check_ipv6(v4, network=True, lookup=lambda _name: None)
    assert finding.level == "warning" and "DNS failed" in finding.message
    if _ipv6_available():
        v6 = load_settings(env={"EDGEPROXY_DNS_CNAME_TARGET": "edge.cdn-neutral.net"})  # [::] defaults
        (finding,) = check_ipv6(v6, network=True, lookup=lambda _name: ["2001:db8::10"])
        assert finding.level == "ok"
