"""An HTTP-01 responder for tests that run renewal without a whole edge.

Answers the CA's ``/.well-known/acme-challenge/<token>`` fetch (RFC 8555
section 8.3) from a store, as the edge's :80 listener does: by token, and only
when the Host is the name the token was published for. Hosts in ``refuse`` get
404, which the CA sees as a real failed validation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgeproxy.storage.base import ChallengeRecord

Lookup = Callable[[str], ChallengeRecord | None]


class Http01Responder:
    """Serves on 127.0.0.1:``port`` until ``close()``; ``lookup`` (a store's
    ``get_challenge``) may be given later, before the first order."""

    def __init__(self, lookup: Lookup | None = None) -> None:
        self.lookup = lookup
        self.refuse: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                token = self.path.rsplit("/", 1)[-1]
                assert outer.lookup is not None, "Http01Responder.lookup was never set"
                challenge = outer.lookup(token)
                host = (self.headers.get("Host") or "").split(":")[0]
                if challenge is None or challenge.hostname != host or host in outer.refuse:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = challenge.key_authorization.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
