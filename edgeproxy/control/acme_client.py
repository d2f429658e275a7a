"""ACME (RFC 8555) certificate issuance over HTTP-01: the only importer of ``acme``/``josepy``.

Owns: the ACME account (one per directory URL, its key and registration
persisted through ``Storage`` and reused across processes), one HTTP-01 order
per hostname with a fresh certificate key, publishing challenge tokens through
``Storage`` (so whichever worker receives the CA's request can answer it), and
turning every ACME, protocol and transport failure into
:class:`edgeproxy.errors.IssuanceError` with a stable ``code`` and a
:class:`~edgeproxy.errors.RetryClass` (house rule 3: ``acme.*`` never leaves
this module). The classification itself is the pure :func:`classify_problem`.
Must not import: ``proxy``, ``hypercorn`` (nor anything else above it in
DESIGN.md section 3: ``certstore``, ``renew``, ``admin``, ``server``, ``cli``).

Design notes:

- Account key: ECDSA P-256 (JWS ``ES256``). RFC 8555 section 6.2 and RFC 7518
  make ES256 the algorithm every server must support, Let's Encrypt and Pebble
  accept it, and it signs faster with far smaller JWS than RSA-2048 (key
  generation is ~1 ms instead of ~100 ms). RSA keys found in storage (made by
  another tool) are still accepted with ``RS256``.
- Certificate keys: a fresh ECDSA P-256 key per certificate, never reused
  across orders, so a leaked key dies with its certificate.
- Polling: ``acme.client.ClientV2.poll_authorizations``/``poll_finalization``
  sleep a fixed 1 s before every poll; we poll ourselves with a short first
  interval that grows (0.25 s x 1.5, capped) and always honour the CA's
  ``Retry-After`` (RFC 8555 section 7.5.1 / 7.4), bounded by the order deadline.
- ``badNonce`` (RFC 8555 section 6.5) is always retryable with a fresh nonce;
  the library retries once, we retry up to ``_BAD_NONCE_ATTEMPTS`` times.
- Renewal information (ARI, RFC 9773): ``renewal_info()`` asks the CA through
  the library's ``ClientV2.renewal_time()`` (a random time in the suggested
  window, its Retry-After capped at 12 h); ``issue(hostname, replaces=...)``
  sends the RFC 9773 section 5 ``replaces`` field, which the library's
  ``NewOrder`` lacks (``_ReplacingNewOrder``), only to CAs that offer ARI, and
  falls back to a plain order if the CA refuses the replacement.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from josepy.json_util import field as jose_field
from josepy.errors import DeserializationError
from josepy.jwa import ES256, ES384, ES512, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA
import requests
from acme import challenges, messages
from acme import client as acme_lib
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import IssuanceError, RetryClass, StorageError
from ..edge.certstore import certificate_metadata
from ..storage.base import AccountRecord, AriState, ChallengeRecord, Storage

__all__ = [
    "AcmeIssuer",
    "ari_cert_id",
    "IssuedCertificate",
    "classify_problem",
    "parse_retry_after",
    "ACME_ERROR_PREFIX",
]

log = logging.getLogger("edgeproxy.acme")

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"

_BAD_NONCE_ATTEMPTS = 10  # each attempt is up to two POSTs (the library retries once itself)
_POLL_FIRST = 0.25  # seconds before the first poll of an authorization or order
_POLL_FACTOR = 1.5
_POLL_MAX = 10.0
_REQUEST_TIMEOUT = 30.0  # seconds for one HTTP request to the CA (capped by the order timeout)
_DETAIL_MAX = 300  # characters of a CA's problem detail quoted in our messages


# ---------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and the private key it was issued for.

    ``chain_pem`` is leaf first, then intermediates. ``serial`` is lowercase hex
    without leading zeros (``format(n, "x")``, as Pebble's management API
    prints it); ``issuer`` is the leaf issuer's RFC 4514 string; datetimes are
    timezone-aware UTC.
    """

    key_pem: bytes
    chain_pem: bytes
    not_before: datetime
    not_after: datetime
    serial: str
    issuer: str


# ---------------------------------------------------------------------------------
# ACME Renewal Information (RFC 9773) and "replaces"
# ---------------------------------------------------------------------------------

_ARI_MAX_POLL = timedelta(hours=12)  # poll at least twice a day


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def ari_cert_id(chain_pem: bytes) -> str:
    """The RFC 9773 section 4.1 certificate identifier of the leaf of ``chain_pem``:
    base64url(keyIdentifier of the Authority Key Identifier) "." base64url(DER
    serial, as a signed big-endian INTEGER value). Pure."""
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    if aki is None:
        raise ValueError("the certificate's Authority Key Identifier has no keyIdentifier")
    serial = leaf.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    return f"{_b64url(aki)}.{_b64url(serial_bytes)}"


