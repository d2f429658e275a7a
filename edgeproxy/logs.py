"""Log output for ``serve``: one JSON object per line (or plain text), with the request id.

Owns: the formatter and handler setup of every serving process, and the filter
that stamps each record with the id of the public request being handled.
Must not import: anything of ours but ``metrics.REQUEST_ID`` (no ``acme``, no storage).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from typing import Any

from .config import LogSettings
from .metrics import REQUEST_ID

__all__ = ["JsonFormatter", "RequestIdFilter", "setup_logging"]

# Attributes every LogRecord has: anything else was passed with ``extra=`` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (None outside a public request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "pid", "request_id"?, extra fields..., "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process or os.getpid(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(settings: LogSettings, level: int = logging.INFO) -> None:
    """Replace the root handlers with one stderr handler in the configured format."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("edgeproxy.access").setLevel(logging.INFO if settings.access_log else logging.WARNING)
