"""The conformance kit: what a plugin author needs to test a plugin against peftmed.

Installed with peftmed as a pytest plugin (entry point ``pytest11``), so its fixtures are available in
any test suite (``peftmed_registry``, ``peftmed_device``, ``peftmed_dtype``, ``tiny_backbone_name``,
``tiny_model``), and its suites are one line each::

    from peftmed.testing import conformance_tests, backbone_conformance_tests
    TestMyMethod = conformance_tests(method_name="my-method", options={"r": 4})
    TestMyBackbone = backbone_conformance_tests("my-backbone-tiny")
    TestMyKernel = kernel_conformance_tests("layer_norm", "my-impl")
    TestMyDataset = dataset_conformance_tests("my-dataset")

See docs/plugins.md for what each check asserts.
"""

from .conformance import (
    BackboneConformance,
    DatasetConformance,
    KernelConformance,
    MethodConformance,
    RegistrationConformance,
    backbone_conformance_tests,
    conformance_tests,
    dataset_conformance_tests,
    kernel_conformance_tests,
)
from .helpers import TOLERANCES, NotApplicable, fresh_registry, is_tiny, tiny_backbones

__all__ = [
    "BackboneConformance", "DatasetConformance", "KernelConformance", "MethodConformance", "NotApplicable", "RegistrationConformance",
    "TOLERANCES", "backbone_conformance_tests", "conformance_tests", "fresh_registry", "is_tiny",
    "dataset_conformance_tests", "kernel_conformance_tests", "tiny_backbones",
]
