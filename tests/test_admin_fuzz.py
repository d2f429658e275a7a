"""Fuzz the admin API from its own OpenAPI document (schemathesis).

Every generated request, with and without a valid token: no 5xx, every error is
a JSON body ``{"error": {"code", "message"}}``, and responses conform to the
schema the API publishes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings

from edgeproxy.admin import create_admin_app
from edgeproxy.config import AdminSettings, load_settings
from edgeproxy.registry import Registry
from edgeproxy.storage import open_storage
from edgeproxy.tokens import TokenStore

TOKEN = "fuzz-token-0123456789abcdef"
_state = Path(tempfile.mkdtemp(prefix="edgeproxy-fuzz-"))
_settings = load_settings(None, env={"EDGEPROXY_DOMAINS_EXTRA_SUFFIXES": "test"})
_registry = Registry(open_storage(f"sqlite://{_state / 'fuzz.db'}"), _settings)
_registry.add("seeded.example.test")  # so that some generated paths name a real domain
(_state / "token").write_text(TOKEN)
app = create_admin_app(_registry, TokenStore(AdminSettings(str(_state / "token"), str(_state / "tokens.json"))))

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


def _assert_error_shape(response: "schemathesis.Response") -> None:  # type: ignore[name-defined]
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_with_token(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    _assert_error_shape(response)
    # positive_data_acceptance is excluded: a schema-valid hostname can still be
    # one we must refuse (an IP literal, a public suffix: 422 with the reason),
    # and those rules are not expressible in JSON Schema.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_without_token(case: schemathesis.Case) -> None:
    response = case.call(headers={"Authorization": "Bearer wrong"})
    _assert_error_shape(response)
    if case.path != "/healthz":
        assert response.status_code == 401
