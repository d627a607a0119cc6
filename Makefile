# The two commands a newcomer needs: `make run` and `make test`. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint format example

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## Serve on SQLite (./tokensvc.db) with the built-in Strava sandbox on http://127.0.0.1:8000
run: install
	$(BIN)/tokensvc serve --sandbox

## The whole suite: SQLite and Postgres (127.0.0.1:5432, or TOKENSVC_TEST_POSTGRES_URL), several processes
test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench alembic
	$(BIN)/ruff format --check src tests bench alembic
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench alembic
	$(BIN)/ruff format src tests bench alembic

## Build the React dashboard example (examples/react/dist); the browser test also builds it when it is stale
example:
	cd examples/react && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
	cd examples/react && npm run build
