"""The one exception tree of edgeproxy.

Owns: every exception type our modules raise across a module boundary.
Must not import: anything of ours (every module may import this one).

Third-party exceptions are mapped where they enter (house rule 3): ``acme.*``
and ``josepy.*`` never leave ``acme_client.py``, ``sqlite3``/``psycopg`` errors
never leave ``storage/``. Callers catch :class:`EdgeproxyError` or a subclass.

Every error carries a stable machine ``code`` (snake_case, part of the admin API
contract) and a human sentence in ``str(error)`` that a customer or operator can
act on.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "EdgeproxyError",
    "ConfigError",
    "InvalidHostname",
    "DomainExists",
    "DomainNotFound",
    "EventNotFound",
    "LimitReached",
    "StorageError",
    "StorageUnavailable",
    "RetryClass",
    "IssuanceError",
]


class EdgeproxyError(Exception):
    """Base of every error edgeproxy raises on purpose."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(EdgeproxyError):
    """The configuration file or an environment override is invalid."""

    code = "config"


class InvalidHostname(EdgeproxyError):
    """A hostname a customer submitted cannot be served.

    ``code`` is one of the stable codes listed in ``domains.HOSTNAME_ERRORS``.
    The HTTP status is 422 (the request was well-formed, the name is not).
    """

    code = "invalid_hostname"


class DomainExists(EdgeproxyError):
    """The hostname is already registered (HTTP 409)."""

    code = "domain_exists"


class DomainNotFound(EdgeproxyError):
    """The hostname is not registered (HTTP 404)."""

    code = "domain_not_found"


class EventNotFound(EdgeproxyError):
    """No lifecycle-webhook delivery of that event id is in the outbox (unknown, or pruned)."""

    code = "event_not_found"


class LimitReached(EdgeproxyError):
    """A registration limit refused the request: HTTP 429 when ``retry_after``
    (seconds) says when to try again, 403 when only an operator can raise it."""

    code = "limit_reached"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class StorageError(EdgeproxyError):
    """The storage backend failed in a way a retry will not fix."""

    code = "storage"


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached right now (HTTP 503); retry later."""

    code = "storage_unavailable"


class RetryClass(str, Enum):
    """How an issuance failure should be retried (used by the scheduler)."""

    TRANSIENT = "transient"  # network, CA 5xx, badNonce storms, timeouts: back off and retry
    CUSTOMER = "customer"  # DNS/CAA/validation: the customer must change something
    RATE_LIMITED = "rate_limited"  # the CA said slow down: honour Retry-After
    NEVER = "never"  # the CA will never issue this (rejectedIdentifier, ...)


class IssuanceError(EdgeproxyError):
    """Obtaining a certificate failed.

    ``code`` is our stable code (``acme_dns``, ``acme_connection``,
    ``acme_unauthorized``, ``acme_rate_limited``, ``acme_caa``,
    ``acme_rejected_identifier``, ``acme_server``, ``acme_timeout``, ...),
    ``retry`` says how the scheduler should treat it and ``retry_after`` (seconds)
    carries the CA's Retry-After when it sent one.
    """

    code = "issuance"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry: RetryClass = RetryClass.TRANSIENT,
        retry_after: float | None = None,
        acme_type: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retry = retry
        self.retry_after = retry_after
        self.acme_type = acme_type
