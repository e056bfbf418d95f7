"""Shared pieces of the bench tests: a miniature configuration (miss-tiny on a few phantom images)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from peftmed.bench import BenchConfig  # noqa: E402

TWO = ["*=layernorm", "F|LoRA|LoRA"]


def mini(output, **overrides) -> BenchConfig:
    """Two recipes, two steps, eight test questions: seconds per job on a 2-core CPU."""
    options = dict(backbone="miss-tiny", dataset="phantom", recipes=list(TWO), steps=2, batch_size=4,
                   eval_batch_size=8, eval_samples=8, dataset_options={"n_images": 4}, output=str(output),
                   progress=False, isolate=False, device="cpu", threads=1,
                   max_new_tokens=3)
    options.update(overrides)
    return BenchConfig(**options)


@pytest.fixture(name="mini", scope="session")
def mini_fixture():
    return mini
