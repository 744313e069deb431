# Quick start: `make run` (main job, built-in default) and `make test`. Each sets itself up, idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	$(BIN)/phikit speedrun

test: setup
	bash scripts/test-deps.sh
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
