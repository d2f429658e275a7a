"""Per-domain script and API paths (``routes.randomize``).

Owns: which path serves the script and which path takes API calls for one
custom hostname. With ``routes.randomize = false`` (the default) every domain
uses ``routes.script_path`` and ``routes.api_path``. With ``randomize = true``
each domain gets its own pair, derived from ``HMAC-SHA256(randomize_secret,
hostname)``: no filter-list rule written for one customer's paths matches
another's, and nothing has to be stored, so every worker and every node agrees
without a lookup. The same secret must be configured everywhere, and changing it
changes every domain's paths (customers would have to paste a new snippet).
Must not import: anything of ours but ``config``.

Pure and cached: the proxy calls :func:`site_routes` on the request path, the
registry calls it for the snippet.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from dataclasses import dataclass

from .config import RoutesSettings

__all__ = ["SiteRoutes", "site_routes"]


@dataclass(frozen=True)
class SiteRoutes:
    script_path: str
    api_path: str  # without a trailing slash

    @property
    def api_prefix(self) -> str:
        return self.api_path + "/"


def _label(data: bytes) -> str:
    # base32 lower-case letters and 2-7: no vowels-only words to speak of, no separators.
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


@functools.lru_cache(maxsize=65536)
def site_routes(hostname: str, routes: RoutesSettings) -> SiteRoutes:
    """The script and API paths for ``hostname`` (already normalized, lower-case)."""
    if not routes.randomize:
        return SiteRoutes(routes.script_path, routes.api_path.rstrip("/"))
    digest = hmac.new(routes.randomize_secret.encode(), hostname.encode("ascii"), hashlib.sha256).digest()
    # Two segments each, 8 characters (40 bits) per segment: long enough that no
    # filter rule for a short word ("/ga/", "/px.js") can ever match a segment whole.
    script = f"/{_label(digest[0:5])}/{_label(digest[5:10])}.js"
    api = f"/{_label(digest[10:15])}/{_label(digest[15:20])}"
    return SiteRoutes(script, api)
