# One entry point for people and CI. `make test` and `make demo` build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch (a 0.9 GB wheel); on a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test test-fast demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dali,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check handpose tools tests
	$(VENV)/bin/ruff format --check handpose tools tests
	$(VENV)/bin/mypy handpose

bench: $(STAMP)
	$(PY) tools/bench_all.py --out bench-out

clean:
	rm -rf $(VENV) $(DEMO) bench-out .pytest_cache .mypy_cache .ruff_cache
