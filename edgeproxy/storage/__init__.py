"""Storage: the ``Storage`` protocol, its records, and ``open_storage(url)``.

Owns: choosing a backend from ``storage.url``. Other modules import the
protocol and records from here and get a backend only through
:func:`open_storage` (``proxy``, ``admin``, ``cli`` and ``monitor`` must not
import a backend module).
Must not import: ``acme``, ``httpx``, ``hypercorn``. Backends are imported
lazily, inside :func:`open_storage`.

Accepted URLs (the part after ``sqlite:`` is a filesystem path, taken
literally: no percent-decoding, no query parameters):

- ``sqlite:///var/lib/edgeproxy/edgeproxy.db`` -> ``/var/lib/edgeproxy/edgeproxy.db``
  (the documented default; everything after ``sqlite://`` is the absolute path).
- ``sqlite:////var/lib/edgeproxy/edgeproxy.db`` -> the same file (SQLAlchemy's
  four-slash spelling is accepted too: leading slashes collapse to one).
- ``sqlite:relative/edgeproxy.db`` -> relative to the current directory.
- ``postgresql://...`` / ``postgres://...``: not supported yet (``ConfigError``).
"""

from __future__ import annotations

from edgeproxy.errors import ConfigError
from edgeproxy.storage.base import (
    DOMAIN_STATUSES,
    AccountRecord,
    CertificateRecord,
    ChallengeRecord,
    DomainRecord,
    FailedRequestRecord,
    Storage,
)

__all__ = [
    "AccountRecord",
    "CertificateRecord",
    "ChallengeRecord",
    "DomainRecord",
    "DOMAIN_STATUSES",
    "FailedRequestRecord",
    "Storage",
    "open_storage",
    "sqlite_path_from_url",
]

_EXAMPLE = "sqlite:///var/lib/edgeproxy/edgeproxy.db"


def sqlite_path_from_url(url: str) -> str:
    """The filesystem path a ``sqlite:`` URL names (see the module docstring).

    Raises ``ConfigError`` when the URL is not a usable ``sqlite:`` file URL.
    """
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.lower() != "sqlite":
        raise ConfigError(f"storage.url {url!r} is not a sqlite: URL (example: {_EXAMPLE})")
    if rest.startswith("//"):
        rest = rest[2:]
        if not rest.startswith("/"):
            # sqlite://host/... : there is no host in a file URL.
            raise ConfigError(
                f"storage.url {url!r}: after 'sqlite://' give an absolute path "
                f"(example: {_EXAMPLE}), or use 'sqlite:relative/path.db'"
            )
        rest = "/" + rest.lstrip("/")
    if not rest or rest.endswith("/"):
        raise ConfigError(f"storage.url {url!r} names no database file (example: {_EXAMPLE})")
    if rest == ":memory:" or "?" in rest:
        raise ConfigError(
            f"storage.url {url!r}: in-memory databases and URL parameters are not "
            f"supported; give a file path (example: {_EXAMPLE})"
        )
    return rest


def open_storage(url: str) -> Storage:
    """Open the store named by ``storage.url``.

    Raises ``ConfigError`` for an unknown or unsupported scheme or a malformed
    URL, and ``StorageError``/``StorageUnavailable`` if the store cannot be
    opened or created.
    """
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from edgeproxy.storage.sqlite import SqliteStorage

        return SqliteStorage(sqlite_path_from_url(url))
    if scheme in ("postgresql", "postgres"):
        raise ConfigError(
            "PostgreSQL storage is not supported yet; set storage.url to a SQLite file "
            f"such as {_EXAMPLE}"
        )
    # The URL itself is not echoed: it may carry a password.
    raise ConfigError(
        f"storage.url has an unknown scheme {scheme!r}; supported: sqlite: (e.g. {_EXAMPLE})"
    )
