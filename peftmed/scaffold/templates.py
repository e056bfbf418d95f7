"""The files of a new plugin package, per kind. Placeholders: __SHORT__ (registry name), __DIST__
(distribution), __MODULE__ (import name), __CLS__ (class-name stem), __KIND__."""

from __future__ import annotations

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "A peftmed __KIND__ plugin: __SHORT__"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["peftmed"]

# peftmed finds plugins through this entry-point group
[project.entry-points.peftmed]
__SHORT__ = "__MODULE__"

[tool.setuptools]
packages = ["__MODULE__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''# __DIST__

A peftmed __KIND__ plugin registering `__SHORT__`.

    pip install --no-build-isolation --no-deps -e .   # --no-deps: keep the torch you have
    peftmed plugins                                   # lists __DIST__ and what it registers
    pytest tests                                      # runs peftmed's conformance kit on it

Edit `__MODULE__/__init__.py`; the hook implementation at its end is what peftmed calls.
See peftmed's docs/plugins.md for every hook and what the conformance kit checks.
'''

METHOD = '''"""__SHORT__: a peftmed method plugin (inject family).

Starts as a learned per-output-channel scale (initialised to one, so the model starts unchanged);
replace the layer's parameters and forward with your method. Uses peftmed's public API only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import peftmed


@dataclass
class __CLS__Config(peftmed.MethodConfig):
    init: float = 1.0  # initial scale (1.0: identity at initialisation)

    def validate(self) -> None:
        if self.init <= 0:
            raise peftmed.ConfigError(f"init must be > 0, got init={self.init}")


class __CLS__Linear(peftmed.AdapterLayer):
    adapter_attributes = ("scale",)  # ParameterDicts holding one tensor per adapter name

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, nn.Linear):
            raise peftmed.RecipeError(f"__SHORT__ wraps nn.Linear layers; got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.scale = nn.ParameterDict()

    def add_adapter(self, name: str, config: __CLS__Config, role: str) -> None:
        w = self.base_layer.weight
        self.scale[name] = nn.Parameter(torch.full((w.shape[0],), config.init, device=w.device, dtype=w.dtype))
        self.configs[name] = config
        self.roles[name] = role

    def merge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters:
            return
        with torch.no_grad():
            self.base_layer.weight.mul_(self.scale[name][:, None])
            if self.base_layer.bias is not None:
                self.base_layer.bias.mul_(self.scale[name])
        self.merged_adapters.append(name)

    def unmerge(self, name: str | None = None) -> None:
        name = name or (self.merged_adapters[-1] if self.merged_adapters else None)
        if name is None or name not in self.merged_adapters:
            return
        with torch.no_grad():
            self.base_layer.weight.div_(self.scale[name][:, None])
            if self.base_layer.bias is not None:
                self.base_layer.bias.div_(self.scale[name])
        self.merged_adapters.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if not self.uses(name):
            return self.base_layer(x)
        return self.base_layer(x) * self.scale[name].to(x.dtype)


class __CLS__(peftmed.Method):
    name = "__SHORT__"
    family = "inject"
    config_class = __CLS__Config
    default_roles = ("attn.v", "mlp.down")
    description = "__SHORT__: describe your method in one line"
    mergeable = True
    identity_at_init = True  # the conformance kit checks this promise
    layer_class = __CLS__Linear


@peftmed.hookimpl
def register_methods(register):
    register(__CLS__())
'''

METHOD_TEST = '''"""Runs peftmed's conformance kit on the __SHORT__ method, on every registered tiny backbone."""

from peftmed.testing import conformance_tests

Test__CLS__Conformance = conformance_tests(method_name="__SHORT__", options={})
'''

BACKBONE = '''"""__SHORT__-tiny: a peftmed backbone plugin (a model, its components and its role map).

Replace the model with yours; keep ``example_inputs`` so the conformance kit can run it, and keep the
role map in step with the module names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import peftmed


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.value(h) * torch.sigmoid(self.query(h))
        return x + self.down(F.gelu(self.up(h)))


class __CLS__Model(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2, image_size: int = 16, vocab: int = 32, classes: int = 3):
        super().__init__()
        self.encoder = nn.ModuleDict({"patch": nn.Linear(3 * 4 * 4, dim),
                                      "blocks": nn.ModuleList(Block(dim) for _ in range(layers))})
        self.text = nn.ModuleDict({"embed": nn.Embedding(vocab, dim),
                                   "blocks": nn.ModuleList(Block(dim) for _ in range(layers)),
                                   "out": nn.Linear(dim, classes)})
        self.image_size, self.vocab = image_size, vocab

    def forward(self, pixel_values, input_ids):
        img = self.encoder["patch"](F.unfold(pixel_values, 4, stride=4).transpose(1, 2))  # (B, N, C)
        for blk in self.encoder["blocks"]:
            img = blk(img)
        txt = self.text["embed"](input_ids) + img.mean(1, keepdim=True)
        for blk in self.text["blocks"]:
            txt = blk(txt)
        return self.text["out"](txt[:, 0])  # (B, classes)

    def example_inputs(self, batch: int = 2, seq: int = 5, generator=None):
        g = generator or torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, self.image_size, self.image_size, generator=g),
                torch.randint(0, self.vocab, (batch, seq), generator=g))


BACKBONE = peftmed.Backbone(
    name="__SHORT__-tiny",
    components={"vision": "encoder", "fusion": "text"},
    roles={"attn.q": r"\\.query$", "attn.v": r"\\.value$", "mlp.up": r"\\.up$", "mlp.down": r"\\.down$",
           "embed": (r"^patch$", r"^embed$"), "head": r"^out$"},  # norm is inferred
    builder=__CLS__Model,
    description="__SHORT__: describe your model in one line",
    tiny=True,
)


@peftmed.hookimpl
def register_backbones(register):
    register(BACKBONE)
'''

BACKBONE_TEST = '''"""Runs peftmed's conformance kit on the __SHORT__-tiny backbone (and a method on it)."""

from peftmed.testing import backbone_conformance_tests, conformance_tests

Test__CLS__Backbone = backbone_conformance_tests("__SHORT__-tiny")
TestLoraOn__CLS__ = conformance_tests("lora", {"r": 2}, backbones=("__SHORT__-tiny",))
'''

KERNEL = '''"""__SHORT__: a peftmed kernel plugin, an implementation of the ``layer_norm`` op.

It starts as the PyTorch reference; replace ``forward``/``backward`` with your fast code (same
signatures, see peftmed.kernels.layer_norm.reference). Its priority is below the built-ins, so
``impl="auto"`` prefers it only once you raise it; ``impl="__SHORT__"`` always selects it.
"""

from __future__ import annotations

import torch

import peftmed
from peftmed.kernels.layer_norm import reference
from peftmed.kernels.registry import KernelImpl


def forward(x, w, b, eps):
    return reference.forward(x, w, b, eps)


def backward(dy, x, w, mean, rstd, needs):
    return reference.backward(dy, x, w, mean, rstd, needs)


IMPL = KernelImpl(
    op="layer_norm", name="__SHORT__", priority=-10, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    loader=lambda: {"forward": forward, "backward": backward},
    description="__SHORT__: describe your implementation in one line",
)


@peftmed.hookimpl
def register_kernels(register):
    register(IMPL)
'''

KERNEL_TEST = '''"""Runs peftmed's conformance kit on the __SHORT__ implementation of layer_norm."""

from peftmed.testing import kernel_conformance_tests

Test__CLS__Kernel = kernel_conformance_tests("layer_norm", "__SHORT__")
'''

DATASET = '''"""__SHORT__: a peftmed dataset plugin (generated records; read your files in ``load``)."""

from __future__ import annotations

import peftmed
from peftmed.data import DatasetSpec, VQARecord


def load(split: str, data_dir=None, **options) -> list[VQARecord]:
    """Records of ``split``; qids must be unique (predictions are matched to answers by qid)."""
    n = 8 if split == "train" else 4
    return [
        VQARecord(qid=f"{split}-{i}", question=f"is there an abnormality in image {i}?",
                  answer="yes" if i % 2 else "no", answer_type="CLOSED", image=f"image_{i}.png",
                  image_id=f"image_{i}.png")
        for i in range(n)
    ]


SPEC = DatasetSpec(name="__SHORT__", description="__SHORT__: describe your dataset in one line", load=load,
                   splits=("train", "test"))


@peftmed.hookimpl
def register_datasets(register):
    register(SPEC)
'''

DATASET_TEST = '''"""Runs peftmed's conformance kit on the __SHORT__ dataset."""

from peftmed.testing import dataset_conformance_tests

Test__CLS__Dataset = dataset_conformance_tests("__SHORT__")
'''

FILES = {
    "method": (METHOD, METHOD_TEST),
    "backbone": (BACKBONE, BACKBONE_TEST),
    "kernel": (KERNEL, KERNEL_TEST),
    "dataset": (DATASET, DATASET_TEST),
}


def render(kind: str, names: dict[str, str]) -> dict[str, str]:
    """Relative path -> text of every file of a new ``kind`` plugin."""
    module, test = FILES[kind]
    subst = {"__SHORT__": names["short"], "__DIST__": names["distribution"], "__MODULE__": names["module"],
             "__CLS__": names["cls"], "__KIND__": kind}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    return {
        "pyproject.toml": fill(PYPROJECT),
        "README.md": fill(README),
        f"{names['module']}/__init__.py": fill(module),
        f"tests/test_{names['module']}.py": fill(test),
    }
