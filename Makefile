# Quick start on a fresh machine: `make demo` runs the demo, `make test` lints, type-checks and tests.
# Both create the virtual environment on first use (torch first, pinned: an unpinned torch can pull a
# multi-GB CUDA build), then install this package editable with its dev extra; a stamp file in the
# environment keeps that to once (again only when setup.cfg or pyproject.toml change).
# CI passes VENV=<fresh folder> so every run installs from scratch.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# e.g. `make demo DEMO_ARGS=--overwrite` to replace an earlier demo's results in runs/demo
DEMO_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.qgait-installed

.PHONY: demo test lint typecheck clean

demo: $(STAMP)
	$(BIN)/qgait demo --out runs/demo $(DEMO_ARGS)

test: lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check qgait_plugin tests

typecheck: $(STAMP)
	$(BIN)/mypy

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV)
