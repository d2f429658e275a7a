"""Private keys at rest: AES-256-GCM sealing with a master key, and key rotation.

Owns: loading master keys, sealing/opening private-key blobs, the ``SealedStorage``
decorator that seals every certificate and ACME-account key on its way into any
``Storage`` backend and opens it on the way out, the read-only start-up check,
and ``rotate``.
Must not import: ``acme``, ``httpx``, ``hypercorn``, storage backends.

Blob format (one line, ASCII)::

    edgeproxy-sealed:v1:<key id>:<urlsafe base64 of 12-byte nonce + ciphertext + tag>

The key id (first 8 bytes of SHA-256 of the master key, hex) says which master
key sealed a blob, so that ``edgeproxy keys rotate`` can re-seal under a new key
while the previous one still opens old blobs. The associated data binds a blob
to its owner (``cert:<hostname>`` or ``account:<directory URL>``): a sealed key
copied onto another row does not open.
"""

from __future__ import annotations

import base64
import datetime as dt
import binascii
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..config import Settings, StorageSettings
from ..errors import ConfigError, EdgeproxyError
from ..storage import open_storage
from ..storage.base import AccountRecord, CertificateRecord, CertificateVisitor, OutboxEvent, Storage

__all__ = [
    "SealedKeyError",
    "KeyRing",
    "SealedStorage",
    "generate_master_key",
    "load_keyring",
    "open_store",
    "rotate",
]

_PREFIX = b"edgeproxy-sealed:v1:"

log = logging.getLogger("edgeproxy.keys")


