# Everything runs from a project-local virtualenv bootstrapped from python3,
# so `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: venv demo test test-matrix bench bench-chart guarantees security-table soak lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python client/demo.py

test: venv
	$(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=85 $(PYTEST_ARGS)

test-matrix:
	$(PYTHON) scripts/test_matrix.py

guarantees: venv
	$(BIN)/python scripts/guarantees.py $(PYTEST_ARGS)

# docs/security.md's attack table from a run of tests/security (needs root: a second user is created).
security-table: venv
	$(BIN)/python scripts/guarantees.py --doc security $(PYTEST_ARGS)

soak: venv
	CLH_SOAK_SECONDS=$${CLH_SOAK_SECONDS:-1800} $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		tests/test_robustness.py -k soak $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# docs/bench.svg from the newest full results in benchmarks/results/ (ingest, latency, e2e, asyncio).
bench-chart: venv
	$(BIN)/python -m benchmarks.chart --newest -o docs/bench.svg

lint: venv
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .venv-matrix .coverage .coverage.* htmlcov logs
