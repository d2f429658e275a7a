"""The ``edgeproxy`` command line: every command calls the same service functions as the admin API.

Owns: argument parsing, human and JSON output, exit codes (0 only on success:
cron relies on it).
Must not import: storage backends, ``acme`` (everything is built by ``node.Services``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings
from .errors import DomainNotFound, EdgeproxyError
from .control.keys import generate_master_key, rotate
from .node import Services
from .storage import migrate_storage, open_storage
from .storage.copy import copy_store

if TYPE_CHECKING:  # registry pulls in dnspython and tldextract; `serve` does not need them first
    from .control.registry import Registry

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve  # hypercorn is only needed here

    serve(_settings(args), workers=args.workers)
    return EXIT_OK


def _services(args: argparse.Namespace) -> Services:
    """The composition root for one command (``node.Services``): what the command
    touches is built on first use, nothing else."""
    return Services(_settings(args))


def _with_registry(args: argparse.Namespace) -> tuple[Registry, Settings]:
    services = _services(args)
    return services.registry, services.settings


def _store_absent(settings: Settings) -> bool:
    """True when ``storage.url`` names a SQLite file that does not exist yet.

    Opening it would create it (and its directory): a read-only command answers
    "nothing registered" instead, and leaves no empty database behind.
    """
    if not settings.storage.url.lower().startswith("sqlite:"):
        return False
    from .storage import sqlite_path_from_url

    return not os.path.exists(sqlite_path_from_url(settings.storage.url))


def _not_registered(raw_hostname: str) -> DomainNotFound:
    return DomainNotFound(f"{raw_hostname!r} is not registered on this edge")  # Registry.get's wording


def _cmd_domains_add(args: argparse.Namespace) -> int:
    from .control.registry import admit_hostname

    # Every check that needs no storage first: a refused name creates no database.
    admit_hostname(args.hostname, _settings(args))
    registry, _ = _with_registry(args)
    record = registry.add(args.hostname)
    view = registry.view(record)
    if args.json:
        _print_json(view)
    else:
        rec = view["dns"]["records"][0]
        print(f"registered {record.hostname} ({record.status})")
        print(f"  customer DNS: {rec['name']}  {rec['type']}  {rec['value']}")
        print(f"  snippet:      {view['snippet']}")
        print("  a running `edgeproxy serve` orders the certificate within seconds; without one, run `edgeproxy renew`")
    return EXIT_OK


def _cmd_domains_list(args: argparse.Namespace) -> int:
    if _store_absent(_settings(args)):
        records: list[Any] = []
        registry: Registry | None = None
    else:
        registry, _ = _with_registry(args)
        records = registry.list()
    if registry is None or not records:
        if args.json:
            _print_json({"domains": []})
        else:
            print("no domains registered")
        return EXIT_OK
    if args.json:
        _print_json({"domains": [registry.view(r) for r in records]})
        return EXIT_OK
    print(f"{'HOSTNAME':<40} {'STATUS':<12} {'NOT AFTER':<21} ERROR")
    for record in records:
        view = registry.view(record)
        not_after = view["certificate"]["not_after"] if view["certificate"] else "-"
        error = view["error"]["code"] if view["error"] else ""
        print(f"{record.hostname:<40} {record.status:<12} {not_after:<21} {error}")
    return EXIT_OK


def _cmd_domains_show(args: argparse.Namespace) -> int:
    if _store_absent(_settings(args)):
        raise _not_registered(args.hostname)
    registry, _ = _with_registry(args)
    _print_json(registry.view(registry.get(args.hostname)))
    return EXIT_OK


def _cmd_domains_remove(args: argparse.Namespace) -> int:
    if _store_absent(_settings(args)):
        raise _not_registered(args.hostname)
    registry, _ = _with_registry(args)
    registry.remove(args.hostname)
    print(f"removed {args.hostname} with its private key and certificate")
    return EXIT_OK


def _cmd_renew(args: argparse.Namespace) -> int:
    from .control.registry import domain_view

    services = _services(args)
    settings, storage, registry = services.settings, services.storage, services.registry
    service = services.renewal()
    forced = [registry.get(h).hostname for h in args.force]
    due = forced or [d.hostname for d in service.due(service.clock())]
    if args.dry_run:
        for hostname in due:
            print(f"due     {hostname}")
        print(f"{len(due)} due, nothing ordered (--dry-run)")
        return EXIT_OK
    # The running `serve` picks the new certificates up from the change feed; this
    # process exits after the pass and needs no TLS contexts of its own.
    result = asyncio.run(service.run_pass(due, force=bool(forced), refresh=False))
    for hostname in result.issued:
        view = domain_view(registry.get(hostname), storage.get_certificate(hostname), settings)
        print(f"issued  {hostname}  not_after={view['certificate']['not_after']}")
    for hostname, exc in result.failed.items():
        print(f"failed  {hostname}  {exc.code}: {exc}")
    for hostname, why in result.waiting.items():
        print(f"waiting {hostname}  {why}")
    for hostname in result.moved:
        print(f"moved   {hostname}  DNS no longer points at this edge; renewals stopped")
    for hostname in result.removed:
        print(f"removed {hostname}  moved away for longer than renew.moved_retention_days")
    for hostname in result.skipped:
        print(f"skipped {hostname}  (another process holds its lock, or it is no longer due)")
    print(f"{len(result.issued)} issued, {len(result.failed)} failed, {len(result.waiting)} waiting, "
          f"{len(result.skipped)} skipped")
    return EXIT_OK if result.ok else EXIT_FAILED


def _cmd_migrate(args: argparse.Namespace) -> int:
    url = args.url or _settings(args).storage.url
    before, after = migrate_storage(url)
    if before == after:
        print(f"storage schema is at version {after}; nothing to do")
    else:
        print(f"storage schema migrated from version {before} to {after}")
    return EXIT_OK


def _cmd_storage_copy(args: argparse.Namespace) -> int:
    # Raw backends on purpose (not keys.open_store): sealed keys move verbatim.
    src = open_storage(args.source)
    try:
        dst = open_storage(args.target)
        try:
            result = copy_store(src, dst, force=args.force, progress=lambda line: print(f"copied {line}", flush=True))
        finally:
            dst.close()
    finally:
        src.close()
    print(f"{result.domains} domain(s), {result.certificates} certificate(s) with their keys, "
          f"{result.accounts} ACME account(s), {result.failed_requests} failed request(s), "
          f"{result.pending_events} webhook event(s) not yet delivered, {result.firing_alerts} firing alert(s) copied")
    return EXIT_OK


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    key_id = generate_master_key(args.file)
    print(f"wrote master key {key_id} to {args.file} (mode 0600); set storage.key_encryption_key_file to use it")
    return EXIT_OK


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.storage.key_encryption_key_file:
        print("edgeproxy: storage.key_encryption_key_file is not set: nothing to seal with", file=sys.stderr)
        return EXIT_FAILED
    store = Services(settings).storage
    # Every stored account: each configured CA's, and those of CAs no longer configured.
    directories = [a.directory_url for a in store.list_accounts()]
    count = rotate(store, directories, progress=lambda what: print(f"resealed {what}"))
    print(f"{count} private key(s) sealed under the current master key; previous_key_files can now be dropped")
    return EXIT_OK


def _cmd_tokens_create(args: argparse.Namespace) -> int:
    from .control.registry import utcnow
    token = _services(args).tokens.create(args.name, utcnow())
    print(token)
    print(f"token {args.name!r} created; it is shown once and stored only as a hash", file=sys.stderr)
    return EXIT_OK


def _cmd_tokens_list(args: argparse.Namespace) -> int:
    infos = _services(args).tokens.list()
    for info in infos:
        print(f"{info.name:<24} {info.created_at:<34} sha256:{info.fingerprint}")
    if not infos:
        print("no named tokens")
    return EXIT_OK


def _cmd_tokens_revoke(args: argparse.Namespace) -> int:
    _services(args).tokens.revoke(args.name)
    print(f"revoked {args.name}")
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .control.doctor import exit_code, format_findings, run_doctor

    findings = run_doctor(_settings(args), network=not args.offline)
    print(format_findings(f for f in findings if f.level != "ok" or args.verbose))
    return exit_code(findings, strict=args.strict)
def _cmd_check(args: argparse.Namespace) -> int:
    from .control.domains import normalize_hostname
    from .control.monitor import PROBED_STATUSES, Prober, probe_hosts

    services = _services(args)
    if args.domain:
        hosts = [normalize_hostname(h) for h in args.domain]
    else:
        try:
            hosts = [d.hostname for d in services.storage.list_domains() if d.status in PROBED_STATUSES]
        finally:
            services.storage.close()
    # The same Prober and workers as the serve loop, unpaced (an operator waits for the
    # answer); 8 workers, not one task per domain. The command sends no alerts.
    prober = services.prober(connect=args.connect, port=args.port)
    results = asyncio.run(probe_hosts(prober.probe, hosts, concurrency=8)) if hosts else []
    if args.json:
        _print_json({"ok": all(r.ok for r in results), "results": [r.to_json() for r in results]})
    else:
        for result in results:
            print(result.line())
        if not results:
            print("no active domains to check")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _cmd_alert_test(args: argparse.Namespace) -> int:
    import datetime as dt

    from .control.monitor import AlertDispatcher, build_sinks, build_test_alert

    settings = _settings(args)
    sinks = build_sinks(settings)
    if not sinks:
        print("no alert sinks configured ([alerts] webhook_url, telegram_*, pagerduty_*, smtp_*)", file=sys.stderr)
        return EXIT_FAILED
    cfg = settings.alerts
    dispatcher = AlertDispatcher(sinks, retries=cfg.retries, retry_delay=cfg.retry_delay, timeout=cfg.timeout)
    failures = asyncio.run(dispatcher.dispatch([build_test_alert(dt.datetime.now(dt.timezone.utc))]))
    for name, errors in failures.items():
        print(f"{'FAIL' if errors else 'ok  '}  {name}" + (f"  {errors[-1]}" if errors else ""))
    return EXIT_FAILED if any(failures.values()) else EXIT_OK
# -- replay and spool ------------------------------------------------------
def _cmd_replay(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .edge.spool import ReplayFilters, move_refusals, replay_failed, spool_path

    services = _services(args)
    settings, storage = services.settings, services.storage
    filters = ReplayFilters.parse(args.since, args.until, args.domain, args.status, datetime.now(timezone.utc))
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, record: Any, outcome: str) -> None:
        width = 30
        filled = width * done // max(1, total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if tty:
            sys.stderr.write(f"\r{bar}")
            if done == total:
                sys.stderr.write("\n")
        elif done == total or done % 100 == 0 or not outcome.startswith("delivered"):
            sys.stderr.write(f"{bar} {record.domain} {record.idempotency_key} {outcome}\n")
        sys.stderr.flush()

    # What the edge refused itself waits in this node's spool file until the replayer
    # moves it to the failed-request log; move it now so that it can be selected.
    has_spool = os.path.exists(spool_path(settings))

    async def run() -> Any:
        try:
            if has_spool:
                await move_refusals(services.spool, storage, settings.privacy.ip_retention,
                                    lambda: datetime.now(timezone.utc))
            return await replay_failed(storage, services.relay, filters, dry_run=args.dry_run, progress=progress)
        finally:
            await services.aclose()

    summary = asyncio.run(run())
    if args.json:
        _print_json(summary.as_dict())
    elif args.dry_run:
        print(f"{summary.selected} would be sent, nothing sent (--dry-run)")
    else:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.failures.items()))
        print(f"{summary.selected} selected, {summary.delivered} delivered, {summary.failed} failed"
              + (f" ({reasons})" if reasons else ""))
    return EXIT_OK if summary.failed == 0 else EXIT_FAILED


def _cmd_spool_stats(args: argparse.Namespace) -> int:
    import time

    spool = _services(args).spool
    try:
        _print_json(spool.stats(time.time()).as_dict())
    finally:
        spool.close()
    return EXIT_OK


def _cmd_spool_list(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    spool = _services(args).spool
    try:
        entries = spool.entries(args.limit, args.domain)
    finally:
        spool.close()
    if args.json:
        _print_json([{"id": e.id, "domain": e.domain, "idempotency_key": e.idempotency_key, "target": e.target,
                      "received_at": datetime.fromtimestamp(e.received_at, timezone.utc).isoformat(),
                      "attempts": e.attempts, "last_error": e.last_error, "bytes": len(e.body)} for e in entries])
        return EXIT_OK
    for e in entries:
        when = datetime.fromtimestamp(e.received_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{e.id:>8} {when} {e.domain:<30} {e.idempotency_key} attempts={e.attempts} {e.last_error or ''}")
    print(f"{len(entries)} listed")
    return EXIT_OK


def _cmd_spool_drain(args: argparse.Namespace) -> int:
    from .edge.spool import Replayer

    services = _services(args)
    settings, spool = services.settings, services.spool
    replayer = Replayer(spool, services.relay, settings.spool, storage=services.storage,
                        ip_retention=settings.privacy.ip_retention)

    async def run() -> int:
        import time

        try:
            while True:
                result = await replayer.drain_once()
                if result.sent == 0 or result.retried:
                    break
            return int(spool.stats(time.time()).depth)
        finally:
            await services.aclose()

    left = asyncio.run(run())
    totals = replayer.totals
    print(f"{totals.delivered} delivered, {totals.refused} moved to the failed-request log, "
          f"{totals.dead} dead-lettered, {left} left in the spool")
    return EXIT_OK if left == 0 else EXIT_FAILED


def _cmd_events_list(args: argparse.Namespace) -> int:
    if _store_absent(_settings(args)):
        deliveries: list[dict[str, Any]] = []
    else:
        deliveries = _services(args).event_log.list(state=args.state, event_id=args.id, hostname=args.domain,
                                                    limit=args.limit)
    if args.json:
        _print_json({"deliveries": deliveries})
        return EXIT_OK
    for d in deliveries:
        detail = d["last_error"] or ""
        if d["state"] == "pending" and d["next_attempt_at"]:
            detail = f"next {d['next_attempt_at']} {detail}".rstrip()
        print(f"{d['occurred_at']} {d['id']} {d['type']:<21} {d['hostname']:<30} {d['state']:<9} "
              f"attempts={d['attempts']} {d['endpoint']} {detail}".rstrip())
    print(f"{len(deliveries)} listed")
    return EXIT_OK


def _cmd_events_redeliver(args: argparse.Namespace) -> int:
    deliveries = _services(args).event_log.redeliver(args.id)
    print(f"event {args.id} is due again for {len(deliveries)} endpoint(s): "
          + ", ".join(d["endpoint"] for d in deliveries) + "; a running `edgeproxy serve` sends it within seconds")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep)


_CONFIG_HELP = "TOML config file (default: $EDGEPROXY_CONFIG, else built-in defaults)"


def _common_options() -> argparse.ArgumentParser:
    """--config and --verbose for every subcommand, so that both
    ``edgeproxy --config FILE serve`` and ``edgeproxy serve --config FILE`` work.

    SUPPRESS: a subcommand that is not given the option leaves the value parsed
    before the subcommand (or the top-level default) alone.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


