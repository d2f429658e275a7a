"""Listening sockets handed over by systemd (socket activation, sd_listen_fds(3)).

Why: with the sockets held by systemd, ``systemctl restart`` and
upgrades refuse no connection: while no edgeproxy process runs, connections
wait in the kernel's listen backlog, and the next process accepts them once its
certificates are loaded.

Contract: ``LISTEN_PID`` must be this process, ``LISTEN_FDS`` the count of
descriptors from fd 3 on, ``LISTEN_FDNAMES`` their names (``FileDescriptorName=``
of each .socket unit: ``http``, ``https``, ``admin``). A socket is matched to a
role by its name only, never by position, and then checked with
``getsockname()`` against that role's ``listen.*`` setting: a socket whose
address is not the configured one is refused, so the admin API can never be
served on a public socket even if a unit names one "admin". Unnamed or unknown
descriptors are an error. The variables are removed once read, so nothing
started later (workers, renewals) takes them for its own.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import MutableMapping

from .config import parse_hostport
from .errors import ConfigError

__all__ = ["ROLES", "SD_LISTEN_FDS_START", "inherited_sockets", "check_inherited"]

SD_LISTEN_FDS_START = 3
ROLES = ("http", "https", "admin")
_WILDCARDS = ("::", "0.0.0.0")


def inherited_sockets(environ: MutableMapping[str, str]) -> dict[str, socket.socket]:
    """The sockets systemd passed, by name (empty when not socket-activated)."""
    if "LISTEN_FDS" not in environ:
        return {}
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ["LISTEN_FDS"])
    except ValueError as exc:
        raise ConfigError(f"LISTEN_PID/LISTEN_FDS are not numbers: {exc}") from exc
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    if pid != os.getpid():
        return {}  # meant for another process (sd_listen_fds(3))
    if len(names) != count:
        raise ConfigError(f"LISTEN_FDNAMES names {len(names)} socket(s) but LISTEN_FDS is {count}: name every "
                          "socket (FileDescriptorName=http|https|admin in its .socket unit)")
    found: dict[str, socket.socket] = {}
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        if name not in ROLES:
            raise ConfigError(f"inherited socket fd {fd} is named {name!r}; expected one of {', '.join(ROLES)}")
        if name in found:
            raise ConfigError(f"two inherited sockets are named {name!r}")
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ConfigError(f"inherited fd {fd} ({name}) is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"inherited socket {name} (fd {fd}) is not a listening stream socket")
        sock.setblocking(False)
        sock.set_inheritable(True)  # handed on to the workers like our own
        found[name] = sock
    return found


def _where(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"unix:{name}" if isinstance(name, str) else f"[{name[0]}]:{name[1]}"


def check_inherited(sock: socket.socket, role: str, address: str) -> None:
    """Raise ConfigError unless ``sock`` listens where ``listen.<role>`` = ``address`` says."""
    what = f"listen.{role}"
    bound = sock.getsockname()
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if sock.family != socket.AF_UNIX or (bound.decode() if isinstance(bound, bytes) else bound) != path:
            raise ConfigError(f"inherited socket {role!r} listens on {_where(sock)}, but {what} is {address}")
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"inherited socket {role!r} listens on {_where(sock)}, but {what} is {address}")
    host, port = parse_hostport(address, what=what)
    got_host, got_port = str(bound[0]), int(bound[1])
    if got_port != port:
        raise ConfigError(f"inherited socket {role!r} listens on {_where(sock)}, but {what} is {address}")
    if host in _WILDCARDS and got_host in _WILDCARDS:
        return  # [::] and 0.0.0.0 both mean "every address" (IPv4 included on a dual-stack socket)
    try:
        same = ipaddress.ip_address(host) == ipaddress.ip_address(got_host)
    except ValueError:
        same = False
    if not same:
        raise ConfigError(f"inherited socket {role!r} listens on {_where(sock)}, but {what} is {address}")
