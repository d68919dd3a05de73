# Two commands matter: `make run` and `make test`. Both create .venv on first use;
# only `make test` needs npm (for buf, the proto linter). Neither rewrites a tracked file.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed

.PHONY: run test test-fast lint format up proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `npm ci` installs exactly the lock and never rewrites it (the lock lists every platform's buf binary).
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Third-party gRPC clients (tritonclient) for the serving tests, in their own venv: see tests/clients/requirements.txt.
$(CLIENTS_STAMP): tests/clients/requirements.txt
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/pip install --quiet -r tests/clients/requirements.txt
	touch $(CLIENTS_STAMP)

## Start the mesh, run the Flyte workflow on sklearn:breast_cancer (metrics, decision), stop the mesh.
run: $(STAMP)
	$(BIN)/mlmesh with-mesh --log-dir artifacts/logs -- $(BIN)/pyflyte run workflow/pipeline.py training_pipeline

# Both tiers run on one pytest-xdist worker per core; tests that need the Docker engine share one
# worker (tests/conftest.py). Each run ends with its budget: test time per tier and the slowest tests.
PYTEST_PARALLEL := -n auto --dist loadgroup

## Run the whole test suite.
test: $(STAMP) $(NODE_STAMP) $(CLIENTS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

## The fast tier, for the edit-test loop: everything but Docker, slow end-to-end and network tests.
test-fast: $(STAMP) $(NODE_STAMP) $(CLIENTS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not docker and not slow and not network"

## Lint, format check, types and the layer contract (pyproject's [tool.importlinter]): what CI checks before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

## Apply the formatter and ruff's safe fixes.
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Start the five services until Ctrl-C.
up: $(STAMP)
	$(BIN)/mlmesh up

## Regenerate the gRPC stubs after editing proto/**/*.proto.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) $(CLIENTS) artifacts .pytest_cache
