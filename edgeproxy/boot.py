"""The ``edgeproxy`` command's entry point: OpenSSL's configuration first, then the CLI.

CPython's ``_ssl`` reads OpenSSL's configuration (``OPENSSL_CONF``) when it is
imported, and the CLI's imports (httpx, aiohttp, ...) import ``ssl``. So this
module, which imports nothing that does, sets ``OPENSSL_CONF`` to our group list
(``tlspolicy``) and only then imports the CLI. If ``ssl`` is already loaded
(a ``sitecustomize``, an embedding program), it re-executes the interpreter
with the variable set rather than serve with OpenSSL's default groups. Worker
processes (spawned) inherit the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .edge.tlspolicy import arrange_openssl_conf

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    if arrange_openssl_conf(os.environ) and "_ssl" in sys.modules:
        args = list(sys.argv[1:] if argv is None else argv)
        os.execv(sys.executable, [sys.executable, "-m", "edgeproxy", *args])
    from .cli import main as cli_main

    return cli_main(argv)
