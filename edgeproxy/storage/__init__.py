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
- ``postgresql://user[:password]@host[:port]/dbname[?param=value...]`` (or
  ``postgres://``): a libpq URI for the shared multi-node store
  (``storage/postgres.py``), e.g. ``postgresql://edge@db.internal/edgeproxy`` or,
  to keep the tables in a schema of their own,
  ``postgresql://edge@db.internal/shared?options=-csearch_path%3Dedgeproxy``.
  The password may also come from ``~/.pgpass`` or ``PGPASSWORD`` (libpq).
"""

from __future__ import annotations

import os

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
    "migrate_storage",
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


def _scheme(url: str) -> str:
    return url.partition(":")[0].lower() if ":" in url else ""


def _unknown_scheme(url: str) -> ConfigError:
    # The URL itself is not echoed: it may carry a password.
    return ConfigError(
        f"storage.url has an unknown scheme {_scheme(url)!r}; supported: sqlite: (e.g. {_EXAMPLE}) "
        "and postgresql://"
    )


def open_storage(url: str, *, auto_migrate: bool = True) -> Storage:
    """Open the store named by ``storage.url``.

    ``auto_migrate`` (``storage.auto_migrate``) applies to PostgreSQL: when
    False, a shared database whose schema is older than this code is refused
    (run ``edgeproxy migrate``) instead of being upgraded by whichever node
    starts first. A SQLite file belongs to one node and is always brought up
    to date on open.

    Raises ``ConfigError`` for an unknown or unsupported scheme or a malformed
    URL, and ``StorageError``/``StorageUnavailable`` if the store cannot be
    opened or created.
    """
    scheme = _scheme(url)
    if scheme == "sqlite":
        from edgeproxy.storage.sqlite import SqliteStorage

        return SqliteStorage(sqlite_path_from_url(url))
    if scheme in ("postgresql", "postgres"):
        from edgeproxy.storage.postgres import PostgresStorage

        return PostgresStorage(url, migrate=auto_migrate)
    raise _unknown_scheme(url)


def migrate_storage(url: str) -> tuple[int, int]:
    """Create or upgrade the schema of the store at ``url`` (``edgeproxy migrate``).

    Returns (version before, version after); idempotent. Raises like
    :func:`open_storage`."""
    scheme = _scheme(url)
    if scheme == "sqlite":
        from edgeproxy.storage.sqlite import SCHEMA_VERSION, SqliteStorage

        path = sqlite_path_from_url(url)
        existed = os.path.exists(path) and os.path.getsize(path) > 0
        SqliteStorage(path).close()  # opening creates or upgrades the schema
        return (SCHEMA_VERSION if existed else 0), SCHEMA_VERSION
    if scheme in ("postgresql", "postgres"):
        from edgeproxy.storage.postgres import PostgresStorage

        store = PostgresStorage(url, migrate=True, min_connections=0)
        try:
            return store.last_migration
        finally:
            store.close()
    raise _unknown_scheme(url)
