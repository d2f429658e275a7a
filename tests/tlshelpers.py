"""Helpers for the TLS tests: a certificate for a name, a store seeded with it, and
``openssl s_client`` runs against a listener (what a scanner sees on the wire)."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.edge.certstore import record_from_pem
from edgeproxy.storage.sqlite import SqliteStorage


def issue(host: str, now: dt.datetime | None = None) -> tuple[bytes, bytes, bytes]:
    """(key_pem, chain_pem, root_pem): an EC P-256 leaf for ``host`` under a fresh root."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeproxy test root")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=60))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem = serialization.Encoding.PEM
    return key_pem, leaf.public_bytes(pem), ca.public_bytes(pem)


def seed(db_path: Path, host: str) -> bytes:
    """Register ``host`` as active with a certificate in the SQLite store at ``db_path``; its root PEM."""
    now = dt.datetime.now(dt.timezone.utc)
    key_pem, chain_pem, root = issue(host, now)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    storage = SqliteStorage(str(db_path))
    try:
        storage.add_domain(host, "active", now)
        storage.save_certificate(record_from_pem(host, key_pem, chain_pem, now))
    finally:
        storage.close()
    return root


@dataclass
class Handshake:
    ok: bool
    output: str

    @property
    def subject_cn(self) -> str | None:
        found = re.search(r"^subject=.*CN ?= ?([^,\n/]+)", self.output, re.M)
        return found.group(1).strip() if found else None

    @property
    def temp_key(self) -> str | None:
        found = re.search(r"^(?:Server|Peer) Temp Key: (.*)$", self.output, re.M)
        return found.group(1).strip() if found else None

    @property
    def cipher(self) -> str | None:
        found = re.search(r"^\s*Cipher\s*: (\S+)", self.output, re.M)
        return found.group(1) if found else None


def s_client(port: int, server_name: str, *args: str) -> Handshake:
    """One ``openssl s_client`` handshake; ``ok`` when a cipher was negotiated."""
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name, *args],
        input=b"", capture_output=True, timeout=20,
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    cipher = re.search(r"Cipher is (\S+)", out)
    ok = proc.returncode == 0 and cipher is not None and cipher.group(1) not in ("(NONE)", "0000")
    return Handshake(ok, out)
