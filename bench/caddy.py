"""Caddy as the bench's second reference: what an operator would run instead of edgeproxy.

Owns: writing a Caddyfile for one site (the same certificate chain and key the
edge serves, the same name, loopback only) and the argv/env to run Debian's
``caddy`` (2.6.2) with it, nothing persisted outside the bench's work dir:
``admin off`` (and so nothing autosaved), ``auto_https off`` (no ACME, no port-80 redirect server),
``HOME``/``XDG_*`` inside the work dir. The routes mirror the edge's hot paths:

- ``/js/app.js``: ``reverse_proxy`` to a fast origin (``relay.py --script``)
  answering the script exactly as the edge serves it (gzip);
- ``/static/js/app.js``: ``file_server`` with ``precompressed gzip`` (the
  script and its ``.gz`` on disk: Caddy's fastest way to serve it);
- ``/api/*``: ``reverse_proxy`` to the same relay the edge forwards to (POST
  events and GET beacons alike; Caddy adds ``X-Forwarded-*`` as the edge does).

Caddy uses every core (GOMAXPROCS = CPUs) as it does by default. The package's
own ``caddy.service`` is never used: ``make caddy`` keeps it from starting.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaddySite", "available"]


def available() -> bool:
    return shutil.which("caddy") is not None


@dataclass
class CaddySite:
    work: Path
    name: str
    https_port: int
    http_port: int  # unused by the site; set so Caddy never reaches for port 80
    certfile: Path
    keyfile: Path
    origin_port: int
    relay_port: int

    def write(self, script: bytes) -> Path:
        """The Caddyfile (and the script files for ``file_server``); its path."""
        root = self.work / "caddy-root"
        (root / "static" / "js").mkdir(parents=True, exist_ok=True)
        (root / "static" / "js" / "app.js").write_bytes(script)
        # The same compression level as the edge's cached variant is not needed:
        # file_server sends whatever .gz is on disk.
        (root / "static" / "js" / "app.js.gz").write_bytes(gzip.compress(script, 9, mtime=0))
        caddyfile = self.work / "Caddyfile"
        caddyfile.write_text(f"""{{
	admin off
	auto_https off
	http_port {self.http_port}
	https_port {self.https_port}
	storage file_system {self.work / "caddy-data"}
	servers {{
		protocols h1 h2
	}}
}}

https://{self.name}:{self.https_port} {{
	bind 127.0.0.1
	tls {self.certfile} {self.keyfile}
	handle /js/app.js {{
		reverse_proxy 127.0.0.1:{self.origin_port}
	}}
	handle /static/* {{
		root * {root}
		file_server {{
			precompressed gzip
		}}
	}}
	handle /api/* {{
		reverse_proxy 127.0.0.1:{self.relay_port}
	}}
}}
""")
        return caddyfile

    def argv(self, caddyfile: Path) -> list[str]:
        return ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"]

    def env(self) -> dict[str, str]:
        home = self.work / "caddy-home"
        home.mkdir(exist_ok=True)
        return {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config")}