class _ReplacingNewOrder(messages.NewOrder):
    """newOrder with the RFC 9773 section 5 ``replaces`` field, which the acme
    library's ``NewOrder`` lacks."""

    replaces: str = jose_field("replaces", omitempty=True)


def _offers_ari(directory: messages.Directory) -> bool:
    try:
        directory["renewalInfo"]
    except KeyError:
        return False
    return True


def _new_order(
    client: acme_lib.ClientV2, hostname: str, csr_pem: bytes, profile: str | None, replaces: str | None
) -> messages.OrderResource:
    """``client.new_order`` plus ``replaces`` (only when the CA offers ARI, RFC 9773 section 5)."""
    if not replaces or not _offers_ari(client.directory):
        return client.new_order(csr_pem, profile=profile)
    order = _ReplacingNewOrder(
        identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=hostname)],
        profile=profile or "", replaces=replaces,
    )
    try:
        response = client._post(client.directory["newOrder"], order)
    except messages.Error as problem:
        # RFC 9773 section 5: a CA that will not accept this replacement (already
        # replaced, unknown certificate) still issues a plain new order.
        if problem.code in ("alreadyReplaced", "malformed", "conflict"):
            log.info("the CA refused replaces=%s for %s (%s); ordering without it", replaces, hostname,
                     problem.code)
            return client.new_order(csr_pem, profile=profile)
        raise
    body = messages.Order.from_json(response.json())
    authorizations = [client._authzr_from_response(client._post_as_get(url), uri=url) for url in body.authorizations]
    return messages.OrderResource(body=body, uri=response.headers.get("Location"),
                                  authorizations=authorizations, csr_pem=csr_pem)


# ---------------------------------------------------------------------------------
# Pure classification (house rule 2: no I/O, ``now`` passed in)
# ---------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date, RFC 9110 10.2.3).

    Returns None when absent or unparseable; never negative.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 HTTP-dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class _Rule:
    code: str
    retry: RetryClass
    template: str  # may use {host}, {detail}, {retry_in}, {type}


_CUSTOMER_DNS = _Rule(
    "acme_dns", RetryClass.CUSTOMER,
    "The CA could not look up {host} in DNS ({detail}). Check that the CNAME record for {host} "
    "exists at your DNS provider and that the domain's nameservers answer; we retry automatically.",
)
_CUSTOMER_WRONG_ANSWER = _Rule(
    "acme_unauthorized", RetryClass.CUSTOMER,
    "The CA reached {host} but did not get this edge's validation answer ({detail}). {host} most "
    "likely points at another server: set its CNAME record to the edge and remove A/AAAA records "
    "that point elsewhere; we retry automatically.",
)
_PROTOCOL = _Rule(
    "acme_protocol", RetryClass.TRANSIENT,
    "The CA rejected our request as invalid ({type}: {detail}). This is an edgeproxy/CA "
    "incompatibility, not something the customer can fix; we retry with backoff. Report it if it persists.",
)
_ACCOUNT = _Rule(
    "acme_account", RetryClass.TRANSIENT,
    "The CA refused our ACME account ({detail}). The account is looked up or registered again on "
    "the next attempt; if this persists the operator must check the account with the CA.",
)

