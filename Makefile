# dockyard — two commands do all set-up on a fresh Debian 12 machine as root:
#   make deploy   venv + Docker engine + lab + `pyinfra inventory/lab.py deploy.py -y`
#   make test     the whole test suite (lint, unit, operation specs, lab end to end)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deploy test unit lint bench engine lab-up lab-down venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

engine:
	bash scripts/ensure-engine.sh

lab-up: venv engine
	$(BIN)/dockyard-lab up

lab-down: venv
	$(BIN)/dockyard-lab down

deploy: lab-up
	$(BIN)/pyinfra inventory/lab.py deploy.py -y

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/vermin --no-tips -t=3.9- --violations dockyard

unit: venv
	$(BIN)/pytest -q -m 'not packaging' tests/unit tests/operations

test: venv engine lint
	bash scripts/test.sh

bench: venv engine
	$(BIN)/python benchmarks/deploy.py
	$(BIN)/python benchmarks/registry.py
	$(BIN)/python benchmarks/layers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
