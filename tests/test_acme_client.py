"""acme_client: pure problem classification, and real issuance against Pebble (no mocked ACME).

The end-to-end tests run a tiny HTTP-01 responder that answers from the same
in-memory storage the issuer publishes tokens to, exactly as the proxy does
from the real store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from edgeproxy.control.acme_client import AcmeIssuer, classify_problem, parse_retry_after
from edgeproxy.edge.certstore import certificate_metadata
from edgeproxy.devtools.pebble import ChallTestSrv
from edgeproxy.errors import IssuanceError, RetryClass
from edgeproxy.storage.base import AccountRecord, CertificateRecord, ChallengeRecord, DomainRecord

from edgeproxy.devtools.pebble import Pebble

PebbleFactory = Callable[..., Pebble]  # the conftest fixture: (http_port, nonce_reject=None, **options)

UTC = dt.timezone.utc
E2E_TIMEOUT = 20


# ---------------------------------------------------------------------------------
# (a) pure classification
# ---------------------------------------------------------------------------------

P = "urn:ietf:params:acme:error:"


@pytest.mark.parametrize(
    ("acme_type", "status", "code", "retry"),
    [
        (P + "dns", 400, "acme_dns", RetryClass.CUSTOMER),
        ("dns", None, "acme_dns", RetryClass.CUSTOMER),  # prefix optional
        (P + "connection", None, "acme_connection", RetryClass.CUSTOMER),
        (P + "unauthorized", 403, "acme_unauthorized", RetryClass.CUSTOMER),
        (P + "incorrectResponse", None, "acme_unauthorized", RetryClass.CUSTOMER),
        (P + "caa", 403, "acme_caa", RetryClass.CUSTOMER),
        (P + "tls", None, "acme_tls", RetryClass.CUSTOMER),
        (P + "rateLimited", 429, "acme_rate_limited", RetryClass.RATE_LIMITED),
        (P + "rejectedIdentifier", 400, "acme_rejected_identifier", RetryClass.NEVER),
        (P + "unsupportedIdentifier", 400, "acme_rejected_identifier", RetryClass.NEVER),
        (P + "serverInternal", 500, "acme_server", RetryClass.TRANSIENT),
        (P + "badNonce", 400, "acme_bad_nonce", RetryClass.TRANSIENT),
        (P + "malformed", 400, "acme_protocol", RetryClass.TRANSIENT),
        (P + "badCSR", 400, "acme_protocol", RetryClass.TRANSIENT),
        (P + "orderNotReady", 403, "acme_protocol", RetryClass.TRANSIENT),
        (P + "accountDoesNotExist", 400, "acme_account", RetryClass.TRANSIENT),
        (P + "userActionRequired", 403, "acme_account", RetryClass.TRANSIENT),
        (P + "externalAccountRequired", 403, "acme_account", RetryClass.TRANSIENT),
        (P + "invalidContact", 400, "acme_invalid_contact", RetryClass.TRANSIENT),
        # No (or an unknown) type: the HTTP status decides.
        ("", 429, "acme_rate_limited", RetryClass.RATE_LIMITED),
        ("about:blank", 503, "acme_server", RetryClass.TRANSIENT),
        ("", 502, "acme_server", RetryClass.TRANSIENT),
        (P + "somethingNew", 400, "acme_error", RetryClass.TRANSIENT),
        ("", None, "acme_error", RetryClass.TRANSIENT),
    ],
)
def test_classify_problem_table(acme_type: str, status: int | None, code: str, retry: RetryClass) -> None:
    error = classify_problem(acme_type, "the detail", status, None, hostname="shop.example.com")
    assert isinstance(error, IssuanceError)
    assert (error.code, error.retry) == (code, retry)
    assert error.acme_type == (acme_type or None)
    assert "the detail" in str(error)


@pytest.mark.parametrize(
    ("acme_type", "advice"),
    [
        ("dns", "CNAME record"),
        ("connection", "port 80"),
        ("unauthorized", "CNAME record"),
        ("caa", "CAA"),
        ("rejectedIdentifier", "different hostname"),
        ("invalidContact", "acme.email"),
    ],
)
def test_customer_messages_name_the_host_and_the_fix(acme_type: str, advice: str) -> None:
    message = str(classify_problem(acme_type, "why", hostname="cdn.shop.example"))
    assert "cdn.shop.example" in message or acme_type == "invalidContact"
    assert advice in message


def test_retry_after_is_carried_and_explained() -> None:
    error = classify_problem(P + "rateLimited", "too many certificates", 429, 3600.0, hostname="a.example")
    assert error.retry is RetryClass.RATE_LIMITED
    assert error.retry_after == 3600.0
    assert "in 60 minutes" in str(error)
    assert classify_problem(P + "serverInternal", "x", 503, 30.0).retry_after == 30.0


def test_long_details_are_truncated_and_flattened() -> None:
    message = str(classify_problem("dns", "line one\n" + "x" * 5000))
    assert "\n" not in message
    assert len(message) < 700


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Wed, 01 Jan 2031 00:02:00 GMT", 120.0),
        ("Tue, 31 Dec 2030 23:00:00 GMT", 0.0),  # in the past: retry now, never negative
        ("soon", None),
        ("-5", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = dt.datetime(2031, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after(header, now) == expected


def test_certificate_info_reads_the_leaf() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")])
    not_before = dt.datetime(2030, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(0x0ABCDEF)
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    other = cert.public_bytes(serialization.Encoding.PEM)
    chain = cert.public_bytes(serialization.Encoding.PEM) + other
    assert certificate_metadata(chain) == (not_before, not_before + dt.timedelta(days=90), "abcdef", "O=Org,CN=Test CA")
    with pytest.raises(ValueError):
        certificate_metadata(b"not a certificate")


# ---------------------------------------------------------------------------------
# Real Pebble: fake storage and an HTTP-01 responder
# ---------------------------------------------------------------------------------


class FakeStorage:
    """In-memory Storage: real behaviour for accounts and challenges only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accounts: dict[str, AccountRecord] = {}
        self.challenges: dict[str, ChallengeRecord] = {}
        self.published: list[ChallengeRecord] = []  # every put_challenge, in order
        self.deleted: list[str] = []

    def get_account(self, directory_url: str) -> AccountRecord | None:
        with self._lock:
            return self.accounts.get(directory_url)

    def save_account(self, account: AccountRecord) -> None:
        with self._lock:
            self.accounts[account.directory_url] = account

    def put_challenge(self, challenge: ChallengeRecord) -> None:
        with self._lock:
            self.challenges[challenge.token] = challenge
            self.published.append(challenge)

    def get_challenge(self, token: str) -> ChallengeRecord | None:
        with self._lock:
            return self.challenges.get(token)

    def delete_challenge(self, token: str) -> None:
        with self._lock:
            self.challenges.pop(token, None)
            self.deleted.append(token)

    # -- not used by the issuer ------------------------------------------------------
    def add_domain(self, hostname: str, status: str, now: dt.datetime) -> DomainRecord:
        raise NotImplementedError

    def get_domain(self, hostname: str) -> DomainRecord | None:
        raise NotImplementedError

    def list_domains(self) -> list[DomainRecord]:
        raise NotImplementedError

    def due_domains(
        self, now: dt.datetime, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[DomainRecord]:
        raise NotImplementedError

    def count_domains(self) -> int:
        raise NotImplementedError

    def domain_statuses(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def count_domains_by_status(self) -> dict[str, int]:
        raise NotImplementedError

    def domain_created_times_since(self, since: dt.datetime) -> list[dt.datetime]:
        raise NotImplementedError

    def update_domain(
        self, hostname: str, now: dt.datetime, *, status: str, error_code: str | None = None,
        error_message: str | None = None, next_attempt_at: dt.datetime | None = None, attempts: int = 0,
    ) -> DomainRecord:
        raise NotImplementedError

    def remove_domain(self, hostname: str) -> bool:
        raise NotImplementedError

    def save_certificate(self, cert: CertificateRecord) -> None:
        raise NotImplementedError

    def get_certificate(self, hostname: str) -> CertificateRecord | None:
        raise NotImplementedError

    def changes_since(self, seq: int) -> tuple[int, list[str]]:
        raise NotImplementedError

    def try_lock(self, name: str, owner: str, ttl_seconds: float, now: dt.datetime) -> bool:
        raise NotImplementedError

    def unlock(self, name: str, owner: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class Responder:
    """HTTP-01 answers from storage; ``mode`` = "ok", "404" or "wrong"."""

    storage: FakeStorage
    port: int = 0
    mode: str = "ok"
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # (Host, path, token was in storage)


@pytest.fixture
def storage() -> FakeStorage:
    return FakeStorage()


@pytest.fixture
def responder(storage: FakeStorage) -> Iterator[Responder]:
    state = Responder(storage)
    prefix = "/.well-known/acme-challenge/"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            record = storage.get_challenge(self.path[len(prefix):]) if self.path.startswith(prefix) else None
            host = self.headers.get("Host", "").rsplit(":", 1)[0]  # port present: tests do not use 80
            state.requests.append((host, self.path, record is not None))
            if state.mode == "404" or record is None:
                self.send_error(404)
                return
            body = (record.key_authorization if state.mode == "ok" else "not-the-key-authorization").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="http01-responder", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_issuer(storage: FakeStorage, directory_url: str, ca_bundle: str) -> AcmeIssuer:
    return AcmeIssuer(storage=storage, directory_url=directory_url, ca_bundle=ca_bundle, email="ops@example.com",
                      timeout=15)


def registration_uri(storage: FakeStorage, directory_url: str) -> str:
    record = storage.get_account(directory_url)
    assert record is not None and record.registration_json
    uri = json.loads(record.registration_json)["uri"]
    assert isinstance(uri, str)
    return uri


# ---------------------------------------------------------------------------------
# (b) issuance end to end
# ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_issues_a_verifiable_certificate_over_http01(
    pebble_factory: PebbleFactory, challtestsrv: ChallTestSrv, responder: Responder, storage: FakeStorage
) -> None:
    host = "shop1.example.test"
    # Pebble resolves the name through challtestsrv: pin it to the responder's address.
    challtestsrv.add_a(host, ["127.0.0.1"])
    try:
        pebble = pebble_factory(responder.port, nonce_reject=0, authz_reuse=0)
        issued = make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path)).issue(host)
    finally:
        challtestsrv.clear_a(host)

    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    leaf, intermediates = chain[0], chain[1:]
    assert [c.public_bytes(serialization.Encoding.PEM) for c in intermediates] == [pebble.intermediate_pem()]
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    now = dt.datetime.now(UTC)
    verifier = PolicyBuilder().store(Store([root])).time(now).build_server_verifier(x509.DNSName(host))
    verified = verifier.verify(leaf, intermediates)  # raises if the chain or the name is wrong
    assert verified[-1] == root

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [host]
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)

    assert issued.not_before.tzinfo is not None and issued.not_after.tzinfo is not None
    assert issued.not_before <= now < issued.not_after
    assert issued.serial == format(leaf.serial_number, "x")
    assert issued.issuer == leaf.issuer.rfc4514_string() and "Pebble Intermediate CA" in issued.issuer
    # Pebble's own record of the certificate is found by our serial format.
    assert pebble.cert_status(issued.serial)["Status"] == "Valid"

    # The CA fetched the token from the responder (Host = the customer's name) while it
    # was published; afterwards nothing is left in storage.
    assert len(storage.published) == 1
    token = storage.published[0].token
    assert storage.published[0].hostname == host
    assert storage.published[0].key_authorization.startswith(token + ".")
    assert storage.published[0].expires_at > now
    assert (host, f"/.well-known/acme-challenge/{token}", True) in responder.requests
    assert storage.challenges == {} and storage.deleted == [token]


