# sodkd: `make demo` and `make test` set up .venv on a fresh machine, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
PYTEST_ARGS ?=
# Idle OpenMP threads spin at barriers by default; on a small, shared machine (2 cores, Ray workers beside
# the driver) that costs 10-100x. Passive waiting is what we measured to be fast here.
export OMP_WAIT_POLICY ?= PASSIVE
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup test unit integration demo bench clean

setup: $(STAMP)

# torch first (the local CPU build), then the project in editable mode; the range in pyproject.toml is
# satisfied by 2.13.0 so nothing pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,foundation]"
	# reference models for the backbone-loading tests, off the venv's path (pyproject.toml: refmodels)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/refmodels "torchvision>=0.28,<0.29" "timm>=1.0,<2"
	touch $(STAMP)

# The backbone-loading tests compare against torchvision's and timm's own models, installed off the venv's path
# (refmodels above); they run in a process of their own with that path, so no other test imports them.
REFTESTS := tests/unit/test_backbone_weights.py
REFPATH  := PYTHONPATH=$(VENV)/refmodels

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS) --ignore=$(REFTESTS) tests
	$(REFPATH) $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS) $(REFTESTS)

unit: setup
	$(BIN)/python -m pytest -q --ignore=$(REFTESTS) tests/unit
	$(REFPATH) $(BIN)/python -m pytest -q $(REFTESTS)

integration: setup
	$(BIN)/python -m pytest -q tests/integration

demo: setup
	$(BIN)/sodkd demo

bench: setup
	$(BIN)/python benchmarks/models.py

clean:
	rm -rf $(VENV) demo-out
