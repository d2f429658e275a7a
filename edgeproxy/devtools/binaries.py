"""Where the harnesses find Debian's binaries (pebble, chromium, certutil ...).

Owns: looking a program up on PATH, with Debian's ``/usr/bin`` as the fallback
for a minimal PATH (CI, systemd), and refusing clearly when it is missing.
Must not import: anything of ours, ``pytest``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["missing", "require", "which"]


def which(name: str) -> str | None:
    """The program's path, or None."""
    found = shutil.which(name)
    if found:
        return found
    fallback = Path("/usr/bin") / name  # Debian's location, even when PATH is minimal
    return str(fallback) if os.access(fallback, os.X_OK) else None


def missing(names: Iterable[str]) -> list[str]:
    """The names that cannot be found (empty when every one is installed)."""
    return [name for name in names if which(name) is None]


def require(name: str, error: type[Exception], hint: str) -> str:
    """The program's path; raises ``error("<name> not found: <hint>")`` when it is missing."""
    path = which(name)
    if path is None:
        raise error(f"{name} not found: {hint}")
    return path
