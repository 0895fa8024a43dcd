# The two commands: `make demo` and `make test`. Everything else is a detail of those.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	&& { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# PGlite with TimescaleDB for the storage tests (tests/timescale/README.md): installed
# when Node and npm are here; without them those tests skip and say why.
TIMESCALE := tests/timescale
TIMESCALE_STAMP := $(TIMESCALE)/node_modules/.installed-stamp
NODE_TOOLS := $(shell command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && echo yes)
TEST_DEPS := $(STAMP) $(if $(NODE_TOOLS),$(TIMESCALE_STAMP))

.PHONY: demo test test-unit test-integration lint bench clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed (python3.11 not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

$(TIMESCALE_STAMP): $(TIMESCALE)/package.json $(TIMESCALE)/package-lock.json
	npm ci --prefix $(TIMESCALE) --no-audit --no-fund
	@touch $@

demo: $(STAMP)
	$(BIN)/telecare demo

# pytest exits 5 when it collected no tests: that is neither a pass nor an ordinary
# failure, so say so and fail loudly.
define run_pytest
	@set +e; $(BIN)/python -m pytest $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests in '$(1)': failing"; exit 1; fi; \
	exit $$rc
endef

test: $(TEST_DEPS) lint
	$(call run_pytest,tests)

test-unit: $(STAMP)
	$(call run_pytest,tests/unit)

test-integration: $(TEST_DEPS)
	$(call run_pytest,tests/integration tests/e2e)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/telecare bench

clean:
	rm -rf $(VENV) .telecare .pytest_cache .mypy_cache .ruff_cache $(TIMESCALE)/node_modules
