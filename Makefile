# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Every install step lives here: CI runs on a clean clone with registries only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all demo test test-fast lint typecheck bench clean deps pebble

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

deps: $(STAMP) pebble

demo: deps
	$(VENV)/bin/edgeproxy demo

test: deps
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache *.egg-info

# Benchmarks (issue 8): loopback only, a few minutes; NOT part of `make test`.
# wrk comes from Debian; py-spy/pyinstrument (bench extra) for bench/profile.py.
bench: deps
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/run.py
