# The two commands of the README: `make run` (set up and start API + workers) and
# `make test` (set up and run the tests). Both start local services that are not running.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The one source of the version: pyproject.toml.
VERSION := $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')

.PHONY: setup system-packages services run test mutants fault bench bench-sustained bench-soak \
	bench-expiry \
	clean docs deploy-generated image lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exactly the versions of the lock file, then the project itself (editable) on top.
$(VENV)/.installed: requirements-dev.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# After changing pyproject.toml's dependencies: pin them again (the floors stay there).
# The image's lock carries every file's hash (the Dockerfile installs it with
# --require-hashes); the development lock does not, since pip-tools in it needs pip and
# setuptools themselves, which hashes would pin too.
LOCK := $(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links
lock: setup
	$(LOCK) --generate-hashes --output-file requirements.lock pyproject.toml
	$(LOCK) --extra dev --output-file requirements-dev.lock pyproject.toml

# The Node tools of the contract checks (redocly lint), from package-lock.json. Without
# npm the lint tests are skipped, except under CI=true, where that fails (as the tests do).
node_modules/.installed: package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	elif [ "$$CI" = true ]; then \
	  echo "npm is missing (CI=true: a missing tool fails): install Node.js and npm" >&2; exit 1; \
	else echo "npm is missing: the OpenAPI and AsyncAPI lint tests are skipped" >&2; fi

setup: $(VENV)/.installed node_modules/.installed system-packages

# Debian's prometheus (promtool) for the alert tests: installed when root, else named.
system-packages:
	@./scripts/system-packages.sh

services:
	./scripts/start-services.sh

# Prints the API's, /metrics' and /openapi.json's addresses once the API answers.
run: setup services
	@./scripts/announce.sh &
	$(BIN)/honcho start

test: setup services
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest
	$(BIN)/python scripts/mutants.py $(MUTANTS_ARGS)

# Breaks each guarantee in a copy of the code and runs the tests that should notice
# (scripts/mutants.py). MUTANTS_ARGS narrows a run: "--only relay", "--skip NUL", "--list".
mutants: setup services
	$(BIN)/python scripts/mutants.py $(MUTANTS_ARGS)

# Benchmarks (README "Benchmarks and fault tests"): each starts its own API, workers and
# wrk on 127.0.0.1 with names of its own, prints a table, and removes what it wrote.
bench: setup services
	$(BIN)/python -m bench load
	$(BIN)/python -m bench consumers
	$(BIN)/python -m bench signals

bench-sustained: setup services
	$(BIN)/python -m bench sustained

bench-soak: setup services
	$(BIN)/python -m bench soak

bench-expiry: setup services
	$(BIN)/python -m bench expiry

# The files in deploy/ written by code: the Grafana dashboard's JSON and the PrometheusRule
# (from deploy/prometheus/rules.yaml). Tests fail when the committed ones are stale.
# The one image of the API and the workers (needs a Docker engine), labelled with VERSION.
image:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t eliab-session-close:$(VERSION) .

# The contract documents of docs/ that are generated from the code (tests compare them).
docs: setup
	$(BIN)/python -m service.openapi > docs/openapi.json
	$(BIN)/python -m session_close.asyncapi > docs/asyncapi.json
	$(BIN)/python -m session_close.asyncapi --schema > docs/session-event.schema.json
	$(BIN)/python -m signals.openapi > docs/signals-openapi.json

deploy-generated: setup
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/session-close.json
	$(BIN)/python deploy/prometheus/prometheusrule.py > deploy/k8s/prometheusrule.yaml

fault: setup services
	$(BIN)/pytest -m fault

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
