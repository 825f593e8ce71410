# The two commands the README promises: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TRUST_DOMAIN ?= example.org
# worksteal: a worker that runs out of tests takes some of the other's queue. With the default
# scheduler a worker left with the tens-of-seconds process tests ran them alone at the end
# (9 min 7 s against 8 min 36 s for the same 2,249 tests on this 2-core machine, one run each).
PYTEST_ARGS ?= -n auto --dist worksteal

.PHONY: run test lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Trellis needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/trellis init --trust-domain $(TRUST_DOMAIN) --exists-ok
	$(BIN)/trellis serve

lint: $(VENV)/.installed-test
	$(BIN)/ruff check ca api cli tests
	$(BIN)/ruff format --check ca api cli tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Issuance benchmark, Trellis against OpenBao PKI (docs/benchmarks.md); e.g. BENCH_ARGS='--seconds 3'.
BENCH_ARGS ?=
.PHONY: bench
bench: $(VENV)/.installed-test
	@# The load generator is Debian's wrk (the Python client is the fallback: --loadgen python).
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -q && apt-get install -y -q --no-install-recommends wrk) || true
	$(BIN)/python -m tests.bench.issuance $(BENCH_ARGS)
