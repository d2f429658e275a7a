"""Settings: TOML + environment overrides, defaults, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config import LETSENCRYPT_STAGING, Settings, load_settings
from edgeproxy.errors import ConfigError


def test_defaults_work_without_any_file() -> None:
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert settings.listen.admin == "127.0.0.1:8081"
    assert settings.storage.url.startswith("sqlite:///")


def test_file_values_and_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[listen]\nhttps = "127.0.0.1:8443"\n'
        '[domains]\nextra_suffixes = ["test"]\n'
        '[upstream]\nrelay = "https://relay.example"\nrewrite = { "cdn.vendor.example" = "{host}" }\n'
    )
    env = {
        "EDGEPROXY_LISTEN_HTTP": "127.0.0.1:8080",
        "EDGEPROXY_DNS_EDGE_IPS": "192.0.2.1, 2001:db8::1",
        "EDGEPROXY_PROXY_MAX_BODY": "1024",
        "EDGEPROXY_DNS_CHECK": "no",
    }
    settings = load_settings(path, env=env)
    assert settings.listen.https == "127.0.0.1:8443"
    assert settings.listen.http == "127.0.0.1:8080"  # env wins
    assert settings.domains.extra_suffixes == ("test",)
    assert settings.dns.edge_ips == ("192.0.2.1", "2001:db8::1")
    assert settings.proxy.max_body == 1024
    assert settings.dns.check is False
    assert settings.upstream.rewrite == {"cdn.vendor.example": "{host}"}


def test_env_list_as_json_and_directory_shortcut() -> None:
    settings = load_settings(None, env={"EDGEPROXY_DOMAINS_EXTRA_SUFFIXES": '["test", "example"]',
                                        "EDGEPROXY_ACME_DIRECTORY": "staging"})
    assert settings.domains.extra_suffixes == ("test", "example")
    assert settings.acme.directory == LETSENCRYPT_STAGING


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[routes]\nscript_path = "/s/x.js"\n')
    assert load_settings(None, env={"EDGEPROXY_CONFIG": str(path)}).routes.script_path == "/s/x.js"


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[listen]\nhttps = 443\n", {}, "[listen] https: expected str"),
        ("[listen]\nbogus = 1\n", {}, "unknown key(s) bogus"),
        ("[nosuch]\na = 1\n", {}, "unknown config section(s): nosuch"),
        ("[listen\n", {}, "not valid TOML"),
        ("", {"EDGEPROXY_LISTEN_HTTP": "nonsense"}, "listen.http must be host:port"),
        ("", {"EDGEPROXY_PROXY_MAX_BODY": "lots"}, "EDGEPROXY_PROXY_MAX_BODY: expected int"),
        ('[routes]\nscript_path = "js/app.js"\n', {}, "routes.script_path must be an absolute path"),
        ('[routes]\napi_path = "/js/app.js"\n', {}, "must differ"),
        ('[acme]\nca_bundle = "/nonexistent/ca.pem"\n', {}, "no such file"),
    ],
)
def test_bad_config_gives_clear_error(tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", env={})


# -- several ACME CAs ([[acme.issuers]]) -------------------------------------------------------

import json  # noqa: E402

from edgeproxy.config import IssuerSettings, acme_issuers  # noqa: E402


def test_acme_alone_is_the_one_issuer_shorthand() -> None:
    settings = load_settings(None, env={"EDGEPROXY_ACME_DIRECTORY": "staging", "EDGEPROXY_ACME_EMAIL": "a@b.example",
                                        "EDGEPROXY_DNS_CAA_IDENTITIES": "letsencrypt.org,example.net"})
    (only,) = acme_issuers(settings)
    assert only == IssuerSettings(directory="https://acme-staging-v02.api.letsencrypt.org/directory",
                                  email="a@b.example", caa_identities=("letsencrypt.org", "example.net"))


def test_issuers_from_the_file_replace_acme_and_the_environment_replaces_the_list(tmp_path: Path) -> None:
    key = tmp_path / "eab.key"
    key.write_text("c2VjcmV0\n")
    path = tmp_path / "edge.toml"
    path.write_text(f"""
[acme]
directory = "https://ignored.example/dir"
[[acme.issuers]]
directory = "production"
email = "ops@example.org"
caa_identities = ["letsencrypt.org"]
[[acme.issuers]]
directory = "https://acme.zerossl.com/v2/DV90"
eab_kid = "kid-1"
eab_hmac_key_file = "{key}"
profile = "classic"
caa_identities = ["sectigo.com", "zerossl.com"]
""")
    first, second = acme_issuers(load_settings(path, env={}))
    assert first.directory == "https://acme-v02.api.letsencrypt.org/directory" and first.email == "ops@example.org"
    assert (second.eab_kid, second.eab_hmac_key_file, second.profile) == ("kid-1", str(key), "classic")
    assert second.caa_identities == ("sectigo.com", "zerossl.com")
    override = json.dumps([{"directory": "staging", "caa_identities": ["letsencrypt.org"]}])
    (only,) = acme_issuers(load_settings(path, env={"EDGEPROXY_ACME_ISSUERS": override}))
    assert only.directory.startswith("https://acme-staging-v02")


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([{"directory": "not a url", "caa_identities": ["x"]}], "directory must be the CA's ACME directory URL"),
        ([{"directory": "staging", "caa_identities": ["x"]}] * 2, "listed twice"),
        ([{"directory": "staging"}], "caa_identities must name"),
        ([{"directory": "staging", "caa_identities": ["x"], "eab_kid": "k"}], "needs both eab_kid"),
        ([{"directory": "staging", "caa_identities": ["x"], "eab_kid": "k", "eab_hmac_key_file": "/nonexistent"}],
         "eab_hmac_key_file: no such file"),
        ([{"directory": "staging", "caa_identities": ["x"], "ca_bundle": "/nonexistent"}], "ca_bundle: no such file"),
        ([{"directory": "staging", "caa_identities": ["x"], "colour": "red"}], "unknown key(s) colour"),
    ],
)
def test_bad_issuers_are_clear_config_errors(entries: list[dict[str, object]], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"EDGEPROXY_ACME_ISSUERS": json.dumps(entries)})
    assert needle in str(info.value)
