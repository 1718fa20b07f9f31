# Every target a developer uses is the one CI uses (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: install check format test test-fast bench demo hub soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Read-only: never rewrites a file. The import rules of the tree are a test (docs/architecture.md).
check: install
	$(BIN)/ruff format --check src tests bench scripts examples
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/test_import_rules.py

format: install
	$(BIN)/ruff format src tests bench scripts examples
	$(BIN)/ruff check --fix src tests bench scripts examples

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: install
	$(PY) scripts/run-tests $(PYTEST_ARGS)

# One command, one run beside the peers (bench/run.py); BENCH_ARGS adds options, e.g. --quick.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

demo: install
	$(PY) scripts/demo.py

# Every accepted message accounted for under injected faults (scripts/soak.py; a short run of it
# is in the test suite). SOAK_ARGS adds options, e.g. SOAK_ARGS="--seed 7".
SOAK_MINUTES ?= 10
soak: install
	$(PY) scripts/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

hub: install
	$(BIN)/ipcbus hub

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
