"""pytest fixtures of the conformance kit (loaded through the ``pytest11`` entry point ``peftmed``).

  peftmed_registry     a fresh registry (its own plugin manager): built-ins + installed plugins
  peftmed_device       the device to test on (``PEFTMED_TEST_DEVICE``, default cpu)
  peftmed_dtype        float32 (parametrise indirectly for others)
  tiny_backbone_name   parametrised over every registered tiny backbone
  tiny_model           a seeded model of ``tiny_backbone_name`` on ``peftmed_device``
"""

from __future__ import annotations

import pytest

from . import helpers as h


@pytest.fixture
def peftmed_registry():
    return h.fresh_registry()


@pytest.fixture
def peftmed_device():
    return h.test_device()


@pytest.fixture
def peftmed_dtype(request):
    return h.to_dtype(getattr(request, "param", "float32"))


def pytest_generate_tests(metafunc):
    if "tiny_backbone_name" in metafunc.fixturenames and not any(
        "tiny_backbone_name" in m.args for m in metafunc.definition.iter_markers("parametrize")
    ):
        names = h.tiny_backbones(h.fresh_registry())
        metafunc.parametrize("tiny_backbone_name", names, ids=names)


@pytest.fixture
def tiny_model(tiny_backbone_name, peftmed_registry, peftmed_device, peftmed_dtype):
    backbone = peftmed_registry.backbone(tiny_backbone_name)
    return h.build_model(backbone, dtype=peftmed_dtype, device=peftmed_device)
