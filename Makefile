# Quick start: `make run` (set-up + the default pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/dvc repro

test: setup  ## everything (what CI runs)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

test-fast: setup  ## inner loops: skips the tests marked slow
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check mme tests experiments benchmarks

bench: setup
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_targets.py
	$(PY) benchmarks/bench_pretrain_step.py

clean:
	rm -rf .pytest_cache reports/metrics/*.json
