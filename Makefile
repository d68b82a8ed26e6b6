# healthml: two commands.
#   make run    set everything up (venv, pinned packages) and run the whole pipeline on SUPPORT2
#   make test   set up, then every test: export drift, notebook tests, integration tests
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
EXTRAS := dev,serve,monitor,dask,compiled,team
# `dvc plots show` draws offline: Vega, Vega-Lite and Vega-Embed from the npm registry (versions and integrity pinned in
# docs/plots/vendor.py) inlined into an HTML template that this clone's DVC uses (.dvc/config.local plots.html_template).
PLOTS_TEMPLATE := vendor/vega/dvc_plots.html

# PHI-handling software phones home nowhere.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export ORT_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: setup run plots test test-fast architecture test-notebooks test-integration export-check docs browser postgres lab clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)  ## create .venv and install healthml with pinned dependencies; vendor Vega for offline plots

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	@echo "Setting up $(VENV) with $(PYTHON) (pinned by requirements/constraints.txt; takes a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[$(EXTRAS)]" 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

$(PLOTS_TEMPLATE): docs/plots/vendor.py docs/plots/dvc_plots.html $(VENV)/.installed
	@if command -v npm >/dev/null; then \
	  $(BIN)/python docs/plots/vendor.py $(@D) && dvc config --local plots.html_template ../$@; \
	else echo "npm not found: dvc plots show will load Vega from a CDN (install Node.js and npm, then make setup)"; fi

# The summary is printed whether the pipeline passed or not (a failing gate exits 1: so does make).
run: setup  ## run the pipeline (healthml repro: dvc repro, its stages served by a warm runner), register its candidate (healthml model register), then print what it found (healthml summary)
	healthml repro && healthml model register || status=$$?; healthml summary; exit $${status:-0}

plots: setup  ## draw the pipeline's plots into dvc_plots/index.html (one file, opens offline)
	dvc plots show

export-check: setup  ## fail if a notebook is saved with outputs, nbdev-export changes healthml/ (nbs/ is the source of truth), ruff finds an error, or dvc.yaml's code deps are not the import graph's
	python .ci/notebooks-clean
	nbdev-export
	@if [ -n "$$(git status --porcelain -- healthml)" ]; then \
	  echo "nbdev-export changed healthml/: edit nbs/, export, and commit both:"; git status --porcelain -- healthml; exit 1; fi
	@echo "nbdev-export: healthml/ matches nbs/"
	ruff check --select F healthml
	healthml dvc deps

architecture: setup  ## redraw docs/architecture.md from the import graph
	python -c "from healthml.core.imports import redraw; redraw('docs/architecture.md', 'healthml')"

test-notebooks: setup  ## the tests inside the notebooks
	nbdev-test --n-workers 2

browser:  ## headless Chromium for the report tests (Debian package; needs root or sudo the first time)
	@command -v chromium >/dev/null || { \
	  echo "Installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian installs the server programs in /usr/lib/postgresql/<version>/bin, off PATH (the test looks there). No cluster is
# created or started: the registry test runs a private instance in a temporary folder and stops it.
postgres:  ## PostgreSQL server programs for the team-registry test (Debian package; needs root or sudo the first time)
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "Installing Debian's postgresql for the team-registry test"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO mkdir -p /etc/postgresql-common/createcluster.d; \
	  echo "create_main_cluster = false" | $$SUDO tee /etc/postgresql-common/createcluster.d/healthml.conf >/dev/null; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

test-integration: setup browser postgres  ## pipeline, CLI, registry, browser and PostgreSQL tests (pytest, both cores, random order)
	python -m pytest -n 2 --dist worksteal --prebuild --durations=30

test-fast: export-check test-notebooks  ## the edit loop (<= 2 min): export drift, notebook tests, pytest without slow tests
	python -m pytest -n 2 -m "not slow"

docs: setup  ## the documentation site in _docs/: every notebook run as test-notebooks runs it and rendered, README as home page
	python docs/site/build.py

# `docs` runs every notebook's cells (its tests included) as nbdev-test does, so CI runs it in place of test-notebooks.
test: export-check docs test-integration  ## everything CI runs

lab: setup  ## open JupyterLab on nbs/
	jupyter lab nbs/

clean:  ## remove pipeline outputs (not the venv, not the DVC cache)
	rm -rf data/interim data/processed models metrics plots reports mlflow.db mlartifacts
