# Two commands for a fresh machine (Python 3.11+):
#   make bench   creates .venv, installs the pinned dependencies into it and runs `peftmed bench`
#   make test    the same environment, then the whole test suite
#   make quick   the fast tests only (the developer's loop: under two minutes on 2 cores)
# Nothing is installed outside .venv, so a system Python that refuses global installs (PEP 668) works.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/*/pyproject.toml)
INSTALLED := $(VENV)/.peftmed-installed
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TESTS := tests $(addsuffix tests,$(dir $(PLUGINS)))

.PHONY: install bench test quick

# A virtual environment with pip; where the interpreter has no ensurepip (Debian's python3 without the
# python3-venv package), one without pip, into which the interpreter's own pip installs pip.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(PYTHON) -m venv --without-pip $(VENV) \
		&& $(PYTHON) -m pip --python $(BIN)/python install -q pip; }

# installed again only when the pins or the packages change
$(INSTALLED): $(BIN)/python requirements-ci.txt requirements-triton-gpu.txt pyproject.toml setup.py $(PLUGINS)
	$(BIN)/python -m pip install -q -r requirements-ci.txt
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/triton-gpu -r requirements-triton-gpu.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	for p in $(dir $(PLUGINS)); do $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e $$p || exit 1; done
	touch $(INSTALLED)

install: $(INSTALLED)

bench: install
	$(BIN)/peftmed bench

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU (it must be set before triton is imported).
# also rewrites tests/slow_tests.txt: what `make quick` leaves out for its measured time (see tests/conftest.py)
test: install
	$(TEST_ENV) PEFTMED_WRITE_SLOW_LIST=1 $(BIN)/python -m pytest -q --durations=30 $(TESTS)

quick: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" --durations=15 $(TESTS)
