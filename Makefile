# The only entry points: `make demo`, `make test`; `make proto`, `make lint`, `make bench-<name>`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: venv proto lint test demo bench-composition bench-protocol bench-datafree bench-otfusion bench-consolidation bench-privacy bench-flower bench-detection bench-amalgamation clean

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

bench-composition: $(STAMP)
	$(BIN)/python -m benchmarks.composition

bench-protocol: $(STAMP)
	$(BIN)/python -m benchmarks.protocol

bench-datafree: $(STAMP)
	$(BIN)/python -m benchmarks.datafree

bench-otfusion: $(STAMP)
	$(BIN)/python -m benchmarks.otfusion

bench-consolidation: $(STAMP)
	$(BIN)/python -m benchmarks.consolidation

bench-privacy: $(STAMP)
	$(BIN)/python -m benchmarks.privacy

bench-flower: $(STAMP)
	$(BIN)/python -m benchmarks.flower --variant marketplace --variant grpc-vs-flower

bench-detection: $(STAMP)
	$(BIN)/python -m benchmarks.detection

bench-amalgamation: $(STAMP)
	$(BIN)/python -m benchmarks.amalgamation

clean:
	rm -rf $(VENV) runs .pytest_cache
