# Two commands on a fresh machine: `make serve` and `make test`.
# Everything is installed into .venv by the rules below; nothing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test clean bench redis-server promtool

# pip shows its progress (the first install takes about a minute). PYTHONWARNINGS reaches
# the setuptools build that pip runs for each editable install and drops only its
# "Editable installation." notice, a warning banner about nothing that is wrong here.
$(STAMP): pyproject.toml plugins/runnel-echo/pyproject.toml plugins/runnel-ctranslate2/pyproject.toml
	@echo "==> Setting up $(VENV): runnel, its test tools and both plugins, as editable installs"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' \
	  $(BIN)/pip install -e '.[test]' -e plugins/runnel-echo -e plugins/runnel-ctranslate2
	touch $(STAMP)
	@echo "==> $(VENV) is ready"

install: $(STAMP)

serve: install
	$(BIN)/runnel serve --config conf/runnel.toml

# The tests of runs shared through Redis start a real redis-server (never skipped).
# Missing, it is installed where that can be done (Debian and Ubuntu, as root, as CI
# runs); elsewhere this says how, and the tests that need it fail saying so too.
redis-server:
	@command -v redis-server >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "==> Installing redis-server (the Redis tests start one)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
	      || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }; \
	  else \
	    echo "==> redis-server is missing and cannot be installed here: install Redis (7 or later) so that"; \
	    echo "    redis-server is on PATH (apt-get install redis-server, brew install redis, dnf install redis)"; \
	  fi; }

# promtool (Debian's prometheus package) checks GET /metrics' output in
# tests/e2e/test_metrics.py; where it cannot be installed that one check is skipped (the
# prometheus_client parser tests stand in for it), so this never fails the build.
promtool:
	@command -v promtool >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "==> Installing promtool (Debian's prometheus package)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        prometheus >/dev/null; } || echo "==> promtool could not be installed: its check is skipped"; \
	  fi; }

# Lint and type-check server/ first (config in pyproject.toml), then the tests.
test: install redis-server promtool
	$(BIN)/ruff check server
	$(BIN)/mypy
	$(BIN)/pytest

clean:
	rm -rf $(VENV) benchmarks/.venv-peers

# The benchmarks (benchmarks/README.md): the peers and the load client get their own
# environment, benchmarks/.venv-peers, never .venv; then the quick mode of every scenario.
bench:
	@[ benchmarks/.venv-peers/.installed -nt benchmarks/requirements-peers.txt ] || { \
	  $(PYTHON) -m venv benchmarks/.venv-peers && \
	  benchmarks/.venv-peers/bin/pip install --quiet --upgrade pip && \
	  benchmarks/.venv-peers/bin/pip install --quiet -r benchmarks/requirements-peers.txt \
	    -e . -e plugins/runnel-echo -e plugins/runnel-ctranslate2 && \
	  { benchmarks/.venv-peers/bin/pip install --quiet granian || echo "granian did not install: the report says so"; } && \
	  touch benchmarks/.venv-peers/.installed; }
	benchmarks/.venv-peers/bin/python benchmarks/run.py --quick $(BENCH_ARGS)