class SealedKeyError(EdgeproxyError):
    """A sealed key cannot be opened with the configured master keys."""

    code = "key_mismatch"


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _read_master_key(path: str) -> bytes:
    """32 raw bytes, or 64 hex characters, or base64 of 32 bytes (what ``keys generate`` writes)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"master key file {path} does not exist (create one with `edgeproxy keys generate {path}`)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read master key file {path}: {exc.strerror}") from exc
    if len(data) == 32:
        return data
    text = data.strip()
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    raise ConfigError(f"master key file {path} must hold a 256-bit key (32 raw bytes, 64 hex or base64 characters)")


@dataclass(frozen=True)
class KeyRing:
    """The current master key (seals) and previous ones (open only). Empty = sealing off."""

    current: tuple[str, AESGCM] | None
    previous: dict[str, AESGCM]

    @property
    def enabled(self) -> bool:
        return self.current is not None

    def seal(self, plain: bytes, owner: str) -> bytes:
        if self.current is None:
            return plain
        kid, aead = self.current
        nonce = secrets.token_bytes(12)  # 96-bit random nonce (NIST SP 800-38D section 8.2.2)
        sealed = aead.encrypt(nonce, plain, owner.encode())
        return _PREFIX + kid.encode() + b":" + base64.urlsafe_b64encode(nonce + sealed)

    def open(self, blob: bytes, owner: str) -> bytes:
        if not blob.startswith(_PREFIX):
            return blob  # stored before sealing was turned on; `keys rotate` seals it
        kid, _, payload = blob[len(_PREFIX):].partition(b":")
        aead = self._by_id(kid.decode("ascii", "replace"))
        raw = base64.urlsafe_b64decode(payload)
        try:
            return aead.decrypt(raw[:12], raw[12:], owner.encode())
        except InvalidTag as exc:
            raise SealedKeyError(f"the sealed key of {owner} does not open with master key {kid.decode()}: "
                            "wrong key file, or the row was tampered with") from exc

    def _by_id(self, kid: str) -> AESGCM:
        if self.current is not None and self.current[0] == kid:
            return self.current[1]
        if kid in self.previous:
            return self.previous[kid]
        configured = [k for k in ([self.current[0]] if self.current else []) + list(self.previous)]
        raise SealedKeyError(
            f"stored private keys were sealed with master key {kid}, which is not configured "
            f"(configured: {', '.join(configured) or 'none'}); set storage.key_encryption_key_file "
            "to that key, or list it in storage.previous_key_files"
        )


def load_keyring(storage: StorageSettings) -> KeyRing:
    current = None
    if storage.key_encryption_key_file:
        key = _read_master_key(storage.key_encryption_key_file)
        current = (_key_id(key), AESGCM(key))
    previous = {}
    for path in storage.previous_key_files:
        key = _read_master_key(path)
        previous[_key_id(key)] = AESGCM(key)
    return KeyRing(current, previous)


class SealedStorage:
    """A ``Storage`` that seals private keys on the way in and opens them on the way out.

    Every other method is the wrapped backend's own (delegated by ``__getattr__``),
    so the Storage contract, including its errors, is unchanged.
    """

    def __init__(self, inner: Storage, ring: KeyRing) -> None:
        self._inner = inner
        self._ring = ring

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save_certificate(self, cert: CertificateRecord, events: Sequence[OutboxEvent] = ()) -> None:
        self._inner.save_certificate(replace(cert, key_pem=self._ring.seal(cert.key_pem, f"cert:{cert.hostname}")),
                                     events)

    def get_certificate(self, hostname: str) -> CertificateRecord | None:
        cert = self._inner.get_certificate(hostname)
        if cert is None:
            return None
        return replace(cert, key_pem=self._ring.open(cert.key_pem, f"cert:{hostname}"))

    def scan_certificates(self, hostnames: Sequence[str], visit: CertificateVisitor) -> set[str]:
        """The backend's bulk scan (when it has one) with every key opened; without
        one, the per-name reads. Defined here so ``__getattr__`` can never hand
        sealed keys to the certstore."""
        inner_scan = getattr(self._inner, "scan_certificates", None)
        if inner_scan is None:
            registered = {h for h in hostnames if self._inner.get_domain(h) is not None}
            for h in registered:
                cert = self.get_certificate(h)
                if cert is not None:
                    visit(h, cert.key_pem, cert.chain_pem, None, cert.not_after, cert.serial)
            return registered

        def opened(h: str, key_pem: bytes, chain_pem: bytes, leaf_der: bytes | None, not_after: dt.datetime,
                   serial: str) -> None:
            if key_pem.startswith(_PREFIX):  # what open() checks first; the owner string only when sealed
                key_pem = self._ring.open(key_pem, f"cert:{h}")
            visit(h, key_pem, chain_pem, leaf_der, not_after, serial)

        return set(inner_scan(hostnames, opened))

    def save_account(self, account: AccountRecord) -> None:
        owner = f"account:{account.directory_url}"
        self._inner.save_account(replace(account, key_pem=self._ring.seal(account.key_pem, owner)))

    def get_account(self, directory_url: str) -> AccountRecord | None:
        account = self._inner.get_account(directory_url)
        if account is None:
            return None
        return replace(account, key_pem=self._ring.open(account.key_pem, f"account:{directory_url}"))

    def list_accounts(self) -> list[AccountRecord]:
        return [replace(a, key_pem=self._ring.open(a.key_pem, f"account:{a.directory_url}"))
                for a in self._inner.list_accounts()]


def open_store(settings: Settings, *, check: bool = True) -> Storage:
    """Open ``storage.url`` with private-key sealing as configured.

    With ``check`` (what ``serve`` and the CLI do), a few stored keys are opened
    first: a wrong or missing master key stops start-up with a clear message
    before anything is written.
    """
    ring = load_keyring(settings.storage)
    if _is_shared(settings.storage.url) and not ring.enabled:
        # No secure_delete in PostgreSQL: a removed key's bytes linger in data
        # files until VACUUM and overwrite, and in WAL, backups and replicas.
        log.warning(
            "storage.url is a shared PostgreSQL store and storage.key_encryption_key_file is not "
            "set: private keys are stored unsealed, and a removed domain's key bytes stay in "
            "PostgreSQL's files, WAL and backups until overwritten; set a master key on every node"
        )
    store = cast(Storage, SealedStorage(open_storage(settings.storage.url, auto_migrate=settings.storage.auto_migrate), ring))
    if check:
        verify(store, settings.acme.directory)
    return store


def _is_shared(url: str) -> bool:
    return url.split(":", 1)[0].lower() in ("postgresql", "postgres")


def verify(store: Storage, directory_url: str, sample: int = 3) -> None:
    """Read-only: open the account key and a few certificate keys (raises SealedKeyError)."""
    store.get_account(directory_url)
    # changes_since(0) names every registered domain without building a record
    # per domain: list_domains() took half a second at 100,000 names.
    _, hostnames = store.changes_since(0)
    for hostname in hostnames[:sample]:
        store.get_certificate(hostname)


def generate_master_key(path: str) -> str:
    """Write a new random 256-bit key (base64, mode 0600); refuse to overwrite. Returns its id."""
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key).decode() + "\n")
    return _key_id(key)


def rotate(store: Storage, directory_urls: Iterable[str], progress: Callable[[str], None] = lambda _m: None) -> int:
    """Re-seal every stored private key under the current master key; returns how many."""
    count = 0
    for directory_url in directory_urls:
        account = store.get_account(directory_url)
        if account is not None:
            store.save_account(account)
            count += 1
            progress(f"account {directory_url}")
    for domain in store.list_domains():
        cert = store.get_certificate(domain.hostname)
        if cert is not None:
            store.save_certificate(cert)
            count += 1
            progress(f"certificate {domain.hostname}")
    return count
