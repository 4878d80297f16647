# Two commands on a fresh machine: `make serve` and `make test`.
# Everything is installed into .venv by the rules below; nothing by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test clean bench redis-server promtool gpu-wheels

# pip shows its progress (the first install takes about a minute). PYTHONWARNINGS reaches
# the setuptools build that pip runs for each editable install and drops only its
# "Editable installation." notice, a warning banner about nothing that is wrong here.
#
# llama-cpp-python (the llamacpp plugin's engine) compiles llama.cpp from source: about
# 11 minutes on 2 cores the first time, then pip reuses the wheel it cached. It is built
# portably (LLAMA_CMAKE_ARGS): a native build uses every instruction set the CPU
# advertises, and machines that advertise AMX but fault on it crash with an illegal
# instruction (Q8_0). AVX2/FMA/F16C stay on; LLAVA_BUILD=OFF skips the multimodal library.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
  -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF

$(STAMP): pyproject.toml plugins/runnel-echo/pyproject.toml plugins/runnel-ctranslate2/pyproject.toml \
          plugins/runnel-llamacpp/pyproject.toml
	@echo "==> Setting up $(VENV): runnel, its test tools and the three plugins, as editable installs"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' \
	  $(BIN)/pip install -e '.[test]' -e plugins/runnel-echo -e plugins/runnel-ctranslate2
	@echo "==> llama-cpp-python: a portable build, ~11 minutes the first time (CMAKE_ARGS=$(LLAMA_CMAKE_ARGS))"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) PYTHONWARNINGS='ignore:Editable installation' \
	  $(BIN)/pip install -e plugins/runnel-llamacpp
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
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    benchmarks/.venv-peers/bin/pip install --quiet -e plugins/runnel-llamacpp 'llama-cpp-python[server]' && \
	  { benchmarks/.venv-peers/bin/pip install --quiet granian || echo "granian did not install: the report says so"; } && \
	  touch benchmarks/.venv-peers/.installed; }
	benchmarks/.venv-peers/bin/python benchmarks/run.py --quick $(BENCH_ARGS)

# The GPU one-shot check's wheels (benchmarks/gpu/README.md): what a lent GPU machine (Python
# 3.12, x86-64, PyTorch for CUDA 13, no network) lacks, into a git-ignored folder that a device
# call carries. No dependencies are resolved (--no-deps): the machine has numpy, pyyaml, jinja2,
# uvloop, sentencepiece, tokenizers, attrs, idna and sortedcontainers; small pure ones it may
# lack a newer version of come too. Everything a call carries must stay under 64 MiB.
GPU_WHEELS := benchmarks/gpu/wheels
GPU_WHEEL_PACKAGES := ctranslate2==4.8.5 orjson pyjwt cryptography cffi pycparser redis prometheus_client \
  h11 pluggy trio outcome sniffio setuptools wheel
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d $(GPU_WHEELS) $(GPU_WHEEL_PACKAGES)
	@wheels=$$(du -sk $(GPU_WHEELS) | cut -f1); \
	tree=$$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
	total=$$(( (wheels + tree) / 1024 )); \
	echo "==> $(GPU_WHEELS): $$(( wheels / 1024 )) MiB, $$(ls $(GPU_WHEELS) | wc -l) wheels; with the working tree" \
	  "$$total MiB of the 64 MiB a device call carries"; \
	[ $$total -lt 64 ] || { echo "==> over 64 MiB: a device call would refuse it"; exit 1; }
