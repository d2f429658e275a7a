"""The ``edgeproxy`` command line: every command calls the same service functions as the admin API.

Owns: argument parsing, human and JSON output, exit codes (0 only on success:
cron relies on it).
Must not import: storage backends (it goes through ``storage.open_storage``), ``acme``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .config import Settings, load_settings
from .errors import EdgeproxyError
from .registry import Registry, domain_view
from .storage import open_storage

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


def _with_registry(args: argparse.Namespace) -> tuple[Registry, Settings]:
    settings = _settings(args)
    return Registry(open_storage(settings.storage.url), settings), settings


def _cmd_domains_add(args: argparse.Namespace) -> int:
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
    registry, settings = _with_registry(args)
    records = registry.list()
    if args.json:
        _print_json({"domains": [registry.view(r) for r in records]})
        return EXIT_OK
    if not records:
        print("no domains registered")
        return EXIT_OK
    print(f"{'HOSTNAME':<40} {'STATUS':<12} {'NOT AFTER':<21} ERROR")
    for record in records:
        view = registry.view(record)
        not_after = view["certificate"]["not_after"] if view["certificate"] else "-"
        error = view["error"]["code"] if view["error"] else ""
        print(f"{record.hostname:<40} {record.status:<12} {not_after:<21} {error}")
    return EXIT_OK


def _cmd_domains_show(args: argparse.Namespace) -> int:
    registry, _ = _with_registry(args)
    _print_json(registry.view(registry.get(args.hostname)))
    return EXIT_OK


def _cmd_domains_remove(args: argparse.Namespace) -> int:
    registry, _ = _with_registry(args)
    registry.remove(args.hostname)
    print(f"removed {args.hostname} with its private key and certificate")
    return EXIT_OK


def _cmd_renew(args: argparse.Namespace) -> int:
    from .acme_client import AcmeIssuer
    from .certstore import CertStore
    from .renew import RenewalService

    settings = _settings(args)
    storage = open_storage(settings.storage.url)
    registry = Registry(storage, settings)
    issuer = AcmeIssuer(
        storage=storage, directory_url=settings.acme.directory, email=settings.acme.email,
        ca_bundle=settings.acme.ca_bundle, profile=settings.acme.profile, timeout=settings.acme.timeout,
    )
    service = RenewalService.from_settings(storage, CertStore(storage), issuer, settings)
    forced = [registry.get(h).hostname for h in args.force]
    due = forced or [d.hostname for d in service.due(service.clock())]
    if args.dry_run:
        for hostname in due:
            print(f"due     {hostname}")
        print(f"{len(due)} due, nothing ordered (--dry-run)")
        return EXIT_OK
    result = asyncio.run(service.run_pass(due, force=bool(forced)))
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="Custom-domain TLS edge for analytics products.")
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML config file (default: $EDGEPROXY_CONFIG, else built-in defaults)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP, HTTPS and admin listeners")
    serve.add_argument("--workers", type=int, default=1, help="worker processes for the public listeners (default 1)")
    serve.set_defaults(func=_cmd_serve)

    domains = sub.add_parser("domains", help="register, list, show and remove customer domains")
    dsub = domains.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = dsub.add_parser("add", help="register a hostname; issuance starts at once")
    add.add_argument("hostname")
    add.add_argument("--json", action="store_true", help="print the full record as JSON")
    add.set_defaults(func=_cmd_domains_add)
    lst = dsub.add_parser("list", help="list registered domains")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_domains_list)
    show = dsub.add_parser("show", help="show one domain as JSON")
    show.add_argument("hostname")
    show.set_defaults(func=_cmd_domains_show)
    rm = dsub.add_parser("remove", help="remove a domain with its key and certificate")
    rm.add_argument("hostname")
    rm.set_defaults(func=_cmd_domains_remove)

    renew = sub.add_parser("renew", help="order certificates for every due domain (for cron / systemd timers)")
    renew.add_argument("--dry-run", action="store_true", help="list what is due, order nothing")
    renew.add_argument("--force", nargs="+", default=[], metavar="HOST", help="order now for these names")
    renew.set_defaults(func=_cmd_renew)

    demo = sub.add_parser("demo", help="run the whole flow locally against Pebble")
    demo.add_argument("--keep", action="store_true", help="keep serving after the round trip until Ctrl-C")
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
