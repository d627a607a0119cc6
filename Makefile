# The two commands a newcomer needs: `make run` and `make test`. Each installs what it needs into .venv first, from
# the hashed lock files (requirements.txt: the service; requirements-dev.txt: the service and its tests and tools;
# requirements-pip.txt: the installer itself, whose newer resolver installs the lock in about half the time).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# `make lock` resolves with uv, kept in a virtualenv of its own under build/ (it is no dependency of the service).
UV_VERSION := 0.13.8
UV := build/tools/uv-$(UV_VERSION)/bin/uv
COMPILE := $(UV) pip compile --universal --python-version 3.11 --generate-hashes --custom-compile-command 'make lock'
STALE_LOCK := echo "tokensvc: the lock files do not satisfy pyproject.toml: run \`make lock\`" >&2; exit 1

.PHONY: install install-runtime run test coverage lint format lock example

$(VENV)/pyvenv.cfg: requirements-pip.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-pip.txt

# The runtime only: what `make run` and the Docker image need (`pip check` fails on a lock older than pyproject).
$(BIN)/.installed-runtime: requirements.txt pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/pip install --quiet --require-hashes -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check >/dev/null || { $(STALE_LOCK); }
	touch $@

# Everything the tests, linters and benchmarks use as well.
$(BIN)/.installed: requirements-dev.txt pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check >/dev/null || { $(STALE_LOCK); }
	touch $@ $(BIN)/.installed-runtime

install: $(BIN)/.installed

install-runtime: $(BIN)/.installed-runtime

## Serve on SQLite (./tokensvc.db) with the built-in Strava sandbox on http://$(HOST):$(PORT) (`make run PORT=8001`)
run: install-runtime
	$(BIN)/tokensvc serve --sandbox --host $(HOST) --port $(PORT)

## The whole suite: SQLite and Postgres (127.0.0.1:5432, or TOKENSVC_TEST_POSTGRES_URL), several processes; spread
## over one pytest-xdist worker per core (at most TEST_WORKERS: each may run three replicas on the one Postgres)
TEST_WORKERS ?= 3
XDIST := --numprocesses auto --maxprocesses $(TEST_WORKERS) --dist worksteal
test: install
	$(BIN)/pytest $(XDIST)

## The suite under coverage.py, the processes it starts included (pyproject.toml [tool.coverage.run]): line coverage
## (`--tb=native`: CPython 3.11.7 raises SystemError formatting pytest's own tracebacks under coverage)
coverage: install
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest $(XDIST) --tb=native
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

lint: install
	$(BIN)/ruff check src tests bench alembic examples
	$(BIN)/ruff format --check src tests bench alembic examples
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench alembic examples
	$(BIN)/ruff format src tests bench alembic examples

$(UV):
	$(PYTHON) -m venv build/tools/uv-$(UV_VERSION)
	build/tools/uv-$(UV_VERSION)/bin/pip install --quiet uv==$(UV_VERSION)

## Re-resolve the lock files after a change to pyproject.toml's dependencies (pins kept where they still fit;
## `make lock LOCK_FLAGS=--upgrade` moves everything to the newest allowed). Commit both files.
lock: $(UV)
	$(COMPILE) $(LOCK_FLAGS) pyproject.toml --extra dev -o requirements-dev.txt
	$(COMPILE) $(LOCK_FLAGS) pyproject.toml -c requirements-dev.txt -o requirements.txt
	printf 'pip>=25\n' | $(COMPILE) $(LOCK_FLAGS) - -o requirements-pip.txt

## Build the React dashboard example (examples/react/dist); the browser test also builds it when it is stale
example:
	cd examples/react && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
	cd examples/react && npm run build
