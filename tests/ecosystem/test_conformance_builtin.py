"""The built-in methods run the same conformance suite a third-party method plugin runs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftmed.testing import conformance_tests, fresh_registry  # noqa: E402

# Small options keep the suite fast; every option a method needs is its default otherwise.
OPTIONS = {"lora": {"r": 4, "alpha": 8}, "prefix": {"n": 4}, "ptuning-v2": {"n": 4}}
NOT_TRAINING = {"frozen"}  # trains nothing by definition: no adapter to check

_registry = fresh_registry()
for _name in _registry.names("method"):
    _owner = _registry.owner("method", _name)
    if _name in NOT_TRAINING or _owner is None or not _owner.builtin:
        continue
    _cls = conformance_tests(_name, OPTIONS.get(_name, {}))
    globals()[_cls.__name__] = _cls

# every built-in kernel implementation that runs here goes through the kernel kit (its op's reference)
from peftmed.testing import kernel_conformance_tests  # noqa: E402

for _key, _impl in _registry.all("kernel").items():
    _owner = _registry.owner("kernel", _key)
    if _owner is not None and _owner.builtin:
        _cls = kernel_conformance_tests(_impl.op, _impl.name)
        globals()[_cls.__name__] = _cls

# the kit takes dtypes as torch dtypes as well as names (torch.float32 used to break collection)
import torch  # noqa: E402

TestLoraTorchDtypeConformance = conformance_tests("lora", {"r": 2}, dtypes=(torch.float32,), backbones=("toy-vlm",))
