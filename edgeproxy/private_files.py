"""Files that hold keys, tokens, request bodies or visitor IPs: 0600 in a 0700 directory.

Owns: creating such a file and its directory with those modes whatever the
process umask, and tightening one that an older version or another tool left
wider. Used by every opener (``serve``, ``replay``, ``spool ...``, the storage
and the spool alike), so it does not matter which command creates a file first.

SQLite gives ``-wal``/``-shm``/``-journal`` the main file's mode when it creates
them (os_unix.c, robust_open/findCreateFileMode), so a 0600 database gets 0600
side files; ``tighten_sqlite`` still fixes side files left by an older version.
An existing directory that others can read is reported, not changed: it may be
shared (``spool.path = "/srv/data/spool.db"``), and changing it is the operator's call.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["SQLITE_SIDE_FILES", "private_directory", "private_file", "tighten_sqlite"]

log = logging.getLogger("edgeproxy.files")

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_warned: set[str] = set()


def private_directory(directory: str) -> None:
    """Create ``directory`` (and parents) with mode 0700; warn once if it exists wider."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        old = os.umask(0o077)  # parents too: makedirs' mode applies to the leaf only
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        finally:
            os.umask(old)
        return
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & 0o077 and directory not in _warned:
        _warned.add(directory)
        log.warning("%s is mode %04o: other users can list it; edgeproxy keeps keys, tokens, request bodies "
                    "and visitor IPs there (chmod 700 it)", directory, mode)


def _tighten(path: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was mode %04o; set to 0600", path, mode)


def private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 (in a 0700 directory), or make an existing one 0600."""
    private_directory(os.path.dirname(os.path.abspath(path)))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _tighten(path)
    else:
        os.close(fd)
        os.chmod(path, 0o600)  # the umask may only narrow 0600, but be exact


def tighten_sqlite(path: str) -> None:
    """``path`` and its SQLite side files 0600 where they exist."""
    for candidate in (path, *(path + suffix for suffix in SQLITE_SIDE_FILES)):
        _tighten(candidate)