# Keyed by the problem type without ``urn:ietf:params:acme:error:`` (RFC 8555 section 6.7).
_RULES: dict[str, _Rule] = {
    "dns": _CUSTOMER_DNS,
    "dnssec": _CUSTOMER_DNS,  # pre-RFC type, still sent by some CAs for DNSSEC failures
    "connection": _Rule(
        "acme_connection", RetryClass.CUSTOMER,
        "The CA could not connect to {host} on port 80 ({detail}). Check that {host} points at the "
        "edge (CNAME record) and that no firewall blocks port 80; we retry automatically.",
    ),
    "unauthorized": _CUSTOMER_WRONG_ANSWER,
    "incorrectResponse": _CUSTOMER_WRONG_ANSWER,
    "tls": _Rule(
        "acme_tls", RetryClass.CUSTOMER,
        "Validating {host} failed on a TLS connection ({detail}): something in front of {host} "
        "redirects the CA to HTTPS. Point {host} at the edge (CNAME record); we retry automatically.",
    ),
    "caa": _Rule(
        "acme_caa", RetryClass.CUSTOMER,
        "A CAA record on {host} or a parent domain forbids this CA from issuing ({detail}). Add a "
        "CAA 'issue' record for our CA (letsencrypt.org for Let's Encrypt) or remove the CAA records; "
        "we retry automatically.",
    ),
    "rateLimited": _Rule(
        "acme_rate_limited", RetryClass.RATE_LIMITED,
        "The CA rate-limited this request ({detail}); we retry {retry_in}.",
    ),
    "rejectedIdentifier": _Rule(
        "acme_rejected_identifier", RetryClass.NEVER,
        "The CA will not issue a certificate for {host} ({detail}); this hostname cannot be served. "
        "Use a different hostname.",
    ),
    "unsupportedIdentifier": _Rule(
        "acme_rejected_identifier", RetryClass.NEVER,
        "The CA does not issue certificates for names like {host} ({detail}). Use a different hostname.",
    ),
    "serverInternal": _Rule(
        "acme_server", RetryClass.TRANSIENT,
        "The CA had an internal error ({detail}); we retry {retry_in}.",
    ),
    "badNonce": _Rule(
        "acme_bad_nonce", RetryClass.TRANSIENT,
        "The CA kept rejecting our anti-replay nonces ({detail}); we retry {retry_in}.",
    ),
    "malformed": _PROTOCOL,
    "badCSR": _PROTOCOL,
    "badSignatureAlgorithm": _PROTOCOL,
    "badPublicKey": _PROTOCOL,
    "orderNotReady": _PROTOCOL,
    "badRevocationReason": _PROTOCOL,
    "alreadyRevoked": _PROTOCOL,
    "accountDoesNotExist": _ACCOUNT,
    "userActionRequired": _Rule(
        "acme_account", RetryClass.TRANSIENT,
        "The CA requires the operator to act on our ACME account, e.g. accept new terms of service "
        "({detail}); issuance resumes once that is done.",
    ),
    "externalAccountRequired": _Rule(
        "acme_account", RetryClass.TRANSIENT,
        "The CA requires external account binding, which edgeproxy does not support ({detail}); "
        "the operator must configure a different acme.directory.",
    ),
    "invalidContact": _Rule(
        "acme_invalid_contact", RetryClass.TRANSIENT,
        "The CA rejected the contact address configured in acme.email ({detail}); the operator must "
        "fix acme.email (or leave it empty).",
    ),
    "unsupportedContact": _Rule(
        "acme_invalid_contact", RetryClass.TRANSIENT,
        "The CA does not accept the contact configured in acme.email ({detail}); the operator must "
        "use a mailto: address (or leave it empty).",
    ),
}

_RATE_LIMITED_STATUS = _RULES["rateLimited"]
_SERVER_STATUS = _RULES["serverInternal"]
_UNKNOWN = _Rule(
    "acme_error", RetryClass.TRANSIENT,
    "The CA refused the request ({type}: {detail}); we retry with backoff.",
)


def _short_type(acme_type: str) -> str:
    return acme_type[len(ACME_ERROR_PREFIX):] if acme_type.startswith(ACME_ERROR_PREFIX) else acme_type


def _retry_in(retry_after: float | None) -> str:
    if retry_after is None:
        return "automatically with backoff"
    if retry_after < 120:
        return f"in {retry_after:.0f} seconds"
    if retry_after < 2 * 3600:
        return f"in {retry_after / 60:.0f} minutes"
    return f"in {retry_after / 3600:.1f} hours"


def classify_problem(
    acme_type: str,
    detail: str = "",
    status: int | None = None,
    retry_after: float | None = None,
    *,
    hostname: str = "",
) -> IssuanceError:
    """Map an ACME problem document to our stable error (pure; no I/O).

    ``acme_type`` is the problem ``type`` with or without the
    ``urn:ietf:params:acme:error:`` prefix ("" when the CA sent none),
    ``status`` the HTTP status of the response that carried it (None for
    errors found inside an authorization or order), ``retry_after`` the
    parsed ``Retry-After`` in seconds. Known types decide; unknown types fall
    back on the status (429 rate limited, 5xx CA trouble), then on a generic
    transient ``acme_error``.
    """
    short = _short_type(acme_type.strip())
    rule = _RULES.get(short)
    if rule is None:
        if status == 429:
            rule = _RATE_LIMITED_STATUS
        elif status is not None and status >= 500:
            rule = _SERVER_STATUS
        else:
            rule = _UNKNOWN
    text = " ".join((detail or "no detail given").split())
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 1] + "…"
    message = rule.template.format(
        host=hostname or "the domain",
        detail=text,
        type=short or (f"HTTP {status}" if status is not None else "unknown problem"),
        retry_in=_retry_in(retry_after),
    )
    return IssuanceError(
        message,
        code=rule.code,
        retry=rule.retry,
        retry_after=retry_after,
        acme_type=acme_type or None,
    )


