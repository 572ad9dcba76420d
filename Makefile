# Every target creates the virtual environment it needs; nothing is installed
# by hand. `make run` serves on the embedded PostgreSQL unless
# ORDERTRAIL_DATABASE_URL names another server.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck schemas bench bench-ingest bench-read bench-rebuild \
	bench-audit bench-growth bench-summary clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/ordertrail migrate
	$(BIN)/ordertrail serve

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(STAMP)
	$(BIN)/mypy

schemas: $(STAMP)
	$(BIN)/ordertrail schemas write

# `bench` runs the three benchmarks one after the other, then gathers their
# headline figures into bench-results/summary.md. A benchmark that fails its
# target still leaves its results, so the summary is written whatever the
# verdicts; `bench` fails afterwards if any did. `bench-growth` (a log of five
# million events, about ten minutes) runs on its own; the summary lists its
# last results when there are some.
bench: $(STAMP)
	@status=0; \
	$(BIN)/python -m ordertrail.bench.ingest || status=1; \
	$(BIN)/python -m ordertrail.bench.read || status=1; \
	$(BIN)/python -m ordertrail.bench.rebuild || status=1; \
	$(BIN)/python -m ordertrail.bench.summary || status=1; \
	exit $$status

bench-summary: $(STAMP)
	$(BIN)/python -m ordertrail.bench.summary

bench-ingest: $(STAMP)
	$(BIN)/python -m ordertrail.bench.ingest

bench-read: $(STAMP)
	$(BIN)/python -m ordertrail.bench.read

bench-rebuild: $(STAMP)
	$(BIN)/python -m ordertrail.bench.rebuild

bench-audit: $(STAMP)
	$(BIN)/python -m ordertrail.bench.audit

bench-growth: $(STAMP)
	$(BIN)/python -m ordertrail.bench.growth

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