# ---------------------------------------------------------------------------------
# (c) the account is persisted and reused
# ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_account_is_reused_across_issuers(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=0)
    bundle = str(pebble.ca_bundle_path)
    assert storage.get_account(pebble.directory_url) is None

    make_issuer(storage, pebble.directory_url, bundle).issue("shop1.example.test")
    first = storage.get_account(pebble.directory_url)
    assert first is not None
    uri = registration_uri(storage, pebble.directory_url)
    assert uri.startswith(pebble.directory_url.rsplit("/", 1)[0])

    # A new issuer (as after a restart, or another process) on the same storage.
    make_issuer(storage, pebble.directory_url, bundle).issue("shop2.example.test")
    second = storage.get_account(pebble.directory_url)
    assert second is not None
    assert second.key_pem == first.key_pem
    assert registration_uri(storage, pebble.directory_url) == uri


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_account_unknown_to_the_ca_is_registered_again_with_the_same_key(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    # A CA that lost its state (as Pebble does on every restart) still gets our key.
    old = pebble_factory(responder.port, nonce_reject=0)
    make_issuer(storage, old.directory_url, str(old.ca_bundle_path)).issue("shop1.example.test")
    old_record = storage.get_account(old.directory_url)
    assert old_record is not None

    new = pebble_factory(responder.port, nonce_reject=0)
    storage.save_account(AccountRecord(new.directory_url, old_record.key_pem, old_record.registration_json))
    make_issuer(storage, new.directory_url, str(new.ca_bundle_path)).issue("shop1.example.test")
    record = storage.get_account(new.directory_url)
    assert record is not None and record.key_pem == old_record.key_pem
    assert registration_uri(storage, new.directory_url).startswith(new.directory_url.rsplit("/", 1)[0])


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_reused_valid_authorization_needs_no_challenge(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=0, authz_reuse=100)
    issuer = make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path))
    first = issuer.issue("shop1.example.test")
    assert len(storage.published) == 1
    second = issuer.issue("shop1.example.test")  # the CA reuses the valid authorization
    assert len(storage.published) == 1
    # Every CA request (Pebble fetches each token several times) was for the first order's token.
    assert {path for _host, path, _present in responder.requests} == {
        f"/.well-known/acme-challenge/{storage.published[0].token}"
    }
    assert second.serial != first.serial and second.key_pem != first.key_pem  # fresh key per certificate


