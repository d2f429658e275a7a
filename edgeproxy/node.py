"""The composition root: every long-lived object of one process, built in one place.

Owns: which implementation each seam gets and how the objects are wired: the
store, the registry, the certificate store, the ACME issuer and the renewal
service, the relay client, the spool around it and the refusal log, the probes,
the admin tokens. ``serve`` (its primary and its workers), every CLI command and
the admin API get their collaborators from :class:`Services`; nothing is built
anywhere else, and nothing is patched onto an object after it was built.

Each object is built on first use and then shared (a CLI command that only lists
domains never loads the ACME client or opens the spool). Heavy modules are
imported inside the properties for the same reason: ``serve`` opens its public
listeners before the primary's imports have loaded.

Roles: ``cli`` (one command), ``worker`` (public listeners only) and ``primary``
(listeners, admin API and the loops). Only the primary creates the bootstrap
admin token.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

from .config import Settings

if TYPE_CHECKING:
    from .edge.certstore import CertMap, CertStore
    from .control.monitor import Prober
    from .control.webhooks import Attempt, EventLog, WebhookDeliverer
    from .control.lifecycle import LifecycleEvents
    from .control.registry import Registry
    from .edge.relay import HttpRelay, Observe
    from .control.issuers import CaIssuer, Issuer
    from .control.renew import RenewalService
    from .edge.spool import RefusalLog, Spool, SpoolingRelay
    from .storage import Storage
    from .control.tokens import TokenStore

__all__ = ["Role", "Services"]

Role = Literal["cli", "worker", "primary"]


class Services:
    """The objects one process needs, each built once on first use.

    ``storage`` and ``issuer`` may be given (tests, a caller that already opened
    the store); ``certmap``: certificates already loaded (``serve`` loads them once
    before forking its workers), which the certificate store starts from; ``stats`` and ``observe_relay`` are the metrics hooks every counting
    object shares (``serve`` passes its Prometheus-backed ones). Not thread-safe
    while building: build from one thread (the event loop's), as ``serve`` does.
    """

    def __init__(self, settings: Settings, *, role: Role = "cli", storage: Storage | None = None,
                 issuer: Issuer | None = None, stats: Counter[str] | None = None,
                 observe_relay: Observe | None = None, certmap: CertMap | None = None) -> None:
        self.settings = settings
        self._certmap = certmap
        self.role = role
        self._storage = storage
        self._issuer = issuer
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self._observe_relay = observe_relay

    # -- the control plane ------------------------------------------------------------
    @functools.cached_property
    def storage(self) -> Storage:
        if self._storage is not None:
            return self._storage
        from .control.keys import open_store

        return open_store(self.settings)

    @functools.cached_property
    def registry(self) -> Registry:
        from .control.registry import Registry

        return Registry(self.storage, self.settings, events=self.lifecycle)

    @functools.cached_property
    def lifecycle(self) -> LifecycleEvents:
        """Which state changes emit which webhook events, for ``events.endpoints``."""
        from .control.lifecycle import LifecycleEvents
        from .control.registry import domain_view

        settings = self.settings
        return LifecycleEvents(settings.events.endpoints, lambda record, cert: domain_view(record, cert, settings))

    @functools.cached_property
    def event_log(self) -> EventLog:
        """Recent webhook deliveries and redelivery (admin API and CLI)."""
        from .control.webhooks import EventLog

        return EventLog(self.storage)

    def webhooks(self, *, on_dead: Callable[[Attempt], Awaitable[None]] | None = None,
                 on_attempt: Callable[[Attempt], None] | None = None) -> WebhookDeliverer:
        """The outbox deliverer ``serve`` runs once per node (``on_dead``: the operator
        alert; ``on_attempt``: metrics)."""
        from .control.webhooks import WebhookDeliverer

        return WebhookDeliverer(self.storage, self.settings.events, events=self.lifecycle,
                                warn_days=self.settings.monitor.cert_warn_days, on_dead=on_dead,
                                on_attempt=on_attempt)

    @functools.cached_property
    def tokens(self) -> TokenStore:
        from .control.tokens import TokenStore

        return TokenStore(self.settings.admin, create_bootstrap=self.role == "primary")

    @functools.cached_property
    def certstore(self) -> CertStore:
        from .edge.certstore import CertStore

        proxy = self.settings.proxy
        return CertStore(self.storage, proxy.tls_context_cache, native=proxy.tls_native,
                         policy=self.settings.tls.policy, loaded=self._certmap)

    @functools.cached_property
    def issuers(self) -> tuple[CaIssuer, ...]:
        """The CAs in order of preference (``config.acme_issuers``), one ACME client
        each; their accounts are stored per directory URL. A given ``issuer`` stands
        in for the first CA (the one-CA setup of tests)."""
        from .control.acme_client import AcmeIssuer
        from .config import acme_issuers
        from .control.issuers import CaIssuer

        built: list[CaIssuer] = []
        for i, ca in enumerate(acme_issuers(self.settings)):
            issuer: Issuer
            if i == 0 and self._issuer is not None:
                issuer = self._issuer
            else:
                issuer = AcmeIssuer(storage=self.storage, directory_url=ca.directory, email=ca.email,
                                    ca_bundle=ca.ca_bundle, profile=ca.profile, timeout=self.settings.acme.timeout,
                                    eab_kid=ca.eab_kid, eab_hmac_key_file=ca.eab_hmac_key_file)
            built.append(CaIssuer(ca.directory, tuple(ca.caa_identities), issuer))
        return tuple(built)

    @property
    def issuer(self) -> Issuer:
        """The first (preferred) CA's client."""
        return self.issuers[0].issuer

    def renewal(self, issuers: Sequence[CaIssuer] | None = None) -> RenewalService:
        """A renewal service over ``issuers`` (default :attr:`issuers`; ``serve`` wraps each to count orders)."""
        from .control.renew import RenewalService

        return RenewalService.from_settings(self.storage, self.certstore, tuple(issuers or self.issuers),
                                            self.settings, events=self.lifecycle)

    def prober(self, *, connect: str | None = None, port: int | None = None) -> Prober:
        from .control.monitor import Prober

        return Prober.from_settings(self.settings, connect=connect, port=port)

    # -- the data path: proxy -> spool -> relay client, one way --------------------------
    @functools.cached_property
    def relay(self) -> HttpRelay:
        """The relay client (``upstream.relay``): passthrough routes, the replayer and
        ``edgeproxy replay`` use it directly; event routes through :attr:`events`."""
        from .edge.relay import HttpRelay

        return HttpRelay(self.settings.upstream.relay, self.settings.upstream, stats=self.stats,
                         observe=self._observe_relay)

    @functools.cached_property
    def spool(self) -> Spool:
        """This node's spool file (every process of a node writes the same one)."""
        from .edge.spool import Spool, spool_path

        return Spool(spool_path(self.settings), max_bytes=self.settings.spool.max_bytes)

    @functools.cached_property
    def refusals(self) -> RefusalLog:
        from .edge.spool import RefusalLog

        return RefusalLog(self.spool, self.settings.failed_log.refusals_per_domain_hour, stats=self.stats)

    @functools.cached_property
    def events(self) -> SpoolingRelay:
        """What event routes send through: the spool as a decorator over :attr:`relay`."""
        from .edge.spool import SpoolingRelay

        return SpoolingRelay(self.relay, self.spool, self.storage, refusals=self.refusals,
                             ip_retention=self.settings.privacy.ip_retention, stats=self.stats)

    # -- shutting down ----------------------------------------------------------------
    async def aclose(self) -> None:
        """Close what was built (never builds anything); idempotent."""
        built = self.__dict__
        if "relay" in built:
            await built["relay"].aclose()
        if "spool" in built:
            await asyncio.to_thread(built["spool"].close)  # joins the writer thread
        if "storage" in built and self._storage is None:
            built["storage"].close()