def _timeout_error(hostname: str, seconds: float, stage: str) -> IssuanceError:
    return IssuanceError(
        f"The CA did not finish {stage} for {hostname} within {seconds:.0f} seconds; we retry automatically.",
        code="acme_timeout",
        retry=RetryClass.TRANSIENT,
    )


def _transport_error(exc: requests.exceptions.RequestException, directory_url: str) -> IssuanceError:
    """A failure to talk to the CA at all (the CA never answered with a problem document)."""
    reason = str(exc)[:_DETAIL_MAX]
    if isinstance(exc, requests.exceptions.SSLError):
        return IssuanceError(
            f"No trusted TLS connection to the ACME server {directory_url} ({reason}). The operator must "
            "check acme.directory and acme.ca_bundle; we retry automatically.",
            code="acme_unreachable",
            retry=RetryClass.TRANSIENT,
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return IssuanceError(
            f"The ACME server {directory_url} did not answer in time ({reason}); we retry automatically.",
            code="acme_timeout",
            retry=RetryClass.TRANSIENT,
        )
    return IssuanceError(
        f"Cannot reach the ACME server {directory_url} ({reason}); we retry automatically.",
        code="acme_unreachable",
        retry=RetryClass.TRANSIENT,
    )


# ---------------------------------------------------------------------------------
# Network: badNonce retries and the HTTP status behind each problem document
# ---------------------------------------------------------------------------------


class _Network(acme_lib.ClientNetwork):
    """``ClientNetwork`` that retries ``badNonce`` harder and remembers the last response.

    ``acme`` raises ``messages.Error`` without the HTTP status or
    ``Retry-After`` of the response that carried it; a requests response
    hook keeps both so that :func:`classify_problem` sees them. One instance
    per order (requests sessions are not shared across threads).
    """

    def __init__(
        self,
        key: JWK | None,
        *,
        alg: JWASignature,
        account: messages.RegistrationResource | None,
        verify: bool | str,
        user_agent: str,
        timeout: float,
    ) -> None:
        # requests accepts a CA bundle path for ``verify``; acme forwards
        # ``verify_ssl`` untouched but annotates it as bool.
        super().__init__(
            key,
            account=account,
            alg=alg,
            verify_ssl=cast(bool, verify),
            user_agent=user_agent,
            timeout=max(1, int(timeout)),
        )
        self.last_status: int | None = None
        self.last_retry_after: float | None = None
        self.bad_nonces = 0  # badNonce answers seen, including the ones the library retried itself
        self.session.hooks["response"].append(self._remember)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.last_status = response.status_code
        self.last_retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(timezone.utc))
        if response.status_code == 400 and b"badNonce" in response.content:
            self.bad_nonces += 1

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        """POST a signed request; on ``badNonce`` re-sign with a fresh nonce and try again.

        RFC 8555 section 6.5: a badNonce response means "retry with a fresh
        nonce". Pebble rejects 5 % of valid nonces by default, and a CA behind
        a load balancer can reject several in a row after a restart.
        """
        for attempt in range(1, _BAD_NONCE_ATTEMPTS + 1):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == _BAD_NONCE_ATTEMPTS:
                    raise
                if attempt > 2:  # a storm, not bad luck: back off a little
                    time.sleep(min(0.05 * 2 ** (attempt - 3), 1.0))
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------


