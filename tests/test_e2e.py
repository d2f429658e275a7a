"""End to end: real Pebble, real HTTP-01 against our real listener, real TLS by SNI.

No mocked ACME here. One edge process and one Pebble serve the whole module:
two domains are registered through the admin API and get certificates through
real HTTP-01 validation; clients trust only Pebble's root, as a browser would.
"""

from __future__ import annotations

import random
import socket
import ssl
import string
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from edgeproxy.devtools.edgeproc import verified_client

from conftest import HOSTS, Stack

pytestmark = pytest.mark.e2e



def peer_certificate(port: int, server_name: str, roots: list[bytes] | None) -> x509.Certificate:
    """Handshake with SNI ``server_name``; verify against ``roots`` when given."""
    if roots is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cadata="\n".join(r.decode() for r in roots))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def san_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_certificates_come_from_pebble_over_http01(stack: Stack) -> None:
    with stack.edge.admin() as admin:
        view = admin.get(f"/v1/domains/{HOSTS[0]}").json()
    assert view["status"] == "active"
    assert view["error"] is None
    assert "Pebble" in view["certificate"]["issuer"]
    assert view["dns"]["records"][0] == {"type": "CNAME", "name": HOSTS[0], "value": "edge.example.net."}
    assert f'src="https://{HOSTS[0]}/js/app.js"' in view["snippet"]
    # The served chain verifies against Pebble's root with the hostname checked.
    cert = peer_certificate(stack.edge.config.https_port, HOSTS[0], stack.roots)
    assert san_names(cert) == [HOSTS[0]]
    assert format(cert.serial_number, "x") == view["certificate"]["serial"]


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_script_and_event_round_trip(stack: Stack, http2: bool) -> None:
    host = HOSTS[0]
    sni = {"sni_hostname": host}
    before = len(stack.relay.snapshot())
    with verified_client(stack.roots, http2=http2) as client:
        script = client.get(f"{stack.https}/js/app.js", headers={"Host": host}, extensions=sni)
        assert script.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("application/javascript")
        assert script.headers["server"] == "edge"  # neutral: no software name, no vendor
        assert script.headers["x-content-type-options"] == "nosniff"
        assert "etag" in script.headers
        # Rewritten to talk back to the custom domain, and the vendor's name is gone.
        assert f"https://{host}/api/v1/m/collect" in script.text
        assert "relay.vendor.invalid" not in script.text

        event = client.post(
            f"{stack.https}/api/v1/m/collect?v=1",
            headers={"Host": host, "Cookie": "session=secret", "Content-Type": "application/json",
                     "X-Forwarded-For": "203.0.113.9"},
            content=b'{"type":"pageview"}', extensions=sni,
        )
        assert event.status_code == 202, event.text
        assert "set-cookie" not in event.headers
        # Small headers: on HTTP/2 HEADERS and DATA then arrive in one read, the
        # case that once lost bodies in our hypercorn#329 workaround.
        bare = client.post(f"{stack.https}/api/v1/m", headers={"Host": host}, content=b'{"n":2}', extensions=sni)
        assert bare.status_code == 202
    received = stack.relay.snapshot()[before:]
    assert len(received) == 2
    assert (received[1].path, received[1].body) == ("/ingest", b'{"n":2}')
    got = received[0]
    assert (got.method, got.path, got.body) == ("POST", "/ingest/collect?v=1", b'{"type":"pageview"}')
    assert got.headers["x-forwarded-for"] == "127.0.0.1"  # the peer; a client's own XFF is not trusted
    assert got.headers["x-forwarded-host"] == host
    assert got.headers["x-forwarded-proto"] == "https"
    assert "cookie" not in got.headers


def test_two_domains_each_with_its_own_certificate(stack: Stack) -> None:
    port = stack.edge.config.https_port
    certs = {host: peer_certificate(port, host, stack.roots) for host in HOSTS}
    assert san_names(certs[HOSTS[0]]) == [HOSTS[0]]
    assert san_names(certs[HOSTS[1]]) == [HOSTS[1]]
    assert certs[HOSTS[0]].serial_number != certs[HOSTS[1]].serial_number
    # An unknown SNI gets the fallback, which names no customer and no Pebble root trusts.
    fallback = peer_certificate(port, "unknown.example.test", None)
    assert not set(san_names(fallback)) & set(HOSTS)
    with pytest.raises(ssl.SSLCertVerificationError):
        peer_certificate(port, "unknown.example.test", stack.roots)


def _random_name(rng: random.Random) -> str:
    label = "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(1, 20)))
    return rng.choice([f"{label}.example.test", f"{label}.com", label, f"shop1.example.test.{label}",
                       f"{label}.shop1.example.test", "localhost", "127.0.0.1", f"{label}.edge.example.net"])


