# Two commands on a fresh machine: `make serve` and `make test`.
# Everything is installed into .venv by the rules below; nothing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test clean

$(STAMP): pyproject.toml plugins/runnel-echo/pyproject.toml plugins/runnel-ctranslate2/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -e plugins/runnel-echo -e plugins/runnel-ctranslate2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/runnel serve --config conf/runnel.toml

test: install
	$(BIN)/pytest

clean:
	rm -rf $(VENV)
