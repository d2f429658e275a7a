"""``edgeproxy doctor``: each check's verdicts, the exit-code policy, and the command itself."""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.config import (
    AcmeSettings,
    LETSENCRYPT_STAGING,
    AdminSettings,
    DnsSettings,
    ListenSettings,
    RoutesSettings,
    Settings,
    StorageSettings,
    UpstreamSettings,
    load_settings,
)
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.control.doctor import (
    Finding,
    check_acme,
    check_listeners,
    check_names,
    check_storage,
    check_token_file,
    check_tls,
    check_upstream,
    exit_code,
    trigger_words_in,
)
from edgeproxy.control.keys import generate_master_key
from edgeproxy.storage import open_storage
from edgeproxy.control.tokens import TokenStore


def levels(findings: list[Finding], check: str) -> list[str]:
    return [f.level for f in findings if f.check == check]


def messages(findings: list[Finding], check: str) -> str:
    return " | ".join(f.message for f in findings if f.check == check)


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("/js/app.js", (), []),
        ("/api/v1/m", (), []),
        ("/static/app.js", (), []),  # "stat" inside "static" is not "stats"
        ("edge.example.net", (), []),
        ("/js/analytics.js", (), ["analytic"]),
        ("/ga/collect", (), ["ga", "collect"]),
        ("/api/Events", (), ["event"]),
        ("stats-edge.example.net", (), ["stats"]),
        ("tracker.shop.example", (), ["track"]),
        ("/assets/tag.js", (), ["tag"]),
        ("/assets/tagline.js", (), []),  # short words only as a whole segment
        ("/metrics/pixel.gif", (), ["metric", "pixel"]),
        ("/js/plausible.js", ("plausible",), ["plausible"]),
    ],
)
def test_trigger_words(name: str, extra: tuple[str, ...], expected: list[str]) -> None:
    assert trigger_words_in(name, extra) == expected


def test_names_defaults_routes_neutral_but_placeholder_target() -> None:
    findings = check_names(Settings())
    assert levels(findings, "routes.script_path") == ["ok"]
    assert levels(findings, "routes.api_path") == ["ok"]
    assert levels(findings, "dns.cname_target") == ["warning"]
    assert "reserved example name" in messages(findings, "dns.cname_target")


def test_names_warn_on_trigger_words_and_vendor_domain() -> None:
    settings = Settings(
        upstream=UpstreamSettings(script="https://scripts.vendorcdn.com/latest.js", relay="https://queue.vendorcdn.com"),
        routes=RoutesSettings(script_path="/js/analytics.js", api_path="/api/vendorcdn"),
        dns=DnsSettings(cname_target="stats.vendorcdn.com"),
    )
    findings = check_names(settings)
    assert levels(findings, "routes.script_path") == ["warning"]
    assert "analytic" in messages(findings, "routes.script_path")
    assert levels(findings, "routes.api_path") == ["warning"]  # the vendor's brand is a trigger word
    assert "vendorcdn" in messages(findings, "routes.api_path")
    target = messages(findings, "dns.cname_target")
    assert levels(findings, "dns.cname_target") == ["warning", "warning", "warning"]  # words, script, relay
    assert "contains stats" in target and "under the vendor's domain vendorcdn.com (upstream.script)" in target


def test_names_neutral_target_is_ok_and_bad_target_is_an_error() -> None:
    ok = check_names(Settings(dns=DnsSettings(cname_target="edge.neutral-proxy.net.")))
    assert levels(ok, "dns.cname_target") == ["ok"]
    lookalike = check_names(Settings(dns=DnsSettings(cname_target="edge.myexample.net")))
    assert levels(lookalike, "dns.cname_target") == ["ok"]  # not example.net
    lab = check_names(Settings(dns=DnsSettings(cname_target="edge.lab.test")))
    assert levels(lab, "dns.cname_target") == ["warning"]
    bad = check_names(Settings(dns=DnsSettings(cname_target="edge_1..net")))
    assert levels(bad, "dns.cname_target") == ["error"]
    empty = check_names(Settings(dns=DnsSettings(cname_target="")))
    assert levels(empty, "dns.cname_target") == ["error"]
    ips_only = check_names(Settings(dns=DnsSettings(cname_target="", edge_ips=("192.0.2.1",))))
    assert levels(ips_only, "dns.cname_target") == ["warning"]


