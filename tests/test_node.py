"""The composition root: each object built once, on first use, and shared."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from edgeproxy.config import AdminSettings, Settings, SpoolSettings, StorageSettings
from edgeproxy.node import Services


def settings(tmp_path: Path) -> Settings:
    return Settings(storage=StorageSettings(url=f"sqlite://{tmp_path}/edge.db"),
                    spool=SpoolSettings(path=str(tmp_path / "spool.db")),
                    admin=AdminSettings(token_file=str(tmp_path / "token"), tokens_file=str(tmp_path / "tokens.json")))


def test_objects_are_built_once_and_wired_to_each_other(tmp_path: Path) -> None:
    services = Services(settings(tmp_path))
    assert services.registry is services.registry
    assert services.registry.storage is services.storage  # one store for everything
    assert services.events.inner is services.relay  # the spool decorates the one relay client
    assert services.refusals.stats is services.stats is services.relay.stats
    asyncio.run(services.aclose())


def test_a_command_builds_only_what_it_touches(tmp_path: Path) -> None:
    """Listing domains opens the store, never the spool file, and loads no ACME client."""
    code = (
        "import sys\n"
        "from edgeproxy.node import Services\n"
        "from edgeproxy.config import load_settings\n"
        f"s = Services(load_settings(env={{'EDGEPROXY_STORAGE_URL': 'sqlite://{tmp_path}/edge.db', "
        f"'EDGEPROXY_SPOOL_PATH': '{tmp_path}/spool.db'}}))\n"
        "assert s.registry.list() == []\n"
        "assert 'acme' not in sys.modules and 'edgeproxy.control.acme_client' not in sys.modules, 'ACME loaded'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "edge.db").exists() and not (tmp_path / "spool.db").exists()


def test_only_the_primary_creates_the_bootstrap_token(tmp_path: Path) -> None:
    conf = settings(tmp_path)
    assert Services(conf, role="worker").tokens.list() == []
    assert not os.path.exists(conf.admin.token_file)
    assert Services(conf, role="primary").tokens.list() == []
    assert os.path.exists(conf.admin.token_file)
