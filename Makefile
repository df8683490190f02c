# The only entry points: `make demo`, `make test`; `make proto`, `make lint`, `make bench-<name>`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: venv proto lint test demo clean

venv: $(STAMP)

# Re-installs whenever pyproject.toml changes; `make venv` on an up-to-date venv does nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m amalgam.protocol.generate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/amalgam demo

# bench-<name>: python -m benchmarks.<name>, e.g. make bench-composition (benchmarks/*.py)
bench-%: $(STAMP)
	$(BIN)/python -m benchmarks.$*

clean:
	rm -rf $(VENV) runs .pytest_cache