def test_the_runbook_example_config_has_neutral_names(tmp_path: Path) -> None:
    """The configuration operators copy from docs/runbook.md passes the name checks."""
    runbook = (Path(__file__).resolve().parent.parent / "docs" / "runbook.md").read_text()
    (example,) = re.findall(r"<<'TOML'\n(.*?)\nTOML\n", runbook, re.S)
    (tmp_path / "example.toml").write_text(example)
    findings = check_names(load_settings(tmp_path / "example.toml", env={}))
    assert {f.level for f in findings} == {"ok"}, findings


def test_listeners_bind_errors_are_classified() -> None:
    def bind(host: str, port: int) -> None:
        if port == 80:
            raise OSError(errno.EACCES, "Permission denied")
        if port == 443:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        if host == "192.0.2.1":
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    findings = check_listeners(Settings(), bind)
    assert levels(findings, "listen.http") == ["error"]
    assert "CAP_NET_BIND_SERVICE" in messages(findings, "listen.http")
    assert levels(findings, "listen.https") == ["warning"]
    assert levels(findings, "listen.admin") == ["ok"]

    far = check_listeners(Settings(listen=ListenSettings(admin="192.0.2.1:8081")), lambda h, p: bind(h, 8081 if h == "192.0.2.1" else 9))
    assert levels(far, "listen.admin") == ["error", "warning"]  # cannot bind, and not loopback


def test_listeners_admin_on_a_unix_socket(tmp_path: Path) -> None:
    ok = check_listeners(Settings(listen=ListenSettings(admin=f"unix:{tmp_path / 'admin.sock'}")), lambda h, p: None)
    assert levels(ok, "listen.admin") == ["ok"]  # no bind attempt, no loopback warning
    missing = check_listeners(Settings(listen=ListenSettings(admin=f"unix:{tmp_path / 'no' / 'admin.sock'}")),
                              lambda h, p: None)
    assert levels(missing, "listen.admin") == ["error"]


def test_listeners_real_socket_in_use_and_duplicates() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(listen=ListenSettings(http="127.0.0.1:0", https=f"127.0.0.1:{port}", admin=f"127.0.0.1:{port}"))
        findings = check_listeners(settings)
    assert levels(findings, "listen.http") == ["ok"]
    assert levels(findings, "listen.https") == ["warning"]
    assert levels(findings, "listen.admin") == ["error"]
    assert "same address as listen.https" in messages(findings, "listen.admin")


def test_token_files(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "token"
    named = tmp_path / "etc" / "tokens.json"
    settings = Settings(admin=AdminSettings(token_file=str(path), tokens_file=str(named)))
    findings = check_token_file(settings)
    assert levels(findings, "admin.token_file") == ["warning"]  # created on first start
    assert levels(findings, "admin.tokens_file") == ["warning"]  # no named tokens yet
    path.parent.mkdir()
    path.write_text("short\n")
    path.chmod(0o644)
    named.write_text("[1, 2]")
    named.chmod(0o600)
    findings = check_token_file(settings)
    assert levels(findings, "admin.token_file") == ["error", "warning"]  # too short, readable by others
    path.write_text("x" * 40 + "\n")
    path.chmod(0o600)
    findings = check_token_file(settings)
    assert levels(findings, "admin.tokens_file") == ["error"] and "JSON object" in messages(findings, "admin.tokens_file")
    named.write_text("{}")
    TokenStore(settings.admin).create("ops", dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc))
    findings = check_token_file(settings)
    assert levels(findings, "admin.token_file") == ["ok"] and levels(findings, "admin.tokens_file") == ["ok"]


def test_storage_is_read_and_never_created(tmp_path: Path) -> None:
    db = tmp_path / "state" / "edge.db"
    settings = Settings(storage=StorageSettings(url=f"sqlite://{db}"))
    assert levels(check_storage(settings), "storage.url") == ["warning"]
    assert not db.exists() and not db.parent.exists()
    db.parent.mkdir()
    open_storage(settings.storage.url).close()
    findings = check_storage(settings)
    assert levels(findings, "storage.url") == ["ok"] and "0 domain(s)" in messages(findings, "storage.url")
    wrong_key = tmp_path / "master.key"
    generate_master_key(str(wrong_key))
    sealed = Settings(storage=StorageSettings(url=settings.storage.url, key_encryption_key_file=str(wrong_key)))
    assert levels(check_storage(sealed), "storage.url") == ["ok"]  # nothing sealed yet: any key opens it
    missing_key = Settings(storage=StorageSettings(url=settings.storage.url, key_encryption_key_file=str(tmp_path / "nope")))
    assert levels(check_storage(missing_key), "storage.url") == ["error"]
    db.write_bytes(b"this is not a database" * 100)
    assert levels(check_storage(settings), "storage.url") == ["error"]
    pg = check_storage(Settings(storage=StorageSettings(url="postgresql://edge@127.0.0.1:1/edge")))
    assert levels(pg, "storage.url") == ["error"] and "unreachable" in messages(pg, "storage.url")


