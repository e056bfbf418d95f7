"""Fixtures of the kernel tests: the Triton interpreter guard and the C++ build (once per session).
Tolerances and helpers are in kernels_testlib.py."""

from __future__ import annotations

import os
import sys

# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports triton
# (tests/conftest.py does too; this guards running this folder on its own) - without a GPU only: on a
# GPU the Triton tests must run the compiled kernels.
import torch  # noqa: E402

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from kernels_testlib import cpp_runs_here  # noqa: E402


@pytest.fixture(scope="session")
def cpp_built():
    """Build (or load from the cache) the C++ extensions once per session."""
    ok, why = cpp_runs_here()
    if not ok:
        pytest.skip(f"C++ kernels cannot build here: {why}")
    from peftmed.kernels import build

    return {name: build.load_extension(name) for name in ("lora_linear_cpu", "layer_norm_cpu")}


@pytest.fixture
def fresh_dispatch():
    """Dispatch decisions forgotten before and after (tests change the environment and registry)."""
    from peftmed.kernels import clear_cache

    clear_cache()
    yield
    clear_cache()
