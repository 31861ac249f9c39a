# Everything runs from a project-local virtualenv bootstrapped from python3,
# so `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Two stamps: the demo needs only the package; tests need the test extra too.
STAMP   = $(VENV)/.installed-stamp
DEMO_STAMP = $(VENV)/.demo-stamp

# test-fast is tests/unit: one file per module of src/, no daemon, no
# subprocess (tests/conftest.py refuses an e2e test there): state machines
# with a fake clock, the daemon's pipeline without a socket, protocol, config,
# paths, the batch writer. Everything else is tests/e2e, marked e2e by its
# conftest. About 10 s.

.PHONY: venv demo test test-fast test-matrix bench figures bench-chart generated guarantees security-table soak lint clean

venv: $(STAMP)

# Old bundled pips cannot install a pyproject-only project in editable mode.
# pip -qq: errors only (the build backend's notes about editable installs,
# and a machine's pip configuration, are not what `make demo` is about).
PIP = $(BIN)/python -m pip install -qq
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python client/demo.py

test: venv
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=85 --durations=15 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-matrix:
	$(PYTHON) scripts/test_matrix.py

# What is generated from the tables in the code (tests fail when a file differs):
# docs/operations.md's table of keys, docs/forwarding.md's of [forward], and the reference config daemon/clh-writerd.toml
# from the daemon's OPTIONS, docs/client.md's tables from the handler's options and counters.
generated: venv
	$(BIN)/python -m clh_writerd.daemon.config docs/operations.md docs/forwarding.md daemon/clh-writerd.toml
	$(BIN)/python -m clh_writerd.client._options docs/client.md

guarantees: venv
	$(BIN)/python scripts/guarantees.py $(PYTEST_ARGS)

# docs/security.md's attack table from a run of tests/e2e/security (needs root: a second user is created).
security-table: venv
	$(BIN)/python scripts/guarantees.py --doc security $(PYTEST_ARGS)

soak: venv
	CLH_SOAK_SECONDS=$${CLH_SOAK_SECONDS:-1800} $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		tests/e2e/test_robustness.py -k soak $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The performance tables of the README and the docs, from the results files their blocks name.
figures: venv
	$(BIN)/python -m benchmarks.summary --write README.md benchmarks/README.md docs/patterns.md docs/migration.md

# docs/bench.svg from the newest full results in benchmarks/results/ (ingest, latency, e2e, asyncio).
bench-chart: venv
	$(BIN)/python -m benchmarks.chart --newest -o docs/bench.svg

lint: venv
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .venv-matrix .coverage .coverage.* htmlcov logs