def test_postgres_storage_is_read_and_never_migrated(pg_url: str) -> None:
    from edgeproxy.storage import migrate_storage

    settings = Settings(storage=StorageSettings(url=pg_url))
    findings = check_storage(settings)
    assert levels(findings, "storage.url") == ["error"] and "edgeproxy migrate" in messages(findings, "storage.url")
    migrate_storage(pg_url)
    findings = check_storage(settings)
    assert levels(findings, "storage.url") == ["ok"] and "0 domain(s)" in messages(findings, "storage.url")


def test_acme_directory_and_ca_bundle(tmp_path: Path) -> None:
    def directory(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/dir":
            return httpx.Response(200, json={"newNonce": "n", "newAccount": "a", "newOrder": "o"})
        return httpx.Response(200, json={"hello": "world"})

    mock = httpx.MockTransport(directory)
    good = check_acme(Settings(acme=AcmeSettings(directory="https://ca.example.com/dir")), network=True, transport=mock)
    assert levels(good, "acme.directory") == ["ok"]
    wrong = check_acme(Settings(acme=AcmeSettings(directory="https://ca.example.com/x")), network=True, transport=mock)
    assert levels(wrong, "acme.directory") == ["error"]
    assert "not an ACME directory" in messages(wrong, "acme.directory")
    offline = check_acme(Settings(acme=AcmeSettings(directory="https://ca.example.com/x")), network=False)
    assert levels(offline, "acme.directory") == []
    staging = check_acme(Settings(acme=AcmeSettings(directory=LETSENCRYPT_STAGING)), network=False)
    assert levels(staging, "acme.directory") == ["warning"]  # browsers do not trust it
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate")
    bad = check_acme(Settings(acme=AcmeSettings(ca_bundle=str(bundle))), network=False)
    assert levels(bad, "acme.ca_bundle") == ["error"]


def test_upstream_against_real_local_servers() -> None:
    with ScriptOrigin() as origin, RecordingRelay(status=405) as relay:
        settings = Settings(upstream=UpstreamSettings(script=origin.script_url, relay=relay.url))
        findings = check_upstream(settings, network=True)
        assert levels(findings, "upstream.script") == ["ok"]
        assert levels(findings, "upstream.relay") == ["ok"]  # any HTTP answer proves the relay is there
        origin.fail = True
        failing = check_upstream(settings, network=True)
        assert levels(failing, "upstream.script") == ["error"] and "503" in messages(failing, "upstream.script")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        down = check_upstream(Settings(upstream=UpstreamSettings(
            script=f"http://127.0.0.1:{port}/latest.js", relay=f"http://127.0.0.1:{port}")), network=True)
    assert levels(down, "upstream.script") == ["error"] and levels(down, "upstream.relay") == ["error"]
    placeholders = check_upstream(Settings(), network=False)
    assert levels(placeholders, "upstream.script") == ["error"] and levels(placeholders, "upstream.relay") == ["error"]
    plain = check_upstream(Settings(upstream=UpstreamSettings(
        script="http://cdn.vendor.example.com/l.js", relay="ftp://relay.vendor.example.com")), network=False)
    assert levels(plain, "upstream.script") == ["warning"] and levels(plain, "upstream.relay") == ["error"]


def test_exit_code_policy() -> None:
    ok, warn, err = Finding("ok", "a", ""), Finding("warning", "b", ""), Finding("error", "c", "")
    assert exit_code([ok, warn]) == 0
    assert exit_code([ok, warn], strict=True) == 1
    assert exit_code([ok, err]) == 1
    assert exit_code([ok], strict=True) == 0


def _write_config(tmp_path: Path, **routes: Any) -> Path:
    token = tmp_path / "token"
    token.write_text("y" * 40)
    token.chmod(0o600)
    (tmp_path / "tokens.json").write_text("{}")
    (tmp_path / "tokens.json").chmod(0o600)
    config = tmp_path / "edgeproxy.toml"
    route_lines = "".join(f'{k} = "{v}"\n' for k, v in routes.items())
    config.write_text(
        '[listen]\nhttp = "127.0.0.1:0"\nhttps = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\n'
        f'[storage]\nurl = "sqlite://{tmp_path / "edge.db"}"\n'
        f'[admin]\ntoken_file = "{token}"\ntokens_file = "{tmp_path / "tokens.json"}"\n'
        '[upstream]\nscript = "https://cdn.vendorx.test/latest.js"\nrelay = "https://queue.vendorx.test"\n'
        '[dns]\ncname_target = "edge.neutral-proxy.net"\n'
        f"[routes]\n{route_lines}"
    )
    return config


def _doctor(config: Path, *args: str, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPROXY_")}
    flags = ["-v"] if verbose else []
    return subprocess.run([sys.executable, "-m", "edgeproxy", "--config", str(config), *flags, "doctor", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_command_exit_codes(tmp_path: Path) -> None:
    # .test never resolves (RFC 6761): online, the upstream checks fail; offline only
    # the missing store warns (serve creates it).
    clean = _doctor(_write_config(tmp_path))
    offline = _doctor(_write_config(tmp_path), "--offline")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert offline.stdout.strip().splitlines()[-1] == "0 error(s), 1 warning(s)"
    assert "does not exist yet" in offline.stdout
    assert clean.returncode == 1 and "ERROR  upstream.script" in clean.stdout

    strict = _doctor(_write_config(tmp_path), "--offline", "--strict")
    assert strict.returncode == 1

    tracked = _doctor(_write_config(tmp_path, script_path="/js/tracker.js"), "--offline", verbose=True)
    assert tracked.returncode == 0
    assert "WARN   routes.script_path" in tracked.stdout and "track" in tracked.stdout
    assert "ok     routes.api_path" in tracked.stdout  # -v prints the passing checks too

    (tmp_path / "bad.toml").write_text('[routes]\nscript_path = "no-slash"\n')
    bad = _doctor(tmp_path / "bad.toml", "--offline")
    assert bad.returncode == 1 and "routes.script_path must be an absolute path" in bad.stderr


def test_tls_native_path_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeproxy.edge import tlsnative
    from edgeproxy.config import ProxySettings
    opted_in = Settings(proxy=ProxySettings(tls_native=True))
    findings = check_tls(opted_in)
    assert levels(findings, "proxy.tls_native") == ["ok"] and "self-test passed" in messages(findings, "proxy.tls_native")
    assert "opt-in" in messages(findings, "proxy.tls_native")
    # The default is the public-API path.
    assert levels(check_tls(Settings()), "proxy.tls_native") == ["ok"]
    assert "off (default)" in messages(check_tls(Settings()), "proxy.tls_native")
    monkeypatch.setattr(tlsnative, "load", lambda *_: None)  # e.g. another CPython layout or OpenSSL
    findings = check_tls(opted_in)
    assert levels(findings, "proxy.tls_native") == ["warning"] and "SSLContext per name" in messages(findings, "proxy.tls_native")


def test_route_samples_are_checked_with_their_query_strings() -> None:
    from edgeproxy.config import RouteSettings

    table = (RouteSettings(name="script", kind="script", path="/assets/site.js"),
             RouteSettings(name="px", kind="event", path="/api/v1/m",
                           samples=("/p.gif?u=1", "/media.gif?type=pageview&h=x", "/media.gif?kind=pageview")))
    findings = check_names(Settings(routes=RoutesSettings(route=table)))
    assert levels(findings, "routes.route px") == ["ok"]
    samples = [f for f in findings if f.check == "routes.route px sample"]
    assert [f.level for f in samples] == ["warning", "warning", "ok"]
    assert "p.gif" in samples[0].message
    assert "type=pageview" in samples[1].message and "request_rewrite" in samples[1].message


def test_every_recipe_is_clean_for_doctor(tmp_path: Path) -> None:
    from test_adblock import recipe_settings

    for settings in recipe_settings(tmp_path):
        routes = [f for f in check_names(settings) if f.check.startswith("routes.")]
        assert routes and [f for f in routes if f.level != "ok"] == [], routes
