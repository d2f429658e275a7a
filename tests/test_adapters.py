"""The import-time checks of the modules that use a dependency's private API bite.

Each adapter names the private attributes it relies on and refuses to import
without them, so an upgrade that renames one fails at start-up with the name.
"""

from __future__ import annotations

import pytest
from prometheus_client import values

from edgeproxy import prometheus_adapter
from edgeproxy.control import acme_client


def test_acme_check_passes_on_the_locked_library_and_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    acme_client._check()  # the installed (locked) acme has every name
    client_class = next(iter(acme_client._PRIVATE_ACME))
    monkeypatch.delattr(client_class, "_authzr_from_response")
    with pytest.raises(ImportError, match=r"ClientV2\._authzr_from_response"):
        acme_client._check()


def test_prometheus_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    prometheus_adapter._check()
    monkeypatch.delattr(values, "MultiProcessValue")
    with pytest.raises(ImportError, match="MultiProcessValue"):
        prometheus_adapter._check()