def test_unknown_host_or_sni_never_reaches_the_relay(stack: Stack) -> None:
    """The outage invariant: 1,000 requests with unknown Host/SNI, zero upstream calls."""
    rng = random.Random(20261123)
    relay_before = len(stack.relay.snapshot())
    origin_before = stack.origin.fetches
    statuses: list[int] = []
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # one handshake (one SNI) per request
    with httpx.Client(verify=False, limits=no_reuse, timeout=5, trust_env=False) as client:
        for i in range(1000):
            name = _random_name(rng)
            kind = i % 4
            if kind == 0:  # unknown SNI and unknown Host
                sni, host, base = name, name, stack.https
            elif kind == 1:  # a registered SNI, but the Host names someone else
                sni, host, base = HOSTS[0], name, stack.https
            elif kind == 2:  # an unknown SNI carrying a registered Host
                sni, host, base = name, HOSTS[1], stack.https
            else:  # plain HTTP on port 80 for an unknown host
                sni, host, base = "", name, stack.http
            path = rng.choice(["/api/v1/m", "/api/v1/m/collect", "/js/app.js", "/"])
            method = "POST" if path.startswith("/api") else "GET"
            ext = {"sni_hostname": sni} if sni else {}
            response = client.request(method, f"{base}{path}", headers={"Host": host},
                                      content=b"{}" if method == "POST" else None, extensions=ext)
            statuses.append(response.status_code)
    assert set(statuses) <= {421, 404}, sorted(set(statuses))
    assert statuses.count(421) >= 700  # every HTTPS case is a misdirected request
    assert len(stack.relay.snapshot()) == relay_before
    assert stack.origin.fetches == origin_before


def test_plain_http_redirects_registered_hosts_only(stack: Stack) -> None:
    with httpx.Client(trust_env=False, timeout=5) as client:
        known = client.get(f"{stack.http}/js/app.js?x=1", headers={"Host": HOSTS[0]})
        unknown = client.get(f"{stack.http}/js/app.js", headers={"Host": "nobody.example.test"})
    assert known.status_code == 308
    assert known.headers["location"] == f"https://{HOSTS[0]}/js/app.js?x=1"
    assert unknown.status_code == 404


def test_admin_api_auth_and_errors(stack: Stack) -> None:
    url = stack.edge.admin_url
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as anonymous:
        assert anonymous.get("/v1/domains").status_code == 401
        wrong = anonymous.get("/v1/domains", headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"
        assert anonymous.get("/healthz").status_code == 200
        assert "/v1/domains" in anonymous.get("/openapi.json").json()["paths"]
    with stack.edge.admin() as admin:
        assert admin.get("/v1/domains/nobody.example.test").status_code == 404
        duplicate = admin.post("/v1/domains", json={"hostname": HOSTS[0].upper()})
        assert duplicate.status_code == 409
        assert duplicate.json()["error"]["code"] == "domain_exists"
        invalid = admin.post("/v1/domains", json={"hostname": "co.uk"})
        assert invalid.status_code == 422
        assert invalid.json()["error"]["message"]
        assert admin.post("/v1/domains", json={"name": "x"}).status_code == 400
        assert admin.post("/v1/domains", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 400
        listed = admin.get("/v1/domains").json()["domains"]
        assert {d["hostname"] for d in listed} >= set(HOSTS)


def test_delete_removes_key_material(stack: Stack) -> None:
    import sqlite3

    host = "shop3.example.test"
    with stack.edge.admin() as admin:
        assert admin.post("/v1/domains", json={"hostname": host}).status_code == 201
        stack.edge.wait_status(host, "active")
        db = stack.edge.config.db_path
        with sqlite3.connect(db) as conn:
            (key_pem,) = conn.execute("SELECT key_pem FROM certificates WHERE hostname = ?", (host,)).fetchone()
        key_body = bytes(key_pem).split(b"\n")[1]  # a line of the key's base64: unique to this key
        assert peer_certificate(stack.edge.config.https_port, host, stack.roots)

        assert admin.delete(f"/v1/domains/{host}").status_code == 204
        assert admin.get(f"/v1/domains/{host}").status_code == 404
        assert admin.delete(f"/v1/domains/{host}").status_code == 404
    files = [p for p in Path(db).parent.iterdir() if p.name.startswith(Path(db).name)]
    for path in files:
        assert key_body not in path.read_bytes(), f"key bytes left in {path.name}"
    # Workers drop the certificate: the name now gets the fallback, which Pebble's root rejects.
    import time

    deadline = time.monotonic() + 10
    while True:
        try:
            peer_certificate(stack.edge.config.https_port, host, stack.roots)
        except ssl.SSLCertVerificationError:
            break
        assert time.monotonic() < deadline, "deleted certificate still served"
        time.sleep(0.2)


def test_oversized_body_gets_413_over_http2_and_the_connection_survives(stack: Stack) -> None:
    """hypercorn#329: answering before the body arrived used to kill the HTTP/2 connection."""
    host = HOSTS[0]
    sni = {"sni_hostname": host}
    before = len(stack.relay.snapshot())
    with verified_client(stack.roots, http2=True) as client:
        big = client.post(f"{stack.https}/api/v1/m", headers={"Host": host}, content=b"x" * (256 * 1024), extensions=sni)
        assert (big.http_version, big.status_code) == ("HTTP/2", 413)
        after = client.get(f"{stack.https}/js/app.js", headers={"Host": host}, extensions=sni)
        assert after.status_code == 200
    assert len(stack.relay.snapshot()) == before
