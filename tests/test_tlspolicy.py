"""One TLS policy (Mozilla intermediate / modern) on every TLS path.

Unit checks on the contexts we build, then real ``edgeproxy serve`` processes
started through the package's entry point (which arranges OPENSSL_CONF) and
probed with ``openssl s_client``: offered groups, TLS 1.2 suites and versions,
on the native per-connection path and on the per-name SSLContext path.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeproxy.edge import tlspolicy
from edgeproxy.edge.certstore import build_context, make_fallback_pair
from edgeproxy.config import load_settings
from edgeproxy.devtools.edgeproc import EdgeConfig, EdgeProcess
from edgeproxy.devtools.upstreams import RecordingRelay, ScriptOrigin
from edgeproxy.errors import ConfigError

from tlshelpers import s_client, seed

HOST = "tls.example.test"


def _context(policy: str) -> ssl.SSLContext:
    import datetime as dt

    chain, key = make_fallback_pair(dt.datetime.now(dt.timezone.utc))
    return build_context(chain, key, policy)


def test_openssl_cnf_names_the_policy_groups() -> None:
    text = tlspolicy.OPENSSL_CONF.read_text()
    groups = re.findall(r"^Groups\s*=\s*(\S+)$", text, re.M)
    assert groups == [":".join(tlspolicy.GROUPS)]


def test_intermediate_context_offers_only_ecdhe_aead_suites() -> None:
    ctx = _context("intermediate")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(re.fullmatch(r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", c)
                         for c in tls12), tls12
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"} == {
        "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: the client picks
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION


def test_modern_context_is_tls13_only() -> None:
    assert _context("modern").minimum_version == ssl.TLSVersion.TLSv1_3


def test_policy_is_validated() -> None:
    assert load_settings(env={}).tls.policy == "intermediate"
    assert load_settings(env={"EDGEPROXY_TLS_POLICY": "modern"}).tls.policy == "modern"
    with pytest.raises(ConfigError, match="tls.policy"):
        load_settings(env={"EDGEPROXY_TLS_POLICY": "old"})


def test_entry_point_sets_openssl_conf_before_ssl_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    code = ("import sys, runpy; sys.argv = ['edgeproxy', '--help'];"
            "import edgeproxy.boot as b; import os; assert '_ssl' not in sys.modules;"
            "b.arrange_openssl_conf(os.environ); import ssl; print(os.environ['OPENSSL_CONF'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tlspolicy.OPENSSL_CONF)
    # A process that had loaded ssl first is re-executed with the variable set.
    code = ("import ssl, sys; sys.argv = ['edgeproxy', 'version-probe'];"
            "from edgeproxy.boot import main; main(['--help'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr
    # An operator's own OPENSSL_CONF is left alone.
    mine = {"OPENSSL_CONF": "/etc/ssl/mine.cnf"}
    assert not tlspolicy.arrange_openssl_conf(mine) and mine["OPENSSL_CONF"] == "/etc/ssl/mine.cnf"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[ScriptOrigin, RecordingRelay]]:
    with ScriptOrigin() as origin, RecordingRelay() as relay:
        yield origin, relay


def _edge(tmp: Path, upstreams: tuple[ScriptOrigin, RecordingRelay], **proxy: object) -> EdgeProcess:
    origin, relay = upstreams
    tls = {"policy": proxy.pop("policy")} if "policy" in proxy else {}
    config = EdgeConfig(state_dir=tmp, acme_directory="https://127.0.0.1:9/directory", acme_ca_bundle="",
                        script_url=origin.script_url, relay_url=f"{relay.url}/ingest",
                        extra={"proxy": dict(proxy), "tls": tls, "renew": {"interval": 3600.0},
                               "monitor": {"interval": 0.0}})
    seed(config.db_path, HOST)
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}  # as systemd starts it: unset
    edge = EdgeProcess(config)
    edge.env = env
    return edge


@pytest.mark.parametrize("native", [True, False], ids=["native", "contexts"])
def test_served_groups_suites_and_versions_intermediate(tmp_path: Path, upstreams: tuple[ScriptOrigin, RecordingRelay],
                                                        native: bool) -> None:
    with _edge(tmp_path, upstreams, tls_native=native) as edge:
        port = edge.config.https_port
        good = s_client(port, HOST, "-groups", "X25519")
        assert good.ok and good.subject_cn == HOST, good.output  # the name's own certificate, not the fallback
        assert good.temp_key is not None and "X25519" in good.temp_key
        for group, shown in (("P-256", "prime256v1"), ("P-384", "secp384r1")):
            hs = s_client(port, HOST, "-groups", group)
            assert hs.ok and hs.temp_key is not None and shown in hs.temp_key, hs.output
        for group in ("P-521", "X448", "ffdhe2048"):
            assert not s_client(port, HOST, "-groups", group).ok, group
        # TLS 1.2: ECDHE + AEAD only; no CBC (LUCKY13), no RSA key exchange, no DHE.
        aead = s_client(port, HOST, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
        assert aead.ok and aead.cipher == "ECDHE-ECDSA-CHACHA20-POLY1305", aead.output
        for cbc in ("ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA",
                    "AES128-GCM-SHA256"):
            assert not s_client(port, HOST, "-tls1_2", "-cipher", cbc).ok, cbc
        assert not s_client(port, HOST, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0").ok
        # The fallback (unknown SNI) is served under the same policy.
        assert not s_client(port, "unknown.example.test", "-groups", "P-521").ok
        assert s_client(port, "unknown.example.test", "-groups", "X25519").ok


def test_modern_policy_refuses_tls12(tmp_path: Path, upstreams: tuple[ScriptOrigin, RecordingRelay]) -> None:
    with _edge(tmp_path, upstreams, policy="modern") as edge:
        port = edge.config.https_port
        assert not s_client(port, HOST, "-tls1_2").ok
        tls13 = s_client(port, HOST, "-tls1_3", "-groups", "X25519")
        assert tls13.ok and tls13.subject_cn == HOST, tls13.output
        assert not s_client(port, HOST, "-tls1_3", "-groups", "P-521").ok