def _account_jwk(key_pem: bytes) -> tuple[JWK, JWASignature]:
    """The JWK and JWS algorithm for a stored account key."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"the stored ACME account key cannot be read: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs: dict[str, JWASignature] = {"secp256r1": ES256, "secp384r1": ES384, "secp521r1": ES512}
        alg = algs.get(key.curve.name)
        if alg is not None:
            return JWKEC(key=key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        return JWKRSA(key=key), RS256
    raise StorageError("the stored ACME account key is neither ECDSA (P-256/384/521) nor RSA")


def _new_account_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key_and_csr(hostname: str) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes]:
    """A fresh P-256 key, its PEM, and a CSR naming ``hostname`` in the SAN only.

    RFC 8555 section 7.4: the CA takes identifiers from the SAN; Let's Encrypt
    ignores the subject, so none is set (as certbot's ``make_csr`` does).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, key_pem, csr.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------
# The issuer
# ---------------------------------------------------------------------------------


@dataclass
class _Account:
    jwk: JWK
    alg: JWASignature
    regr: messages.RegistrationResource


class AcmeIssuer:
    """Obtains certificates from one ACME directory over HTTP-01.

    Thread-safe: several ``issue()`` calls may run at once (each order has its
    own HTTP session); the account is set up once per instance under a lock.
    The caller serializes orders per hostname (``renew`` holds a storage lock).
    """

    def __init__(
        self,
        *,
        storage: Storage,
        directory_url: str,
        email: str = "",
        ca_bundle: str = "",
        profile: str = "",
        timeout: float = 90.0,
        user_agent: str = "edgeproxy",
    ) -> None:
        self.storage = storage
        self.directory_url = directory_url
        self.email = email.strip()
        self.ca_bundle = ca_bundle
        self.profile = profile
        self.timeout = timeout
        self.user_agent = user_agent
        self._lock = threading.Lock()
        self._directory: messages.Directory | None = None
        self._account: _Account | None = None
        self._profile_warned = False
        self.bad_nonce_retries = 0  # badNonce answers survived so far (for metrics and tests)

    # -- public API -------------------------------------------------------------------
    def issue(self, hostname: str, replaces: str | None = None) -> IssuedCertificate:
        """Order, validate (HTTP-01) and download a certificate for ``hostname``. Blocking.

        ``hostname`` is already normalized (IDNA A-label, lowercase, no
        trailing dot). Challenge tokens are in storage only while the order
        runs. ``replaces`` is the ARI identifier of the certificate this order
        renews (RFC 9773 section 5). Raises :class:`IssuanceError` (``code``/``retry`` say what
        happened and how to retry); storage failures propagate as
        ``StorageError``.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            try:
                cert = self._issue_once(hostname, deadline, replaces)
            except _StaleAccount:
                # The CA forgot our account (Pebble restarted, account
                # deactivated): look it up or register it again, then retry once.
                with self._lock:
                    self._account = None
                    self._directory = None
                cert = self._issue_once(hostname, deadline, replaces)
        except _StaleAccount as exc:
            raise exc.error from None
        log.info(
            "issued certificate for %s: serial %s, not after %s, in %.2fs",
            hostname, cert.serial, cert.not_after.isoformat(), time.monotonic() - started,
        )
        return cert

    async def issue_async(self, hostname: str) -> IssuedCertificate:
        """:meth:`issue` in a worker thread (house rule 4: ``acme`` is blocking)."""
        return await asyncio.to_thread(self.issue, hostname)

    def renewal_info(self, hostname: str, chain_pem: bytes) -> AriState:
        """Ask the CA when to renew (RFC 9773 section 4.2; a plain GET, no account).

        ``renew_at`` is a random time inside the suggested window (the acme
        library's ``renewal_time``) or None when the directory has no
        ``renewalInfo``; ``next_poll`` honours the CA's Retry-After, at most 12 h
        away. Raises :class:`IssuanceError` when the CA cannot be asked.
        """
        net = self._network()
        now = datetime.now(timezone.utc)
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        try:
            cert_id = ari_cert_id(chain_pem)
        except ValueError:
            # No Authority Key Identifier (a certificate not from an ACME CA, e.g.
            # imported): it has no ARI identity; the backstop decides.
            return AriState(hostname=hostname, serial=format(leaf.serial_number, "x"), cert_id="",
                            renew_at=None, next_poll=now + _ARI_MAX_POLL, checked_at=now)
        with self._acme_errors(hostname, net):
            client = acme_lib.ClientV2(self._get_directory(net), net)
            renew_at, next_poll = client.renewal_time(leaf.public_bytes(serialization.Encoding.PEM))
        # The library mixes aware (window) and naive local (retry) datetimes.
        if renew_at is not None and renew_at.tzinfo is None:
            renew_at = renew_at.astimezone(timezone.utc)
        next_utc = next_poll.astimezone(timezone.utc) if next_poll.tzinfo is None else next_poll
        return AriState(
            hostname=hostname, serial=format(leaf.serial_number, "x"), cert_id=cert_id,
            renew_at=renew_at, next_poll=min(next_utc, now + _ARI_MAX_POLL), checked_at=now,
        )

    # -- one attempt ----------------------------------------------------------------------
    def _issue_once(self, hostname: str, deadline: float, replaces: str | None = None) -> IssuedCertificate:
        # One network (HTTP session + nonce pool) per attempt: it carries the
        # directory GET, the account lookup and the order, so whichever request
        # fails, its HTTP status and Retry-After are at hand for classification.
        net = self._network()
        with self._acme_errors(hostname, net):
            try:
                directory = self._get_directory(net)
                account = self._get_account(directory, net)
                net.key, net.alg, net.account = account.jwk, account.alg, account.regr
                client = acme_lib.ClientV2(directory, net)
                return self._run_order(client, net, hostname, deadline, replaces)
            finally:
                with self._lock:
                    self.bad_nonce_retries += net.bad_nonces

    @contextmanager
    def _acme_errors(self, hostname: str, net: _Network) -> Iterator[None]:
        """Translate everything ``acme``/``requests``/``josepy`` raise into ``IssuanceError``."""
        try:
            yield
        except (IssuanceError, StorageError, _StaleAccount):
            raise
        except messages.Error as problem:
            error = self._problem_error(problem, hostname, net.last_status, net.last_retry_after)
            if problem.code == "accountDoesNotExist":
                raise _StaleAccount(error) from problem
            raise error from problem
        except requests.exceptions.RequestException as exc:
            raise _transport_error(exc, self.directory_url) from exc
        except (acme_errors.Error, DeserializationError, ValueError, KeyError) as exc:
            # Non-JSON error pages (a proxy's 502), missing nonces, documents we
            # cannot parse: the status, when there is one, is the best evidence.
            error = classify_problem("", f"{type(exc).__name__}: {exc}", net.last_status,
                                     net.last_retry_after, hostname=hostname)
            if error.code == "acme_error":
                error = IssuanceError(
                    f"Unexpected answer from the ACME server ({type(exc).__name__}: {str(exc)[:_DETAIL_MAX]}); "
                    "we retry with backoff.",
                    code="acme_protocol", retry=RetryClass.TRANSIENT,
                )
            raise error from exc

    @staticmethod
    def _problem_error(
        problem: messages.Error, hostname: str, status: int | None, retry_after: float | None
    ) -> IssuanceError:
        # A "compound" problem (RFC 8555 section 6.7.1) is explained by its
        # subproblems; the first one decides the class.
        if _short_type(problem.typ) == "compound" and problem.subproblems:
            sub = problem.subproblems[0]
            return classify_problem(sub.typ, sub.detail or "", status, retry_after, hostname=hostname)
        return classify_problem(problem.typ, problem.detail or "", status, retry_after, hostname=hostname)

    def _network(self) -> _Network:
        """A network without key: GETs work at once, POSTs once ``key``/``alg`` are set."""
        return _Network(
            None,
            alg=ES256,
            account=None,
            verify=self.ca_bundle or True,
            user_agent=self.user_agent,
            timeout=min(_REQUEST_TIMEOUT, self.timeout),
        )

    # -- directory and account --------------------------------------------------------
    def _get_directory(self, net: _Network) -> messages.Directory:
        """The directory (RFC 8555 section 7.1.1), fetched once per instance."""
        with self._lock:
            if self._directory is None:
                self._directory = acme_lib.ClientV2.get_directory(self.directory_url, net)
            return self._directory

    def _get_account(self, directory: messages.Directory, net: _Network) -> _Account:
        """The registered account for this directory, created and persisted on first use.

        The key is saved before registering, so a crash between the two leaves a
        key that registers (or finds) the same account next time instead of an
        orphan. If two processes create keys at once, both adopt whichever key
        storage kept (last writer wins; the other account is simply unused).
        """
        with self._lock:
            if self._account is not None:
                return self._account
            record = self.storage.get_account(self.directory_url)
            if record is None:
                self.storage.save_account(AccountRecord(self.directory_url, _new_account_key_pem(), ""))
                record = self.storage.get_account(self.directory_url)
                if record is None:
                    raise StorageError("the ACME account key was saved but cannot be read back")
            jwk, alg = _account_jwk(record.key_pem)
            net.key, net.alg, net.account = jwk, alg, None
            client = acme_lib.ClientV2(directory, net)
            regr = self._existing_registration(client, record)
            if regr is None:
                regr = self._register(client)
                log.info("registered ACME account %s at %s", regr.uri, self.directory_url)
            elif self.email and tuple(regr.body.emails) != (self.email,):
                # Send only the contact: echoing status/key back is not an update.
                regr = client.update_registration(regr, messages.Registration.from_data(email=self.email))
                log.info("updated ACME account %s contact to %s", regr.uri, self.email)
            else:
                log.debug("reusing ACME account %s", regr.uri)
            if record.registration_json != regr.json_dumps():
                self.storage.save_account(AccountRecord(self.directory_url, record.key_pem, regr.json_dumps()))
            self._account = _Account(jwk, alg, regr)
            return self._account

    @staticmethod
    def _existing_registration(
        client: acme_lib.ClientV2, record: AccountRecord
    ) -> messages.RegistrationResource | None:
        """Re-query the stored registration (``onlyReturnExisting``, RFC 8555 section 7.3.1).

        One request per process start proves the CA still knows the key and
        returns the current account object; None if it does not (a CA reset).
        """
        if not record.registration_json:
            return None
        stored = messages.RegistrationResource.json_loads(record.registration_json)
        try:
            return client.query_registration(stored)
        except messages.Error as problem:
            if problem.code == "accountDoesNotExist":
                log.warning("the CA no longer knows ACME account %s; registering again", stored.uri)
                return None
            raise

    def _register(self, client: acme_lib.ClientV2) -> messages.RegistrationResource:
        """Create the account, agreeing to the CA's terms of service (RFC 8555 section 7.3)."""
        new = messages.NewRegistration.from_data(email=self.email or None, terms_of_service_agreed=True)
        try:
            return client.new_account(new)
        except acme_errors.ConflictError as conflict:
            # The key already has an account (e.g. the registration JSON was
            # lost): fetch it rather than failing.
            existing = messages.RegistrationResource(uri=conflict.location, body=new)
            return client.query_registration(existing)

    # -- the order ----------------------------------------------------------------------
    def _order_profile(self, directory: messages.Directory) -> str | None:
        if not self.profile:
            return None
        meta = getattr(directory, "meta", None)
        profiles = getattr(meta, "profiles", None) or {}
        if not profiles:
            if not self._profile_warned:
                log.warning("acme.profile=%r ignored: %s advertises no profiles", self.profile, self.directory_url)
                self._profile_warned = True
            return None
        if self.profile not in profiles:
            raise IssuanceError(
                f"The CA does not offer the certificate profile {self.profile!r} (it offers "
                f"{', '.join(sorted(profiles))}); the operator must fix acme.profile.",
                code="acme_profile",
                retry=RetryClass.TRANSIENT,
            )
        return self.profile

    def _run_order(
        self, client: acme_lib.ClientV2, net: _Network, hostname: str, deadline: float, replaces: str | None = None
    ) -> IssuedCertificate:
        key, key_pem, csr_pem = _new_key_and_csr(hostname)
        orderr = _new_order(client, hostname, csr_pem, self._order_profile(client.directory), replaces)
        published: list[str] = []
        try:
            for authzr in orderr.authorizations:
                self._answer(client, net, authzr, hostname, published)
            for authzr in orderr.authorizations:
                self._wait_authorization(client, authzr, hostname, deadline)
            chain_pem = self._finalize(client, net, orderr, hostname, deadline)
        finally:
            for token in published:
                try:
                    self.storage.delete_challenge(token)
                except StorageError:
                    # The row expires on its own; do not mask the order's outcome.
                    log.warning("could not delete HTTP-01 token for %s", hostname, exc_info=True)
        return self._checked(hostname, key, key_pem, chain_pem)

    def _answer(
        self, client: acme_lib.ClientV2, net: _Network, authzr: messages.AuthorizationResource, hostname: str,
        published: list[str],
    ) -> None:
        """Publish and answer this authorization's HTTP-01 challenge (nothing to do if already valid).

        The token is appended to ``published`` as soon as it is stored, so the
        caller's ``finally`` deletes it even if answering fails.
        """
        body = authzr.body
        if body.status == messages.STATUS_VALID:
            return  # reused from an earlier order (RFC 8555 section 7.1.3)
        if body.status != messages.STATUS_PENDING:
            raise self._authorization_error(body, hostname)
        for challb in body.challenges:
            if isinstance(challb.chall, challenges.HTTP01):
                break
        else:
            raise IssuanceError(
                f"The CA offers no HTTP-01 challenge for {hostname}; this edge cannot validate it.",
                code="acme_no_http01",
                retry=RetryClass.NEVER,
            )
        response, key_authorization = challb.response_and_validation(net.key)
        token = str(challb.chall.encode("token"))  # base64url, as in the request path
        expires = body.expires or datetime.now(timezone.utc) + timedelta(days=7)
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
        # Published before answering: the CA may fetch the token the moment
        # it sees our answer (RFC 8555 section 7.5.1).
        self.storage.put_challenge(ChallengeRecord(token, key_authorization, hostname, expires))
        published.append(token)
        if challb.status == messages.STATUS_PENDING:
            client.answer_challenge(challb, response)

    def _wait_authorization(
        self, client: acme_lib.ClientV2, authzr: messages.AuthorizationResource, hostname: str, deadline: float
    ) -> None:
        """Poll until the authorization leaves ``pending``; raise if it is not ``valid``."""
        if authzr.body.status == messages.STATUS_VALID:
            return
        poller, retry_after = _Poller(deadline), None
        while poller.wait(retry_after):
            authzr, response = client.poll(authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                return
            if status != messages.STATUS_PENDING:
                raise self._authorization_error(authzr.body, hostname)
            retry_after = _retry_after_or_none(response)
        raise _timeout_error(hostname, self.timeout, "validating the domain")

    def _finalize(
        self, client: acme_lib.ClientV2, net: _Network, orderr: messages.OrderResource, hostname: str,
        deadline: float,
    ) -> bytes:
        """Send the CSR, poll the order until ``valid``, download the chain (RFC 8555 section 7.4)."""
        new_nonce = client.directory["newNonce"]
        orderr = client.begin_finalization(orderr)
        body = orderr.body
        poller, retry_after = _Poller(deadline), None
        while True:
            if body.status == messages.STATUS_VALID and body.certificate:
                # POST-as-GET (RFC 8555 section 6.3) through our badNonce-retrying network.
                return net.post(body.certificate, None, new_nonce_url=new_nonce).text.encode()
            if body.status == messages.STATUS_INVALID:
                if body.error is not None:
                    raise self._problem_error(body.error, hostname, None, None)
                raise IssuanceError(
                    f"The CA abandoned the order for {hostname} without saying why; we retry with backoff.",
                    code="acme_order_invalid", retry=RetryClass.TRANSIENT,
                )
            if not poller.wait(retry_after):
                raise _timeout_error(hostname, self.timeout, "issuing the certificate")
            if body.status == messages.STATUS_READY:
                # Still "ready": our finalize did not take (it can race the last
                # authorization turning valid); send it again, as certbot does.
                orderr = client.begin_finalization(orderr)
                body, retry_after = orderr.body, None
                continue
            response = net.post(orderr.uri, None, new_nonce_url=new_nonce)
            body = messages.Order.from_json(response.json())
            retry_after = _retry_after_or_none(response)

    def _authorization_error(self, body: messages.Authorization, hostname: str) -> IssuanceError:
        """The problem that made an authorization invalid (the failed challenge's ``error``)."""
        for challb in body.challenges:
            if challb.error is not None:
                return self._problem_error(challb.error, hostname, None, None)
        return IssuanceError(
            f"The CA marked the authorization for {hostname} {body.status} without a reason; "
            "we retry with backoff.",
            code="acme_unauthorized" if body.status == messages.STATUS_INVALID else "acme_protocol",
            retry=RetryClass.CUSTOMER if body.status == messages.STATUS_INVALID else RetryClass.TRANSIENT,
        )

    @staticmethod
    def _checked(hostname: str, key: ec.EllipticCurvePrivateKey, key_pem: bytes, chain_pem: bytes) -> IssuedCertificate:
        """Refuse a chain that does not match our key or name (we would serve a broken site)."""
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise IssuanceError(
                f"The CA returned an unreadable certificate for {hostname} ({exc}); we retry with backoff.",
                code="acme_bad_certificate", retry=RetryClass.TRANSIENT,
            ) from exc
        leaf = certs[0]
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            )
        except x509.ExtensionNotFound:
            names = []
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki) or hostname not in names:
            raise IssuanceError(
                f"The CA returned a certificate that does not match the order for {hostname}; we retry with backoff.",
                code="acme_bad_certificate", retry=RetryClass.TRANSIENT,
            )
        not_before, not_after, serial, issuer = certificate_metadata(chain_pem)
        return IssuedCertificate(key_pem, chain_pem, not_before, not_after, serial, issuer)


class _StaleAccount(Exception):
    """The CA does not know our account any more; carries the mapped error."""

    def __init__(self, error: IssuanceError) -> None:
        super().__init__(str(error))
        self.error = error


def _retry_after_or_none(response: requests.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"), datetime.now(timezone.utc))


class _Poller:
    """Paces a polling loop: short first interval, growing, honouring ``Retry-After``, bounded by a deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._next = _POLL_FIRST

    def wait(self, retry_after: float | None = None) -> bool:
        """Sleep before the next poll; False (without sleeping) once the deadline has passed.

        The CA's ``Retry-After`` replaces our own interval (RFC 8555 section
        7.5.1); we never sleep past the deadline.
        """
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        delay = retry_after if retry_after is not None else self._next
        self._next = min(self._next * _POLL_FACTOR, _POLL_MAX)
        time.sleep(min(delay, remaining))
        return True
