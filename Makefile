# Two entry points do all set-up on a fresh machine:  `make train` (the main job) and `make test`.
# Both create .venv, install PyTorch first (TORCH_SPEC), then this package.
# Another PyTorch build:  make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/slimtrain train

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/slimtrain bench --json benchmarks/results/bench_cpu.json

clean:
	rm -rf $(VENV)
