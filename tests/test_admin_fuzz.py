"""Fuzz the admin API from its own OpenAPI document (schemathesis).

Every generated request, with and without a valid token: no 5xx, every error is
a JSON body ``{"error": {"code", "message"}}``, and responses conform to the
schema the API publishes.

One pytest item per API operation, with its own id
(``test_admin_api_with_token[POST /v1/domains]``). Not ``@schema.parametrize()``:
under pytest 9 its items all carry the bare function's node id (7 items, one
id), so a failure could not be told apart or re-run by id. Its app also had to
exist at import, which left a store in /tmp behind on every run, even
``--collect-only``; here the schema comes from ``openapi_document()`` (which
cleans up after itself) and the app's store lives only as long as the module's
tests run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from edgeproxy.control.admin import create_admin_app
from edgeproxy.config import AdminSettings, load_settings
from edgeproxy.devtools.refdocs import openapi_document
from edgeproxy.control.registry import Registry
from edgeproxy.storage import open_storage
from edgeproxy.control.tokens import TokenStore
from edgeproxy.control.webhooks import EventLog

TOKEN = "fuzz-token-0123456789abcdef"
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def admin_app() -> Iterator[FastAPI]:
    with tempfile.TemporaryDirectory(prefix="edgeproxy-fuzz-") as tmp:
        state = Path(tmp)
        storage = open_storage(f"sqlite://{state / 'fuzz.db'}")
        try:
            registry = Registry(storage, load_settings(None, env={"EDGEPROXY_DOMAINS_EXTRA_SUFFIXES": "test"}))
            registry.add("seeded.example.test")  # so that some generated paths name a real domain
            (state / "token").write_text(TOKEN)
            tokens = TokenStore(AdminSettings(str(state / "token"), str(state / "tokens.json")))
            # The optional routes too, as openapi_document() and `serve` build them.
            app = create_admin_app(registry, tokens, last_check=lambda _host: None,
                                   metrics=lambda: (b"", "text/plain"), event_log=EventLog(registry.storage))
            # The document the cases come from is the one this app serves.
            assert app.openapi() == SCHEMA.raw_schema
            # Requests go to the app in-process (ASGI): the schema picks the transport,
            # each operation (copied from the schema at load time) names the app, and
            # checks that send follow-up requests (ignored_auth) use the operation's.
            for holder in (SCHEMA, *OPERATIONS):
                holder.app = app
            try:
                yield app
            finally:
                for holder in (SCHEMA, *OPERATIONS):
                    holder.app = None
        finally:
            storage.close()


def _cases(operation: Any) -> st.SearchStrategy[schemathesis.Case]:
    # Schema-valid and schema-violating requests, as schemathesis' own runner mixes them.
    return st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))


def _fuzz(operation: Any, max_examples: int, check: Callable[[schemathesis.Case], None]) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=_cases(operation))
    def run(case: schemathesis.Case) -> None:
        check(case)

    run()


def _assert_error_shape(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_every_operation_is_fuzzed_under_its_own_id() -> None:
    labels = [operation.label for operation in OPERATIONS]
    assert len(labels) >= 7 and len(set(labels)) == len(labels)
    assert "POST /v1/domains" in labels


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: str(operation.label))
def test_admin_api_with_token(admin_app: FastAPI, operation: Any) -> None:
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
        _assert_error_shape(response)
        # positive_data_acceptance is excluded: a schema-valid hostname can still be
        # one we must refuse (an IP literal, a public suffix: 422 with the reason),
        # and those rules are not expressible in JSON Schema.
        excluded = [positive_data_acceptance]
        if any(p.location == "query" for p in operation.iter_parameters()):
            # A schema-violating query value (an object, null, an extra key with a null
            # value) often serializes to a valid query string (empty, or left out), so
            # "negative" cases that are valid on the wire get answered 200. The route's own
            # query validation is tested with real requests in tests/test_webhooks.py.
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded)

    _fuzz(operation, 60, check)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: str(operation.label))
def test_admin_api_without_token(admin_app: FastAPI, operation: Any) -> None:
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={"Authorization": "Bearer wrong"})
        _assert_error_shape(response)
        if case.path != "/healthz" and case.path != "/metrics":
            assert response.status_code == 401

    _fuzz(operation, 15, check)
