"""Test-wide settings. TRITON_INTERPRET must be set before anything imports triton (peft,
transformers model modules and torch.compile do), so it is set here, before any test module loads,
and only without a GPU: on a GPU the Triton tests run the compiled kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # shared test helpers (cli_helpers) for every test folder
VQA_RAD = REPO.parent / "shared" / "data" / "vqa_rad"


@pytest.fixture
def registry():
    """A fresh registry (built-ins plus installed entry points), also made the process default."""
    import peftmed.plugins as plugins

    reg = plugins.build_registry()
    old = plugins._default
    plugins.set_default_registry(reg)
    yield reg
    plugins.set_default_registry(old)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models on a shared 2-core machine only pay for thread hand-offs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vqa_rad_dir():
    if not (VQA_RAD / "trainset.json").is_file():
        pytest.skip(f"VQA-RAD not found at {VQA_RAD} (expected ../shared/data/vqa_rad beside the repo)")
    return VQA_RAD
