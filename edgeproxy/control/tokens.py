"""Admin API tokens: named, stored hashed, compared in constant time.

Owns: the tokens file (``admin.tokens_file``: JSON, mode 0600, SHA-256 hashes
only), creating, listing, revoking and checking tokens, and the bootstrap token
file (``admin.token_file``) that a fresh install creates so it is never open.
Must not import: ``acme``, ``httpx``, ``hypercorn``, storage backends.

Tokens are 256 random bits, so a fast hash is the right tool (a slow password
hash protects low-entropy secrets; these have none to protect). A running
``serve`` re-reads the file when its modification time changes, so a token
created or revoked with the CLI takes effect without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import AdminSettings
from ..errors import ConfigError, EdgeproxyError

__all__ = ["TokenInfo", "TokenStore", "load_or_create_bootstrap_token"]

log = logging.getLogger("edgeproxy.tokens")

_PREFIX = "ep_"  # recognisable in logs and secret scanners


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_or_create_bootstrap_token(path: str) -> str:
    """Read the bootstrap token; on first start create one (0600) so that a fresh
    install is never left open. Operators may delete the file once they have
    named tokens."""
    file = Path(path)
    if file.exists():
        token = file.read_text().strip()
        if len(token) < 16:
            raise ConfigError(f"admin token in {path} is shorter than 16 characters")
        return token
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = _PREFIX + secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("created admin token file %s", path)
    return token


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created_at: str
    fingerprint: str  # first hex digits of the hash: tells tokens apart, reveals nothing


class TokenStore:
    """Named tokens in ``admin.tokens_file`` plus the optional bootstrap token."""

    def __init__(self, settings: AdminSettings, *, create_bootstrap: bool = False) -> None:
        self.path = Path(settings.tokens_file)
        self._lock = threading.Lock()
        self._version: tuple[int, int, int] | None = None
        self._hashes: dict[str, str] = {}  # hash -> name
        self._bootstrap: str | None = None
        if create_bootstrap or Path(settings.token_file).exists():
            self._bootstrap = _hash(load_or_create_bootstrap_token(settings.token_file))

    # -- checking -------------------------------------------------------------------------
    def check(self, supplied: str) -> str | None:
        """The token's name if ``supplied`` is valid, else None (constant time per token)."""
        digest = _hash(supplied)
        matched = None
        candidates = dict(self._current())
        if self._bootstrap is not None:
            candidates[self._bootstrap] = "bootstrap"
        for known, name in candidates.items():
            # Compare against every token, even after a match, so timing says nothing.
            if hmac.compare_digest(digest, known):
                matched = name
        return matched

    def _current(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        # Writes replace the file (new inode), so this changes on every write
        # even when two land within one timestamp tick.
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if version != self._version:
                self._hashes = {entry["sha256"]: name for name, entry in self._read().items()}
                self._version = version
            return self._hashes

    # -- managing (the CLI) -------------------------------------------------------------------
    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"admin tokens file {self.path} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"admin tokens file {self.path} must hold a JSON object")
        return data

    def _write(self, data: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one

    def create(self, name: str, now: dt.datetime) -> str:
        """Make a token called ``name``; returns it (shown once, never stored)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise EdgeproxyError("token names are 1-64 letters, digits, '-', '_' or '.'", code="bad_token_name")
        data = self._read()
        if name in data:
            raise EdgeproxyError(f"a token named {name!r} exists; revoke it first", code="token_exists")
        token = _PREFIX + secrets.token_urlsafe(32)
        data[name] = {"sha256": _hash(token), "created_at": now.isoformat()}
        self._write(data)
        return token

    def revoke(self, name: str) -> None:
        data = self._read()
        if name not in data:
            raise EdgeproxyError(f"no token named {name!r}", code="token_not_found")
        del data[name]
        self._write(data)

    def list(self) -> list[TokenInfo]:
        return [TokenInfo(name, entry.get("created_at", ""), entry["sha256"][:12])
                for name, entry in sorted(self._read().items())]
