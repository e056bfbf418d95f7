# Two commands for a fresh machine:
#   make bench   installs the pinned dependencies and runs `peftmed bench` on the embedded phantom data
#   make test    installs the pinned dependencies and runs the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install bench test

install:
	$(PIP) install -q -r requirements-ci.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	for p in $(dir $(PLUGINS)); do $(PIP) install -q --no-build-isolation --no-deps -e $$p || exit 1; done

bench: install
	peftmed bench

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU (it must be set before triton is imported).
test: install
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q tests $(addsuffix tests,$(dir $(PLUGINS)))
