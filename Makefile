# sntfx: `make demo` and `make test` create .venv and install what is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest

.PHONY: install demo test test-slow test-zoo bench clean

# pyproject.toml declares ranges (installing sntfx keeps a user's torch); the .venv gets the versions the
# tests run on. Changing them rebuilds the .venv.
TESTED_PINS := torch==2.14.1 torchvision==0.29.1

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' $(TESTED_PINS)
	@touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default: Adam vs SAM vs SNT on Fashion-MNIST
## (scikit-learn's digits when it is not installed), a small CNN, 2 seeds.
## DEMO_ARGS adds study options (e.g. DEMO_ARGS="--epochs 2"); DEMO_OUT moves the results.
DEMO_OUT  ?= demo-results
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/sntfx study --preset quick --out $(DEMO_OUT) $(DEMO_ARGS)
	@echo "report: $(DEMO_OUT)/report.md"

## Unit and integration tests (about 20 minutes on 2 cores).
test: $(STAMP)
	$(PYTEST) -m "not slow" -q --durations=20

## The long tests: the model-zoo sweep (one style per model) and fault injection (CI runs them too).
test-slow: $(STAMP)
	$(PYTEST) -m "slow and not exhaustive" -q

## The whole zoo sweep: every torchvision classifier and timm family with every style (over an hour).
test-zoo: $(STAMP)
	$(PYTEST) -m slow -q tests/test_zoo.py

## Measurements (ratios within one run); results in bench-results/.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_transform.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_ort.py
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) demo-results bench-results .pytest_cache
