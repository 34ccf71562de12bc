# The README's two commands: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
FHIR_SERVER := tests/fhir_server

export PORT

.PHONY: run test lint bench venv node browser migrate keys clean

# The web server and one job worker (async work runs out of the box); stopping one stops both.
run: venv migrate keys
	@trap 'kill $$worker 2>/dev/null; wait $$worker' EXIT INT TERM; \
	$(BIN)/flask --app app jobs worker & worker=$$!; \
	$(BIN)/gunicorn -c app/gunicorn_conf.py 'app:create_app()'

keys: venv
	$(BIN)/flask --app app keys generate --if-missing

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
	$(BIN)/flask --app app db upgrade

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

node: $(FHIR_SERVER)/node_modules/.installed

$(FHIR_SERVER)/node_modules/.installed: $(FHIR_SERVER)/package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node 20) is needed for the test FHIR server"; exit 1; }
	npm ci --prefix $(FHIR_SERVER) --no-audit --no-fund
	touch $@

# Debian's Chromium and its driver for the SMART app's browser test (never a browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver || \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; } || \
	  { echo "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"; exit 1; }

clean:
	rm -rf $(VENV) $(FHIR_SERVER)/node_modules instance/gateway.db* .pytest_cache
