# The README's Quick start: `make demo` and `make test` work on a fresh clone. Each first sets up .venv
# (python3 -m venv, then pip install -e ".[test,embedded]"), again whenever pyproject.toml changes.
#
#   make demo    the self-contained tour (embedded PostgreSQL, Prefect's temporary server)
#   make test    the whole test suite, as .ci/run runs it (it starts PostgreSQL/Redis where none answers)
#   make lint    ruff and mypy
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_TIMEOUT ?= 3600
PYTEST_ARGS ?=

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,embedded]"
	@touch $@

demo: $(STAMP)
	$(BIN)/alya demo

# Bounded, so that a hung run fails instead of outliving CI's limit.
test: $(STAMP)
	timeout --signal=TERM --kill-after=60 $(TEST_TIMEOUT) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alya flows tests bench
	$(BIN)/mypy
