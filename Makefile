# Every target sets itself up: a fresh machine needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench bench-peers clean

# --compile-bytecode: uv does not write .pyc files by default (pip does); without them every
# worker process compiles its imports at start-up, which costs time and ~17 MB of RSS.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/durably demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy src

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m compileall -q src bench
	$(BIN)/python -m bench $(BENCH_ARGS)

# The same workloads against other Python job queues (the `peers` extra, in `dev`).
bench-peers: $(STAMP)
	$(BIN)/python -m compileall -q src bench
	$(BIN)/python -m bench.peers $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