# ---------------------------------------------------------------------------------
# (d) badNonce storms
# ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_issues_despite_half_of_all_nonces_being_rejected(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=50)
    issuer = make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path))
    issued = issuer.issue("shop1.example.test")
    assert issued.chain_pem.count(b"BEGIN CERTIFICATE") == 2
    # ~12 signed requests at 50 %: rejections really happened and were survived.
    assert issuer.bad_nonce_retries > 0


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_issues_with_pebbles_default_nonce_rejection(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port)  # Pebble's own default: 5 % rejected
    assert "PEBBLE_WFE_NONCEREJECT" not in pebble.environment()
    issuer = make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path))
    hosts = [f"shop{n}.example.test" for n in range(3)]

    async def issue_all() -> list[str]:
        # Concurrent orders through issue_async: one account, one thread each.
        issued = await asyncio.gather(*(issuer.issue_async(h) for h in hosts))
        return [x509.load_pem_x509_certificate(c.chain_pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)[0] for c in issued]

    assert asyncio.run(issue_all()) == hosts
    assert len(storage.accounts) == 1 and storage.challenges == {}


# ---------------------------------------------------------------------------------
# (e) failures map to our codes, and challenges never outlive the order
# ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
@pytest.mark.parametrize("mode", ["404", "wrong"])
def test_validation_failure_is_a_customer_error_and_cleans_up(
    mode: str, pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=0)
    responder.mode = mode
    with pytest.raises(IssuanceError) as caught:
        make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path)).issue("shop3.example.test")
    error = caught.value
    assert error.code == "acme_unauthorized"
    assert error.retry is RetryClass.CUSTOMER
    assert error.acme_type == P + "unauthorized"
    assert "shop3.example.test" in str(error) and "CNAME" in str(error)
    # The CA did ask, for a token that was published at the time ...
    assert any(host == "shop3.example.test" and present for host, _path, present in responder.requests)
    # ... and the token is gone now.
    assert len(storage.published) == 1 and storage.challenges == {}


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_unreachable_http01_address_is_a_connection_error(
    pebble_factory: PebbleFactory, challtestsrv: ChallTestSrv, responder: Responder, storage: FakeStorage
) -> None:
    host = "elsewhere.example.test"
    challtestsrv.add_a(host, ["127.0.0.2"])  # loopback, but nothing listens there
    try:
        pebble = pebble_factory(responder.port, nonce_reject=0)
        with pytest.raises(IssuanceError) as caught:
            make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path)).issue(host)
    finally:
        challtestsrv.clear_a(host)
    assert (caught.value.code, caught.value.retry) == ("acme_connection", RetryClass.CUSTOMER)
    assert storage.challenges == {} and len(storage.deleted) == 1


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_name_refused_by_ca_policy_is_never_retried(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=0, domain_blocklist=["blocked.example.test"])
    with pytest.raises(IssuanceError) as caught:
        make_issuer(storage, pebble.directory_url, str(pebble.ca_bundle_path)).issue("blocked.example.test")
    assert (caught.value.code, caught.value.retry) == ("acme_rejected_identifier", RetryClass.NEVER)
    assert storage.published == []  # refused at new-order: nothing was ever published


@pytest.mark.e2e
@pytest.mark.timeout(E2E_TIMEOUT)
def test_untrusted_ca_certificate_is_reported_as_unreachable(
    pebble_factory: PebbleFactory, responder: Responder, storage: FakeStorage
) -> None:
    pebble = pebble_factory(responder.port, nonce_reject=0)
    issuer = AcmeIssuer(storage=storage, directory_url=pebble.directory_url, timeout=10)  # no ca_bundle
    with pytest.raises(IssuanceError) as caught:
        issuer.issue("shop1.example.test")
    assert (caught.value.code, caught.value.retry) == ("acme_unreachable", RetryClass.TRANSIENT)
    assert "acme.ca_bundle" in str(caught.value)


@pytest.mark.timeout(E2E_TIMEOUT)
def test_ca_that_does_not_listen_is_unreachable(storage: FakeStorage) -> None:
    with pytest.raises(IssuanceError) as caught:
        AcmeIssuer(storage=storage, directory_url="https://127.0.0.1:9/dir", timeout=5).issue("shop1.example.test")
    assert (caught.value.code, caught.value.retry) == ("acme_unreachable", RetryClass.TRANSIENT)
    assert storage.accounts == {}  # nothing persisted before the CA answered
