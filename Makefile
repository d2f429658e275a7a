# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Every install step lives here: CI runs on a clean clone with registries only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
UV     := $(VENV)/bin/uv

# Reproducible installs: exact pins, every file checked against its hash.
#   requirements.lock      runtime dependencies (the Dockerfile installs this one)
#   requirements-dev.lock  runtime + the test and bench extras (make deps/test/bench, so CI)
# Both also pin pyproject's [build-system] requires, so the project itself is built
# with --no-build-isolation and nothing is fetched without a hash.
# `make lock` regenerates them with uv (pinned, with hashes, in requirements-uv.txt),
# resolved for CPython 3.11 on Linux x86_64: the machines, CI and the image. Each pin
# lists the hashes of every file of that release, so pip can verify whichever wheel it
# picks elsewhere too. Existing pins are kept while they still satisfy pyproject.toml;
# `make lock UV_ARGS=--upgrade` moves everything to the newest releases.
#   requirements-scan.lock sslyze for tests/test_tls_scan.py, in its own venv (see below)
LOCK      := requirements.lock
DEV_LOCK  := requirements-dev.lock
SCAN_LOCK := requirements-scan.lock

.PHONY: all demo test test-fast lint typecheck bench bench-spool clean deps lock pebble chromium systemd-tools docs postgres openssl caddy

all: test

# The stamp depends on the lock, so a changed lock reinstalls. Packages dropped from the
# lock stay in an existing venv: `make clean deps` gives exactly the locked set.
$(STAMP): $(DEV_LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(UV): requirements-uv.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements-uv.txt
	@touch $(UV)

LOCK_FLAGS  = --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
              --custom-compile-command 'make lock' --quiet $(UV_ARGS)
# pyproject's [build-system] requires, one a line, fed to uv on stdin ("-").
BUILD_REQUIRES = $(PYTHON) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

# The dev lock first; the runtime lock is constrained by it, so the two never pin a
# package at different versions (tests/test_lock.py checks that, and both against pyproject).
lock: $(UV)
	$(BUILD_REQUIRES) | $(UV) pip compile $(LOCK_FLAGS) --extra test --extra bench pyproject.toml - -o $(DEV_LOCK)
	$(BUILD_REQUIRES) | $(UV) pip compile $(LOCK_FLAGS) --constraint $(DEV_LOCK) pyproject.toml - -o $(LOCK)
	echo '$(SSLYZE_SPEC)' | $(UV) pip compile $(LOCK_FLAGS) - -o $(SCAN_LOCK)

# Debian's pebble package ships pebble and pebble-challtestsrv (Let's Encrypt's ACME test server).
pebble:
	@if ! command -v pebble >/dev/null || ! command -v pebble-challtestsrv >/dev/null; then \
		echo "installing Debian's pebble package"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble; \
	fi

# The PostgreSQL tests run against a real server and are never skipped:
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
	$(PY) tests/pgharness.py '$(PG_TEST_URL)'


# systemd-analyze / systemd-sysusers check deploy/ (tests/test_packaging.py). Debian's
# systemd package only installs them here; nothing is started (no systemd as PID 1).
systemd-tools:
	@if ! command -v systemd-analyze >/dev/null || ! command -v systemd-sysusers >/dev/null; then \
		echo "installing Debian's systemd package (for systemd-analyze verify)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; \
	fi

# The real-browser test (tests/test_browser.py) drives Debian's headless
# chromium; certutil (libnss3-tools) puts Pebble's per-run root into a throwaway NSS
# database, so no certificate error is ever ignored.
chromium:
	@if ! command -v chromium >/dev/null || ! command -v certutil >/dev/null; then \
		echo "installing Debian's chromium and libnss3-tools packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium libnss3-tools; \
	fi

# sslyze (tests/test_tls_scan.py) in its own venv: sslyze 6.3 pins cryptography<47,
# certbot's acme needs >=47, so it cannot share .venv; the test talks to it over the wire.
SCAN_VENV := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
SSLYZE_SPEC := sslyze>=6.3.1,<7
$(SCAN_STAMP): $(SCAN_LOCK)
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet --require-hashes -r $(SCAN_LOCK)
	@touch $(SCAN_STAMP)

# The TLS tests (tests/test_tlspolicy.py) probe the listeners with `openssl s_client`.
openssl:
	@command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; }

deps: $(STAMP) $(SCAN_STAMP) pebble chromium systemd-tools openssl

demo: deps
	$(VENV)/bin/edgeproxy demo

test: deps postgres
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

# docs/configuration.md and docs/admin-api.md are generated; tests/test_docs.py fails when stale.
docs: $(STAMP)
	$(PY) -m edgeproxy.devtools.refdocs
# Spool/forward/replay benchmark (loopback, about a minute); numbers go into README.
bench-spool: $(STAMP)
	$(PY) bench/spool_bench.py

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache .hypothesis *.egg-info

# Caddy (Debian's 2.6.2) is the bench's second reference: what operators would run instead.
# Its package enables and starts caddy.service (the default Caddyfile: port 80). The bench
# never uses that service, it starts its own caddy on free loopback ports, so the install
# must not leave one running: a policy-rc.d answering 101 ("action forbidden") keeps
# invoke-rc.d and deb-systemd-invoke from starting it (created only if the host has none,
# removed afterwards), and on a host running systemd the unit is stopped and disabled too.
caddy:
	@if ! command -v caddy >/dev/null; then \
		echo "installing Debian's caddy package (caddy.service kept from starting: policy-rc.d, then disabled)"; \
		made=; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; made=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends caddy; rc=$$?; \
		if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		if [ -d /run/systemd/system ]; then systemctl disable --now caddy.service caddy-api.service || true; fi; \
		exit $$rc; \
	fi

# Benchmarks: loopback only, ~10 minutes; NOT part of `make test`.
# wrk comes from Debian; py-spy/pyinstrument (bench extra, in the dev lock) for bench/profile.py.
bench: deps caddy
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) bench/run.py
