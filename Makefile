# Every target works on a fresh clone with python3.11 and make: the venv is built on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,speed]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/checkout-sidecar demo

test: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/python -m pytest -q -m 'not slow'

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (Debian package)"; \
		(apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 || \
		{ echo "wrk is missing: run 'sudo apt-get install wrk' and retry"; exit 1; }; }
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
