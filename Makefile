# Two entry points, both self-installing into a local virtual environment (.venv):
#   make demo   -- the first-run demo on bundled data
#   make test   -- the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_repsim.demo

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q --doctest-modules lightning_repsim tests

bench: $(STAMP)
	$(PY) benchmarks/bench_functional.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_repsim tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