_COMMON = _common_options()


def _command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, parents=[_COMMON], **kwargs)
    return parser


def _usage(parser: argparse.ArgumentParser) -> Any:
    """A command handler for ``edgeproxy`` or ``edgeproxy domains`` alone: the help, exit 2."""
    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE
    return show


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="Custom-domain TLS edge for analytics products.")
    parser.add_argument("--config", "-c", metavar="FILE", default=None, help=_CONFIG_HELP)
    parser.add_argument("--verbose", "-v", action="store_true", default=False, help="debug logging")
    parser.set_defaults(func=_usage(parser))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = _command(sub, "serve", help="run the HTTP, HTTPS and admin listeners")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes for the public listeners (default: the CPUs this process may use)")
    serve.set_defaults(func=_cmd_serve)

    domains = _command(sub, "domains", help="register, list, show and remove customer domains")
    domains.set_defaults(func=_usage(domains))
    dsub = domains.add_subparsers(dest="action", metavar="ACTION")
    add = _command(dsub, "add", help="register a hostname; issuance starts at once")
    add.add_argument("hostname", help="the customer's hostname, e.g. cdn.shop.example.com (no scheme, path or "
                                      "port; internationalized names are accepted); its DNS may point here later")
    add.add_argument("--json", action="store_true", help="print the full record as JSON")
    add.set_defaults(func=_cmd_domains_add)
    lst = _command(dsub, "list", help="list registered domains")
    lst.add_argument("--json", action="store_true",
                     help="print every domain's full record as JSON (as GET /v1/domains answers)")
    lst.set_defaults(func=_cmd_domains_list)
    show = _command(dsub, "show", help="show one domain as JSON")
    show.add_argument("hostname", help="a registered hostname (any spelling that normalizes to it)")
    show.set_defaults(func=_cmd_domains_show)
    rm = _command(dsub, "remove", help="remove a domain with its key and certificate")
    rm.add_argument("hostname", help="a registered hostname (any spelling that normalizes to it)")
    rm.set_defaults(func=_cmd_domains_remove)

    renew = _command(sub, "renew", help="order certificates for every due domain (for cron / systemd timers)")
    renew.add_argument("--dry-run", action="store_true", help="list what is due, order nothing")
    renew.add_argument("--force", nargs="+", default=[], metavar="HOST", help="order now for these names")
    renew.set_defaults(func=_cmd_renew)

    migrate = _command(sub, "migrate", help="create or upgrade the storage schema (idempotent)")
    migrate.add_argument("--url", default="", help="storage URL (default: storage.url from the config)")
    migrate.set_defaults(func=_cmd_migrate)

    storage = _command(sub, "storage", help="move state between stores")
    storage.set_defaults(func=_usage(storage))
    ssub = storage.add_subparsers(dest="action", metavar="ACTION")
    copy = _command(
        ssub, "copy", help="copy domains, certificates with keys, and ACME accounts from one store to another",
        description="Copy a node's state into another store, e.g. "
                    "--from sqlite:///var/lib/edgeproxy/edgeproxy.db --to postgresql://edge@db/edgeproxy. "
                    "Idempotent; keys are copied as stored (sealed or not).",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="URL", help="source storage URL")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="target storage URL (migrated first)")
    copy.add_argument("--force", action="store_true", help="copy into a target that already holds data")
    copy.set_defaults(func=_cmd_storage_copy)

    keys = _command(sub, "keys", help="master keys that seal private keys at rest")
    keys.set_defaults(func=_usage(keys))
    ksub = keys.add_subparsers(dest="action", metavar="ACTION")
    gen = _command(ksub, "generate", help="write a new random 256-bit master key file (0600)")
    gen.add_argument("file", help="where to write the key; an existing file is never overwritten")
    gen.set_defaults(func=_cmd_keys_generate)
    rot = _command(ksub, "rotate", help="re-seal every stored private key under storage.key_encryption_key_file")
    rot.set_defaults(func=_cmd_keys_rotate)

    tokens = _command(sub, "tokens", help="named admin API tokens (stored hashed)")
    tokens.set_defaults(func=_usage(tokens))
    tsub = tokens.add_subparsers(dest="action", metavar="ACTION")
    tcreate = _command(tsub, "create", help="create a token and print it once")
    tcreate.add_argument("name", help="a name for the token, to list and revoke it by")
    tcreate.set_defaults(func=_cmd_tokens_create)
    _command(tsub, "list", help="list token names (never the tokens)").set_defaults(func=_cmd_tokens_list)
    trevoke = _command(tsub, "revoke", help="revoke a token by name")
    trevoke.add_argument("name", help="the name the token was created with")
    trevoke.set_defaults(func=_cmd_tokens_revoke)

    doctor = _command(sub, "doctor", help="check the configuration and warn about names ad blockers match")
    doctor.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    doctor.add_argument("--offline", action="store_true", help="skip the ACME directory and upstream requests")
    doctor.set_defaults(func=_cmd_doctor)
    check = _command(sub, "check", help="probe domains as a real client: TLS, script, one event (exit 1 on any failure)")
    which = check.add_mutually_exclusive_group()
    which.add_argument("--domain", action="append", metavar="HOST", help="check this name (repeatable)")
    which.add_argument("--all", action="store_true", help="check every active domain (the default)")
    check.add_argument("--connect", metavar="IP", help="connect to this address instead of resolving each name")
    check.add_argument("--port", type=int, help="HTTPS port (default: monitor.port, else the port of listen.https)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(func=_cmd_check)

    alert = _command(sub, "alert", help="alert sinks")
    alert.set_defaults(func=_usage(alert))
    asub = alert.add_subparsers(dest="action", metavar="ACTION")
    atest = _command(asub, "test", help="send a test alert to every configured sink (exit 1 if one fails)")
    atest.set_defaults(func=_cmd_alert_test)

    replay = _command(sub, "replay", help="resend failed-request log entries with their original idempotency keys")
    replay.add_argument("--since", metavar="T", help="received at or after T (ISO-8601, or an age like 12h, 7d)")
    replay.add_argument("--until", metavar="T", help="received before T")
    replay.add_argument("--domain", metavar="HOST", help="only this custom domain")
    replay.add_argument("--status", type=int, metavar="CODE", help="only entries refused with this status")
    replay.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.set_defaults(func=_cmd_replay)
    spool = _command(sub, "spool", help="inspect or drain this node's durable spool")
    spool.set_defaults(func=_usage(spool))
    ssub = spool.add_subparsers(dest="action", metavar="ACTION")
    _command(ssub, "stats", help="depth, bytes, oldest entry, dead letters (JSON)").set_defaults(func=_cmd_spool_stats)
    slist = _command(ssub, "list", help="list spooled requests, oldest first")
    slist.add_argument("--limit", type=int, default=100, help="list at most N entries (default 100)")
    slist.add_argument("--domain", metavar="HOST", help="only entries for this custom domain")
    slist.add_argument("--json", action="store_true", help="print the entries as JSON")
    slist.set_defaults(func=_cmd_spool_list)
    _command(ssub, "drain", help="send spooled requests to the relay now (exit 0 when empty)").set_defaults(
        func=_cmd_spool_drain)

    events = _command(sub, "events", help="lifecycle webhooks: recent deliveries, redeliver one")
    events.set_defaults(func=_usage(events))
    esub = events.add_subparsers(dest="action", metavar="ACTION")
    elist = _command(esub, "list", help="recent deliveries, newest first (as GET /v1/events)")
    elist.add_argument("--state", choices=("pending", "delivered", "dead"), help="only deliveries in this state")
    elist.add_argument("--domain", metavar="HOST", help="only events of this domain")
    elist.add_argument("--id", metavar="EVENT_ID", help="only this event")
    elist.add_argument("--limit", type=int, default=100, help="list at most N deliveries (default 100, max 1000)")
    elist.add_argument("--json", action="store_true", help="print the deliveries as JSON")
    elist.set_defaults(func=_cmd_events_list)
    eredo = _command(esub, "redeliver", help="send an event again to every endpoint it was for, now "
                                             "(as POST /v1/events/{id}/redeliver)")
    eredo.add_argument("id", help="the event id (evt_..., the webhook-id header)")
    eredo.set_defaults(func=_cmd_events_redeliver)

    demo = _command(sub, "demo", help="run the whole flow locally against Pebble")
    demo.add_argument("--keep", action="store_true", help="after the round trip keep serving until Ctrl-C, and keep the state directory "
                                                           "(removed after a successful run without it; always kept after a failure)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: one line per forwarded event is noise on
    # the hot path (our own logs say what matters).
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        code: int = args.func(args)
        return code
    except EdgeproxyError as exc:
        print(f"edgeproxy: {exc} [{exc.code}]", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"edgeproxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
