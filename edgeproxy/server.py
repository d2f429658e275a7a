"""hypercorn wiring: sockets, worker processes, per-connection SNI, background loops.

Owns: binding the three listeners (public HTTP, public HTTPS, loopback admin),
the worker processes, and what runs in each: every worker serves the public
listeners from its in-memory ``CertStore``; the primary (the parent process)
also serves the admin API and runs the issuance/renewal loop.

Why not ``hypercorn.asyncio.serve``: it runs one app on one set of sockets and
never tells the app which SNI the client sent. We need three apps on three
socket sets, and the proxy must refuse a Host that differs from the SNI
(DESIGN.md section 5). So we use hypercorn's own connection handler
(``TCPServer``: HTTP/1.1, HTTP/2, keep-alive, flow control) and start the
asyncio servers ourselves, wrapping the app per TLS connection so that the SNI
recorded by ``CertStore.sni_callback`` lands in ``scope["extensions"]["tls"]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import time
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry

from .edge import tlspolicy
from .sockets import ROLES, check_inherited, inherited_sockets
from .h1fast import FastConnections
from .hypercorn_adapter import (
    DRAIN_FIRST_REQUEST_GRACE, ASGIWrapper, EdgeTCPServer, WorkerContext, absolute_form, edge_config,
)
from .config import Settings, parse_hostport
from .logs import setup_logging
from .metrics import (
    CONTENT_TYPE, CountingIssuer, Metrics, StateCollector, StatsCounter, enable_multiprocess, instrument, make_run_dir,
    multiprocess_dir, render, sample_total, scrape_registry,
)
from .node import Services
from .edge.proxy import EdgeProxy, Site
from .edge.spool import Replayer, ReplayFilters, move_refusals, prune_loop, replay_failed
from .storage.base import Storage

if TYPE_CHECKING:  # imported where used: the public listeners start before the primary's parts load
    from .edge.certstore import CertMap
    from .control.monitor import MonitorService, SpoolStats
    from .control.issuers import Issuer
    from .control.webhooks import Attempt

__all__ = ["bind_socket", "default_workers", "serve", "EdgeNode"]

log = logging.getLogger("edgeproxy.server")

# Seconds a drain waits for TLS handshakes that were under way when the
# listeners closed (loopback handshakes take ~1 ms; clients far away ~3 RTTs).
_HANDSHAKE_GRACE = 0.5

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def bind_socket(address: str, what: str, backlog: int = 1024) -> socket.socket:
    """Bind and listen on ``host:port`` (IPv4 or IPv6) or ``unix:/path`` (mode 0600);
    non-blocking, inheritable by workers.

    ``[::]:port`` is one dual-stack socket (IPV6_V6ONLY off: IPv4 peers arrive as
    ``::ffff:a.b.c.d``, normalized in ``addresses.py``); on a host without IPv6
    it falls back to ``0.0.0.0:port`` with a warning (customers publish
    AAAA records, and Let's Encrypt validates over IPv6 first when one exists).
    """
    if address.startswith("unix:"):
        return _bind_unix(address[len("unix:"):], what, backlog)
    host, port = parse_hostport(address, what=what)
    if host == "::":
        try:
            return _bind_tcp(host, port, address, what, backlog)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise
            log.warning("%s: no IPv6 on this host (%s); listening on 0.0.0.0:%d (IPv4 only)", what,
                        exc.strerror or exc, port)
            host = "0.0.0.0"
    return _bind_tcp(host, port, address, what, backlog)


def _bind_tcp(host: str, port: int, address: str, what: str, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        # Dual-stack whatever net.ipv6.bindv6only says (RFC 3493 section 5.3).
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Accepted sockets inherit TCP_NODELAY on Linux. Without it, Nagle holds a
    # response's second write (hypercorn sends headers and body separately) until
    # the client's delayed ACK, ~40 ms per request: keep-alive throughput was a
    # quarter of plain hypercorn's, which sets the same option. asyncio
    # only sets it itself on sockets created with proto=IPPROTO_TCP.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address} ({what}): {exc.strerror}") from exc
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def _bind_unix(path: str, what: str, backlog: int) -> socket.socket:
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left behind by a process that died; nobody listens
        else:
            probe.close()
            raise OSError(f"cannot listen on unix:{path} ({what}): another process is listening there")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: only our user may connect
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _with_sni(app: ASGIApp, server_name: str | None) -> ASGIApp:
    """Bind the SNI of one TLS connection into every request scope on it."""

    async def call(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = {"server_name": server_name}
        await app(scope, receive, send)

    return call


@dataclass
class _Listener:
    name: str
    sock: socket.socket
    app: ASGIApp
    tls: bool = False
    server: asyncio.AbstractServer | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _load_primary_modules() -> None:
    """Import what only the primary uses (``EdgeNode._start_primary``)."""
    for module in ("control.acme_client", "control.admin", "control.monitor", "control.registry", "control.renew",
                   "control.tokens", "control.webhooks", "control.lifecycle"):
        importlib.import_module(f"{__package__}.{module}")


class EdgeNode:
    """Everything one process serves. ``primary`` adds the admin API and the issuance loop."""

    def __init__(
        self,
        settings: Settings,
        sockets: dict[str, socket.socket],
        *,
        primary: bool,
        storage: Storage | None = None,
        issuer: Issuer | None = None,
        certmap: CertMap | None = None,
    ) -> None:
        self.settings = settings
        self.sockets = sockets
        self.primary = primary
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        # Metrics: multiprocess files under `serve`, a local registry otherwise.
        self.metrics_registry = None if multiprocess_dir() else CollectorRegistry()
        self.metrics = Metrics(self.metrics_registry)
        # Everything else comes from the composition root, counting into these metrics.
        self.services = Services(settings, role="primary" if primary else "worker", storage=storage,
                                 issuer=issuer, stats=StatsCounter(self.metrics),
                                 observe_relay=self.metrics.observe_relay, certmap=certmap)
        self.storage = self.services.storage
        self.certstore = self.services.certstore
        # The data path, one way: proxy -> spool -> relay client. Every worker spools
        # into the same node-local file; the primary drains it.
        self.spool = self.services.spool
        self.relay = self.services.relay
        self.proxy = EdgeProxy(settings, resolve=self._resolve, challenge=self._challenge, relay=self.relay,
                               events=self.services.events, record_refusal=self.services.refusals.record,
                               stats=self.services.stats)
        # (depth, oldest age in s) for alerts and /metrics.
        self.spool_stats: SpoolStats | None = self.spool.depth_age
        self.monitor: MonitorService | None = None
        self._config = edge_config()
        # A drain waits for requests in flight at least as long as a relay call can
        # take: it then either answers or times out and is spooled (SpoolingRelay),
        # never cut off mid-call. systemd's TimeoutStopSec (30 s) is above it.
        upstream = settings.upstream
        self._config.graceful_timeout = max(self._config.graceful_timeout,
                                            upstream.connect_timeout + upstream.timeout + 1.0)
        self._context = WorkerContext(None)
        self._listeners: list[_Listener] = []
        self._fast: FastConnections | None = None

    # -- the two functions the proxy sees -----------------------------------------------
    def _resolve(self, host: str) -> Site | None:
        active = self.certstore.hosts.get(host)
        return None if active is None else Site(host, active)

    async def _challenge(self, token: str) -> tuple[str, str] | None:
        record = await asyncio.to_thread(self.storage.get_challenge, token)
        return None if record is None else (record.hostname, record.key_authorization)

    # -- connections ----------------------------------------------------------------------
    def _callback(self, listener: _Listener) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        loop = asyncio.get_running_loop()
        plain = ASGIWrapper(cast(Any, absolute_form(listener.app)))

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            listener.tasks.add(task)
            task.add_done_callback(listener.tasks.discard)
            peer = writer.get_extra_info("peername")  # gone once the transport has closed
            app = plain
            if listener.tls:
                ssl_object = writer.get_extra_info("ssl_object")
                app = ASGIWrapper(cast(Any, _with_sni(absolute_form(listener.app),
                                                      getattr(ssl_object, "edgeproxy_sni", None))))
            try:
                await EdgeTCPServer(app, loop, self._config, self._context, {}, reader, writer)
            except asyncio.CancelledError:
                # Shutdown cancels connections that outlived the grace period.
                # End the task normally: asyncio's stream callback logs a
                # cancelled connection task as an error.
                writer.close()
            except OSError as exc:  # ssl.SSLError included
                # A peer that breaks TLS after the handshake (a scanner's
                # renegotiation probe, an alert, a reset) surfaces here, from
                # hypercorn's final wait_closed(). Left alone, asyncio logs it at
                # ERROR with a traceback per connection; one line says enough.
                # TLS errors at INFO: after a policy change they show which
                # clients fail and why. Plain resets at DEBUG: the internet's noise.
                where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
                level = logging.INFO if isinstance(exc, ssl.SSLError) else logging.DEBUG
                log.log(level, "%s connection from %s ended: %s", listener.name, where,
                        getattr(exc, "reason", None) or exc.__class__.__name__)

        return on_connection

    async def run(self) -> None:
        """Serve until ``stop`` is set, then drain connections and close.

        Start-up order (time to the first served request with 100,000
        certificates): the certificate map and the script first (together), then
        the public listeners, and only then the primary's admin API and loops,
        whose imports (FastAPI, acme) alone take a few hundred milliseconds.
        """
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(self.certstore.refresh(), self.proxy.startup())
        access = self.settings.log.access_log
        routes = self.settings.routes
        listeners = [
            _Listener("http", self.sockets["http"],
                      instrument(self.proxy.http_app, "http", self.metrics, routes, log_access=access)),
            _Listener("https", self.sockets["https"],
                      instrument(self.proxy.https_app, "https", self.metrics, routes, log_access=access), tls=True),
        ]
        self._listeners = listeners
        for listener in listeners:
            await self._listen(listener)
        self.certstore.trim_memory()  # after the bulk load: hand its scratch memory back
        background = [asyncio.create_task(self.certstore.run(self.settings.proxy.cert_refresh_interval, self.stop))]
        try:
            if self.primary:
                # The imports take a few hundred ms of CPU; in a thread, the loop
                # keeps answering the public listeners that are already open.
                await asyncio.to_thread(_load_primary_modules)
                admin = self._start_primary(background)
                listeners.append(admin)
                await self._listen(admin)
            # Start-up is done: what it built (modules, the certificate map,
            # ~130,000 tracked objects) lives as long as the process. Frozen, the
            # collector stops walking it at every full collection.
            gc.freeze()
            await self.stop.wait()
        finally:
            await self._shutdown(background)

    async def _listen(self, listener: _Listener) -> None:
        ssl_context = self.certstore.server_context() if listener.tls else None
        if listener.tls and self.settings.proxy.http1_fast_path:
            # Simple HTTP/1.1 requests on the lean path; it hands the rest to hypercorn.
            self._fast = FastConnections(
                cast(Any, listener.app), self._callback(listener), lambda: self._config.response_headers("h11"),
                listener.tasks, keep_alive_timeout=self._config.keep_alive_timeout,
                read_timeout=self._config.read_timeout or 60.0, first_request_grace=DRAIN_FIRST_REQUEST_GRACE)
            listener.server = await asyncio.get_running_loop().create_server(
                self._fast.protocol, sock=listener.sock, ssl=ssl_context,
                ssl_handshake_timeout=self._config.ssl_handshake_timeout, backlog=1024)
        else:
            listener.server = await asyncio.start_server(
                self._callback(listener), sock=listener.sock, ssl=ssl_context,
                ssl_handshake_timeout=self._config.ssl_handshake_timeout if listener.tls else None,
                backlog=1024,
            )
        name = listener.sock.getsockname()
        where = f"unix:{name}" if isinstance(name, str) else f"{name[0]}:{name[1]}"
        log.info("pid %d serving %s on %s", os.getpid(), listener.name, where)

    def _start_primary(self, background: list[asyncio.Task[None]]) -> _Listener:
        """The primary's share: admin API, probes, issuance and renewal, replay,
        pruning. Imported here, after the public listeners are up: nothing on the
        public path needs FastAPI or the ACME client."""
        from .control.admin import create_admin_app

        monitor = self._monitor()
        admin = create_admin_app(self.services.registry, self.services.tokens,
                                 on_registered=lambda _h: self._wake_soon(),
                                 last_check=monitor.last_check, metrics=self._metrics_renderer(monitor),
                                 spool_status=self._spool_status, replay=self._replay,
                                 event_log=self.services.event_log)
        background.append(asyncio.create_task(monitor.run_forever(self.stop)))
        if self.settings.events.endpoints:
            # Once per node (the primary); nodes sharing a PostgreSQL store share the
            # outbox, each row claimed by one of them at a time.
            deliverer = self.services.webhooks(on_dead=self._webhook_dead, on_attempt=self._webhook_attempt)
            background.append(asyncio.create_task(deliverer.run_forever(self.stop)))
        renewer = self.services.renewal([dataclasses.replace(ca, issuer=CountingIssuer(ca.issuer, self.metrics))
                                         for ca in self.services.issuers])
        r = self.settings.renew
        background.append(asyncio.create_task(
            renewer.run_forever(self.stop, self.wake, interval=r.interval, jitter=r.jitter, poll=r.poll)))
        replayer = Replayer(self.spool, self.relay, self.settings.spool, storage=self.storage,
                            ip_retention=self.settings.privacy.ip_retention)
        background.append(asyncio.create_task(replayer.run(self.stop)))
        background.append(asyncio.create_task(
            prune_loop(self.storage, self.settings.failed_log.retention_days, self.stop)))
        return _Listener("admin", self.sockets["admin"], admin)

    # -- monitoring ----------------------------------------------------------
    def _relay_4xx_total(self) -> float:
        registry = scrape_registry(None, self.metrics_registry)
        return sample_total(registry, "edgeproxy_relay_responses_total", {"code_class": "4xx"})

    def _spool(self) -> tuple[int, float] | None:
        return self.spool_stats() if self.spool_stats is not None else None

    def _monitor(self) -> MonitorService:
        from .control.monitor import AlertDispatcher, MonitorService, Prober, build_sinks

        alerts = self.settings.alerts
        dispatcher = AlertDispatcher(build_sinks(self.settings), retries=alerts.retries,
                                     retry_delay=alerts.retry_delay, timeout=alerts.timeout,
                                     on_delivery=self.metrics.observe_delivery)
        probes = self.metrics.probes
        self.monitor = MonitorService(
            self.settings, self.storage, self.services.prober(), dispatcher,
            spool_stats=self._spool, relay_4xx_total=self._relay_4xx_total,
            on_result=lambda r: probes.labels("ok" if r.ok else "failed").inc(),
        )
        return self.monitor

    async def _webhook_dead(self, attempt: Attempt) -> None:
        from .control.webhooks import dead_letter_alert

        if self.monitor is not None:
            await self.monitor.dispatcher.dispatch([dead_letter_alert(attempt, datetime.now(timezone.utc))])

    def _webhook_attempt(self, attempt: Attempt) -> None:
        self.metrics.observe_webhook(attempt.state)

    def _metrics_renderer(self, monitor: MonitorService) -> Callable[[], tuple[bytes, str]]:
        state = StateCollector(
            domain_counts=self.storage.count_domains_by_status,
            cert_expiries=self.certstore.expiries,
            spool_stats=self._spool,
            failing_probes=lambda: sum(1 for r in list(monitor.results.values()) if not r.ok),
            outbox_counts=self.storage.count_deliveries_by_state,
            warn_days=self.settings.monitor.cert_warn_days,
        )

        def render_metrics() -> tuple[bytes, str]:
            return render(scrape_registry(state, self.metrics_registry)), CONTENT_TYPE

        return render_metrics
    def _spool_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.spool.stats(time.time()).as_dict()
        return status

    async def _replay(self, filters: ReplayFilters, dry_run: bool) -> dict[str, Any]:
        await move_refusals(self.spool, self.storage, self.settings.privacy.ip_retention,
                            lambda: datetime.now(timezone.utc))
        summary = await replay_failed(self.storage, self.relay, filters, dry_run=dry_run)
        return summary.as_dict()

    def _wake_soon(self) -> None:
        # Called from the admin route's worker thread: hop back onto the loop.
        self._loop.call_soon_threadsafe(self.wake.set)

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
        await self._context.terminated.set()  # tells keep-alive connections to finish
        if self._fast is not None:
            self._fast.drain()
        # Drain. A connection accepted just before close() is still in
        # its TLS handshake and has no task yet: give handshakes a moment to finish
        # and register, then wait for every connection task until graceful_timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.graceful_timeout
        await asyncio.sleep(_HANDSHAKE_GRACE)
        pending: set[asyncio.Task[None]] = set()
        while loop.time() < deadline:
            pending = {t for listener in self._listeners for t in listener.tasks if not t.done()}
            if not pending:
                break
            await asyncio.wait(pending, timeout=deadline - loop.time())
        for task in pending:
            task.cancel()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.proxy.aclose()
        await asyncio.to_thread(self.spool.close)
        self.storage.close()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        await self.run()


def _run(settings: Settings, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on the configured event loop (``proxy.event_loop``)."""
    if settings.proxy.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: fall back, say so
            log.warning("proxy.event_loop = uvloop but uvloop is not installed; using asyncio")
        else:
            uvloop.run(main())
            return
    asyncio.run(main())


def _worker_main(settings: Settings, sockets: dict[str, socket.socket], parent: int,
                 certmap: CertMap | None = None) -> None:
    """Entry point of an extra worker process: forked at start-up with the parent's
    ``certmap``, or spawned (a replacement for a worker that died: it loads its own)."""
    setup_logging(settings.log)
    node = EdgeNode(settings, sockets, primary=False, certmap=certmap)

    async def orphan_guard() -> None:
        # A parent killed with SIGKILL cannot stop us: leave when it is gone.
        while os.getppid() == parent:
            await asyncio.sleep(1)
        node.stop.set()

    async def main() -> None:
        guard = asyncio.create_task(orphan_guard())
        try:
            await node.main()
        finally:
            guard.cancel()

    _run(settings, main)


def listening_sockets(settings: Settings, environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The three listeners: inherited from systemd where it passed them (``sockets.py``:
    matched by name, checked against the config), bound here otherwise."""
    inherited = inherited_sockets(os.environ if environ is None else environ)
    sockets: dict[str, socket.socket] = {}
    try:
        for role in ROLES:
            address = getattr(settings.listen, role)
            sock = inherited.pop(role, None)
            if sock is None:
                sockets[role] = bind_socket(address, f"listen.{role}")
                continue
            sockets[role] = sock
            check_inherited(sock, role, address)
            log.info("listen.%s: using the socket systemd passed (%s)", role, address)
    except BaseException:
        for sock in [*sockets.values(), *inherited.values()]:
            sock.close()
        raise
    return sockets


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, as nginx's
    ``worker_processes auto``; a container's cpuset shows here, a CFS quota does not)."""
    return len(os.sched_getaffinity(0))


def serve(settings: Settings, workers: int | None = None) -> None:
    """Run the edge: ``workers`` processes (default: ``default_workers()``) serve the
    public listeners; the parent is one of them and also serves the admin API and runs
    the issuance loop, the spool's replayer, the webhook deliverer and the pruning: once
    per node, whatever the worker count."""
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise ValueError("workers must be at least 1")
    setup_logging(settings.log, level=logging.getLogger().level or logging.INFO)
    sockets = listening_sockets(settings)
    public = {k: sockets[k] for k in ("http", "https")}
    if not tlspolicy.groups_configured():
        log.warning("TLS key-exchange groups come from OPENSSL_CONF=%s, not from edgeproxy's %s (%s); "
                    "start edgeproxy through its own command to get them", os.environ.get("OPENSSL_CONF", ""),
                    tlspolicy.OPENSSL_CONF, ":".join(tlspolicy.GROUPS))
    # One fresh directory per run for every process's metric files (inherited by
    # the spawned workers through the environment); removed when serve ends.
    metrics_dir = make_run_dir()
    enable_multiprocess(metrics_dir)
    try:
        _serve(settings, sockets, public, workers)
    finally:
        shutil.rmtree(metrics_dir)
        for sock in sockets.values():
            sock.close()


def _forked_worker_main(settings: Settings, sockets: dict[str, socket.socket], parent: int,
                        certmap: CertMap) -> None:
    """A worker forked at start-up: it keeps the public listeners only."""
    for role, sock in sockets.items():
        if role not in ("http", "https"):
            sock.close()  # the admin listener is the parent's alone
    gc.enable()
    _worker_main(settings, {k: sockets[k] for k in ("http", "https")}, parent, certmap)


def _preload(settings: Settings) -> CertMap:
    """Every certificate, loaded once before the workers fork (memory: every worker
    would otherwise hold its own copy of the ~1 KB per name).

    Runs before any event loop or thread exists in this process, with its own
    storage connection, closed again: nothing that cannot cross a fork does."""
    services = Services(settings, role="worker")
    try:
        certstore = services.certstore
        certstore.refresh_blocking()
        return certstore.snapshot()
    finally:
        services.storage.close()


def _serve(settings: Settings, sockets: dict[str, socket.socket], public: dict[str, socket.socket],
           workers: int) -> None:
    spawn = multiprocessing.get_context("spawn")
    children: list[Any] = []
    certmap: CertMap | None = None
    if workers > 1:
        # Load before fork, share by copy-on-write (100,000 certificates and 2 workers:
        # the tree's PSS 454 -> 378-382 MB, bench/README.md). gc.disable() until
        # the fork leaves no freed holes between the map's objects; gc.freeze() moves
        # them out of the collector's generations, so no child's collection writes to
        # their headers (a write would copy the page into that child).
        gc.disable()
        certmap = _preload(settings)
        from .edge.certstore import CertStore

        CertStore.trim_memory()
        gc.freeze()
        fork = multiprocessing.get_context("fork")
        for _ in range(workers - 1):
            proc = fork.Process(target=_forked_worker_main, args=(settings, sockets, os.getpid(), certmap),
                                daemon=True)
            proc.start()
            children.append(proc)
        gc.enable()

    def start_child() -> Any:
        # A replacement for a worker that died is spawned, not forked: this process
        # then runs an event loop and threads, which a fork must not copy.
        proc = spawn.Process(target=_worker_main, args=(settings, public, os.getpid()), daemon=True)
        proc.start()
        return proc

    node = EdgeNode(settings, sockets, primary=True, certmap=certmap)

    async def supervise() -> None:
        while not node.stop.is_set():
            await asyncio.sleep(1)
            for i, proc in enumerate(children):
                if not proc.is_alive() and not node.stop.is_set():
                    log.error("worker pid %s exited with %s; starting a new one", proc.pid, proc.exitcode)
                    children[i] = start_child()

    async def main() -> None:
        watcher = asyncio.create_task(supervise())
        try:
            await node.main()
        finally:
            watcher.cancel()
            for proc in children:
                if proc.is_alive():
                    proc.terminate()  # SIGTERM: graceful in the child
            for proc in children:
                await asyncio.to_thread(proc.join, 10)

    _run(settings, main)

