# The README's two commands: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
FHIR_SERVER := tests/fhir_server

export PORT

.PHONY: run test lint bench venv node browser migrate keys clean

# The web server and one job worker (async work runs out of the box); Ctrl-C or SIGTERM stops both gracefully,
# and if one of them exits the other is stopped too (app/up.py).
run: venv migrate keys
	@exec $(BIN)/gateway up

keys: venv
	$(BIN)/gateway keys generate --if-missing

test: venv node browser
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	@command -v wrk >/dev/null || apt-get install -y wrk || { echo "bench needs wrk (Debian package wrk)"; exit 1; }
	$(BIN)/python -m bench.hook_throughput

migrate: venv
	$(BIN)/gateway db upgrade

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --editable .  # the `gateway` command
	touch $@

node: $(FHIR_SERVER)/node_modules/.installed

$(FHIR_SERVER)/node_modules/.installed: $(FHIR_SERVER)/package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node 20) is needed for the test FHIR server"; exit 1; }
	npm ci --prefix $(FHIR_SERVER) --no-audit --no-fund
	touch $@

# Debian's Chromium and its driver for the SMART app's browser test (never a browser download). Installing them needs
# root; without root the browser test is skipped (with the reason) and every other test runs.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "chromium and chromium-driver are not installed, and installing them needs root: the SMART browser test will be skipped"; \
	else \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; } || \
	  { echo "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"; exit 1; }; \
	fi

clean:
	rm -rf $(VENV) $(FHIR_SERVER)/node_modules instance/gateway.db* .pytest_cache
