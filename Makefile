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

# The old-torch leg: Debian 12's python3-torch (1.13.1, reports 1.13.0a0) for /usr/bin/python3, a venv
# that sees it (--system-site-packages), this package installed with pip constrained so that it
# touches neither torch nor torchvision (configs/constraints-torch1.txt). `make test-torch1` needs the
# Debian packages installed: apt-get install python3-torch python3-torchvision python3-venv
SYSTEM_PYTHON ?= /usr/bin/python3
VENV_TORCH1 ?= .venv-torch1
STAMP_TORCH1 := $(VENV_TORCH1)/.qgait-installed

.PHONY: demo test test-torch1 lint typecheck clean

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

test-torch1: $(STAMP_TORCH1)
	$(VENV_TORCH1)/bin/python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('1.13') else 'pip replaced the system torch: ' + v)"
	$(VENV_TORCH1)/bin/python -m pytest -q

$(STAMP_TORCH1): setup.cfg pyproject.toml configs/constraints-torch1.txt
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV_TORCH1)
	$(VENV_TORCH1)/bin/python -m pip install --quiet -c configs/constraints-torch1.txt -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) $(VENV_TORCH1)
