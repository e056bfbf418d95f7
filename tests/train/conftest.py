"""Fixtures for the trainer tests; the fake model lives in train_fakes.py."""

import pytest

from train_fakes import FakeVQA, FakePlugin, make_records, build_fake, bare_fake  # noqa: F401


@pytest.fixture
def fake_registry():
    """A fresh registry with the fake backbones, made the process default for the test."""
    import peftmed.plugins as plugins

    reg = plugins.build_registry(extra_plugins=[FakePlugin()], load_entrypoints=False)
    old = plugins._default
    plugins.set_default_registry(reg)
    yield reg
    plugins.set_default_registry(old)


@pytest.fixture
def records():
    return make_records()
