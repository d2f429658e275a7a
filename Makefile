# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Every install step lives here: CI runs on a clean clone with registries only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all demo test test-fast lint typecheck bench bench-spool clean deps pebble systemd-tools docs postgres openssl

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Debian's pebble package ships pebble and pebble-challtestsrv (Let's Encrypt's ACME test server).
pebble:
	@if ! command -v pebble >/dev/null || ! command -v pebble-challtestsrv >/dev/null; then \
		echo "installing Debian's pebble package"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble; \
	fi

# The PostgreSQL tests (issue 6) run against a real server and are never skipped:
# start the machine's cluster if it is installed but stopped, then fail loudly
# unless 127.0.0.1:5432 accepts the test user. EDGEPROXY_TEST_PG_URL overrides.
PG_TEST_URL ?= $(or $(EDGEPROXY_TEST_PG_URL),postgresql://postgres@127.0.0.1:5432/test)
postgres: $(STAMP)
	@if command -v pg_lsclusters >/dev/null && [ -z "$(EDGEPROXY_TEST_PG_URL)" ]; then \
		for version in $$(ls /etc/postgresql 2>/dev/null); do \
			if ! pg_lsclusters -h "$$version" main 2>/dev/null | grep -q online; then \
				echo "starting PostgreSQL $$version/main"; \
				pg_ctlcluster --skip-systemctl-redirect "$$version" main start || true; \
			fi; \
		done; \
	fi
	$(PY) -m edgeproxy.devtools.pgharness '$(PG_TEST_URL)'


# systemd-analyze / systemd-sysusers check deploy/ (tests/test_packaging.py). Debian's
# systemd package only installs them here; nothing is started (no systemd as PID 1).
systemd-tools:
	@if ! command -v systemd-analyze >/dev/null || ! command -v systemd-sysusers >/dev/null; then \
		echo "installing Debian's systemd package (for systemd-analyze verify)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; \
	fi

# sslyze (tests/test_tls_scan.py) in its own venv: sslyze 6.3 pins cryptography<47,
# certbot's acme needs >=47, so it cannot share .venv; the test talks to it over the wire.
SCAN_VENV := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
SSLYZE_SPEC := sslyze>=6.3.1,<7
$(SCAN_STAMP): Makefile
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet '$(SSLYZE_SPEC)'
	@touch $(SCAN_STAMP)

# The TLS tests (tests/test_tlspolicy.py) probe the listeners with `openssl s_client`.
openssl:
	@command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; }

deps: $(STAMP) $(SCAN_STAMP) pebble systemd-tools openssl

demo: deps
	$(VENV)/bin/edgeproxy demo

test: deps postgres
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

# docs/configuration.md and docs/admin-api.md are generated; tests/test_docs.py fails when stale.
docs: $(STAMP)
	$(PY) -m edgeproxy.devtools.refdocs
# Issue 3: spool/forward/replay benchmark (loopback, about a minute); numbers go into README.
bench-spool: $(STAMP)
	$(PY) bench/spool_bench.py

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache *.egg-info

# Benchmarks (issue 8): loopback only, a few minutes; NOT part of `make test`.
# wrk comes from Debian; py-spy/pyinstrument (bench extra) for bench/profile.py.
bench: deps
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/run.py
