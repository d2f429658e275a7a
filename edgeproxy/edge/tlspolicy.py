"""The one TLS policy of every public listener: Mozilla's "intermediate" or "modern".

Owns: what a server ``SSLContext`` offers (protocol versions, TLS 1.2 cipher
suites, who picks the suite) and the key-exchange groups, which Python 3.11's
``ssl`` cannot set itself: ``SSLContext.set_ecdh_curve`` takes one curve, and a
list (``SSL_CTX_set1_groups_list``) is only reachable through OpenSSL's
configuration file. ``openssl.cnf`` next to this module sets
``Groups = X25519:P-256:P-384`` as OpenSSL's ``system_default``; the entry point
(``edgeproxy.boot``) points ``OPENSSL_CONF`` at it before ``ssl`` is imported,
because CPython's ``_ssl`` loads the configuration when it is imported (measured:
set afterwards, a server still offered P-521).
Must not import ``ssl`` at module level: ``boot`` imports this module first.

Definitions: https://ssl-config.mozilla.org/ (guidelines v5.7), the same JSON
that sslyze's ``--mozilla_config`` checks against (tests/test_tls_scan.py).
- intermediate: TLS 1.2 and 1.3; TLS 1.2 suites ECDHE with AES-GCM or
  ChaCha20-Poly1305 only (Mozilla also lists three DHE-RSA suites; our keys are
  ECDSA and we offer no finite-field groups, so they could never be chosen);
  TLS 1.3's three AEAD suites (OpenSSL's default list, all allowed by both
  profiles); groups X25519, P-256, P-384; the client picks the suite
  (``server_preferred_order: false``: every offered suite is strong).
- modern: TLS 1.3 only, same groups. Drops clients older than about 2018
  (Firefox 63, Chrome 70, Safari 12.1, Android 10).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

__all__ = ["GROUPS", "OPENSSL_CONF", "POLICIES", "TlsPolicy", "apply", "arrange_openssl_conf", "groups_configured"]

log = logging.getLogger("edgeproxy.tlspolicy")

# OpenSSL group names; openssl.cnf holds the same list (tests/test_tlspolicy.py compares).
GROUPS = ("X25519", "P-256", "P-384")
OPENSSL_CONF = Path(__file__).with_name("openssl.cnf")


@dataclass(frozen=True)
class TlsPolicy:
    name: str
    minimum_version: str  # an ssl.TLSVersion member name
    tls12_ciphers: str  # OpenSSL cipher string for TLS 1.2 ("" = TLS 1.2 is off anyway)


POLICIES: dict[str, TlsPolicy] = {
    "intermediate": TlsPolicy(
        "intermediate", "TLSv1_2",
        # Mozilla's order (ECDSA first, AES-128 before AES-256, ChaCha20 last).
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
    ),
    "modern": TlsPolicy("modern", "TLSv1_3", ""),
}


def apply(ctx: ssl.SSLContext, policy: str) -> None:
    """Set ``policy``'s versions and suites on a server context (every one we build)."""
    import ssl

    chosen = POLICIES[policy]
    ctx.minimum_version = ssl.TLSVersion[chosen.minimum_version]
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    if chosen.tls12_ciphers:
        ctx.set_ciphers(chosen.tls12_ciphers)  # TLS 1.2 only; TLS 1.3 keeps OpenSSL's three AEAD suites
    # Mozilla: "server_preferred_order: false" for both profiles (every suite is
    # strong, so the client picks, e.g. ChaCha20 on phones without AES hardware).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # RFC 9113 section 9.2.2 forbids TLS 1.2 renegotiation under HTTP/2, and
    # compression enables CRIME (sslyze checks both).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def arrange_openssl_conf(environ: MutableMapping[str, str]) -> bool:
    """Point ``OPENSSL_CONF`` at our group list unless the operator set one.

    Returns True when it changed ``environ``. An operator's own file is left
    alone (it may load a FIPS provider, say); ``serve`` then warns that the
    groups come from that file (``groups_configured``).
    """
    if environ.get("OPENSSL_CONF"):
        return False
    environ["OPENSSL_CONF"] = str(OPENSSL_CONF)
    return True


def groups_configured(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether this process's OpenSSL was configured with our group list."""
    env = os.environ if environ is None else environ
    return env.get("OPENSSL_CONF") == str(OPENSSL_CONF)
